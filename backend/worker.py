"""``segmask worker``: an RQ worker that loads the model once and keeps it warm.

Why RQ's SimpleWorker (jobs run in the worker process) rather than the default fork-per-job Worker: a
forked child would either load the model again (about 1 s) or inherit a copy of it whose per-image feature
cache dies with the child, so every click would pay for the trunk again; and forking a process that has
started PyTorch's thread pools is not safe. A crash in a job still only fails that job: RQ records it and
the server answers 500 for it; if the whole process dies, the server answers 503 until a worker is back.
Several workers may run, on one or many machines; each takes queues in priority order, and one that takes
the interactive queue also serves its click lane (backend.click_lane) from a second thread, on the same
runtime. Each sizes PyTorch's thread pools at its start (backend.torch_threads).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import socket
import time
import uuid

import redis
from rq import Queue, SimpleWorker, worker_registration
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.affinity import working_key
from backend.click_lane import ClickLane
from backend.job_protocol import PRIORITIES, queue_names
from backend.jobs import install_runtime, lane_click
from backend.runtime import Runtime
from backend.settings import Settings
from backend.torch_threads import apply_torch_threads

log = logging.getLogger(__name__)
# Seconds: an idle worker blocks on its queues for WORKER_TTL - 15 s between heartbeats.
WORKER_TTL = 20
# Requests a worker runs at once at most: its RQ job and a click of its click lane.
WORKER_CONCURRENCY = 2


class WarmWorker(SimpleWorker):
    """A SimpleWorker that registers itself again when Redis has forgotten it, and tells the server what it
    is running (backend.affinity: a click is not sent to a worker busy with a batch).

    A Redis restarted without persistence loses the worker registry; RQ's worker reconnects but stays
    unregistered, and the server, which checks for a registered worker before enqueueing (to answer 503
    at once instead of after a timeout), would refuse requests this live worker could serve.
    """

    def __init__(self, *args, queue_prefix: str = "segmask", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.queue_prefix = queue_prefix

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        # An idle worker beats every dequeue_timeout (WORKER_TTL - 15 s); RQ keeps its key for
        # WORKER_TTL + 60 s after a beat. One missed beat plus 10 s (connection_timeout) is enough: a killed
        # worker then stops counting as a live one (backend.rq_dispatcher.live_workers) ~15 s after it died,
        # not 80 s (480 s with RQ's default TTL). Beats during a job pass their own, job-length timeout.
        super().heartbeat(timeout or self.connection_timeout, pipeline)
        if pipeline is None and not self.connection.sismember(self.redis_workers_keys, self.key):
            log.warning("worker %s was not registered in Redis (restarted?); registering again", self.name)
            self.connection.hset(self.key, mapping=self.serialize())
            worker_registration.register(self)

    def execute_job(self, job: Job, queue: Queue) -> None:
        working = working_key(self.queue_prefix, self.name)
        self.connection.set(working, queue.name, ex=(job.timeout or 180) + 60)
        try:
            super().execute_job(job, queue)
        finally:
            # Expires anyway; a Redis gone meanwhile must not replace the job's own outcome.
            with contextlib.suppress(redis.RedisError):
                self.connection.delete(working)


def build_worker(settings: Settings, queues: tuple[str, ...] = PRIORITIES) -> WarmWorker:
    """A worker listening on ``queues`` (names from :data:`backend.job_protocol.PRIORITIES`), in that
    priority."""
    if settings.embedded:
        raise SystemExit("segmask worker needs SEGMASK_REDIS_URL (embedded mode runs jobs in the server)")
    unknown = set(queues) - set(PRIORITIES)
    if unknown:
        raise SystemExit(f"unknown queue(s) {sorted(unknown)}; choose from {PRIORITIES}")
    ordered = [name for name in PRIORITIES if name in queues]
    connection = redis.Redis.from_url(settings.redis_url)
    names = [
        n for n, short in zip(queue_names(settings.queue_prefix), PRIORITIES, strict=True) if short in ordered
    ]
    name = f"segmask-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    rq_queues = [Queue(n, connection=connection, serializer=JSONSerializer) for n in names]
    return WarmWorker(
        rq_queues,
        connection=connection,
        serializer=JSONSerializer,
        name=name,
        worker_ttl=WORKER_TTL,
        queue_prefix=settings.queue_prefix,
    )


def run_worker(settings: Settings, queues: tuple[str, ...] = PRIORITIES, burst: bool = False) -> None:
    """Load the model, then serve jobs until stopped (SIGTERM/SIGINT finish the current job first).

    RQ's worker quits when Redis goes away at some moments (e.g. while it records its state). This loop
    keeps the process, and its warm model, alive: it waits for Redis to answer again and starts a fresh
    RQ worker on the same runtime.
    """
    plan = apply_torch_threads(settings, concurrency=WORKER_CONCURRENCY)
    install_runtime(Runtime(settings, slots=plan.slots, threads=plan.threads))
    while True:
        worker = build_worker(settings, queues)
        lane = click_lane(worker, settings, queues, burst)
        log.info("worker %s listening on %s", worker.name, ", ".join(q.name for q in worker.queues))
        try:
            worker.work(burst=burst, with_scheduler=False)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.error("worker %s lost Redis: %s", worker.name, exc)
        finally:
            if lane is not None:
                lane.stop(settings.interactive_timeout + 5.0)
        # A SIGTERM/SIGINT sets the shutdown date (RQ only sets _stop_requested when it arrives mid-job).
        if burst or worker._stop_requested or worker._shutdown_requested_date is not None:
            return
        # RQ's handlers stay installed after work(); plain signals stop the wait below.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        wait_for_redis(worker.connection)


def click_lane(
    worker: WarmWorker, settings: Settings, queues: tuple[str, ...], burst: bool
) -> ClickLane | None:
    """The started click lane of ``worker``; None for a worker that takes no clicks (no interactive queue),
    a ``--burst`` one (it quits when the queues are empty), or when cache affinity, which routes clicks to
    a lane, is off."""
    if "interactive" not in queues or burst or settings.affinity_ttl <= 0:
        return None
    run = functools.partial(lane_click, worker_name=worker.name, connection=worker.connection)
    return ClickLane(worker.connection, settings.queue_prefix, worker.name, run).start()


def wait_for_redis(connection: redis.Redis, longest_pause: float = 30.0) -> None:
    """Block until ``connection`` answers PING, retrying with a growing pause."""
    pause = 1.0
    while True:
        try:
            connection.ping()
            log.info("Redis answers again")
            return
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("Redis unavailable (%s); retrying in %.0f s", exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, longest_pause)
