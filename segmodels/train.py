"""Training stages ``deepmask`` (trunk top + DeepMask heads) and ``sharpmask`` (refinement, the rest frozen),
and :func:`train`, the entry point that runs any stage (``multipathnet`` in train_multipathnet.py).

Resumable, with the state, curves and checkpoint written as train_common.py describes.

Optimiser: AdamW with a cosine schedule instead of the paper's SGD (lr 1e-3, 300 epochs of 128k samples on
80k images): our budget is minutes of CPU on ~80 images, and Adam needs no per-stage learning-rate tuning.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from segmodels.checkpoint import load_checkpoint
from segmodels.data import CocoInstances, WindowSampler
from segmodels.deepmask import mask_loss, score_loss
from segmodels.device import resolve_device, to_device
from segmodels.model import ModelConfig, SegmentationModel
from segmodels.sharpmask import window_skips
from segmodels.train_common import (
    STAGES,
    STATE_JSON,
    TrainConfig,
    load_state,
    lr_at,
    record_epoch,
    save_final,
    save_state,
)
from segmodels.train_multipathnet import train_multipathnet

log = logging.getLogger(__name__)


def build_model(cfg: TrainConfig) -> tuple[SegmentationModel, dict]:
    """The starting model: ``--init`` checkpoint when given (required for sharpmask), else ImageNet trunk."""
    if cfg.init:
        model, meta = load_checkpoint(cfg.init)
        return model, meta
    if cfg.stage == "sharpmask":
        raise ValueError("sharpmask trains on a frozen DeepMask: pass --init DEEPMASK_CHECKPOINT_DIR")
    # The ResNet-50 trunk starts from no shipped weights, so it has no ImageNet classifier for a label head.
    config = ModelConfig(backbone=cfg.backbone, label_head=cfg.backbone == "mobilenet_v2")
    return SegmentationModel(config), {}


TRUNK_LR_SCALE = 0.1


def parameter_groups(model: SegmentationModel, cfg: TrainConfig) -> list[dict]:
    """The stage's trainable parameters; pretrained trunk stages learn 10x slower than the new heads."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.stage == "sharpmask":
        heads = list(model.sharpmask.parameters())
        trunk = []
    else:
        model.trunk.freeze_below(cfg.trunk_trainable_from)
        trunk = [p for p in model.trunk.parameters() if p.requires_grad]
        heads = list(model.deepmask.parameters())
    for p in heads:
        p.requires_grad_(True)
    groups = [{"params": heads, "lr_scale": 1.0}]
    if trunk:
        groups.append({"params": trunk, "lr_scale": TRUNK_LR_SCALE})
    return groups


