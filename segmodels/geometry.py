"""Mask, polygon, box and RLE geometry shared by the models and the Label Studio backend.

PyTorch-free on purpose (numpy, OpenCV and pycocotools only) so it can be used and tested without a model.

Conventions used throughout:

- images are ``(H, W, 3)`` uint8 RGB arrays;
- masks are ``(H, W)`` bool arrays;
- points are ``(x, y)`` in pixels, in pixel EDGE coordinates: ``(0, 0)`` is the top-left corner of the
  top-left pixel and pixel ``(row r, column c)`` has its centre at ``(c + 0.5, r + 0.5)``;
- boxes are float ``[x1, y1, x2, y2]`` in pixels with exclusive right/bottom edges, so a mask covering
  columns 0..9 has ``x1 = 0`` and ``x2 = 10``;
- a polygon covers the pixels whose centres lie inside it, which is how COCO rasterises polygons
  (pycocotools), so masks drawn here match COCO evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    "box_iou_xyxy",
    "coco_segmentation_to_mask",
    "mask_iou",
    "mask_to_box",
    "mask_to_polygon",
    "mask_to_polygons",
    "mask_to_rle",
    "masks_iou_matrix",
    "polygon_to_mask",
    "polygons_to_mask",
    "rle_to_mask",
]


def polygon_to_mask(polygon_xy: np.ndarray | Sequence[float], height: int, width: int) -> np.ndarray:
    """Rasterise one polygon given in pixel edge coordinates to a ``(height, width)`` bool mask.

    ``polygon_xy`` is an ``(N, 2)`` array of ``(x, y)`` vertices or a flat COCO-style list
    ``[x1, y1, x2, y2, ...]``. A pixel is set when its centre lies inside the polygon. Fewer than three
    vertices give an empty mask.
    """
    flat = np.asarray(polygon_xy, dtype=np.float64).reshape(-1)
    # pycocotools would read a 4-number list as a box, so degenerate polygons are handled here.
    if flat.size < 6:
        return np.zeros((height, width), dtype=bool)
    rle = mask_utils.frPyObjects([flat.tolist()], height, width)[0]
    return mask_utils.decode(rle).astype(bool)


def polygons_to_mask(polygons: Sequence[np.ndarray | Sequence[float]], height: int, width: int) -> np.ndarray:
    """Union of :func:`polygon_to_mask` over several polygons (an empty list gives an empty mask)."""
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        mask |= polygon_to_mask(polygon, height, width)
    return mask


def _outlines(mask: np.ndarray) -> list[np.ndarray]:
    """Outer boundaries of the 8-connected parts of ``mask``, as float32 (N, 2) edge-coordinate polygons.

    cv2.findContours returns centres of boundary pixels, and a polygon through them loses half a pixel on
    every side. Tracing instead a grid of half-pixel points (pixel corners, edge midpoints and centres),
    where a point is set when it touches a mask pixel, puts the contour on the pixels' outer edges; the
    half-pixel resolution keeps parts separated by a one-pixel gap apart. Holes are not traced.
    """
    x0, y0, x1, y1 = mask_to_box(mask).astype(int)
    height, width = y1 - y0, x1 - x0
    crop = mask[y0:y1, x0:x1].astype(np.uint8)
    up = cv2.resize(crop, (2 * width, 2 * height), interpolation=cv2.INTER_NEAREST)
    # Grid point g along an axis sits at edge coordinate (g - 1) / 2 (the margin of one keeps border points
    # traceable by findContours) and touches the up-sampled pixels g - 2 and g - 1.
    grid = np.zeros((2 * height + 3, 2 * width + 3), dtype=np.uint8)
    grid[1:-2, 1:-2] = up
    grid[1:] = grid[1:] | grid[:-1]
    grid[:, 1:] = grid[:, 1:] | grid[:, :-1]
    contours, _ = cv2.findContours(grid, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(-1, -1))
    origin = np.array([x0, y0], dtype=np.float32)
    return [contour.reshape(-1, 2).astype(np.float32) / 2 + origin for contour in contours]


def _simplify(outline: np.ndarray, mask: np.ndarray, min_iou: float) -> np.ndarray:
    """Simplify one outline with the largest approxPolyDP epsilon that keeps IoU with ``mask`` >= min_iou.

    The IoU is measured against the mask pixels inside the outline, on the outline's bounding box. When
    holes already keep the exact outline below ``min_iou``, its own IoU becomes the target instead.
    """
    x0, y0 = np.floor(outline.min(axis=0)).astype(int)
    x1, y1 = np.ceil(outline.max(axis=0)).astype(int)
    height, width = y1 - y0, x1 - x0
    local = outline - np.array([x0, y0], dtype=np.float32)
    filled = polygon_to_mask(local, height, width)
    reference = mask[y0:y1, x0:x1] & filled
    target = min(min_iou, mask_iou(filled, reference))
    best, low, high = local, 0.0, max(height, width) / 2
    # The search assumes IoU falls as epsilon grows; only verified candidates are kept, so the result meets
    # the target even where that assumption fails.
    while high - low > 0.05:
        epsilon = (low + high) / 2
        candidate = cv2.approxPolyDP(local, epsilon, closed=True).reshape(-1, 2)
        if len(candidate) >= 3 and mask_iou(polygon_to_mask(candidate, height, width), reference) >= target:
            best, low = candidate, epsilon
        else:
            high = epsilon
    return best + np.array([x0, y0], dtype=np.float32)


def mask_to_polygons(
    mask: np.ndarray,
    min_iou: float = 0.95,
    max_parts: int = 4,
    min_part_area_fraction: float = 0.1,
) -> list[np.ndarray]:
    """Polygons outlining a bool mask, for annotators to edit: few vertices, IoU with the mask >= min_iou.

    Each polygon is a float32 ``(N, 2)`` array of ``(x, y)`` pixel edge coordinates, so
    :func:`polygons_to_mask` reproduces the mask closely. The largest part comes first; other separate
    parts follow, largest first, only when their area is at least ``min_part_area_fraction`` of the
    largest one, at most ``max_parts`` polygons in all. Holes are ignored (Label Studio polygons have
    none). Each outline is simplified with cv2.approxPolyDP using the largest epsilon (found by binary
    search) for which the rasterised polygon keeps IoU >= ``min_iou`` with that part of the mask (or, when
    holes make that unreachable, the IoU of the unsimplified outline). An empty mask gives ``[]``.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    outlines = sorted(_outlines(mask), key=cv2.contourArea, reverse=True)[:max_parts]
    largest_area = cv2.contourArea(outlines[0])
    kept = [o for o in outlines if cv2.contourArea(o) >= min_part_area_fraction * largest_area]
    return [_simplify(outline, mask, min_iou) for outline in kept]


