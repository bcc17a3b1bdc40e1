"""The model lock of a :class:`backend.runtime.Runtime`, with an optional deadline for whoever waits for it.

A runtime serves one request at a time (its predictor holds the current image's features). In embedded
mode many server threads share it, and each request has a time limit (SEGMASK_INTERACTIVE_TIMEOUT or
SEGMASK_BATCH_TIMEOUT): :func:`waiting_until` gives the requests run inside it a deadline for getting the
model, past which they get a 503 instead of working on for a client that has given up, and optionally a
last check once they hold it (``admit``: the click lane's claim, backend.click_lane).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from backend.errors import ServiceError

# Holds of the model remembered for busy_share (at least a few seconds' worth of clicks).
HOLDS_KEPT = 256


@dataclass
class ModelWait:
    """A request's deadline for getting the model (monotonic time), its time limit (s), the seconds it has
    waited for the model so far, and ``admit``: called each time the request gets the model, before it
    uses it; a ServiceError it raises refuses the request (the model is released)."""

    deadline: float
    limit: float
    waited: float = 0.0
    admit: Callable[[], None] | None = None


_current_wait: ContextVar[ModelWait | None] = ContextVar("segmask_model_wait", default=None)


@contextlib.contextmanager
def waiting_until(wait: ModelWait) -> Iterator[ModelWait]:
    """Within the block, this thread waits for any :class:`ModelLock` until ``wait.deadline`` at most."""
    token = _current_wait.set(wait)
    try:
        yield wait
    finally:
        _current_wait.reset(token)


class ModelLock:
    """A lock that a request inside :func:`waiting_until` waits for until its deadline at most, then gets a
    503 ``worker_timeout``; the time it waited is added to its :class:`ModelWait`. Anything else waits as
    long as it takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting = 0  # threads in __enter__, counted under _count_lock (a hint for background work)
        self._count_lock = threading.Lock()
        # When the current hold began, and the (start, end) monotonic times of the last holds.
        self._held_since: float | None = None
        self._holds: deque[tuple[float, float]] = deque(maxlen=HOLDS_KEPT)

    def __enter__(self) -> ModelLock:
        wait = _current_wait.get()
        if wait is None:
            self._acquire(None)
            self._held_since = time.monotonic()
            return self
        started = time.monotonic()
        # A free model is taken even after the deadline: the request is here, and it costs no one a wait.
        acquired = self._acquire(max(wait.deadline - started, 0.0))
        wait.waited += time.monotonic() - started
        if not acquired:
            raise ServiceError(
                503,
                "worker_timeout",
                f"the model was busy with other requests: waited {wait.waited:.1f} s, the request's time "
                f"limit ({wait.limit:g} s); it was not processed",
            )
        if wait.admit is not None:
            try:
                wait.admit()
            except BaseException:
                self._lock.release()
                raise
        self._held_since = time.monotonic()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._held_since is not None:
            self._holds.append((self._held_since, time.monotonic()))
            self._held_since = None
        self._lock.release()

    def _acquire(self, timeout: float | None) -> bool:
        counted = False
        try:
            with self._count_lock:
                self._waiting += 1
                counted = True
            return self._lock.acquire() if timeout is None else self._lock.acquire(timeout=timeout)
        finally:
            if counted:
                with self._count_lock:
                    self._waiting -= 1

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        """Hold the model for background work: neither counted as waiting nor in :meth:`busy_share`, so
        that work never makes the model look busy to the requests it yields to."""
        with self._lock:
            yield

    def locked(self) -> bool:
        """Whether someone holds the model (as ``threading.Lock.locked``)."""
        return self._lock.locked()

    @property
    def waiting(self) -> int:
        """How many threads are waiting for the model now."""
        return self._waiting

    def busy_share(self, window: float) -> float:
        """The share of the last ``window`` seconds the model was held (the current hold included)."""
        now = time.monotonic()
        since = self._held_since
        holds = [*self._holds, *([(since, now)] if since is not None else [])]
        busy = sum(max(0.0, min(end, now) - max(start, now - window)) for start, end in holds)
        return min(busy / window, 1.0)

    def idle(self) -> bool:
        """Whether nobody holds the model or waits for it (background work may take it now)."""
        return not self._waiting and not self._lock.locked()