def sharpmask_logits(model: SegmentationModel, inputs: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 192, 192)`` crops -> ``(B, 160, 160)`` refined logits (trunk and DeepMask frozen)."""
    with torch.no_grad():
        taps = model.trunk(inputs)
        emb = model.deepmask.embedding(taps["s16"]).flatten(1)
    zeros = torch.zeros(inputs.shape[0], dtype=torch.long)
    return model.sharpmask(emb, window_skips(taps, torch.arange(inputs.shape[0]), zeros, zeros))


def mask_logits(model: SegmentationModel, stage: str, inputs: torch.Tensor) -> torch.Tensor:
    if stage == "sharpmask":
        return sharpmask_logits(model, inputs)
    return model.deepmask(model.trunk(inputs)["s16"])[0]


def batch_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of ``logits > 0`` against the {0, 1} target, at the logits' resolution."""
    if target.shape[-1] != logits.shape[-1]:
        target = (
            torch.nn.functional.interpolate(target[:, None], size=logits.shape[-2:], mode="area")[:, 0] >= 0.5
        )
    pred, gt = logits > 0, target > 0.5
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class Validation:
    """A fixed set of un-augmented validation windows, scored after every epoch."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        val = CocoInstances(cfg.data, "val")
        sampler = WindowSampler(val, seed=10_000 + cfg.seed, augment=False)
        self.mask_inputs, self.mask_targets = sampler.mask_batch(cfg.val_samples)
        self.score_inputs, self.score_labels = sampler.score_batch(cfg.val_samples)
        self.device = device
        self.batch = cfg.batch_size

    @torch.no_grad()
    def __call__(self, model: SegmentationModel, stage: str) -> dict[str, float]:
        model.eval()
        ious, mloss = [], 0.0
        for i in range(0, len(self.mask_inputs), self.batch):
            x = to_device(self.mask_inputs[i : i + self.batch], self.device)
            y = self.mask_targets[i : i + self.batch].to(self.device)
            logits = mask_logits(model, stage, x)
            mloss += mask_loss(logits, y).item() * len(x)
            ious.append(batch_iou(logits, y).cpu())
        scores = torch.cat(
            [
                model.deepmask(
                    model.trunk(to_device(self.score_inputs[i : i + self.batch], self.device))["s16"]
                )[1].cpu()
                for i in range(0, len(self.score_inputs), self.batch)
            ]
        )
        model.train()
        iou = torch.cat(ious)
        return {
            "val_mask_loss": mloss / len(self.mask_inputs),
            "val_mean_iou": iou.mean().item(),
            "val_success_50": (iou >= 0.5).float().mean().item(),
            "val_success_70": (iou >= 0.7).float().mean().item(),
            "val_score_accuracy": ((scores > 0).float() == self.score_labels).float().mean().item(),
        }


def train_step(
    model: SegmentationModel,
    optimizer: torch.optim.Optimizer,
    sampler: WindowSampler,
    cfg: TrainConfig,
    step: int,
    device: torch.device,
) -> tuple[str, float]:
    """One optimiser step of the ``deepmask`` or ``sharpmask`` stage at ``step`` of ``cfg.total_steps``
    (learning rate from :func:`lr_at`, scaled per parameter group); returns the loss's name and value.

    The paper alternates mask batches (positives only) and objectness batches: in the ``deepmask`` stage odd
    steps train the objectness head on ``(B, 3, 192, 192)`` crops, even steps the mask head.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg) * group["lr_scale"]
    if cfg.stage == "deepmask" and step % 2 == 1:
        x, y = sampler.score_batch(cfg.batch_size)
        loss = score_loss(model.deepmask(model.trunk(to_device(x, device))["s16"])[1], y.to(device))
        name = "train_score_loss"
    else:
        x, y = sampler.mask_batch(cfg.batch_size)
        loss = mask_loss(mask_logits(model, cfg.stage, to_device(x, device)), y.to(device))
        name = "train_mask_loss"
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return name, loss.item()


def train(cfg: TrainConfig) -> Path | None:
    """Run (or resume) one training stage; returns the output checkpoint directory, or None when
    ``stop_after_steps`` ended this run early (the state is saved: run again to continue)."""
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.stage!r}; choose one of {STAGES}")
    if cfg.stage == "multipathnet":
        return train_multipathnet(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, init_meta = build_model(cfg)
    model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = WindowSampler(
        CocoInstances(cfg.data, cfg.split),
        seed=cfg.seed,
        augment=cfg.augment,
        click_centred=cfg.click_centred,
        mask_sampling=cfg.mask_sampling,
        paste_probability=cfg.paste_probability,
    )
    validate = Validation(cfg, device)
    step = 0
    history: list[dict] = []
    if (out / STATE_JSON).exists():
        step, history = load_state(out, model, optimizer, sampler.rng)
        log.info("resuming %s from step %d", out, step)
    started = time.monotonic()
    prior_seconds = history[-1]["seconds"] if history else 0.0
    running: dict[str, list[float]] = {"train_mask_loss": [], "train_score_loss": []}
    bar = tqdm(
        total=cfg.total_steps, initial=step, desc=f"train {cfg.stage}", unit="step", dynamic_ncols=True
    )
    stop_at = (
        cfg.total_steps if cfg.stop_after_steps is None else min(cfg.total_steps, step + cfg.stop_after_steps)
    )
    while step < stop_at:
        name, loss = train_step(model, optimizer, sampler, cfg, step, device)
        running[name].append(loss)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step % cfg.steps_per_epoch == 0 or step == cfg.total_steps:
            seconds = prior_seconds + time.monotonic() - started
            running = record_epoch(
                history, running, step, seconds, validate(model, cfg.stage), out, cfg.stage
            )
        if step % cfg.checkpoint_every == 0 or step == stop_at:
            save_state(out, model, optimizer, step, sampler.rng, history, cfg)
    bar.close()
    if step < cfg.total_steps:
        log.info("stopped at step %d of %d; run the same command again to resume", step, cfg.total_steps)
        return None
    return save_final(model, cfg, init_meta, history, device)
