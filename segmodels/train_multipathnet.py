"""Training stage ``multipathnet``: class labels for the refined proposals, on the frozen shared trunk.

- Classes are the data's categories (``instances.json``, by id), stored in the checkpoint, so a project's own
  label set replaces COCO's by training on the project's data.
- Proposals: the ``--init`` checkpoint's top-100 SharpMask proposals of every training image, computed once
  and cached in ``OUT/proposals-train.json`` (boxes and mask IoU with every ground-truth instance).
- The trunk is frozen (DeepMask and SharpMask share it), so the taps of every image at scale 1, and of its
  mirror image, are computed once and kept in memory; a step is RoIAlign and the MultiPathNet heads only.
- RoIs per image as in Fast R-CNN / MultiPathNet: up to 25% foreground (mask IoU >= 0.5 with an instance;
  the ground-truth boxes join the proposals), the rest background (IoU in [0.1, 0.5)).
- The label head (``multipathnet.LabelHead``) is fit first, by L-BFGS on every training instance's mask
  (box-only instances: their box) at scale 1; the towers' steps leave it alone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou
from tqdm import tqdm

from segmodels.checkpoint import load_checkpoint
from segmodels.checkpoint_files import atomic_write_json
from segmodels.data import CocoInstances, Instance, to_tensor
from segmodels.device import resolve_device
from segmodels.geometry import mask_to_box, masks_iou_matrix
from segmodels.model import SegmentationModel
from segmodels.multipathnet import (
    IOU_THRESHOLDS,
    LabelHead,
    assign_targets,
    encode_boxes,
    fit_label_head,
    integral_loss,
    mask_coverage,
)
from segmodels.predictor import PAD, MaskPredictor, box_mask, level_input
from segmodels.train_common import (
    STATE_JSON,
    TrainConfig,
    load_state,
    lr_at,
    record_epoch,
    save_final,
    save_state,
)

log = logging.getLogger(__name__)
ROIS_PER_IMAGE = 64
FG_FRACTION = 0.25
FG_IOU = IOU_THRESHOLDS[0]
BG_LOW = 0.1
PROPOSALS = 100


@dataclass
class ImageRois:
    """One image's RoIs: ``boxes (R, 4)`` xyxy image pixels (proposals, then the ground-truth boxes),
    ``iou (R, G)`` mask IoU with the instances, ``gt_boxes (G, 4)`` and ``gt_labels (G,)`` in 1..K."""

    image_index: int
    boxes: np.ndarray
    iou: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray


def class_list(dataset: CocoInstances) -> tuple[list[str], list[int]]:
    """Every category of the data, ordered by id: names and ids."""
    ids = sorted(dataset.categories)
    return [dataset.categories[i] for i in ids], ids


def instance_box(dataset: CocoInstances, inst: Instance) -> np.ndarray:
    """xyxy image-pixel box of an instance: its mask's tight box, or its COCO ``bbox`` when it has no mask."""
    if inst.has_mask:
        return mask_to_box(dataset.mask(inst))
    x, y, w, h = inst.box
    return np.array([x, y, x + w, y + h], np.float32)


def instance_region(dataset: CocoInstances, inst: Instance) -> np.ndarray:
    """``bool (H, W)``: an instance's mask, or its filled COCO box when it has no mask."""
    if inst.has_mask:
        return dataset.mask(inst)
    info = dataset.images[inst.image_index]
    return box_mask(instance_box(dataset, inst), info["height"], info["width"], margin=0.0)


def roi_iou(
    roi_masks: Sequence[np.ndarray | None],
    roi_boxes: np.ndarray,
    gt_masks: Sequence[np.ndarray | None],
    gt_boxes: np.ndarray,
) -> np.ndarray:
    """``(R, G)`` overlap of RoIs with instances: mask IoU where both have a mask, box IoU otherwise (a
    box-only instance, or a box-only instance's own box among the RoIs). Boxes xyxy pixels."""
    iou = box_iou(*(torch.as_tensor(b, dtype=torch.float64) for b in (roi_boxes, gt_boxes))).numpy()
    rows = [i for i, m in enumerate(roi_masks) if m is not None]
    cols = [j for j, m in enumerate(gt_masks) if m is not None]
    if rows and cols:
        iou[np.ix_(rows, cols)] = masks_iou_matrix(
            np.stack([m for m in roi_masks if m is not None]),
            np.stack([m for m in gt_masks if m is not None]),
        )
    return iou


