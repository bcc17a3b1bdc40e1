"""A model mask as one object of a job result: a polygon in percent of the image, or Label Studio's brush
RLE at the original image's size."""

from __future__ import annotations

import time

import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from backend.ls_geometry import points_to_percent
from backend.working_size import WorkingFeatures
from segmodels.geometry import mask_to_polygon


def encode_mask(
    mask: np.ndarray, score: float, output: str | None, scaled: WorkingFeatures, seconds: dict
) -> dict:
    """A working-size bool ``(h, w)`` mask as ``{"score", "polygon": [[x%, y%]]}`` or ``{"score", "rle"}``
    (``output`` "brush": Label Studio brush RLE at the original size); {} if empty. Adds the seconds spent
    to ``seconds["encode"]``."""
    started = time.perf_counter()
    try:
        if not mask.any():
            return {}
        if output == "brush":
            return {"score": float(score), "rle": brush_rle(scaled.mask_to_original(mask))}
        polygon = mask_to_polygon(mask)
        if polygon is None or len(polygon) < 3:
            return {}
        work = scaled.features
        pct = np.clip(points_to_percent(polygon, work.width, work.height), 0.0, 100.0)
        return {"score": float(score), "polygon": np.round(pct, 3).tolist()}
    finally:
        seconds["encode"] = seconds.get("encode", 0.0) + time.perf_counter() - started


def brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush RLE (RGBA, alpha 255 inside) of a bool ``(H, W)`` mask."""
    return [int(v) for v in mask2rle(mask.astype(np.uint8) * 255)]
