"""The click head: a prompt-conditioned mask decoder for corrective clicks (in the spirit of RITM, Sofiiuk et
al. 2021), over the shared trunk's taps.

Input geometry: a ``CROP`` = 192 px square crop of the image around the object (the predictor's zoom-in
window, see :func:`zoom_window`), the trunk's taps of that crop, and three prompt maps over the same crop:
positive clicks, negative clicks (disks of ``CLICK_RADIUS`` px) and the previous mask (probability in [0, 1],
zero before the first prediction). Output: mask logits ``(N, 96, 96)`` over the whole crop (stride 2).

The decoder runs top-down as SharpMask does (s16 -> s8 -> s4 -> s2); the prompt maps are fed at every level
(max-pooled, so a click is never lost to downsampling), and the s16 level has dilated convolutions whose
receptive field spans the whole crop, so one click can decide pixels anywhere in the object.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CROP = 192
OUT_STRIDE = 2
CLICK_RADIUS = 5
# The zoom-in window: the object's (or the prompt's) larger side spans this share of the crop.
OBJECT_SHARE = 0.67
MIN_WINDOW_PX = 48.0
PROMPT_CHANNELS = 3
LEVELS = ("s16", "s8", "s4", "s2")


def _block(c_in: int, c_out: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(c_out), nn.ReLU(True)
    )


class ClickHead(nn.Module):
    """Mask logits for a crop from its trunk taps and prompt maps.

    ``tap_channels``: the trunk's channels per tap; ``width``: channels at s16, halved at every finer level.
    """

    def __init__(self, tap_channels: dict[str, int], width: int = 96) -> None:
        super().__init__()
        widths = [width, width // 2, width // 4, width // 8]
        self.entry = _block(tap_channels["s16"] + PROMPT_CHANNELS, width)
        self.context = nn.Sequential(*(_block(width, width, d) for d in (2, 4, 2)))
        self.up = nn.ModuleList(
            nn.Sequential(
                _block(w_in + tap_channels[tap] + PROMPT_CHANNELS, w_out),
                _block(w_out, w_out),
            )
            for tap, w_in, w_out in zip(LEVELS[1:], widths[:-1], widths[1:], strict=True)
        )
        self.out = nn.Conv2d(widths[-1], 1, 1)

    def forward(self, taps: dict[str, torch.Tensor], prompts: torch.Tensor) -> torch.Tensor:
        """``taps[t]``: ``(N, C_t, 192/s, 192/s)`` of the crop; ``prompts``: ``(N, 3, 192, 192) float32`` in
        [0, 1] (positive disks, negative disks, previous mask) -> ``(N, 96, 96)`` mask logits."""
        x = self.entry(torch.cat([taps["s16"], _pool_to(prompts, taps["s16"])], 1))
        x = x + self.context(x)
        for tap, module in zip(LEVELS[1:], self.up, strict=True):
            skip = taps[tap]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = module(torch.cat([x, skip, _pool_to(prompts, skip)], 1))
        return self.out(x)[:, 0]


def _pool_to(prompts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Click disks max-pooled (never lost), the previous mask average-pooled, to ``like``'s size."""
    h, w = like.shape[-2:]
    size = (h, w)
    clicks = F.adaptive_max_pool2d(prompts[:, :2], size)
    previous = F.adaptive_avg_pool2d(prompts[:, 2:], size)
    return torch.cat([clicks, previous], 1)


def click_maps(points: np.ndarray, labels: np.ndarray, size: int = CROP) -> np.ndarray:
    """``(2, size, size) float32`` disks of :data:`CLICK_RADIUS` px around crop-pixel ``points (N, 2)``
    (x, y): channel 0 for ``labels == 1`` (positive), channel 1 for the others (negative)."""
    maps = np.zeros((2, size, size), np.float32)
    centres = np.arange(size) + 0.5
    for (x, y), label in zip(points, labels, strict=True):
        near = ((centres[None, :] - x) ** 2 + (centres[:, None] - y) ** 2) <= CLICK_RADIUS**2
        maps[0 if label == 1 else 1][near] = 1.0
    return maps


def zoom_window(
    region: np.ndarray | None, points: np.ndarray, share: float = OBJECT_SHARE
) -> tuple[tuple[float, float], float]:
    """The zoom-in crop for a prompt: centre ``(x, y)`` image pixels and scale (crop px per image px).

    ``region``: xyxy image-pixel box of the current mask (or None); ``points (N, 2)``: every click so far.
    The crop is centred on the box covering both, whose larger side (at least :data:`MIN_WINDOW_PX`) spans
    ``share`` of the :data:`CROP` px crop.
    """
    boxes = [np.concatenate([points.min(0), points.max(0)])] if len(points) else []
    if region is not None:
        boxes.append(np.asarray(region, np.float64))
    if not boxes:
        raise ValueError("a zoom window needs a region or at least one point")
    stack = np.stack(boxes)
    x0, y0 = stack[:, :2].min(0)
    x1, y1 = stack[:, 2:].max(0)
    side = max(x1 - x0, y1 - y0, MIN_WINDOW_PX)
    return ((x0 + x1) / 2, (y0 + y1) / 2), share * CROP / side


def crop_points(points: np.ndarray, centre: tuple[float, float], scale: float) -> np.ndarray:
    """Image-pixel points ``(N, 2)`` in the coordinates of the crop of :func:`zoom_window`."""
    return (np.asarray(points, np.float64).reshape(-1, 2) - np.array(centre)) * scale + CROP / 2
