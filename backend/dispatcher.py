"""How the server gets model work done: one :class:`Dispatcher` interface, two ways of working.

With ``SEGMASK_REDIS_URL`` set, :class:`~backend.rq_dispatcher.RQDispatcher` enqueues jobs for ``segmask
worker`` processes and waits for their results; the server holds no model and imports no model code.
Without it (embedded mode), :class:`~backend.embedded_dispatcher.EmbeddedDispatcher` runs the same job code
in the server process. Callers use the interface alone and never ask which one they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import redis

from backend.access import LabelStudioAccess
from backend.job_protocol import JobKind, JobOutcome
from backend.rq_dispatcher import RQDispatcher
from backend.settings import Settings
from backend.training import TrainRequest


class Dispatcher(Protocol):
    """What the server runs model jobs through, and what it needs to know of the way they run."""

    #: "rq" or "embedded", as /health reports it.
    mode: str
    #: The Redis that server processes and workers share (training locks, /setup information, known
    #: projects); None in embedded mode, where all of that stays in this process.
    connection: redis.Redis | None
    #: How jobs reach Label Studio; the server keeps /setup information here for them.
    access: LabelStudioAccess
    #: Rescores a project in this process after a training thread published a version (embedded mode);
    #: None where a worker does it (backend.rescore.rescore_job).
    rescore_in_process: Callable[[TrainRequest], object] | None

    def run(self, kind: JobKind, requests: list[dict], timeout: float) -> list[JobOutcome]:
        """Run ``kind`` on every request within ``timeout`` seconds; one outcome per request, in order (a
        request that failed or ran out of time has its ServiceError in its outcome). Raises a ServiceError
        when no request can be run at all (503 ``no_worker``, ``redis_unavailable``)."""
        ...

    def queue_depths(self) -> dict[str, int]:
        """Jobs waiting per queue."""
        ...


def build_dispatcher(settings: Settings) -> Dispatcher:
    """RQ when a Redis URL is configured, else a warm in-process runtime (embedded mode)."""
    if settings.embedded:
        # Imported here, not at the top: it loads the model, and PyTorch with it, which a server with Redis
        # must not pay for.
        from backend.embedded_dispatcher import EmbeddedDispatcher
        from backend.runtime import Runtime
        from backend.torch_threads import process_plan

        plan = process_plan(settings)
        return EmbeddedDispatcher(Runtime(settings, slots=plan.slots, threads=plan.threads))
    return RQDispatcher(settings)
