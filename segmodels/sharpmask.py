"""SharpMask: top-down refinement of a DeepMask window over the trunk taps (docs/papers.md).

``M(i+1) = R_i(M_i, F_i)``: a horizontal 3x3 conv on the skip tap F_i and a vertical 3x3 conv on the
current mask encoding M_i, summed, ReLU, then x2 upsampling. Taps from coarse to fine: s16 (10x10 cells
per window), s8 (20), s4 (40), s2 (80); the last module ends at 160x160, one logit per window pixel.
Trained with DeepMask (and the trunk) frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segmodels.backbones import TAP_STRIDES
from segmodels.deepmask import CELLS, WINDOW

REFINE_TAPS = ("s16", "s8", "s4", "s2")


class RefinementModule(nn.Module):
    """One top-down step: ``(B, k_in, n, n)`` encoding + ``(B, C, n, n)`` skip -> ``(B, k_out, 2n, 2n)``."""

    def __init__(self, skip_channels: int, k_in: int, k_s: int, k_out: int) -> None:
        super().__init__()
        self.horizontal = nn.Sequential(nn.Conv2d(skip_channels, k_s, 3, padding=1), nn.ReLU(inplace=True))
        self.vertical = nn.Sequential(nn.Conv2d(k_in, k_s, 3, padding=1), nn.ReLU(inplace=True))
        self.merge = nn.Conv2d(k_s, k_out, 3, padding=1)

    def forward(self, m: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.horizontal(skip) + self.vertical(m))
        return F.interpolate(self.merge(x), scale_factor=2, mode="bilinear", align_corners=False)


class SharpMask(nn.Module):
    """Refines a window embedding into ``(N, 160, 160)`` mask logits.

    ``k`` holds k_m = k_s per module, halving from 32 as in the paper (32, 16, 8, 4).
    """

    def __init__(
        self, tap_channels: dict[str, int], embed_dim: int = 512, k: tuple[int, ...] = (32, 16, 8, 4)
    ):
        super().__init__()
        if len(k) != len(REFINE_TAPS):
            raise ValueError(f"need one k per refinement tap {REFINE_TAPS}, got {k}")
        self.k0 = k[0]
        self.vertical0 = nn.Linear(embed_dim, k[0] * CELLS * CELLS)
        outs = list(k[1:]) + [k[-1]]
        self.refine = nn.ModuleList(
            RefinementModule(tap_channels[t], k_in, k_in, k_out)
            for t, k_in, k_out in zip(REFINE_TAPS, k, outs, strict=True)
        )
        self.out = nn.Conv2d(k[-1], 1, 3, padding=1)

    def forward(self, embedding: torch.Tensor, skips: dict[str, torch.Tensor]) -> torch.Tensor:
        """``embedding (N, 512)``; ``skips[t]``: the window's crop of tap t, ``(N, C_t, 160/s, 160/s)``."""
        m = F.relu(self.vertical0(embedding)).view(-1, self.k0, CELLS, CELLS)
        for tap, module in zip(REFINE_TAPS, self.refine, strict=True):
            m = module(m, skips[tap])
        return self.out(m)[:, 0]


def window_skips(
    taps: dict[str, torch.Tensor], batch: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Crop each tap to the central 160 px window of dense window cells ``(batch[n], rows[n], cols[n])``.

    ``taps[t]`` is ``(B, C, H/stride, W/stride)``; window (i, j) covers trunk-input pixels
    ``[16 i + 16, 16 i + 176)`` x ``[16 j + 16, 16 j + 176)`` (see deepmask.py). On 192 px training crops
    the only window is (0, 0). Returns ``{t: (N, C, 160/stride, 160/stride)}`` float32 (taps stored at a lower
    precision are widened here, after the gather, so that only the window's cells are converted).
    """
    out = {}
    for tap in REFINE_TAPS:
        stride = TAP_STRIDES[tap]
        size = WINDOW // stride
        offsets = torch.arange(size, device=rows.device)
        ys = ((16 * rows + 16) // stride)[:, None] + offsets
        xs = ((16 * cols + 16) // stride)[:, None] + offsets
        # One gather: (N, size, size, C), which is already channels-last for the refinement convs.
        crops = taps[tap].permute(0, 2, 3, 1)[batch[:, None, None], ys[:, :, None], xs[:, None, :]]
        out[tap] = crops.permute(0, 3, 1, 2).float()
    return out
