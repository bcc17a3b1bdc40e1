"""Nuclio detector handler (CVAT "Automatic annotation"): image -> labelled masks/polygons.

Request ``{"image": base64, "threshold"?: float}``; response a list of ``{"label", "type", "points",
"mask"?, "confidence": "0.9312", "attributes": []}`` (formats in backend/cvat/shapes.py). ``threshold``
defaults to ``SEGMASK_SCORE_THRESHOLD`` (0.5); ``SEGMASK_CVAT_SHAPE`` picks "mask" (default) or "polygon"
items and must match the ``type`` in function.yaml's spec.
"""

import os

from backend.cvat.nuclio_io import max_base64_chars, serve
from backend.cvat.runtime import decode_base64_image, shared_segmenter
from backend.cvat.shapes import nuclio_detection_items
from backend.errors import bad_request


def init_context(context):
    """Load the model once per worker into ``context.user_data``."""
    context.user_data.segmenter = shared_segmenter()
    context.user_data.shape_type = os.environ.get("SEGMASK_CVAT_SHAPE", "mask")
    context.logger.info(f"segmask detector ready ({len(context.user_data.segmenter.classes)} classes)")


def handler(context, event):
    def answer(body: dict) -> list[dict]:
        image = decode_base64_image(body.get("image"), max_base64_chars())
        threshold = body.get("threshold")
        if threshold is not None and not (isinstance(threshold, int | float) and 0 <= threshold <= 1):
            raise bad_request(f"'threshold' must be a number in [0, 1], got {threshold!r}")
        detections = context.user_data.segmenter.detect(image, threshold)
        return nuclio_detection_items(detections, context.user_data.shape_type)

    return serve(context, event, answer)
