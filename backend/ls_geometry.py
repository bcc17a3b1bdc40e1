"""Label Studio coordinates <-> pixels: every conversion between the two happens here.

Label Studio gives region coordinates in percent of the image: ``x`` and ``width`` of its width, ``y`` and
``height`` of its height (origin top-left, ``x`` right, ``y`` down). Pixels are segmodels.geometry's edge
coordinates of a ``width x height`` image. A rectangle is ``x, y, width, height`` with a ``rotation`` in
degrees (clockwise on screen) about its top-left corner; Label Studio rotates it in pixels, so on a
non-square image the rotated corners can only be found knowing the image's aspect ratio.
"""

from __future__ import annotations

import math

import numpy as np

Box = tuple[float, float, float, float]


def points_to_percent(points_xy: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel ``(N, 2)`` ``(x, y)`` points to Label Studio ``(N, 2)`` percent of the image width and height."""
    return np.asarray(points_xy, dtype=np.float64) / np.array([width, height]) * 100.0


def percent_to_points(points_percent: np.ndarray, width: int, height: int) -> np.ndarray:
    """Label Studio ``(N, 2)`` percent points to pixels; the inverse of :func:`points_to_percent`."""
    return np.asarray(points_percent, dtype=np.float64) * np.array([width, height]) / 100.0


def rectangle_pixel_box(
    x: float, y: float, w: float, h: float, degrees: float, width: int, height: int
) -> Box:
    """Axis-aligned ``(x1, y1, x2, y2)`` pixels around a percent rectangle on a ``width x height`` image,
    clipped to the image."""
    x1, y1, x2, y2 = _rotated_bounds(
        x * width / 100, y * height / 100, w * width / 100, h * height / 100, degrees, 1.0
    )
    return max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))


def rectangle_percent_box(
    x: float, y: float, w: float, h: float, degrees: float = 0.0, size: tuple[float, float] | None = None
) -> Box:
    """Axis-aligned ``(x1, y1, x2, y2)`` percent around a percent rectangle, clipped to ``[0, 100]``.

    ``size`` is the image's ``(width, height)`` in pixels (any scale); it is needed only when ``degrees``
    is not 0, and a ValueError without it then.
    """
    if degrees and size is None:
        raise ValueError("a rotated rectangle needs the image size")
    aspect = size[1] / size[0] if degrees else 1.0
    x1, y1, x2, y2 = _rotated_bounds(x, y, w, h, degrees, aspect)
    return max(x1, 0.0), max(y1, 0.0), min(x2, 100.0), min(y2, 100.0)


def _rotated_bounds(x: float, y: float, w: float, h: float, degrees: float, aspect: float) -> Box:
    """``(x1, y1, x2, y2)`` around a ``w x h`` rectangle at top-left ``(x, y)`` rotated by ``degrees`` about
    that corner, in units where one unit of ``y`` is ``aspect`` units of ``x`` long (1 for pixels, the
    image's height / width for percent); not clipped. An unrotated rectangle gives exactly ``x + w, y + h``.
    """
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [
        (x + dx * cos - dy * aspect * sin, y + dx / aspect * sin + dy * cos)
        for dx, dy in ((0, 0), (w, 0), (0, h), (w, h))
    ]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return min(xs), min(ys), max(xs), max(ys)
