"""The baselines of interactive segmentation that ``segmask evaluate`` (eval_interactive.py) and
``bench/bench_http.py`` set the model against: the filled GT box, and OpenCV GrabCut from the tight GT box.

Images are ``(H, W, 3) uint8 RGB``, masks ``bool (H, W)``, boxes float ``[x1, y1, x2, y2]`` in pixels with
exclusive right/bottom edges.
"""

from __future__ import annotations

import cv2
import numpy as np

from segmodels.geometry import mask_to_box
from segmodels.predictor import box_mask

GRABCUT_ITERATIONS = 5
# OpenCV's per-thread random generator seeds GrabCut's colour models: seeded on each call, so that the
# baseline's score does not depend on what ran before it.
GRABCUT_SEED = 0


def filled_box_mask(gt: np.ndarray) -> np.ndarray:
    """The baseline "filled GT box": every pixel of the tight box of ``gt`` (``(H, W)`` bool)."""
    height, width = gt.shape
    return box_mask(mask_to_box(gt), height, width, margin=0.0)


def grabcut_mask(image: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """OpenCV GrabCut from a rectangle: ``image (H, W, 3) uint8 RGB``, ``box`` xyxy pixels -> bool (H, W).

    ``GC_INIT_WITH_RECT``, :data:`GRABCUT_ITERATIONS` iterations; the mask is ``GC_FGD | GC_PR_FGD``. Returns
    None when the box leaves no background pixel to model (GrabCut refuses to start).
    """
    height, width = image.shape[:2]
    x1, y1 = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    x2, y2 = min(width, int(round(box[2]))), min(height, int(round(box[3])))
    if x1 == 0 and y1 == 0 and x2 == width and y2 == height:
        return None
    labels = np.zeros((height, width), np.uint8)
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    cv2.setRNGSeed(GRABCUT_SEED)
    cv2.grabCut(
        bgr,
        labels,
        (x1, y1, max(1, x2 - x1), max(1, y2 - y1)),
        background,
        foreground,
        GRABCUT_ITERATIONS,
        cv2.GC_INIT_WITH_RECT,
    )
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
