"""The click lane: a click on an image a worker already holds goes straight to that worker through two Redis
lists, without RQ's job bookkeeping.

Why: a repeated click costs the model ~20-60 ms, and RQ around it (the job hash, its registries, the result
stream, the worker's state changes) costs several more round trips to Redis each way
(bench/bench_rq_floor.py). The lane is one ``RPUSH`` and one ``BLPOP`` on each side: the server pushes
``{"id", "request", "sent", "deadline"}`` (JSON; wall-clock seconds) onto the worker's lane
(:func:`lane_key`) and blocks on the reply list of that id (:func:`reply_key`); a thread of the worker
(:class:`ClickLane`) pops it, runs the click on the worker's one runtime (whose lock it shares with RQ's
jobs) and pushes backend.job_protocol's envelope onto the reply list, which expires if nobody reads it.

Only clicks use it, and only when backend.affinity routes a click to the worker holding its image; every
other job, and a click nobody holds, goes through RQ's shared queues. A click whose deadline has passed
before the worker reaches it is dropped: the server has answered 503 already. Like RQ's queues, the lane
holds requests, which never carry a credential (backend.access).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis

from backend.errors import ServiceError
from backend.job_protocol import SEGMENT, JobOutcome, decode_job_result, encode_job_result

log = logging.getLogger(__name__)
# Seconds a reply waits to be read (the server reads it at once, or has given up).
REPLY_TTL = 60
# Seconds the lane's thread blocks on an empty lane before it checks whether it should stop.
POLL_S = 1.0


def lane_key(prefix: str, worker_name: str) -> str:
    """The list worker ``worker_name`` takes clicks from, e.g. ``segmask:lane:segmask-host-1a2b3c4d``."""
    return f"{prefix}:lane:{worker_name}"


def reply_key(prefix: str, request_id: str) -> str:
    """The list the result of lane request ``request_id`` is pushed onto."""
    return f"{prefix}:reply:{request_id}"


def send_click(
    connection: redis.Redis, prefix: str, worker_name: str, request: dict, timeout: float
) -> JobOutcome:
    """Run a click ``request`` on worker ``worker_name`` through its lane and wait at most ``timeout``
    seconds for the outcome (server side). A click the worker has not taken by then is withdrawn and
    answered 503."""
    request_id = uuid.uuid4().hex
    now = time.time()
    payload = json.dumps({"id": request_id, "request": request, "sent": now, "deadline": now + timeout})
    lane = lane_key(prefix, worker_name)
    connection.rpush(lane, payload)
    reply = connection.blpop([reply_key(prefix, request_id)], timeout=max(timeout, 0.01))
    if reply is None:
        connection.lrem(lane, 1, payload)
        return JobOutcome(
            ServiceError(
                503,
                "worker_timeout",
                f"worker {worker_name} did not finish click {request_id} within {timeout:.0f} s; it was "
                "withdrawn",
            )
        )
    return decode_job_result(json.loads(reply[1]))


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

    def stop(self, timeout: float = 5.0) -> None:
        """Take no further click; wait up to ``timeout`` seconds for the one running."""
        self._stop.set()
        self._thread.join(timeout)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                popped = self.connection.blpop([self.key], timeout=POLL_S)
                if popped is not None:
                    self.serve_one(json.loads(popped[1]))
            except redis.RedisError as exc:
                log.warning("click lane %s: Redis unavailable (%s)", self.key, exc)
                self._stop.wait(POLL_S)
            except Exception:  # one bad click must not end the lane; the server times it out
                log.exception("click lane %s: a click failed", self.key)

    def serve_one(self, message: dict) -> None:
        """Run one lane message (:func:`send_click`'s payload) and push its outcome, unless the server has
        given up on it."""
        started = time.time()
        if started > message["deadline"]:
            log.info("click lane %s: dropped click %s, past its deadline", self.key, message["id"])
            return
        clock = time.perf_counter()
        try:
            value: dict | ServiceError = self.run(message["request"])
        except ServiceError as exc:
            log.warning("%s click refused: %s (%s)", SEGMENT.name, exc.message, exc.kind)
            value = exc
        except Exception as exc:
            log.exception("click lane %s: click %s failed", self.key, message["id"])
            value = ServiceError(500, "worker_error", f"the worker failed on click {message['id']}: {exc!r}")
        envelope = encode_job_result(value, started - message["sent"], time.perf_counter() - clock)
        reply = reply_key(self.prefix, message["id"])
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.rpush(reply, json.dumps(envelope))
            pipe.expire(reply, REPLY_TTL)
            pipe.execute()
