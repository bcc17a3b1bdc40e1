"""What the server and the processes that run the model agree on: the queues, the kinds of job, and what a
job hands back. Neither side's machinery is here (no RQ, no model), so a server with Redis imports it
without loading PyTorch.

Queues are named ``<SEGMASK_QUEUE_PREFIX>:<name>`` for each name of :data:`PRIORITIES`; workers take them in
that order, so a click waiting behind a pre-annotation batch is served first (``training`` holds
backend.training's jobs).

A job's result travels through RQ's JSON serializer (nothing is unpickled from Redis) as one envelope, made
by :func:`encode_job_result` in the worker and read by :func:`decode_job_result` in the server, nowhere
else: the runtime's result (backend.runtime) or, for a :class:`~backend.errors.ServiceError` that stopped
the job, ``{"error": {"status", "kind", "message"}}``; either with ``"timing": {"queued", "running"}``
(seconds), which the server reads for /metrics without another Redis round trip. The server hands callers
a :class:`JobOutcome`, whose :meth:`~JobOutcome.result` raises that ServiceError again.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.errors import ServiceError

# Highest priority first: workers listen in this order.
PRIORITIES = ("interactive", "batch", "training")


def queue_names(prefix: str) -> list[str]:
    """Redis queue names in priority order, e.g. ``segmask:interactive``."""
    return [f"{prefix}:{name}" for name in PRIORITIES]


@dataclass(frozen=True)
class JobKind:
    """One kind of model job.

    ``name``: what it does, the ``kind`` label of the job metrics; ``queue``: the queue it waits on (one of
    :data:`PRIORITIES`), which is also the mode of the ``/predict`` that makes it (the ``mode`` label of the
    request metrics); ``function``: the import path RQ calls in a worker (backend.jobs).
    """

    name: str
    queue: str
    function: str


#: One object for a click/box prompt: a ``/predict`` with a smart context.
SEGMENT = JobKind("segment", "interactive", "backend.jobs.segment_job")
#: Labelled objects of one image: a ``/predict`` without context (pre-annotation), one job per task.
DETECT = JobKind("detect", "batch", "backend.jobs.detect_job")
#: The image's features computed and kept, nothing returned: a ``/predict`` without context while
#: pre-annotation is off (SEGMASK_PREANNOTATE=false), so the clicks on an opened task find them.
WARM = JobKind("warm", "batch", "backend.jobs.warm_job")


@dataclass(frozen=True)
class JobOutcome:
    """How one job ended: ``value``, its JSON result or the ServiceError that stopped it (read it with
    :meth:`result`), and where its time went, in seconds: ``queued`` (waiting for a worker, or in embedded
    mode for the model) and ``running`` (the rest)."""

    value: dict | ServiceError
    queued: float = 0.0
    running: float = 0.0

    def result(self) -> dict:
        """The job's JSON result; raises the ServiceError that stopped the job."""
        if isinstance(self.value, ServiceError):
            raise self.value
        return self.value


def encode_job_result(value: dict | ServiceError, queued: float, running: float) -> dict:
    """The envelope a job function returns to RQ (see the module docstring)."""
    if isinstance(value, ServiceError):
        value = {"error": {"status": value.status, "kind": value.kind, "message": value.message}}
    return {**value, "timing": {"queued": queued, "running": running}}


def decode_job_result(envelope: dict) -> JobOutcome:
    """The outcome of a job that returned ``envelope`` (:func:`encode_job_result`'s)."""
    value = dict(envelope)
    timing = value.pop("timing", {})
    error = value.get("error")
    if error:
        value = ServiceError(int(error["status"]), str(error["kind"]), str(error["message"]))
    return JobOutcome(value, queued=timing.get("queued", 0.0), running=timing.get("running", 0.0))
