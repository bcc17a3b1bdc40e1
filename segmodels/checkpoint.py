"""Checkpoints: ``model.safetensors`` (tensors only) + ``model.json`` (config, classes, training, metrics).

Loading never unpickles anything. Both files are written to temporary names and renamed into place, the
JSON last, so a reader sees either the old checkpoint or the complete new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from segmodels.model import ModelConfig, SegmentationModel

FORMAT = "segmask-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
# Large weight matrices are stored as float16 in compact checkpoints (half the size; inference error ~1e-3).
COMPACT_MIN_NUMEL = 65536


def _new_file_mode() -> int:
    """The mode an ordinary new file gets under the current umask (mkstemp's files are owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def _atomic_target(path: Path) -> Iterator[str]:
    """A temporary path beside ``path`` to write; renamed onto ``path`` (with an ordinary file mode) when the
    block succeeds, removed when it fails, so readers see the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        # mkstemp and safetensors both create owner-only files whatever the umask.
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    with _atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write a safetensors file."""
    with _atomic_target(path) as tmp:
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


def read_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / METADATA_FILE
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a segmask checkpoint (format={meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {meta['format_version']} is newer than this code ({FORMAT_VERSION})"
        )
    return meta


def checkpoint_version(directory: str | Path) -> str:
    """The model version a checkpoint serves under: its metadata's ``version`` when it has one (the model
    store's numbered versions), else ``<directory name>-<first 10 hex of sha1(model.json)>``. Reads only the
    small JSON file, so it is cheap enough to call per request."""
    path = Path(directory) / METADATA_FILE
    raw = path.read_bytes()
    version = json.loads(raw).get("version")
    return (
        str(version) if version else f"{Path(directory).resolve().name}-{hashlib.sha1(raw).hexdigest()[:10]}"
    )


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
