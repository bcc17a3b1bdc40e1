"""The training job board: each project's latest training record in ``<store>/jobs/<project>.json``.

A record holds the job's state (queued, running, published, kept, failed, interrupted), stage, percent and
outcome; ``/jobs`` shows them all. Records are replaced atomically; a store without a root keeps none.
"""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime

from segmodels.checkpoint_files import atomic_write_json
from segmodels.model_store import ModelStore, process_alive


def now() -> str:
    """The current UTC time as an ISO 8601 string, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobBoard:
    """Per-project training records in ``<store>/jobs/<project>.json`` (atomic writes)."""

    def __init__(self, store: ModelStore) -> None:
        self.dir = store.root / "jobs" if store.root else None

    def write(self, project: int, **fields) -> dict:
        """Merge ``fields`` into the project's record and return it (unsaved when the store has no root)."""
        if self.dir is None:
            return fields
        path = self.dir / f"{project}.json"
        record = {**self.read(project), **fields, "project": project, "updated_at": now()}
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record)
        return record

    def read(self, project: int) -> dict:
        """The project's record ({} if none); a running job whose process is gone reads as interrupted."""
        path = self.dir / f"{project}.json" if self.dir else None
        if path is None or not path.exists():
            return {}
        record = json.loads(path.read_text())
        if record.get("state") == "running" and not _job_process_alive(record):
            record = {**record, "state": "interrupted", "reason": "the job's process is gone (killed?)"}
        return record

    def all(self) -> list[dict]:
        """Every project's record, in file name order."""
        if self.dir is None or not self.dir.exists():
            return []
        return [self.read(int(p.stem)) for p in sorted(self.dir.glob("*.json")) if p.stem.isdigit()]


def _job_process_alive(record: dict) -> bool:
    """Whether the process that wrote a running record exists; another machine's record is trusted."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        pid = int(record.get("pid", 0))
    except ValueError:
        return False
    return process_alive(pid)
