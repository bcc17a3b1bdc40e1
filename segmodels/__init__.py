"""segmask's vision library: DeepMask proposals, SharpMask refinement, MultiPathNet labels and a click
head, served through a small stateful predictor (PyTorch and numpy only)::

    from segmodels import load_predictor

    predictor = load_predictor()  # the shipped model; or load_predictor("path/to/checkpoint", "cuda")
    predictor.set_image(image)  # (H, W, 3) uint8 RGB
    mask = predictor.segment(points=[[120.0, 80.0]], point_labels=[1])  # pixel (x, y); 1 positive, 0 negative
    detections = predictor.detect(score_threshold=0.5, max_detections=10)

The public names load on first use, so a process that only needs the torch-free modules (the checkpoint
format, the model store, the data split) never imports PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segmodels.predictor import Detection, Mask, MaskPredictor, load_predictor

__all__ = ["Detection", "Mask", "MaskPredictor", "load_predictor"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("segmodels.predictor"), name)
    raise AttributeError(f"module 'segmodels' has no attribute {name!r}")
