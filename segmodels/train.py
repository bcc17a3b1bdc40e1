"""Training stages: ``deepmask`` (trunk top + DeepMask heads) and ``sharpmask`` (refinement, the rest frozen).

Resumable: every ``checkpoint_every`` steps the model, optimiser, step and RNG states are written atomically
to ``OUT/state.safetensors`` + ``OUT/state.json``; running the same command again continues from there.
The finished model is written as a checkpoint (``OUT/model.safetensors`` + ``OUT/model.json``), with a PNG
of the loss and validation curves (``OUT/curves.png``).

Optimiser: AdamW with a cosine schedule instead of the paper's SGD (lr 1e-3, 300 epochs of 128k samples on
80k images): our budget is minutes of CPU on ~80 images, and Adam needs no per-stage learning-rate tuning.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segmodels.checkpoint import atomic_write_json, load_checkpoint, save_checkpoint, save_tensors
from segmodels.data import CocoInstances, WindowSampler
from segmodels.deepmask import mask_loss, score_loss
from segmodels.model import ModelConfig, SegmentationModel
from segmodels.sharpmask import window_skips

log = logging.getLogger(__name__)
STAGES = ("deepmask", "sharpmask", "multipathnet")
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


@dataclass
class TrainConfig:
    stage: str
    data: str
    out: str
    init: str | None = None
    backbone: str = "mobilenet_v2"
    epochs: int = 20
    steps_per_epoch: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 5e-4
    trunk_trainable_from: str | None = "s16"
    seed: int = 0
    device: str = "auto"
    augment: bool = True
    val_samples: int = 256
    checkpoint_every: int = 100
    compact: bool = False
    stop_after_steps: int | None = None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images in channels-last layout, ~1.3x faster for the trunk's convolutions on CPU."""
    return images.to(device).contiguous(memory_format=torch.channels_last)


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over 2% of the steps, then cosine decay to 1% of ``lr``."""
    warm = max(1, cfg.total_steps // 50)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.total_steps - warm)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def save_state(out: Path, model, optimizer, step: int, rng: np.random.Generator, history: list, cfg) -> None:
    """Model, optimiser, step, RNG states and history, written atomically (see module docstring)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for name, value in st.items():
            tensors[f"optim.{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["torch_rng"] = torch.get_rng_state()
    save_tensors(out / STATE_TENSORS, tensors)
    atomic_write_json(
        out / STATE_JSON,
        {
            "step": step,
            "config": asdict(cfg),
            "numpy_rng": rng.bit_generator.state,
            "history": history,
            "param_groups": opt["param_groups"],
        },
    )


def load_state(out: Path, model, optimizer, rng: np.random.Generator) -> tuple[int, list]:
    from safetensors.torch import load_file

    meta = json.loads((out / STATE_JSON).read_text())
    tensors = load_file(out / STATE_TENSORS)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["torch_rng"])
    rng.bit_generator.state = meta["numpy_rng"]
    return meta["step"], meta["history"]


def record_epoch(
    history: list[dict],
    running: dict[str, list[float]],
    step: int,
    seconds: float,
    metrics: dict,
    out: Path,
    stage: str,
) -> dict[str, list[float]]:
    """Append an epoch's mean training losses and validation ``metrics`` to ``history``, log them, redraw
    ``out/curves.png``; returns emptied running lists for the next epoch."""
    record = {"step": step, "seconds": seconds}
    record.update({k: float(np.mean(v)) if v else None for k, v in running.items()})
    record.update(metrics)
    history.append(record)
    log.info("step %d: %s", step, {k: round(v, 4) for k, v in record.items() if isinstance(v, float)})
    plot_curves(history, out / "curves.png", f"{stage} training")
    return {k: [] for k in running}


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Losses (log scale, left) and validation metrics (right) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history]
    keys = [k for k in history[-1] if k not in ("step", "seconds")]
    for key in keys:
        vals = [h.get(key) for h in history]
        if any(v is not None for v in vals):
            (ax1 if "loss" in key else ax2).plot(steps, vals, label=key)
    ax1.set_xlabel("step")
    ax1.set_yscale("log")
    ax1.legend()
    ax2.set_xlabel("step")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


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
        from segmodels.train_multipathnet import train_multipathnet

        return train_multipathnet(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, init_meta = build_model(cfg)
    model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = WindowSampler(CocoInstances(cfg.data, "train"), seed=cfg.seed, augment=cfg.augment)
    validate = Validation(cfg, device)
    step, history = 0, []
    if (out / STATE_JSON).exists():
        step, history = load_state(out, model, optimizer, sampler.rng)
        log.info("resuming %s from step %d", out, step)
    started = time.monotonic()
    prior_seconds = history[-1]["seconds"] if history else 0.0
    running = {"train_mask_loss": [], "train_score_loss": []}
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


def save_final(model: SegmentationModel, cfg: TrainConfig, init_meta: dict, history: list, device) -> Path:
    """Write the trained checkpoint to ``cfg.out``: stages so far, and this stage's command, config, time,
    hardware and final validation figures next to those of the stages it started from."""
    model.eval()
    stages = [s for s in init_meta.get("stages", []) if s != cfg.stage] + [cfg.stage]
    meta = {
        "stages": stages,
        "training": {
            **init_meta.get("training", {}),
            cfg.stage: {
                "command": " ".join(["segmask", *sys.argv[1:]]) if sys.argv else "",
                "config": asdict(cfg),
                "seconds": history[-1]["seconds"] if history else 0.0,
                "hardware": f"{platform.machine()} {torch.device(device)} x{torch.get_num_threads()} threads",
                "final": history[-1] if history else {},
            },
        },
        "metrics": init_meta.get("metrics", {}),
    }
    return save_checkpoint(model, cfg.out, meta, compact=cfg.compact)
