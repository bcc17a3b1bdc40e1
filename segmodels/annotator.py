"""The simulated annotator of interactive segmentation (the RITM / f-BRS protocol), used by evaluation,
fine-tuning, benchmarks and the click head's training.

The first click goes at the interior point of the object farthest from its boundary; each next click goes at
the point farthest from the boundary of the larger error region: positive in a missed part (false negative),
negative in a spurious part (false positive). "Larger" compares the two regions' largest distances to their
boundaries, as RITM does. Masks are ``bool (H, W)``; points ``(x, y)`` in pixel edge coordinates (pixel (r, c)
has its centre at ``(c + 0.5, r + 0.5)``). The image border counts as boundary.
"""

from __future__ import annotations

import cv2
import numpy as np


def boundary_distance(mask: np.ndarray) -> np.ndarray:
    """``(H, W) float32``: each set pixel's Euclidean distance to the nearest unset pixel or the border."""
    padded = np.pad(mask.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def deepest_point(distance: np.ndarray) -> tuple[float, float]:
    """The centre ``(x, y)`` of the pixel where ``distance`` peaks (the first one in row order)."""
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(col) + 0.5, float(row) + 0.5


def click_point(mask: np.ndarray) -> tuple[float, float]:
    """The interior point of a non-empty mask farthest from its boundary: the first click."""
    return deepest_point(boundary_distance(mask))


def annotator_clicks(gt: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n + 1, 2)`` points ``(x, y)`` where people click on ``gt (H, W) bool``: first its deepest point
    (:func:`click_point`), then ``n`` random pixel centres at least a third as far from its boundary."""
    depth = boundary_distance(gt)
    rows, cols = np.nonzero(depth >= depth.max() / 3)
    k = rng.integers(len(rows), size=n)
    interior = np.stack([cols[k] + 0.5, rows[k] + 0.5], axis=1)
    return np.concatenate([[deepest_point(depth)], interior]).astype(np.float64)


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[tuple[float, float], int] | None:
    """The next corrective click for ``pred`` vs ``gt``: ``((x, y), label)`` with label 1 (positive, in
    ``gt & ~pred``) or 0 (negative, in ``pred & ~gt``); None when they agree. A tie goes to the positive."""
    missed = boundary_distance(gt & ~pred)
    spurious = boundary_distance(pred & ~gt)
    depth_missed, depth_spurious = float(missed.max()), float(spurious.max())
    if depth_missed == 0 and depth_spurious == 0:
        return None
    if depth_missed >= depth_spurious:
        return deepest_point(missed), 1
    return deepest_point(spurious), 0
