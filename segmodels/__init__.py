"""segmask's vision library: DeepMask proposals, SharpMask refinement, MultiPathNet labels and a click
head, served through a small stateful predictor (PyTorch and numpy only)::

    from segmodels import load_predictor

    predictor = load_predictor()  # the shipped model; or load_predictor("path/to/checkpoint", "cuda")
    predictor.set_image(image)  # (H, W, 3) uint8 RGB
    mask = predictor.segment(points=[[120.0, 80.0]], labels=[1])  # pixel (x, y); 1 positive, 0 negative
    detections = predictor.detect(score_threshold=0.5, max_detections=10)
"""

from segmodels.predictor import Detection, Mask, MaskPredictor, load_predictor

__all__ = ["Detection", "Mask", "MaskPredictor", "load_predictor"]