def rois_of_image(
    predictor: MaskPredictor, dataset: CocoInstances, index: int, labels: dict[int, int]
) -> ImageRois | None:
    """The image's top :data:`PROPOSALS` proposals and ground-truth boxes as RoIs, with their overlap with
    the instances (:func:`roi_iou`); None when the image has no instance. ``labels``: category id -> 1..K."""
    instances = dataset.instances_by_image[index]
    if not instances:
        return None
    gt_masks = [dataset.mask(inst) if inst.has_mask else None for inst in instances]
    gt_boxes = np.stack([instance_box(dataset, inst) for inst in instances])
    predictor.set_image(dataset.image(index))
    props = [m.mask for m in predictor.propose(PROPOSALS) if m.mask.any()]
    prop_boxes = [mask_to_box(m) for m in props]
    boxes = np.concatenate([np.stack(prop_boxes), gt_boxes]) if props else gt_boxes
    return ImageRois(
        index,
        boxes,
        roi_iou([*props, *gt_masks], boxes, gt_masks, gt_boxes),
        gt_boxes,
        np.array([labels[inst.category_id] for inst in instances]),
    )


def image_rois(predictor: MaskPredictor, dataset: CocoInstances, labels: dict[int, int]) -> list[ImageRois]:
    """:func:`rois_of_image` of every image that has instances."""
    out = []
    for index in tqdm(range(len(dataset)), desc="proposals", unit="image"):
        rois = rois_of_image(predictor, dataset, index, labels)
        if rois is not None:
            out.append(rois)
    return out


def cached_rois(path: Path, compute) -> list[ImageRois]:
    """``compute()`` once; later runs (and resumes) read the JSON."""
    if path.exists():
        rows = json.loads(path.read_text())
        return [
            ImageRois(
                r["image_index"], *(np.asarray(r[k]) for k in ("boxes", "iou", "gt_boxes", "gt_labels"))
            )
            for r in rows
        ]
    rois = compute()
    atomic_write_json(
        path,
        [
            {
                "image_index": r.image_index,
                "boxes": r.boxes.tolist(),
                "iou": r.iou.tolist(),
                "gt_boxes": r.gt_boxes.tolist(),
                "gt_labels": r.gt_labels.tolist(),
            }
            for r in rois
        ],
    )
    return rois


@torch.no_grad()
def image_taps(
    model: SegmentationModel, image: np.ndarray, device
) -> tuple[dict[str, torch.Tensor], float, float]:
    """Trunk taps s4/s8/s16 of ``image`` at scale 1 (the level MultiPathNet reads at inference), and the
    label head's ImageNet features as ``"imagenet"`` when the model has one."""
    padded, sx, sy = level_input(image, 1.0)
    taps = model.trunk(to_tensor([padded]).to(device))
    taps = {t: taps[t] for t in ("s4", "s8", "s16")}
    if model.multipathnet is not None and model.multipathnet.label_head is not None:
        taps["imagenet"] = model.multipathnet.imagenet_features(taps)
    return taps, sx, sy


def to_trunk(boxes: np.ndarray, sx: float, sy: float, width: int | None = None) -> torch.Tensor:
    """Image-pixel xyxy boxes -> trunk-input pixels; mirrored about ``width`` when it is given."""
    b = boxes.astype(np.float64).copy()
    if width is not None:
        b[:, [0, 2]] = width - b[:, [2, 0]]
    return torch.as_tensor(b * [sx, sy, sx, sy] + PAD, dtype=torch.float32)


def sample_rois(rois: ImageRois, rng: np.random.Generator, n: int = ROIS_PER_IMAGE) -> np.ndarray:
    """Indices of up to ``n`` RoIs, without replacement: at most 25% foreground, the rest background."""
    best = rois.iou.max(axis=1)
    fg = np.flatnonzero(best >= FG_IOU)
    bg = np.flatnonzero((best >= BG_LOW) & (best < FG_IOU))
    n_fg = min(len(fg), int(n * FG_FRACTION))
    n_bg = min(len(bg), n - n_fg)
    return np.concatenate([rng.choice(fg, n_fg, replace=False), rng.choice(bg, n_bg, replace=False)])


class TapCache:
    """Frozen-trunk taps of every image and of its mirror image, computed on first use."""

    def __init__(self, model: SegmentationModel, dataset: CocoInstances, device) -> None:
        self.model, self.dataset, self.device = model, dataset, device
        self._taps: dict[tuple[int, bool], tuple] = {}

    def __call__(self, index: int, flip: bool) -> tuple[dict[str, torch.Tensor], float, float]:
        key = (index, flip)
        if key not in self._taps:
            image = self.dataset.image(index)
            self._taps[key] = image_taps(self.model, image[:, ::-1].copy() if flip else image, self.device)
        return self._taps[key]