def mask_to_polygon(mask: np.ndarray, min_iou: float = 0.95) -> np.ndarray | None:
    """The polygon of the largest part of ``mask`` (see :func:`mask_to_polygons`); None when empty."""
    polygons = mask_to_polygons(mask, min_iou=min_iou, max_parts=1)
    return polygons[0] if polygons else None


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of the same shape; 0.0 when both are empty."""
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 0.0


def masks_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(N, H, W)`` and ``(M, H, W)`` bool masks as an ``(N, M)`` float32 matrix.

    Pairs of empty masks get 0.
    """
    flat_a = a.reshape(len(a), -1).astype(np.float32)
    flat_b = b.reshape(len(b), -1).astype(np.float32)
    intersection = flat_a @ flat_b.T
    union = flat_a.sum(axis=1)[:, None] + flat_b.sum(axis=1)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight float32 box ``[x1, y1, x2, y2]`` of a bool mask, exclusive right/bottom; zeros when empty."""
    columns = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if columns.size == 0:
        return np.zeros(4, dtype=np.float32)
    return np.array([columns[0], rows[0], columns[-1] + 1, rows[-1] + 1], dtype=np.float32)


def scale_box(box: np.ndarray, factor: float) -> np.ndarray:
    """``box`` (xyxy) scaled by ``factor`` about its centre, in the same units."""
    box = np.asarray(box, np.float64)
    centre, half = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) / 2 * factor
    return np.concatenate([centre - half, centre + half])


def box_iou_xyxy(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (any one unit, e.g. pixels); 0.0 when the
    union is empty. COCO's ``[x, y, w, h]`` boxes need converting first."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE ``{"size": [H, W], "counts": str}`` of a bool mask, ready for JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Decode a COCO RLE dict to a bool mask.

    Accepts compressed RLE (``counts`` as str or bytes) and uncompressed RLE (``counts`` a list of ints).
    """
    height, width = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.decode(mask_utils.frPyObjects(rle, height, width)).astype(bool)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return mask_utils.decode({"size": [height, width], "counts": counts}).astype(bool)


def coco_segmentation_to_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Bool mask of a COCO annotation's ``segmentation``, rasterised as COCO evaluation does.

    ``segmentation`` is a list of flat polygons (their union is taken) or an RLE dict, compressed or
    uncompressed.
    """
    if isinstance(segmentation, dict):
        return rle_to_mask(segmentation)
    return polygons_to_mask(segmentation, height, width)
