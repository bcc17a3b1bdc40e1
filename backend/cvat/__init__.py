"""CVAT integration: cvat-sdk auto-annotation function modules and nuclio serverless functions, all serving
the same :class:`segmodels.predictor.MaskPredictor` (see backend/cvat/README.md)."""
