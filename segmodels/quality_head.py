"""The quality head: the predicted IoU of a dense DeepMask window's mask with the object under a click (as
SAM predicts the IoU of each of its masks), which ranks a first click's candidate windows instead of
objectness.

Input per candidate window: its DeepMask embedding ``(512,)`` and the :data:`FEATURES` of the click and of
the window's coarse (56 x 56) DeepMask mask (:func:`window_features`). Output: the predicted IoU in [0, 1]
of the window's mask, thresholded as the click path thresholds it (SharpMask-refined when the checkpoint
refines), with the object under the click.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torch import nn

# The cheap features, in this order (window sides are the window box's, in image pixels).
FEATURES = (
    "click_x",  # the click's offset from the window centre, in window sides ([-0.5, 0.5] inside)
    "click_y",
    "log2_scale",  # the window's scale: trunk-input pixels per image pixel
    "log2_window_share",  # the window side over the image's larger side
    "inside_image",  # the share of the window inside the image
    "objectness",  # DeepMask's objectness logit
    "click_probability",  # the mask probability at the click
    "area_share",  # the share of the window above the threshold
    "confidence",  # the window's mean |2p - 1|
    "border_share",  # the share of the window's outermost ring above the threshold
    "component_share",  # the share of the mask in the click's connected part (0 when the click is off it)
    "centroid_x",  # the mask centroid's offset from the click, in window sides (0 for an empty mask)
    "centroid_y",
)


class QualityHead(nn.Module):
    """A small MLP over ``(embedding, features)``; the inputs are standardised by the ``shift`` and ``scale``
    buffers, fitted on the training inputs (:meth:`standardise`) and stored with the weights."""

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, embed_dim: int = 512, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        width = embed_dim + len(FEATURES)
        self.register_buffer("shift", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 1),
        )

    def standardise(self, embeddings: torch.Tensor, features: torch.Tensor) -> None:
        """Set ``shift`` and ``scale`` to the mean and standard deviation of training inputs ``(N, 512)`` and
        ``(N, F)``."""
        x = torch.cat([embeddings, features], 1).float()
        self.shift.copy_(x.mean(0))
        self.scale.copy_(x.std(0).clamp_min(1e-6))

    def logits(self, embeddings: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``(N, 512)`` embeddings and ``(N, F)`` features -> ``(N,)`` logits of the predicted IoU."""
        x = (torch.cat([embeddings, features], 1) - self.shift) / self.scale
        return self.mlp(x)[:, 0]

    def forward(self, embeddings: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``(N, 512)`` embeddings and ``(N, F)`` features -> ``(N,)`` predicted IoU in [0, 1]."""
        return torch.sigmoid(self.logits(embeddings, features))


def window_features(
    logits: np.ndarray,
    box: np.ndarray,
    point: np.ndarray,
    scale: float,
    objectness: float,
    image_size: tuple[int, int],
    threshold_logit: float,
) -> np.ndarray:
    """The :data:`FEATURES` ``(F,) float32`` of one candidate window.

    ``logits``: ``(S, S)`` mask logits over the window ``box`` (xyxy image pixels); ``point``: the click
    ``(x, y)`` in image pixels; ``scale``: trunk-input pixels per image pixel; ``objectness``: the window's
    objectness logit; ``image_size``: ``(H, W)``; ``threshold_logit``: the click path's mask threshold.
    """
    s = logits.shape[0]
    side_x, side_y = float(box[2] - box[0]), float(box[3] - box[1])
    u, v = (point[0] - box[0]) / side_x, (point[1] - box[1]) / side_y
    height, width = image_size
    overlap_x = max(0.0, min(box[2], width) - max(box[0], 0.0))
    overlap_y = max(0.0, min(box[3], height) - max(box[1], 0.0))
    probability = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    mask = logits > threshold_logit
    row, col = min(max(math.floor(v * s), 0), s - 1), min(max(math.floor(u * s), 0), s - 1)
    ring = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    area = int(mask.sum())
    component, centroid = 0.0, (0.0, 0.0)
    if area:
        _, parts = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        component = float((parts == parts[row, col]).sum()) / area if mask[row, col] else 0.0
        ys, xs = np.nonzero(mask)
        centroid = ((xs.mean() + 0.5) / s - u, (ys.mean() + 0.5) / s - v)
    return np.array(
        [
            u - 0.5,
            v - 0.5,
            math.log2(scale),
            math.log2(side_x / max(height, width)),
            overlap_x * overlap_y / (side_x * side_y),
            objectness,
            probability[row, col],
            area / s**2,
            np.abs(2.0 * probability - 1.0).mean(),
            ring.mean(),
            component,
            *centroid,
        ],
        np.float32,
    )
