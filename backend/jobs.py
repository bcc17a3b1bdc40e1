"""The RQ entry points: what a ``segmask worker`` runs for the server's jobs, on the process's one warm
:class:`~backend.runtime.Runtime`.

RQ calls these functions by import path (:data:`backend.job_protocol.SEGMENT`'s and ``DETECT``'s
``function``) with the request as JSON, and stores what they return: backend.job_protocol's envelope, so a
ServiceError that stops a job reaches the server as that error, not as a failed job. The worker's click lane
(backend.click_lane) runs :func:`lane_click` on the same runtime.
"""

from __future__ import annotations

import contextlib
import logging
import time

import redis
from rq import get_current_job
from rq.utils import now as utcnow

from backend.affinity import AffinityMap
from backend.errors import ServiceError
from backend.job_protocol import DETECT, SEGMENT, WARM, JobKind, encode_job_result
from backend.model_lock import waiting_until, yielding
from backend.runtime import Runtime
from backend.settings import Settings

log = logging.getLogger(__name__)
# A worker process holds exactly one warm Runtime.
_runtime: Runtime | None = None


def install_runtime(runtime: Runtime) -> None:
    """Make ``runtime`` the one the job functions of this process use (backend.worker does this at start)."""
    global _runtime
    _runtime = runtime


def current_runtime() -> Runtime:
    """This process's runtime; built from the environment on first use when none was installed."""
    if _runtime is None:
        install_runtime(Runtime(Settings.from_env()))
    return _runtime


def segment_job(request: dict) -> dict:
    """RQ entry point of :data:`~backend.job_protocol.SEGMENT` jobs (interactive queue)."""
    return _run(SEGMENT, request)


def detect_job(request: dict) -> dict:
    """RQ entry point of :data:`~backend.job_protocol.DETECT` jobs (batch queue)."""
    return _run(DETECT, request)


def warm_job(request: dict) -> dict:
    """RQ entry point of :data:`~backend.job_protocol.WARM` jobs (batch queue)."""
    return _run(WARM, request)


def lane_click(request: dict, worker_name: str, connection: redis.Redis) -> dict:
    """A click from worker ``worker_name``'s lane: its result (a ServiceError refuses it). Records, as every
    job does, that this worker holds the image."""
    runtime = current_runtime()
    _remember(runtime, connection, request, worker_name)
    return runtime.run(SEGMENT, request)


def _remember(runtime: Runtime, connection: redis.Redis, request: dict, worker_name: str) -> None:
    """Record that ``worker_name`` is working on the request's image, so the clicks on it come here
    (backend.affinity)."""
    image = request.get("image")
    if not isinstance(image, dict) or runtime.settings.affinity_ttl <= 0:
        return
    settings = runtime.settings
    try:
        AffinityMap(connection, settings.queue_prefix, settings.affinity_ttl).remember(image, worker_name)
    except redis.RedisError as exc:  # a routing hint: the job itself does not need it
        log.warning("could not record the image's worker: %s", exc)


def _run(kind: JobKind, request: dict) -> dict:
    """Run ``kind`` on ``request`` and encode its result, or the ServiceError that stopped it, with the
    seconds the job waited in its queue and ran. Records first that this worker is working on the image."""
    runtime = current_runtime()
    started = time.perf_counter()
    job = get_current_job()
    queued = (utcnow() - job.enqueued_at).total_seconds() if job and job.enqueued_at else 0.0
    if job and job.worker_name:
        _remember(runtime, job.connection, request, job.worker_name)
    try:
        # Pre-annotation yields the model, level by level, to clicks on this worker's click lane.
        with waiting_until(yielding()) if kind == DETECT else contextlib.nullcontext():
            value: dict | ServiceError = runtime.run(kind, request)
    except ServiceError as exc:
        log.warning("%s job refused: %s (%s)", kind.name, exc.message, exc.kind)
        value = exc
    return encode_job_result(value, queued, time.perf_counter() - started)
