"""The click lane: a click on an image a worker already holds goes straight to that worker through Redis
lists, without RQ's job bookkeeping.

Why: a repeated click costs the model ~20-60 ms, and RQ around it (the job hash, its registries, the result
stream, the worker's state changes) costs several more round trips to Redis each way
(bench/bench_rq_floor.py). The lane is one ``RPUSH`` and one ``BLPOP`` on each side: the server pushes
``{"id", "request", "timeout"}`` (JSON) onto the worker's lane (:func:`lane_key`) and blocks on the reply
list of that id (:func:`reply_key`); a thread of the worker (:class:`ClickLane`) pops it, runs the click on
the worker's one runtime (whose model lock it shares with RQ's jobs) and pushes backend.job_protocol's
envelope onto the reply list, which expires if nobody reads it. Between clicks the thread refreshes
:func:`alive_key`; backend.affinity routes a click only to a worker whose lane is alive.

A click runs at most once, and never starts after the server has answered: the worker claims it
(``SET <prefix>:claim:<id> NX``, :func:`claim_key`) once it holds the model, and a server whose time limit
has passed claims it first and answers 503, so the claim decides without comparing two machines' clocks.
(A click the worker claimed just before the limit still finishes; the server has answered 503 and drops
its result.)
Only clicks use the lane; every other job, and a click on an image nobody holds, goes through RQ's shared
queues. Like RQ's queues, the lane holds requests, which never carry a credential (backend.access).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

import redis

from backend.errors import ServiceError
from backend.job_protocol import SEGMENT, JobOutcome, decode_job_result, encode_job_result
from backend.model_lock import ModelWait, waiting_until

log = logging.getLogger(__name__)
# Seconds a reply is kept (the server reads it at once, or has given up on it).
REPLY_TTL = 60
# Seconds the lane's thread blocks on an empty lane before it beats and checks whether it should stop.
POLL_S = 1.0
# Seconds a lane counts as alive after its thread's last beat.
ALIVE_TTL = 5


def lane_key(prefix: str, worker_name: str) -> str:
    """The list worker ``worker_name`` takes clicks from, e.g. ``segmask:lane:segmask-host-1a2b3c4d``."""
    return f"{prefix}:lane:{worker_name}"


def alive_key(prefix: str, worker_name: str) -> str:
    """Refreshed between clicks by worker ``worker_name``'s lane thread; expires :data:`ALIVE_TTL` s after
    its last beat (or during a long click, when new clicks are better off on the shared queue)."""
    return f"{prefix}:lane-alive:{worker_name}"


def reply_key(prefix: str, request_id: str) -> str:
    """The list the result of lane request ``request_id`` is pushed onto."""
    return f"{prefix}:reply:{request_id}"


def claim_key(prefix: str, request_id: str) -> str:
    """Set by whoever decides lane request ``request_id``'s fate first: the worker that runs it, or the
    server that gave up on it."""
    return f"{prefix}:claim:{request_id}"


def claim_ttl(timeout: float) -> int:
    """Seconds a claim is kept: past any time the worker may still try to claim a click whose time limit is
    ``timeout`` (it waits for the model that long after popping it, which is at most ``timeout`` after the
    server pushed it)."""
    return 2 * math.ceil(timeout) + REPLY_TTL


def send_click(
    connection: redis.Redis, prefix: str, worker_name: str, request: dict, timeout: float
) -> JobOutcome:
    """Run a click ``request`` on worker ``worker_name`` through its lane and wait at most ``timeout``
    seconds for the outcome (server side). A click the worker has not started by then never runs: 503."""
    request_id = uuid.uuid4().hex
    payload = json.dumps({"id": request_id, "request": request, "timeout": timeout})
    lane = lane_key(prefix, worker_name)
    started = time.monotonic()
    with connection.pipeline(transaction=False) as pipe:
        pipe.rpush(lane, payload)
        pipe.expire(lane, math.ceil(timeout) + REPLY_TTL)  # a server that dies here leaves nothing for long
        pipe.execute()
    try:
        reply = connection.blpop([reply_key(prefix, request_id)], timeout=max(timeout, 0.01))
    except redis.RedisError:
        with contextlib.suppress(redis.RedisError):  # the caller answers 503: the click must not run later
            connection.set(claim_key(prefix, request_id), "server", nx=True, ex=claim_ttl(timeout))
        raise
    if reply is None:
        if connection.set(claim_key(prefix, request_id), "server", nx=True, ex=claim_ttl(timeout)):
            connection.lrem(lane, 1, payload)
            fate = "it was not started and never will be"
        else:
            fate = "it started too late and its result is discarded"
        return JobOutcome(
            ServiceError(
                503,
                "worker_timeout",
                f"worker {worker_name} did not finish click {request_id} within {timeout:g} s; {fate}",
            )
        )
    outcome = decode_job_result(json.loads(reply[1]))
    # Measured here, on one clock: the worker only knows how long it ran.
    return replace(outcome, queued=max(time.monotonic() - started - outcome.running, 0.0))


class ClickLane:
    """The worker's side: a daemon thread that serves ``worker_name``'s lane with ``run`` (a click request
    -> its result dict, raising ServiceError to refuse it) until :meth:`stop`."""

    def __init__(
        self, connection: redis.Redis, prefix: str, worker_name: str, run: Callable[[dict], dict]
    ) -> None:
        self.connection, self.prefix, self.worker_name, self.run = connection, prefix, worker_name, run
        self.key = lane_key(prefix, worker_name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"click-lane-{worker_name}", daemon=True)

    def start(self) -> ClickLane:
        self._thread.start()
        return self

    def stop(self, timeout: float) -> None:
        """Take no further click, wait up to ``timeout`` seconds for the one running, and answer the clicks
        still waiting in the lane with a 503 at once (rather than at the server's time limit)."""
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self.connection.delete(alive_key(self.prefix, self.worker_name))
        if self._thread.is_alive():
            self._thread.join(timeout)
        with contextlib.suppress(redis.RedisError):
            while (raw := self.connection.lpop(self.key)) is not None:
                message = json.loads(raw)
                if self._claim(message["id"], float(message["timeout"])):
                    refusal = ServiceError(503, "worker_stopping", f"worker {self.worker_name} is stopping")
                    self._reply(message["id"], encode_job_result(refusal, 0.0, 0.0))

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self.connection.set(alive_key(self.prefix, self.worker_name), 1, ex=ALIVE_TTL)
                popped = self.connection.blpop([self.key], timeout=POLL_S)
                if popped is not None:
                    self.serve_one(json.loads(popped[1]))
            except redis.RedisError as exc:
                log.warning("click lane %s: Redis unavailable (%s)", self.key, exc)
                self._stop.wait(POLL_S)
            except Exception:  # a malformed message must not end the lane; its server times it out
                log.exception("click lane %s: could not serve a message", self.key)

    def serve_one(self, message: dict) -> None:
        """Run one lane message (:func:`send_click`'s payload), claiming it once the model is held, and push
        its outcome. Waits for the model for the message's time limit at most."""
        request_id, timeout = message["id"], float(message["timeout"])
        claimed = False

        def claim() -> None:
            nonlocal claimed
            try:
                won = claimed or self._claim(request_id, timeout)
            except redis.RedisError as exc:
                raise ServiceError(
                    503, "redis_unavailable", f"could not claim click {request_id}: {exc}"
                ) from exc
            if not won:
                raise ServiceError(503, "worker_timeout", f"the server gave up on click {request_id}")
            claimed = True

        clock = time.perf_counter()
        try:
            with waiting_until(ModelWait(time.monotonic() + timeout, timeout, admit=claim)):
                value: dict | ServiceError = self.run(message["request"])
        except ServiceError as exc:
            log.warning("%s click refused: %s (%s)", SEGMENT.name, exc.message, exc.kind)
            value = exc
        except Exception as exc:
            log.exception("click lane %s: click %s failed", self.key, request_id)
            value = ServiceError(500, "worker_error", f"the worker failed on click {request_id}: {exc!r}")
        self._reply(request_id, encode_job_result(value, 0.0, time.perf_counter() - clock))

    def _claim(self, request_id: str, timeout: float) -> bool:
        key = claim_key(self.prefix, request_id)
        return bool(self.connection.set(key, "worker", nx=True, ex=claim_ttl(timeout)))

    def _reply(self, request_id: str, envelope: dict) -> None:
        reply = reply_key(self.prefix, request_id)
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.rpush(reply, json.dumps(envelope))
            pipe.expire(reply, REPLY_TTL)
            pipe.execute()
