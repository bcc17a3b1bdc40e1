"""Bounded working resolution: the model sees an image at most ``SEGMASK_MAX_WORK_SIDE`` px on its longest
side, and answers in the original image's coordinates.

Why: the trunk runs over a pyramid up to 2^0.5 times the image, so its time and memory grow with the pixel
count (a 7000x7000 image drove a worker past 12 GB), and so does every per-click step on a full-image mask;
the model was trained on COCO images of at most 640 px and finds objects from a few hundred pixels.

Coordinates: *original* pixels are the decoded image's (Label Studio's ``original_width x original_height``,
what CVAT sends); *working* pixels are the downscaled image's. Both are edge coordinates (pixel ``i`` spans
``[i, i + 1)``, segmodels.geometry), so a point scales by the ratio of the sizes; percent coordinates are the
same in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from segmodels.geometry import mask_to_polygons
from segmodels.predictor import Detection, ImageFeatures


def working_shape(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``(w, h)`` working size of a ``width x height`` image: unchanged when its longest side is at most
    ``max_side``, else scaled (aspect kept, rounded, at least 1 px) to a longest side of ``max_side``."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def mask_polygons(mask: np.ndarray, max_side: int, max_parts: int = 4) -> list[np.ndarray]:
    """:func:`segmodels.geometry.mask_to_polygons` of a bool ``(H, W)`` mask, in its pixels, traced on the
    mask brought to its working size (area-averaged, then rounded): a mask the model made at that size holds
    no finer detail, and tracing a 49 MP mask would take seconds."""
    height, width = mask.shape
    size = working_shape(width, height, max_side)
    if size == (width, height):
        return mask_to_polygons(mask, max_parts=max_parts)
    small = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_AREA).view(bool)
    scale = np.array([width / size[0], height / size[1]], np.float32)
    return [polygon * scale for polygon in mask_to_polygons(small, max_parts=max_parts)]


def working_image(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` ``(H, W, 3) uint8`` at its working size ``(h, w, 3)``: area-averaged (no aliasing) when it
    is larger, the same array otherwise."""
    height, width = image.shape[:2]
    size = working_shape(width, height, max_side)
    if size == (width, height):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class WorkingFeatures:
    """An image's trunk features, computed on its working-size image, and its original ``width x height``:
    what the feature caches keep (``nbytes``: the features' bytes)."""

    features: ImageFeatures
    width: int
    height: int

    @property
    def nbytes(self) -> int:
        return self.features.nbytes

    @property
    def scale(self) -> np.ndarray:
        """``(2,)`` working pixels per original pixel along x and y."""
        return np.array([self.features.width / self.width, self.features.height / self.height])

    @property
    def downscaled(self) -> bool:
        return (self.features.width, self.features.height) != (self.width, self.height)

    def points_to_working(self, points: np.ndarray) -> np.ndarray:
        """``(N, 2)`` original-pixel ``(x, y)`` -> working pixels."""
        return np.asarray(points, np.float64).reshape(-1, 2) * self.scale

    def box_to_working(self, box: np.ndarray) -> np.ndarray:
        """``[x1, y1, x2, y2]`` original pixels -> working pixels."""
        return np.asarray(box, np.float64).reshape(4) * np.tile(self.scale, 2)

    def mask_to_original(self, mask: np.ndarray) -> np.ndarray:
        """Bool ``(h, w)`` working mask -> bool ``(H, W)`` original mask: each original pixel takes the value
        of the working pixel its centre falls in (nearest neighbour, centre-aligned). Only the mask's tight
        box is written, so the zero pages of a small object's large mask take no memory."""
        if not self.downscaled:
            return mask
        out = np.zeros((self.height, self.width), bool)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not len(rows):
            return out
        src_y, y0, y1 = _sources(rows[0], rows[-1] + 1, mask.shape[0], self.height)
        src_x, x0, x1 = _sources(cols[0], cols[-1] + 1, mask.shape[1], self.width)
        out[y0:y1, x0:x1] = mask[np.ix_(src_y, src_x)]
        return out

    def detection_to_original(self, detection: Detection) -> Detection:
        """``detection`` with its mask and box in original pixels."""
        if not self.downscaled:
            return detection
        return Detection(
            detection.label,
            detection.class_id,
            detection.score,
            self.mask_to_original(detection.mask),
            (detection.box / np.tile(self.scale, 2)).astype(detection.box.dtype),
        )


def _sources(start: int, stop: int, work: int, original: int) -> tuple[np.ndarray, int, int]:
    """Along one axis: the original pixels ``[first, last)`` whose centres fall in working pixels ``[start,
    stop)``, and the working pixel each of them takes."""
    source = (2 * np.arange(original) + 1) * work // (2 * original)  # floor((i + 0.5) * work / original)
    first, last = np.searchsorted(source, [start, stop])
    return source[first:last], int(first), int(last)
