"""The server's side of RQ: enqueue a job on the queue of its kind and wait for its result.

The server never runs a model itself when Redis is configured: it enqueues a job on the queue of its
priority (backend.job_protocol) and blocks on the job's result stream (RQ's ``latest_result``) until a
deadline well under Label Studio's 100 s. A click on an image a worker holds goes to that worker's click
lane instead (backend.affinity, backend.click_lane): no RQ job, two Redis lists.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import redis
from rq import Queue, Worker
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.results import Result
from rq.serializers import JSONSerializer

from backend.access import LabelStudioAccess, SetupRegistry
from backend.affinity import AffinityMap
from backend.click_lane import send_click
from backend.errors import ServiceError
from backend.job_protocol import PRIORITIES, SEGMENT, JobKind, JobOutcome, decode_job_result, queue_names
from backend.settings import Settings

log = logging.getLogger(__name__)
WORKER_CHECK_S = 2.0


def live_workers(connection: redis.Redis, queue: Queue) -> int:
    """Workers registered on ``queue`` whose key still exists. RQ's registry set keeps a killed worker
    until some worker's maintenance cleans it, but its key expires soon after its last heartbeat
    (backend.worker)."""
    keys = Worker.all_keys(connection=connection, queue=queue)
    return int(connection.exists(*keys)) if keys else 0


class RQDispatcher:
    """Enqueues on Redis for ``segmask worker`` processes and waits for their results
    (a :class:`backend.dispatcher.Dispatcher`)."""

    mode = "rq"
    # A worker rescores after training (backend.training enqueues backend.rescore.rescore_job).
    rescore_in_process = None

    def __init__(self, settings: Settings) -> None:
        longest_wait = max(settings.interactive_timeout, settings.batch_timeout)
        # Short connect timeout: a dead Redis must give a quick 503, not a hang. The read timeout must
        # outlast the longest blocking wait on a result stream.
        self.connection = redis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=1.0,
            socket_timeout=longest_wait + 5.0,
            health_check_interval=30,
        )
        # /setup information goes to Redis, where workers read it.
        self.access = LabelStudioAccess(settings, SetupRegistry(self.connection, settings.queue_prefix))
        self.prefix = settings.queue_prefix
        self._worker_seen: dict[str, float] = {}
        self.affinity = (
            AffinityMap(self.connection, settings.queue_prefix, settings.affinity_ttl)
            if settings.affinity_ttl > 0
            else None
        )
        self.queues = {
            short: Queue(name, connection=self.connection, serializer=JSONSerializer)
            for short, name in zip(PRIORITIES, queue_names(settings.queue_prefix), strict=True)
        }

    def run(self, kind: JobKind, requests: list[dict], timeout: float) -> list[JobOutcome]:
        queue = self.queues[kind.queue]
        try:
            self._require_worker(queue)
            holder = self._holder(kind, requests)
            if holder is not None:
                return [send_click(self.connection, self.prefix, holder, requests[0], timeout)]
            jobs = [
                queue.enqueue(
                    kind.function,
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

    def _holder(self, kind: JobKind, requests: list[dict]) -> str | None:
        """The worker whose lane a click goes to: the one holding its image's features when it can take it
        now (backend.affinity); None for everything else, which goes to the shared queue of its kind."""
        if kind is not SEGMENT or self.affinity is None or len(requests) != 1:
            return None
        image = requests[0].get("image")
        return self.affinity.worker_for(image) if isinstance(image, dict) else None

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

    def _wait(self, job: Job, deadline: float) -> JobOutcome:
        remaining = deadline - time.monotonic()
        result = job.latest_result(timeout=max(1, math.ceil(remaining))) if remaining > 0 else None
        if result is None:
            # Nobody will read a late result. The job's ttl equals the timeout, so an unstarted job may
            # have expired already and there is nothing left to cancel.
            with contextlib.suppress(InvalidJobOperation, NoSuchJobError):
                job.cancel()
            return JobOutcome(
                ServiceError(
                    503,
                    "worker_timeout",
                    f"no worker finished job {job.id} within the timeout; it was cancelled",
                )
            )
        if result.type != Result.Type.SUCCESSFUL:
            last_line = (result.exc_string or "").strip().splitlines()[-1:] or ["no traceback"]
            log.error("job %s failed on the worker:\n%s", job.id, result.exc_string)
            return JobOutcome(
                ServiceError(500, "worker_error", f"the worker failed on job {job.id}: {last_line[0]}")
            )
        return decode_job_result(result.return_value)

    def queue_depths(self) -> dict[str, int]:
        return {name: q.count for name, q in self.queues.items()}

    def _where(self) -> str:
        kwargs = self.connection.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
