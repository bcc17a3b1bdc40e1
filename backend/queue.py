"""Queue names and priorities, enqueue-and-wait, and the embedded (in-process) mode.

The server never runs a model itself when Redis is configured: it enqueues a job on the queue of its
priority and blocks on the job's result stream (RQ's ``latest_result``) until a deadline well under Label
Studio's 100 s. Workers take queues in the order of :data:`PRIORITIES`, so a click waiting behind a
pre-annotation batch is served first. Without Redis, :class:`EmbeddedDispatcher` runs the same job code in
the server process, one model call at a time, under the same deadlines.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis
from rq import Queue, Worker
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.results import Result
from rq.serializers import JSONSerializer

from backend.errors import ServiceError
from backend.jobs import Runtime
from backend.model_lock import ModelWait, waiting_until

log = logging.getLogger(__name__)

# Highest priority first: workers listen in this order.
PRIORITIES = ("interactive", "batch", "training")
JOB_FUNCTIONS = {"segment": "backend.jobs.segment_job", "detect": "backend.jobs.detect_job"}
QUEUE_OF = {"segment": "interactive", "detect": "batch"}
WORKER_CHECK_S = 2.0


def queue_names(prefix: str) -> list[str]:
    """Redis queue names in priority order, e.g. ``segmask:interactive``."""
    return [f"{prefix}:{name}" for name in PRIORITIES]


@dataclass
class JobOutcome:
    """A finished job: its JSON ``result`` and where the time went (seconds)."""

    result: dict
    queued: float = 0.0
    running: float = 0.0


class Dispatcher(Protocol):
    mode: str

    def run(self, kind: str, requests: list[dict], timeout: float) -> list[JobOutcome | ServiceError]:
        """Run ``kind`` on every request; one outcome (or the ServiceError that stopped it) per request."""
        ...

    def queue_depths(self) -> dict[str, int]:
        """Jobs waiting per queue."""
        ...


def unwrap(outcome: JobOutcome) -> dict:
    """The job's result, raising the ServiceError a job reported as ``{"error": ...}``."""
    error = outcome.result.get("error")
    if error:
        raise ServiceError(int(error["status"]), str(error["kind"]), str(error["message"]))
    return outcome.result


class EmbeddedDispatcher:
    """Runs jobs in this process with a warm :class:`Runtime` (no Redis, no worker), within the ``timeout``
    of each :meth:`run`, as :class:`RQDispatcher` does.

    What is bounded and counted as queued is the wait for the runtime's model lock
    (:class:`backend.model_lock.ModelLock`): the dispatcher does not serialise what the runtime does outside
    its lock.
    A request that cannot get the model before the deadline, and every request of a batch not started by
    then, is answered 503 ``worker_timeout`` without running: nobody would read its result.
    ``JobOutcome.queued`` is the time waited for the model, ``running`` the rest of the time in the runtime.
    """

    mode = "embedded"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def run(self, kind: str, requests: list[dict], timeout: float) -> list[JobOutcome | ServiceError]:
        handler = {"segment": self.runtime.segment, "detect": self.runtime.detect}[kind]
        deadline = time.monotonic() + timeout
        return [self._run_one(handler, request, ModelWait(deadline, timeout)) for request in requests]

    @staticmethod
    def _run_one(
        handler: Callable[[dict], dict], request: dict, wait: ModelWait
    ) -> JobOutcome | ServiceError:
        if time.monotonic() >= wait.deadline:
            return ServiceError(
                503,
                "worker_timeout",
                f"not started: earlier tasks used up the request's time limit ({wait.limit:g} s)",
            )
        started = time.monotonic()
        try:
            with waiting_until(wait):
                result = handler(request)
        except ServiceError as exc:
            return exc
        return JobOutcome(result, queued=wait.waited, running=time.monotonic() - started - wait.waited)

    def queue_depths(self) -> dict[str, int]:
        return {}


def live_workers(connection: redis.Redis, queue: Queue) -> int:
    """Workers registered on ``queue`` whose key still exists. RQ's registry set keeps a killed worker
    until some worker's maintenance cleans it, but its key expires soon after its last heartbeat
    (backend.worker)."""
    keys = Worker.all_keys(connection=connection, queue=queue)
    return int(connection.exists(*keys)) if keys else 0


class RQDispatcher:
    """Enqueues on Redis for ``segmask worker`` processes and waits for their results."""

    mode = "rq"

    def __init__(self, redis_url: str, prefix: str, longest_wait: float) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        # Short connect timeout: a dead Redis must give a quick 503, not a hang. The read timeout must
        # outlast the longest blocking wait on a result stream.
        self.connection = redis.Redis.from_url(
            redis_url, socket_connect_timeout=1.0, socket_timeout=longest_wait + 5.0, health_check_interval=30
        )
        self._worker_seen: dict[str, float] = {}
        self.queues = {
            name: Queue(f"{prefix}:{name}", connection=self.connection, serializer=JSONSerializer)
            for name in PRIORITIES
        }

    def run(self, kind: str, requests: list[dict], timeout: float) -> list[JobOutcome | ServiceError]:
        queue = self.queues[QUEUE_OF[kind]]
        try:
            self._require_worker(queue)
            jobs = [
                queue.enqueue(
                    JOB_FUNCTIONS[kind],
                    request,
                    ttl=math.ceil(timeout),
                    result_ttl=60,
                    failure_ttl=3600,
                    job_timeout=max(math.ceil(timeout), 30),
                )
                for request in requests
            ]
            deadline = time.monotonic() + timeout
            return [self._wait(job, deadline) for job in jobs]
        except redis.RedisError as exc:
            raise ServiceError(
                503,
                "redis_unavailable",
                f"Redis at {self._where()} is unavailable ({exc.__class__.__name__}: "
                f"{exc}); the request was not processed, retry when it is back",
            ) from exc

    def _require_worker(self, queue: Queue) -> None:
        # Checked at most every WORKER_CHECK_S per queue: a click should not pay for it every time.
        if time.monotonic() - self._worker_seen.get(queue.name, -1e9) < WORKER_CHECK_S:
            return
        if live_workers(self.connection, queue) > 0:
            self._worker_seen[queue.name] = time.monotonic()
        else:
            raise ServiceError(
                503,
                "no_worker",
                f"no worker listens on queue '{queue.name}' (start one with `segmask worker`)",
            )

    def _wait(self, job: Job, deadline: float) -> JobOutcome | ServiceError:
        remaining = deadline - time.monotonic()
        result = job.latest_result(timeout=max(1, math.ceil(remaining))) if remaining > 0 else None
        if result is None:
            # Nobody will read a late result. The job's ttl equals the timeout, so an unstarted job may
            # have expired already and there is nothing left to cancel.
            with contextlib.suppress(InvalidJobOperation, NoSuchJobError):
                job.cancel()
            return ServiceError(
                503, "worker_timeout", f"no worker finished job {job.id} within the timeout; it was cancelled"
            )
        if result.type != Result.Type.SUCCESSFUL:
            last_line = (result.exc_string or "").strip().splitlines()[-1:] or ["no traceback"]
            log.error("job %s failed on the worker:\n%s", job.id, result.exc_string)
            return ServiceError(500, "worker_error", f"the worker failed on job {job.id}: {last_line[0]}")
        value = result.return_value
        timing = value.pop("timing", {}) if isinstance(value, dict) else {}
        return JobOutcome(value, queued=timing.get("queued", 0.0), running=timing.get("running", 0.0))

    def queue_depths(self) -> dict[str, int]:
        return {name: q.count for name, q in self.queues.items()}

    def _where(self) -> str:
        kwargs = self.connection.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