def roi_loss(model, taps_cache: TapCache, rois: ImageRois, idx: np.ndarray, flip: bool) -> tuple:
    """Integral loss of one image's sampled RoIs."""
    taps, sx, sy = taps_cache(rois.image_index, flip)
    width = taps_cache.dataset.images[rois.image_index]["width"] if flip else None
    boxes = to_trunk(rois.boxes[idx], sx, sy, width)
    gt = to_trunk(rois.gt_boxes, sx, sy, width)
    iou = torch.as_tensor(rois.iou[idx], dtype=torch.float32)
    labels, matched, _ = assign_targets(boxes, gt, torch.as_tensor(rois.gt_labels), bg_low=BG_LOW, iou=iou)
    out = model.multipathnet(taps, boxes.to(taps["s16"].device))
    targets = encode_boxes(boxes, gt[matched.clamp(min=0)])
    device = out["probs"].device
    return integral_loss(out["logits"], labels.to(device), out["deltas"], targets.to(device))


def region_coverage(
    taps_cache: TapCache, index: int, taps: dict[str, torch.Tensor], sx: float, sy: float
) -> torch.Tensor | None:
    """The label head's coverage (``multipathnet.mask_coverage``) of image ``index``'s instance regions, in
    the order of its ground-truth boxes; None without a label head."""
    if "imagenet" not in taps:
        return None
    return instance_coverage(taps_cache.dataset, index, taps["imagenet"], sx, sy)


def instance_coverage(
    dataset: CocoInstances, index: int, features: torch.Tensor, sx: float, sy: float
) -> torch.Tensor:
    """The coverage ``(G, gh, gw)`` of image ``index``'s instance regions, in the order of its ground-truth
    boxes, on the grid of its label-head ``features (1, D, gh, gw)`` (``sx, sy``: trunk-input pixels per
    image pixel)."""
    regions = [instance_region(dataset, inst) for inst in dataset.instances_by_image[index]]
    gh, gw = features.shape[-2:]
    return mask_coverage(regions, (sx, sy), PAD, (gh, gw))


