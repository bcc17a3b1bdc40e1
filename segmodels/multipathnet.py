"""MultiPathNet: classify (and re-box) object proposals from four foveal regions (docs/papers.md).

Each proposal box is viewed at four context sizes (x1, x1.5, x2, x4, same centre). Every region pools 7x7
RoIAlign features from the trunk taps with skip connections as in the original: the deepest tap (s16, in
conv5's role) feeds all four regions, s8 (conv4) feeds x1..x2 and s4 (conv3) feeds x1 only. Per region:
L2-normalise each tap's pooled RoI feature, concatenate, 1x1 conv, then a fully connected tower; the four
towers are concatenated into a shared layer read by one classifier per IoU threshold (the integral loss).
At inference the classifiers' softmaxes are averaged. Class-specific box deltas come from the x1.5 tower.

The label head (our addition, :class:`LabelHead`): with ~580 training instances over 80 classes the towers
memorise their training images (96% top-1 there, 0.44 held out), so which foreground class a proposal
shows comes from ImageNet instead. A frozen copy of the ImageNet network's top (``backbones.ImageNetTail``)
lifts the s8 tap to stride-32 features; each proposal's mask pools them; a linear classifier fit by L-BFGS
reads them together with the ImageNet classifier's own verdict mapped onto the label names
(``imagenet_labels.py``).
The towers still decide object vs. background and regress the boxes: ``probs = [p_bg, (1 - p_bg) *
softmax(label head)]``.

Coordinates: boxes are ``xyxy`` in pixels of the trunk input (the frame of the taps), with pixel-edge
convention (see geometry.py), which is what ``roi_align(aligned=True)`` expects. Class 0 is background;
foreground classes are 1..K.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, roi_align

from segmodels.backbones import TAP_STRIDES, ImageNetTail
from segmodels.imagenet_labels import PRIOR_FLOOR, imagenet_prior

REGIONS = ("x1", "x1.5", "x2", "x4")
REGION_SCALES = (1.0, 1.5, 2.0, 4.0)
# Coarse to fine, the order in which each region concatenates its taps (conv5, conv4, conv3 in the original).
REGION_TAPS: dict[str, tuple[str, ...]] = {
    "x1": ("s16", "s8", "s4"),
    "x1.5": ("s16", "s8"),
    "x2": ("s16", "s8"),
    "x4": ("s16",),
}
POOLED_TAPS = ("s16", "s8", "s4")
BOX_REGION = "x1.5"
IOU_THRESHOLDS = (0.50, 0.55, 0.60, 0.65, 0.70, 0.75)
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# torchvision's BoxCoder clamp: exp(dw) stays below 1000/16, so wild deltas cannot overflow.
MAX_LOG_SCALE = math.log(1000.0 / 16)
LABEL_STRIDE = 32
# The label head's cosine logits are multiplied by this: unit vectors give logits in [-1, 1] otherwise, too
# flat a softmax for the weight decay the head was fit with.
LABEL_LOGIT_SCALE = 10.0
# Chosen by 4-fold cross-validation over the training images (grouped by image), never the held-out split.
LABEL_WEIGHT_DECAY = 1e-3


def foveal_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """``(R, 4)`` xyxy boxes -> ``(4, R, 4)`` foveal regions x1, x1.5, x2, x4 (same centre, sides scaled).

    Not clipped to the image: ``roi_align`` samples zeros more than one feature cell outside the map, so a
    region hanging over the border sees "no context" there instead of a squashed view of the image.
    """
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2
    scaled = half * boxes.new_tensor(REGION_SCALES).view(-1, 1, 1)
    return torch.cat([centre - scaled, centre + scaled], dim=-1)


def encode_boxes(proposals: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Regression targets ``(R, 4)`` (dx, dy, dw, dh), weighted (10, 10, 5, 5), taking ``proposals (R, 4)``
    onto their matched ``gt (R, 4)``; both xyxy with exclusive right/bottom edges (width = x2 - x1)."""
    wx, wy, ww, wh = BOX_CODER_WEIGHTS
    pw, ph = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
    px, py = proposals[:, 0] + pw / 2, proposals[:, 1] + ph / 2
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gx, gy = gt[:, 0] + gw / 2, gt[:, 1] + gh / 2
    return torch.stack(
        [wx * (gx - px) / pw, wy * (gy - py) / ph, ww * torch.log(gw / pw), wh * torch.log(gh / ph)], dim=1
    )


