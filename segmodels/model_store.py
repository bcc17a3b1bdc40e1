"""A versioned model store: immutable numbered checkpoints and an atomically switched ``current`` pointer.

Layout under ``root``::

    versions/v1/            a checkpoint (model.safetensors + model.json with "version": "v1")
                            and whatever the training job kept beside it (metrics.json, data/, train.log)
    current                 JSON {"version": "v3", "switched_at": ..., "reason": ...}, replaced atomically
    history.jsonl           one line per switch of ``current`` (publish, rollback), appended
    staging/                versions being built; renamed into versions/ only when complete

A version directory appears in ``versions/`` by a single rename, so readers never see half of one, and is
never changed afterwards. With no ``current`` yet, the store serves ``fallback`` (the shipped model).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from segmodels.checkpoint_files import METADATA_FILE, atomic_write_json, checkpoint_version

VERSIONS = "versions"
CURRENT = "current"
HISTORY = "history.jsonl"


@dataclass
class StagedVersion:
    """A version being built in ``path``; ``name`` is set once it has been added to the store."""

    path: Path
    name: str | None = None


@dataclass(frozen=True)
class VersionInfo:
    """One stored version: ``name`` (``v3``), its directory, whether it is current, and its metadata."""

    name: str
    path: Path
    current: bool
    created: str | None
    metrics: dict
    published: bool


class ModelStore:
    """Numbered model versions under ``root``; ``fallback`` is served while nothing is published."""

    def __init__(self, root: str | Path | None, fallback: str | Path) -> None:
        """``root`` None: a read-only store that only ever serves ``fallback``."""
        self.root = Path(root) if root else None
        self.fallback = Path(fallback)

    @property
    def writable(self) -> bool:
        return self.root is not None

    # ---- reading ------------------------------------------------------------------------------------------
    def current_name(self) -> str | None:
        """The published version's name, or None while the fallback is served."""
        if self.root is None:
            return None
        try:
            return json.loads((self.root / CURRENT).read_text())["version"]
        except FileNotFoundError:
            return None

    def current_dir(self) -> Path:
        """Directory of the checkpoint to serve now."""
        name = self.current_name()
        return self.root / VERSIONS / name if self.root and name else self.fallback

    def current_version(self) -> str:
        """The version string predictions carry (cheap: reads two small files)."""
        return checkpoint_version(self.current_dir())

    def versions(self) -> list[VersionInfo]:
        """Every stored version, oldest first, plus the fallback as ``name`` = its version string."""
        current = self.current_name()
        published = self._published()
        infos = [
            VersionInfo(checkpoint_version(self.fallback), self.fallback, current is None, None, {}, True)
        ]
        for path in sorted(self._version_dirs(), key=_number):
            meta = json.loads((path / METADATA_FILE).read_text())
            metrics_path = path / "metrics.json"
            metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
            infos.append(
                VersionInfo(
                    path.name,
                    path,
                    path.name == current,
                    meta.get("created"),
                    metrics,
                    path.name in published,
                )
            )
        return infos

    def get(self, name: str) -> Path:
        """The directory of version ``name`` (``v3``, or the fallback's version string); KeyError if none."""
        if name == checkpoint_version(self.fallback):
            return self.fallback
        path = self.root / VERSIONS / name if self.root else None
        if path is None or not (path / METADATA_FILE).exists():
            known = ", ".join(v.name for v in self.versions())
            raise KeyError(f"no model version {name!r} (known: {known})")
        return path

    # ---- writing ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def new_version(self) -> Iterator[StagedVersion]:
        """A staging directory to build a version in; on a clean exit it becomes ``versions/vN`` (the next
        number) in one rename, with ``"version": "vN"`` in its model.json. On an exception, or if the
        process dies, nothing appears in ``versions/`` (stale staging directories are removed later)."""
        root = self._writable_root()
        staging_root = root / "staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staging(staging_root)
        staging = Path(tempfile.mkdtemp(prefix=f"{socket.gethostname()}-{os.getpid()}-", dir=staging_root))
        staged = StagedVersion(staging)
        try:
            yield staged
            with self._lock(root):
                name = f"v{self._next_number()}"
                meta = json.loads((staging / METADATA_FILE).read_text())
                atomic_write_json(staging / METADATA_FILE, {**meta, "version": name})
                (root / VERSIONS).mkdir(parents=True, exist_ok=True)
                os.rename(staging, root / VERSIONS / name)
            staged.name = name
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def publish(self, name: str, reason: str) -> None:
        """Make ``name`` the served version (atomic pointer switch), recording why."""
        root = self._writable_root()
        self.get(name)
        record = {"version": name, "switched_at": _now(), "reason": reason}
        with self._lock(root):
            atomic_write_json(root / CURRENT, record)
            self._append_history(root, record)

    def rollback(self, name: str) -> None:
        """Serve ``name`` again (any stored version, or the fallback's version string)."""
        root = self._writable_root()
        if name == checkpoint_version(self.fallback):
            with self._lock(root):
                (root / CURRENT).unlink(missing_ok=True)
                self._append_history(
                    root, {"version": None, "switched_at": _now(), "reason": "rollback to the fallback"}
                )
            return
        self.publish(name, "rollback")

    # ---- internals ----------------------------------------------------------------------------------------
    def _writable_root(self) -> Path:
        """``root``; PermissionError on a read-only store (no root)."""
        if self.root is None:
            raise PermissionError(
                "no model store is configured (SEGMASK_MODEL_STORE); only the fallback is served"
            )
        return self.root

    @staticmethod
    def _append_history(root: Path, record: dict) -> None:
        with open(root / HISTORY, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _version_dirs(self) -> list[Path]:
        versions = self.root / VERSIONS if self.root else None
        if versions is None or not versions.exists():
            return []
        return [p for p in versions.iterdir() if p.name.startswith("v") and p.name[1:].isdigit()]

    def _next_number(self) -> int:
        return max((_number(p) for p in self._version_dirs()), default=0) + 1

    def _published(self) -> set[str]:
        path = self.root / HISTORY if self.root else None
        if path is None or not path.exists():
            return set()
        return {json.loads(line)["version"] for line in path.read_text().splitlines() if line.strip()} - {
            None
        }

    @staticmethod
    @contextlib.contextmanager
    def _lock(root: Path) -> Iterator[None]:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _remove_stale_staging(staging_root: Path) -> None:
        """Staging directories of processes that no longer exist (killed jobs) on this host."""
        host = socket.gethostname()
        for path in staging_root.iterdir():
            owner, _, rest = path.name.partition("-")
            pid = rest.split("-", 1)[0]
            if owner == host and pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _number(path: Path) -> int:
    return int(path.name[1:])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
