"""DeepMask heads over a stride-16 trunk (the released "DeepMask-ours" design, see docs/papers.md).

Window geometry, in pixels of the (rescaled) network input:
- a window is ``WINDOW`` = 160 px; the trunk sees ``INPUT`` = 192 px, i.e. ``CONTEXT`` = 16 px per side;
- a canonical object's larger bbox side is ``OBJECT`` = 92 px, centred in the window;
- the stride-16 map of a 192 px input is 12x12; the heads crop 1 cell per side and see 10x10 cells.

Fully convolutional: on a trunk map of (h, w) cells, output cell (i, j) is the window whose 192 px input
starts at pixel (16 j, 16 i) of the trunk input, i.e. whose centre is at (16 j + 96, 16 i + 96).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WINDOW = 160
INPUT = 192
CONTEXT = (INPUT - WINDOW) // 2
OBJECT = math.ceil(WINDOW * 128 / 224)
STRIDE = 16
CELLS = WINDOW // STRIDE
MASK_SIZE = 56
SCORE_LOSS_WEIGHT = 1.0 / 32


class DeepMask(nn.Module):
    """Shared window embedding with a mask head and an objectness head.

    ``reduce`` is the paper's 1x1 bottleneck before the shared window linear; the paper's 128 channels
    follow a 1024-channel ResNet map, and MobileNetV2's stride-16 map has only 96, so the default keeps a
    3x reduction (32 channels). At 128 channels the 10x10 window linear alone costs ~33 GMAC on a 7-scale
    pyramid of a 640x480 image (about 0.7 s on two CPU cores).
    """

    def __init__(self, in_channels: int, reduce_channels: int = 32, embed_dim: int = 512) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, reduce_channels, 1), nn.ReLU(inplace=True))
        # A CELLS x CELLS "valid" convolution is the paper's Linear(reduce * 10 * 10 -> 512), per window.
        self.embed = nn.Conv2d(reduce_channels, embed_dim, CELLS)
        self.mask_head = nn.Linear(embed_dim, MASK_SIZE * MASK_SIZE)
        self.score_head = nn.Sequential(
            nn.Dropout(0.5),
            nn.Conv2d(embed_dim, 1024, 1),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Conv2d(1024, 1, 1),
        )
        self.embed_dim = embed_dim

    def embedding(self, f16: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` stride-16 features -> ``(B, 512, h - 11, w - 11)`` window embeddings."""
        return self.embed(self.reduce(f16[:, :, 1:-1, 1:-1]))

    def score(self, embedding: torch.Tensor) -> torch.Tensor:
        """``(B, 512, h, w)`` -> ``(B, h, w)`` objectness logits."""
        return self.score_head(embedding)[:, 0]

    def mask(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(N, 512)`` window embeddings -> ``(N, 56, 56)`` mask logits over the central 160 px window."""
        return self.mask_head(vectors).view(-1, MASK_SIZE, MASK_SIZE)

    def forward(self, f16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training form on 192 px crops: ``(B, C, 12, 12)`` ->
        mask logits ``(B, 56, 56)``, score logits ``(B,)``, embeddings ``(B, 512)``."""
        emb = self.embedding(f16)
        if emb.shape[-2:] != (1, 1):
            raise ValueError(f"forward expects 192 px crops (12x12 cells), got {tuple(f16.shape[-2:])}")
        vec = emb.flatten(1)
        return self.mask(vec), self.score(emb).flatten(), vec


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logistic loss of ``(B, S, S)`` mask logits against a ``(B, T, T)`` {0, 1} 160 px window target."""
    if target.shape[-1] != logits.shape[-1]:
        target = F.interpolate(target[:, None], size=logits.shape[-2:], mode="area")[:, 0]
        target = (target >= 0.5).float()
    return F.binary_cross_entropy_with_logits(logits, target)


def score_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logistic objectness loss, weighted 1/32 as in the paper. ``labels`` in {0, 1}."""
    return SCORE_LOSS_WEIGHT * F.binary_cross_entropy_with_logits(logits, labels)
