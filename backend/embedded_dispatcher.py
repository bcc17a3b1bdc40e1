"""Embedded mode (no Redis): the server runs jobs itself, on one warm runtime, under the same time limits."""

from __future__ import annotations

import time

from backend.access import LabelStudioAccess
from backend.errors import ServiceError
from backend.job_protocol import DETECT, JobKind, JobOutcome
from backend.model_lock import ModelWait, waiting_until
from backend.rescore import rescore
from backend.runtime import Runtime
from backend.training import TrainRequest


class EmbeddedDispatcher:
    """Runs jobs in this process with a warm :class:`Runtime` (no Redis, no worker), within the ``timeout``
    of each :meth:`run` as far as waiting goes (a :class:`backend.dispatcher.Dispatcher`).

    What is bounded and counted as queued is the wait for the runtime's model lock
    (:class:`backend.model_lock.ModelLock`): the dispatcher does not serialise what the runtime does outside
    its lock. A request that cannot get the model before the deadline, and every request of a batch not
    started by then, is answered 503 ``worker_timeout`` without running: nobody would read its result. Unlike
    :class:`backend.rq_dispatcher.RQDispatcher`, which stops waiting at the deadline, a request that has
    started runs to its end: its image download (``SEGMASK_IMAGE_TIMEOUT``) and its model work once it holds
    the model. ``JobOutcome.queued`` is the time waited for the model, ``running`` the rest of the time in
    the runtime.
    """

    mode = "embedded"
    connection = None

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @property
    def access(self) -> LabelStudioAccess:
        """The runtime's: /setup information stays in this process."""
        return self.runtime.access

    def rescore_in_process(self, req: TrainRequest) -> dict:
        """Rescore ``req.project`` with this process's runtime (backend.rescore)."""
        return rescore(self.runtime, req)

    def run(self, kind: JobKind, requests: list[dict], timeout: float) -> list[JobOutcome]:
        deadline = time.monotonic() + timeout
        # Pre-annotation yields the model to waiting clicks and task opens, image by image.
        yields = kind == DETECT
        return [
            self._run_one(kind, request, ModelWait(deadline, timeout, yields=yields)) for request in requests
        ]

    def _run_one(self, kind: JobKind, request: dict, wait: ModelWait) -> JobOutcome:
        if time.monotonic() >= wait.deadline:
            return JobOutcome(
                ServiceError(
                    503,
                    "worker_timeout",
                    f"not started: earlier tasks used up the request's time limit ({wait.limit:g} s)",
                )
            )
        started = time.monotonic()
        try:
            with waiting_until(wait):
                value: dict | ServiceError = self.runtime.run(kind, request)
        except ServiceError as exc:
            value = exc
        return JobOutcome(value, queued=wait.waited, running=time.monotonic() - started - wait.waited)

    def queue_depths(self) -> dict[str, int]:
        return {}