@torch.no_grad()
def label_examples(
    head: LabelHead, taps_cache: TapCache, labels: dict[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every instance of the cache's dataset as a label-``head`` example: pooled ImageNet features ``(N, D)``
    over its region at scale 1, and its label ``(N,)`` in 0..K-1 (``labels``: category id -> 1..K)."""
    pooled, targets = [], []
    dataset = taps_cache.dataset
    for index, instances in enumerate(dataset.instances_by_image):
        if not instances:
            continue
        taps, sx, sy = taps_cache(index, False)
        features = taps["imagenet"]
        coverage = instance_coverage(dataset, index, features, sx, sy)
        batch = torch.zeros(len(instances), dtype=torch.long)
        pooled.append(head.pool(features, coverage.to(features.device), batch))
        targets += [labels[inst.category_id] - 1 for inst in instances]
    return torch.cat(pooled), torch.tensor(targets, dtype=torch.long)


def fit_labels(model: SegmentationModel, taps_cache: TapCache, labels: dict[int, int]) -> dict[str, float]:
    """Fit the label head (``multipathnet.fit_label_head``) on every instance of the cache's dataset; returns
    ``{"label_head_loss", "label_head_train_top1"}`` (empty without a label head or instances)."""
    head = model.require_multipathnet().label_head
    if head is None:
        return {}
    pooled, targets = label_examples(head, taps_cache, labels)
    if not len(targets):
        return {}
    loss = fit_label_head(head, pooled, targets)
    with torch.no_grad():
        top1 = (head(pooled).argmax(dim=1).cpu() == targets).float().mean().item()
    log.info("label head: %d examples, objective %.3f, training top-1 %.3f", len(targets), loss, top1)
    return {"label_head_loss": loss, "label_head_train_top1": top1}


@torch.no_grad()
def top1_accuracy(model: SegmentationModel, taps_cache: TapCache, rois: list[ImageRois]) -> float:
    """Share of ground-truth instances whose box MultiPathNet labels correctly (top-1 over the classes)."""
    model.eval()
    hits, total = 0, 0
    for r in rois:
        taps, sx, sy = taps_cache(r.image_index, False)
        coverage = region_coverage(taps_cache, r.image_index, taps, sx, sy)
        boxes = to_trunk(r.gt_boxes, sx, sy).to(taps["s16"].device)
        probs = model.require_multipathnet()(taps, boxes, coverage)["probs"]
        pred = probs[:, 1:].argmax(dim=1).cpu().numpy() + 1
        hits += int((pred == r.gt_labels).sum())
        total += len(r.gt_labels)
    model.train()
    return hits / max(total, 1)


def multipathnet_parameters(model: SegmentationModel) -> list[torch.nn.Parameter]:
    """Freeze everything but MultiPathNet's towers and heads (the shared trunk stays as DeepMask and SharpMask
    need it; the label head is fit apart, by :func:`fit_labels`); their parameters, to optimise."""
    for p in model.parameters():
        p.requires_grad_(False)
    mpn = model.require_multipathnet()
    label_params = set() if mpn.label_head is None else {id(p) for p in mpn.label_head.parameters()}
    params = [p for p in mpn.parameters() if id(p) not in label_params]
    for p in params:
        p.requires_grad_(True)
    return params


def usable_rois(rois: list[ImageRois]) -> list[ImageRois]:
    """The images with at least one foreground RoI (the ground-truth boxes among the RoIs make that all
    images with instances, unless an instance's mask covers no pixel)."""
    return [r for r in rois if (r.iou.max(axis=1) >= FG_IOU).any()]


def multipathnet_step(
    model: SegmentationModel,
    optimizer: torch.optim.Optimizer,
    taps: TapCache,
    usable: list[ImageRois],
    rng: np.random.Generator,
    cfg: TrainConfig,
    step: int,
) -> tuple[float, dict[str, list[float]]]:
    """One optimiser step at ``step`` of ``cfg.total_steps``: the mean integral loss over ``batch_size // 16``
    random images of ``usable`` (each with :data:`ROIS_PER_IMAGE` sampled RoIs, mirrored at random).

    Returns the loss and the per-image parts ``{"train_cls_loss": [...], "train_box_loss": [...]}``.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    losses = []
    parts: dict[str, list[float]] = {"train_cls_loss": [], "train_box_loss": []}
    for _ in range(max(1, cfg.batch_size // 16)):
        rois = usable[rng.integers(len(usable))]
        loss, image_parts = roi_loss(model, taps, rois, sample_rois(rois, rng), bool(rng.integers(2)))
        losses.append(loss)
        parts["train_cls_loss"].append(image_parts["cls"].item())
        parts["train_box_loss"].append(image_parts["box"].item())
    loss = torch.stack(losses).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), parts


def train_multipathnet(cfg: TrainConfig) -> Path | None:
    """Run (or resume) the MultiPathNet stage from the ``cfg.init`` DeepMask+SharpMask checkpoint."""
    if not cfg.init:
        raise ValueError("multipathnet trains on a DeepMask+SharpMask checkpoint: pass --init CHECKPOINT_DIR")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    train_data, val_data = CocoInstances(cfg.data, "train"), CocoInstances(cfg.data, "val")
    names, ids = class_list(train_data)
    labels = {cid: i + 1 for i, cid in enumerate(ids)}
    proposer, _ = load_checkpoint(cfg.init, device)
    predictor = MaskPredictor(proposer, {"stages": ["sharpmask"]}, device)
    train_rois = cached_rois(out / "proposals-train.json", lambda: image_rois(predictor, train_data, labels))
    val_rois = cached_rois(out / "proposals-val.json", lambda: image_rois(predictor, val_data, labels))
    model, init_meta = load_checkpoint(cfg.init, device)
    # The label head reads an ImageNet classifier: the weights package ships MobileNetV2's only.
    model.config.label_head = model.config.backbone == "mobilenet_v2"
    model.set_classes(names, ids)
    params = multipathnet_parameters(model)
    model.train()
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr_scale": 1.0}], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    step = 0
    history: list[dict] = []
    if (out / STATE_JSON).exists():
        step, history = load_state(out, model, optimizer, rng)
        log.info("resuming %s from step %d", out, step)
    train_taps, val_taps = TapCache(model, train_data, device), TapCache(model, val_data, device)
    if step == 0:
        fit_labels(model, train_taps, labels)
    usable = usable_rois(train_rois)
    started, prior = time.monotonic(), history[-1]["seconds"] if history else 0.0
    running: dict[str, list[float]] = {"train_cls_loss": [], "train_box_loss": []}
    stop_at = (
        cfg.total_steps if cfg.stop_after_steps is None else min(cfg.total_steps, step + cfg.stop_after_steps)
    )
    bar = tqdm(
        total=cfg.total_steps, initial=step, desc="train multipathnet", unit="step", dynamic_ncols=True
    )
    while step < stop_at:
        loss, parts = multipathnet_step(model, optimizer, train_taps, usable, rng, cfg, step)
        for name, values in parts.items():
            running[name] += values
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % cfg.steps_per_epoch == 0 or step == cfg.total_steps:
            metrics = {
                "val_top1": top1_accuracy(model, val_taps, val_rois),
                "train_top1": top1_accuracy(model, train_taps, train_rois),
            }
            seconds = prior + time.monotonic() - started
            running = record_epoch(history, running, step, seconds, metrics, out, cfg.stage)
        if step % cfg.checkpoint_every == 0 or step == stop_at:
            save_state(out, model, optimizer, step, rng, history, cfg)
    bar.close()
    if step < cfg.total_steps:
        log.info("stopped at step %d of %d; run the same command again to resume", step, cfg.total_steps)
        return None
    return save_final(model, cfg, init_meta, history, device)
