"""Checkpoints: ``model.safetensors`` (tensors only) + ``model.json`` (config, classes, training, metrics).

Loading never unpickles anything. Both files are written to temporary names and renamed into place, the
JSON last, so a reader sees either the old checkpoint or the complete new one (segmodels.checkpoint_files
holds the format and the atomic writes).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from segmodels.checkpoint_files import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    WEIGHTS_FILE,
    atomic_target,
    atomic_write_json,
    read_metadata,
)
from segmodels.model import ModelConfig, SegmentationModel

# Large weight matrices are stored as float16 in compact checkpoints (half the size; inference error ~1e-3).
COMPACT_MIN_NUMEL = 65536


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write a safetensors file."""
    with atomic_target(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def save_checkpoint(
    model: SegmentationModel,
    directory: str | Path,
    metadata: dict[str, Any] | None = None,
    compact: bool = False,
) -> Path:
    """Save ``model`` to ``directory``; ``metadata`` (training, metrics, ...) goes into model.json."""
    directory = Path(directory)
    state = model.state_dict()
    if compact:
        state = {
            k: v.half() if v.is_floating_point() and v.numel() >= COMPACT_MIN_NUMEL else v
            for k, v in state.items()
        }
    save_tensors(directory / WEIGHTS_FILE, state)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_json(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **(metadata or {}),
    }
    atomic_write_json(directory / METADATA_FILE, meta)
    return directory


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[SegmentationModel, dict]:
    """Rebuild the model from ``directory`` (strict: every tensor must match), in eval mode."""
    meta = read_metadata(directory)
    model = SegmentationModel(ModelConfig.from_json(meta["config"]), pretrained_trunk=False)
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in load_file(Path(directory) / WEIGHTS_FILE).items()
    }
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta
