"""``segmask worker``: an RQ worker that loads the model once and keeps it warm.

Why RQ's SimpleWorker (jobs run in the worker process) rather than the default fork-per-job Worker: a
forked child would either load the model again (about 1 s) or inherit a copy of it whose per-image feature
cache dies with the child, so every click would pay for the trunk again; and forking a process that has
started PyTorch's thread pools is not safe. A crash in a job still only fails that job: RQ records it and
the server answers 500 for it; if the whole process dies, the server answers 503 until a worker is back.
Several workers may run, on one or many machines; each takes queues in priority order.

Each process that runs the model sizes PyTorch's thread pools at its start (:func:`apply_torch_threads`):
PyTorch's default, a thread per core in every process, makes workers sharing a machine fight over its
cores, and their throughput falls several times over.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
import uuid
from pathlib import Path

import redis
import torch
from rq import Queue, SimpleWorker, worker_registration
from rq.serializers import JSONSerializer

from backend.jobs import Runtime, install_runtime
from backend.queue import PRIORITIES, queue_names
from backend.settings import Settings

log = logging.getLogger(__name__)
# Seconds: an idle worker blocks on its queues for WORKER_TTL - 15 s between heartbeats.
WORKER_TTL = 20
# cgroup v2's CPU limit of this process's group ("<quota> <period>" in microseconds, or "max <period>").
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container
    started with ``--cpus 2`` still has every core of the machine in its affinity)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return max(1, min(cores, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or no quota ("max")
        return cores


def torch_thread_count(settings: Settings, cores: int, omp_num_threads: str = "") -> int:
    """PyTorch threads for one model process: SEGMASK_TORCH_THREADS when set; else OMP_NUM_THREADS (what
    PyTorch itself obeys) when set; else an equal share of ``cores`` for each of SEGMASK_WORKERS_PER_HOST."""
    if settings.torch_threads > 0:
        return settings.torch_threads
    if omp_num_threads.strip().isdigit() and int(omp_num_threads) > 0:
        return int(omp_num_threads)
    return max(1, cores // max(1, settings.workers_per_host))


def apply_torch_threads(settings: Settings) -> int:
    """Size this process's PyTorch intra- and inter-op thread pools by :func:`torch_thread_count`, log it,
    and return the count. Call it before the model does any work: PyTorch fixes the inter-op pool then."""
    cores = usable_cores()
    threads = torch_thread_count(settings, cores, os.environ.get("OMP_NUM_THREADS", ""))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError as exc:  # PyTorch takes it once, before any inter-op work; serve anyway
        log.warning("PyTorch's inter-op threads stay at %d: %s", torch.get_num_interop_threads(), exc)
    log.info(
        "PyTorch threads: %d intra-op, %d inter-op (SEGMASK_TORCH_THREADS=%d, OMP_NUM_THREADS=%s, "
        "%d usable cores, SEGMASK_WORKERS_PER_HOST=%d)",
        torch.get_num_threads(),
        torch.get_num_interop_threads(),
        settings.torch_threads,
        os.environ.get("OMP_NUM_THREADS", "unset"),
        cores,
        settings.workers_per_host,
    )
    return threads


class WarmWorker(SimpleWorker):
    """A SimpleWorker that registers itself again when Redis has forgotten it.

    A Redis restarted without persistence loses the worker registry; RQ's worker reconnects but stays
    unregistered, and the server, which checks for a registered worker before enqueueing (to answer 503
    at once instead of after a timeout), would refuse requests this live worker could serve.
    """

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        # An idle worker beats every dequeue_timeout (WORKER_TTL - 15 s); RQ keeps its key for
        # WORKER_TTL + 60 s after a beat. One missed beat plus 10 s (connection_timeout) is enough: a killed
        # worker then stops counting as a live one (backend.queue.live_workers) ~15 s after it died, not
        # 80 s (480 s with RQ's default TTL). Beats during a job pass their own, job-length timeout.
        super().heartbeat(timeout or self.connection_timeout, pipeline)
        if pipeline is None and not self.connection.sismember(self.redis_workers_keys, self.key):
            log.warning("worker %s was not registered in Redis (restarted?); registering again", self.name)
            self.connection.hset(self.key, mapping=self.serialize())
            worker_registration.register(self)


def build_worker(settings: Settings, queues: tuple[str, ...] = PRIORITIES) -> WarmWorker:
    """A worker listening on ``queues`` (names from :data:`backend.queue.PRIORITIES`, in that priority)."""
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
    rq_queues = [Queue(name, connection=connection, serializer=JSONSerializer) for name in names]
    return WarmWorker(
        rq_queues,
        connection=connection,
        serializer=JSONSerializer,
        name=f"segmask-{socket.gethostname()}-{uuid.uuid4().hex[:8]}",
        worker_ttl=WORKER_TTL,
    )


def run_worker(settings: Settings, queues: tuple[str, ...] = PRIORITIES, burst: bool = False) -> None:
    """Load the model, then serve jobs until stopped (SIGTERM/SIGINT finish the current job first).

    RQ's worker quits when Redis goes away at some moments (e.g. while it records its state). This loop
    keeps the process, and its warm model, alive: it waits for Redis to answer again and starts a fresh
    RQ worker on the same runtime.
    """
    apply_torch_threads(settings)
    install_runtime(Runtime(settings))
    while True:
        worker = build_worker(settings, queues)
        log.info("worker %s listening on %s", worker.name, ", ".join(q.name for q in worker.queues))
        try:
            worker.work(burst=burst, with_scheduler=False)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.error("worker %s lost Redis: %s", worker.name, exc)
        # A SIGTERM/SIGINT sets the shutdown date (RQ only sets _stop_requested when it arrives mid-job).
        if burst or worker._stop_requested or worker._shutdown_requested_date is not None:
            return
        # RQ's handlers stay installed after work(); plain signals stop the wait below.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        wait_for_redis(worker.connection)


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