def decode_boxes(proposals: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Apply each proposal's deltas for its class: ``proposals (R, 4)``, ``deltas (R, K+1, 4)``,
    ``labels (R,)`` long -> refined boxes ``(R, 4)`` xyxy."""
    deltas = deltas[torch.arange(deltas.shape[0], device=deltas.device), labels]
    wx, wy, ww, wh = BOX_CODER_WEIGHTS
    pw, ph = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
    px, py = proposals[:, 0] + pw / 2, proposals[:, 1] + ph / 2
    cx = px + deltas[:, 0] / wx * pw
    cy = py + deltas[:, 1] / wy * ph
    w = pw * torch.exp((deltas[:, 2] / ww).clamp(max=MAX_LOG_SCALE))
    h = ph * torch.exp((deltas[:, 3] / wh).clamp(max=MAX_LOG_SCALE))
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


def box_coverage(boxes: torch.Tensor, grid: tuple[int, int], stride: int = LABEL_STRIDE) -> torch.Tensor:
    """Share of each ``stride`` x ``stride`` cell covered by each box: ``boxes (R, 4)`` xyxy trunk-input
    pixels (exclusive right/bottom edges) -> ``(R, gh, gw)`` float in [0, 1]."""
    gh, gw = grid
    edges_x = torch.arange(gw + 1, dtype=boxes.dtype, device=boxes.device) * stride
    edges_y = torch.arange(gh + 1, dtype=boxes.dtype, device=boxes.device) * stride

    def overlap(lo: torch.Tensor, hi: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        left = torch.maximum(lo[:, None], edges[None, :-1])
        right = torch.minimum(hi[:, None], edges[None, 1:])
        return (right - left).clamp(min=0) / stride

    return (
        overlap(boxes[:, 1], boxes[:, 3], edges_y)[:, :, None]
        * overlap(boxes[:, 0], boxes[:, 2], edges_x)[:, None, :]
    )


def mask_coverage(
    masks: Sequence[np.ndarray],
    scale: tuple[float, float],
    pad: int,
    grid: tuple[int, int],
    stride: int = LABEL_STRIDE,
) -> torch.Tensor:
    """Share of each ``stride`` x ``stride`` cell of the trunk input covered by each mask.

    ``masks``: R bool ``(H, W)`` in image pixels; the trunk input is the image resized by ``scale`` (sx, sy)
    and shifted by ``pad`` pixels right and down. Returns ``(R, gh, gw)`` float32 in [0, 1].
    """
    gh, gw = grid
    out = np.zeros((len(masks), gh, gw), np.float32)
    canvas = np.zeros((gh * stride, gw * stride), np.uint8)
    for i, mask in enumerate(masks):
        h, w = mask.shape
        rw, rh = round(w * scale[0]), round(h * scale[1])
        m: np.ndarray = mask.astype(np.uint8) * 255
        if (rw, rh) != (w, h):
            m = cv2.resize(m, (rw, rh), interpolation=cv2.INTER_NEAREST)
        canvas[:] = 0
        y1, x1 = min(pad + rh, canvas.shape[0]), min(pad + rw, canvas.shape[1])
        canvas[pad:y1, pad:x1] = m[: y1 - pad, : x1 - pad]
        # INTER_AREA with an integer factor is the exact block mean.
        out[i] = cv2.resize(canvas, (gw, gh), interpolation=cv2.INTER_AREA) / 255.0
    return torch.from_numpy(out)


class LabelHead(nn.Module):
    """Which foreground class (1..K) a region shows, from ImageNet features pooled over its mask.

    Per region: ``f`` = the :class:`~segmodels.backbones.ImageNetTail` features averaged with the region's
    coverage of each stride-32 cell as weights; ``m_k`` = the ImageNet classifier's softmax of ``f`` summed
    over the ImageNet classes of label k (``imagenet_labels.imagenet_prior``). Logits:
    ``10 * <W_k, f / |f|> + b_k + prior_weight * log(m_k + 1e-4)``. The tail is frozen; ``linear`` and
    ``prior_weight`` are fit by :func:`fit_label_head`, a convex problem.
    """

    prior: torch.Tensor

    def __init__(self, tail: ImageNetTail, class_names: Sequence[str]) -> None:
        super().__init__()
        self.tail = tail
        self.linear = nn.Linear(tail.dim, len(class_names))
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.prior_weight = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("prior", imagenet_prior(class_names))

    def pool(self, features: torch.Tensor, coverage: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """``features (B, D, gh, gw)`` tail output, ``coverage (R, gh, gw)``, ``batch_index (R,)`` ->
        ``(R, D)`` coverage-weighted means (an empty coverage gives zeros)."""
        weights = (coverage / coverage.sum(dim=(1, 2), keepdim=True).clamp(min=1e-6)).flatten(1)
        weights = weights.to(features.dtype)
        out = features.new_zeros(len(coverage), features.shape[1])
        for b in batch_index.unique().tolist():
            rows = batch_index == b
            out[rows] = weights[rows] @ features[b].flatten(1).T
        return out

    def imagenet_probabilities(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(R, D)`` pooled features -> ``(R, 1000)`` float32: the frozen ImageNet classifier's softmax."""
        return self.tail.classifier(pooled).float().softmax(dim=1)

    def prior_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(R, D)`` -> ``(R, K)`` log ImageNet probability mass of each label (``log(m_k + 1e-4)``)."""
        return torch.log(self.imagenet_probabilities(pooled) @ self.prior + PRIOR_FLOOR)

    def logits(self, pooled: torch.Tensor, prior_logits: torch.Tensor) -> torch.Tensor:
        """``(R, D)`` pooled features and their ``(R, K)`` :meth:`prior_logits` -> ``(R, K)`` logits."""
        unit = F.normalize(pooled.float(), dim=1)
        return (
            LABEL_LOGIT_SCALE * unit @ self.linear.weight.T
            + self.linear.bias
            + self.prior_weight * prior_logits
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.logits(pooled, self.prior_logits(pooled))


def fit_label_head(
    head: LabelHead,
    pooled: torch.Tensor,
    labels: torch.Tensor,
    weight_decay: float = LABEL_WEIGHT_DECAY,
    max_iter: int = 300,
) -> float:
    """Fit ``head.linear`` and ``head.prior_weight`` to ``pooled (N, D)`` features of labelled regions
    (``labels (N,)`` long in 0..K-1): softmax cross-entropy plus ``weight_decay`` times the squared distance
    of the weights from their current values (zeros for a new head; the old rows when a fine-tune keeps
    them, so a few project examples adjust what the model knew instead of replacing it). L-BFGS, full batch.

    Returns the final objective.
    """
    pooled = pooled.detach().float()
    labels = labels.long().to(pooled.device)
    prior = head.prior_logits(pooled).detach()
    anchor_w, anchor_b = head.linear.weight.detach().clone(), head.linear.bias.detach().clone()
    params = [head.linear.weight, head.linear.bias, head.prior_weight]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head.logits(pooled, prior), labels)
        loss = loss + weight_decay * ((head.linear.weight - anchor_w) ** 2).sum()
        loss = loss + weight_decay * ((head.linear.bias - anchor_b) ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return float(objective().detach())


class MultiPathNet(nn.Module):
    """Foveal-region classifier with integral-loss heads over trunk taps s4, s8, s16.

    ``num_classes`` counts foreground classes; heads output ``num_classes + 1`` (class 0 = background).
    Defaults are sized for CPU and for fine-tuning on ~100 images: ~2.5 M parameters for 80 classes on
    MobileNetV2 taps (the original's VGG towers had two 4096-d layers per region).
    """

    def __init__(
        self,
        tap_channels: dict[str, int],
        num_classes: int,
        roi_size: int = 7,
        reduce_channels: int = 32,
        tower_dim: int = 256,
        hidden_dim: int = 512,
        iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS,
        dropout: float = 0.5,
        label_head: LabelHead | None = None,
    ) -> None:
        super().__init__()
        self.label_head = label_head
        self.num_classes = num_classes
        self.roi_size = roi_size
        self.iou_thresholds = tuple(iou_thresholds)
        # The original multiplies the L2-normalised RoI vectors by a fixed 1000 before the 1x1 conv. With our
        # 24..96 channels that would give entries of ~15..30, so each tap gets sqrt(C * roi^2) instead: unit
        # RMS entries whatever the channel count, i.e. O(1) input for a default-initialised conv. A learnable
        # per-channel scale (ParseNet) would be redundant: the linear 1x1 conv right after absorbs it.
        self.tap_scales = {t: math.sqrt(tap_channels[t] * roi_size * roi_size) for t in POOLED_TAPS}
        # No ReLU after the 1x1 conv, as in the original: it is a low-rank factor of the tower's first layer.
        self.mix = nn.ModuleList(
            nn.Conv2d(sum(tap_channels[t] for t in REGION_TAPS[r]), reduce_channels, 1) for r in REGIONS
        )
        # One Linear per tower: the shared layer above plays the original's second fc (fc7).
        self.towers = nn.ModuleList(
            nn.Sequential(
                nn.Flatten(),
                nn.Linear(reduce_channels * roi_size * roi_size, tower_dim),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            )
            for _ in REGIONS
        )
        self.shared = nn.Sequential(
            nn.Linear(len(REGIONS) * tower_dim, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout)
        )
        classifiers = [nn.Linear(hidden_dim, num_classes + 1) for _ in self.iou_thresholds]
        self.classifiers = nn.ModuleList(classifiers)
        self.box_head = nn.Linear(tower_dim, (num_classes + 1) * 4)
        # Fast R-CNN init (the original's classAndBBoxLinear): near-uniform softmax, near-zero deltas.
        for head in classifiers:
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
        nn.init.normal_(self.box_head.weight, std=0.001)
        nn.init.zeros_(self.box_head.bias)

    def imagenet_features(self, taps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The label head's ``(B, D, H/32, W/32)`` features of ``taps``: ``taps["imagenet"]`` when a caller
        cached them there, else computed from the s8 tap."""
        if "imagenet" in taps:
            return taps["imagenet"]
        if self.label_head is None:
            raise RuntimeError("this MultiPathNet has no label head")
        return self.label_head.tail(taps["s8"])

    def forward(
        self,
        taps: Mapping[str, torch.Tensor],
        boxes: torch.Tensor | list[torch.Tensor],
        coverage: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Classify proposals.

        ``taps[t]``: ``(B, C_t, H/s, W/s)`` for t in s4, s8, s16 (and optionally ``"imagenet"``, see
        :meth:`imagenet_features`). ``boxes``: ``(R, 4)`` xyxy in trunk-input pixels when B == 1, or a list
        of B ``(R_i, 4)`` tensors, one per image (outputs follow the list order, R = sum R_i).
        ``coverage``: ``(R, H/32, W/32)`` share of each stride-32 cell in each proposal's mask
        (:func:`mask_coverage`); None uses the boxes' own (:func:`box_coverage`). Only the label head
        reads it.

        Returns ``logits``: list of T ``(R, K+1)``, one per IoU threshold; ``probs``: ``(R, K+1)``, the mean
        of their softmaxes, or with a label head ``[p_bg, (1 - p_bg) * softmax(label logits)]``; ``deltas``:
        ``(R, K+1, 4)`` class-specific box deltas (see ``decode_boxes``).
        """
        rois = self._rois(taps, boxes)
        n = rois.shape[0]
        fovea = foveal_boxes(rois[:, 1:])
        pooled: dict[str, list[torch.Tensor]] = {r: [] for r in REGIONS}
        for tap in POOLED_TAPS:
            regions = [i for i, r in enumerate(REGIONS) if tap in REGION_TAPS[r]]
            # One roi_align call per tap for all the regions that read it.
            region_rois = torch.cat([torch.cat([rois[:, :1], fovea[i]], dim=1) for i in regions])
            feats = roi_align(
                taps[tap],
                region_rois,
                output_size=self.roi_size,
                spatial_scale=1.0 / TAP_STRIDES[tap],
                sampling_ratio=2,
                aligned=True,
            )
            # Each RoI's whole C x 7 x 7 vector is normalised, as in the original (View + Normalize(2)), not
            # each location over channels: that keeps where in the region the activation energy lies.
            norm = torch.linalg.vector_norm(feats.flatten(1), dim=1).clamp(min=1e-12)
            feats = feats * (self.tap_scales[tap] / norm).view(-1, 1, 1, 1)
            for i, f in zip(regions, feats.split(n), strict=True):
                pooled[REGIONS[i]].append(f)
        towers = [
            tower(mix(torch.cat(pooled[r], dim=1)))
            for r, mix, tower in zip(REGIONS, self.mix, self.towers, strict=True)
        ]
        shared = self.shared(torch.cat(towers, dim=1))
        logits = [head(shared) for head in self.classifiers]
        probs = torch.stack([x.softmax(dim=1) for x in logits]).mean(dim=0)
        if self.label_head is not None:
            probs = self._with_labels(self.label_head, probs, taps, rois, coverage)
        deltas = self.box_head(towers[REGIONS.index(BOX_REGION)]).view(n, self.num_classes + 1, 4)
        return {"logits": logits, "probs": probs, "deltas": deltas}

    def _with_labels(
        self,
        label_head: LabelHead,
        probs: torch.Tensor,
        taps: Mapping[str, torch.Tensor],
        rois: torch.Tensor,
        coverage: torch.Tensor | None,
    ) -> torch.Tensor:
        features = self.imagenet_features(taps)
        if coverage is None:
            gh, gw = features.shape[-2:]
            coverage = box_coverage(rois[:, 1:], (gh, gw))
        pooled = label_head.pool(features, coverage.to(features.device), rois[:, 0].long())
        fg = label_head(pooled).softmax(dim=1).to(probs.dtype)
        background = probs[:, :1]
        return torch.cat([background, (1 - background) * fg], dim=1)

    @staticmethod
    def _rois(taps: Mapping[str, torch.Tensor], boxes: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``(R, 5)`` rows ``(batch index, x1, y1, x2, y2)`` in the taps' dtype."""
        batch = taps["s16"].shape[0]
        if isinstance(boxes, torch.Tensor):
            if batch != 1:
                raise ValueError(f"a single (R, 4) boxes tensor needs taps of batch 1, got {batch}")
            boxes = [boxes]
        if len(boxes) != batch:
            raise ValueError(f"got {len(boxes)} box lists for a batch of {batch} images")
        rois = [torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)]
        return torch.cat(rois).to(taps["s16"].dtype)


def assign_targets(
    proposal_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS,
    bg_low: float = 0.1,
    iou: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integral-loss labels for ``proposal_boxes (R, 4)`` against ``gt_boxes (G, 4)`` with ``gt_labels (G,)``
    in 1..K.

    ``iou (R, G)``, when given, replaces box IoU (e.g. mask IoU: our proposals are masks). For each threshold
    u, a proposal whose best IoU is >= u takes that ground truth's label, one in [bg_low, u) is background
    (0), and one below ``bg_low`` is ignored (-1). As in Fast R-CNN, callers usually append the ground-truth
    boxes to the proposals so that every object has a foreground example.

    Returns ``labels (T, R)`` long, ``matched_gt (R,)`` long (index into the ground truth; -1 when G == 0),
    ``max_iou (R,)``.
    """
    if iou is None:
        iou = box_iou(proposal_boxes, gt_boxes)
    r, g = proposal_boxes.shape[0], gt_boxes.shape[0]
    if iou.shape != (r, g):
        raise ValueError(f"iou must be ({r}, {g}), got {tuple(iou.shape)}")
    if g == 0:
        max_iou = iou.new_zeros(r)
        matched = torch.full((r,), -1, dtype=torch.long, device=iou.device)
        fg_labels = torch.zeros(r, dtype=torch.long, device=iou.device)
    else:
        max_iou, matched = iou.max(dim=1)
        fg_labels = gt_labels.long()[matched]
    thresholds = max_iou.new_tensor(iou_thresholds).view(-1, 1)
    labels = torch.where(max_iou >= thresholds, fg_labels, torch.zeros_like(fg_labels))
    labels[:, max_iou < bg_low] = -1
    return labels, matched, max_iou


def integral_loss(
    logits: list[torch.Tensor],
    labels: torch.Tensor,
    deltas: torch.Tensor,
    regression_targets: torch.Tensor,
    box_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The integral loss: mean over thresholds of cross-entropy, plus smooth-L1 box regression.

    ``logits``: T ``(R, K+1)``; ``labels (T, R)`` from ``assign_targets`` (-1 = ignored); ``deltas
    (R, K+1, 4)``; ``regression_targets (R, 4)`` from ``encode_boxes`` (only foreground rows are read). The
    box term covers the first threshold's foreground (IoU >= 0.5 by default) with its ground-truth class's
    deltas, normalised by that threshold's number of labelled proposals as in Fast R-CNN / torchvision.

    Returns ``(total, {"cls": ..., "box": ...})``, the parts detached.
    """
    cls_terms = []
    for x, y in zip(logits, labels, strict=True):
        # Sum / count rather than the mean reduction, which is NaN when every proposal is ignored.
        ce = F.cross_entropy(x, y, ignore_index=-1, reduction="sum")
        cls_terms.append(ce / (y >= 0).sum().clamp(min=1))
    cls = torch.stack(cls_terms).mean()
    first = labels[0]
    fg = torch.nonzero(first > 0).squeeze(1)
    box_sum = F.smooth_l1_loss(deltas[fg, first[fg]], regression_targets[fg], beta=1.0 / 9, reduction="sum")
    box = box_sum / (first >= 0).sum().clamp(min=1)
    total = cls + box_weight * box
    return total, {"cls": cls.detach(), "box": box.detach()}
