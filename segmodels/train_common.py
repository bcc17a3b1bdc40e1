"""What every training stage shares: the run's config (``TrainConfig``), the learning-rate schedule, the
resumable state, the per-epoch history and curves, and the finished checkpoint.

Resumable: every ``checkpoint_every`` steps the model, optimiser, step and RNG states are written atomically
to ``OUT/state.safetensors`` + ``OUT/state.json``; running the same command again continues from there.
The finished model is written as a checkpoint (``OUT/model.safetensors`` + ``OUT/model.json``), with a PNG
of the loss and validation curves (``OUT/curves.png``).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from segmodels.checkpoint import save_checkpoint, save_tensors
from segmodels.checkpoint_files import atomic_write_json
from segmodels.model import SegmentationModel

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
    split: str = "train"
    click_centred: float = 0.0
    mask_sampling: str = "category"
    paste_probability: float = 0.0

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


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
    record: dict[str, float | None] = {"step": step, "seconds": seconds}
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


def fit_head(
    head: torch.nn.Module,
    step_loss: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    weight_decay: float,
    on_step: Callable[[float], None] | None = None,
) -> list[float]:
    """Train ``head`` in place (everything else frozen): ``steps`` AdamW steps under a one-cycle schedule
    (5% warm-up) on ``step_loss()``, the loss of a freshly drawn batch; ``on_step(loss)`` after each step.
    Leaves ``head`` in eval mode; returns the loss of every step."""
    head.requires_grad_(True)
    optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.05)
    head.train()
    curve: list[float] = []
    for _ in range(steps):
        loss = step_loss()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        curve.append(loss.item())
        if on_step is not None:
            on_step(curve[-1])
    head.eval()
    return curve


def save_with_head(
    model: SegmentationModel,
    meta: dict,
    stage: str,
    record: dict,
    curve: list[float],
    device: torch.device,
    out: str | Path,
) -> Path:
    """Write ``model`` (``meta``'s checkpoint with a newly trained head) compactly to ``out``: ``meta``'s
    training records plus ``training[stage]`` (``record``, the hardware and the loss per 100 steps of
    ``curve``), and ``stage`` last among its stages."""
    training = dict(meta.get("training", {}))
    training[stage] = {
        **record,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "loss_every_100": [round(float(np.mean(curve[i : i + 100])), 4) for i in range(0, len(curve), 100)],
    }
    stages = [s for s in meta.get("stages", []) if s != stage] + [stage]
    kept = {k: v for k, v in meta.items() if k not in ("format", "format_version", "config", "created")}
    return save_checkpoint(model.cpu(), out, {**kept, "training": training, "stages": stages}, compact=True)
