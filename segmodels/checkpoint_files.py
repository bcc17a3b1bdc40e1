"""The checkpoint format on disk, without PyTorch: file names, metadata, and atomic writes.

A checkpoint is a directory of ``model.safetensors`` (tensors only) and ``model.json`` (config, classes,
training, metrics). Every file is written to a temporary name and renamed into place, so a reader sees the
old file or the complete new one. What reads and writes tensors is segmodels.checkpoint; this module is
what a process that holds no model (the Redis-mode server, the model store) needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FORMAT = "segmask-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"


def _new_file_mode() -> int:
    """The mode an ordinary new file gets under the current umask (mkstemp's files are owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_target(path: Path) -> Iterator[str]:
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
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


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
