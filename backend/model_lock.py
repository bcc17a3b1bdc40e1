"""The model lock of a :class:`backend.runtime.Runtime`, with an optional deadline for whoever waits for it.

A runtime serves ``slots`` requests at once (SEGMASK_MODEL_SLOTS, backend.torch_threads), each on its own
view of the model and never two on the same image (their features change as they run). In embedded
mode many server threads share it, and each request has a time limit (SEGMASK_INTERACTIVE_TIMEOUT or
SEGMASK_BATCH_TIMEOUT): :func:`waiting_until` gives the requests run inside it a deadline for getting the
model, past which they get a 503 instead of working on for a client that has given up, and optionally a
last check once they hold it (``admit``: the click lane's claim, backend.click_lane).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from backend.errors import ServiceError


@dataclass
class ModelWait:
    """A request's deadline for getting the model (monotonic time), its time limit (s), the seconds it has
    waited for the model so far, and ``admit``: called each time the request gets the model, before it
    uses it; a ServiceError it raises refuses the request (the model is released). A request that
    ``yields`` (pre-annotation) gets the model only when no other request waits for it, so an annotator's
    click waits for the hold in progress at most, never for a queue of pre-annotated images."""

    deadline: float
    limit: float
    waited: float = 0.0
    admit: Callable[[], None] | None = None
    yields: bool = False


_current_wait: ContextVar[ModelWait | None] = ContextVar("segmask_model_wait", default=None)


def yielding() -> ModelWait:
    """The wait of background model work done in a request's stead (rescoring a project): no deadline,
    and it yields to every request (:attr:`ModelWait.yields`)."""
    return ModelWait(math.inf, math.inf, yields=True)


@contextlib.contextmanager
def waiting_until(wait: ModelWait) -> Iterator[ModelWait]:
    """Within the block, this thread waits for any :class:`ModelLock` until ``wait.deadline`` at most."""
    token = _current_wait.set(wait)
    try:
        yield wait
    finally:
        _current_wait.reset(token)


@dataclass(eq=False)
class _Waiter:
    """One thread waiting for a :class:`ModelLock` (compared by identity), for work on the image ``key``
    (None: no particular image)."""

    yields: bool
    key: str | None


class ModelLock:
    """A lock of ``slots`` places that a request inside :func:`waiting_until` waits for until its deadline
    at most, then gets a 503 ``worker_timeout``; the time it waited is added to its :class:`ModelWait`.
    Anything else waits as long as it takes. A hold names the image it works on (:meth:`hold`); no two
    holds of one image run at once. A free place goes to the longest waiting request that does not yield
    (:attr:`ModelWait.yields`) and whose image is free, else to the longest waiting one whose image is
    free: first come, first served, so that no click waits behind clicks that came after it. ``with lock:``
    holds a place for no particular image."""

    def __init__(self, slots: int = 1) -> None:
        if slots < 1:
            raise ValueError(f"a model lock needs at least one slot, got {slots}")
        self.slots = slots
        self._cond = threading.Condition()
        self._held: list[str | None] = []  # the image of each hold in progress
        self._queue: list[_Waiter] = []  # in the order they came

    def __enter__(self) -> ModelLock:
        self._enter(None)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._release(None)

    @contextlib.contextmanager
    def hold(self, key: str | None) -> Iterator[None]:
        """Hold a place for work on the image ``key``, as ``with lock:`` does otherwise."""
        self._enter(key)
        try:
            yield
        finally:
            self._release(key)

    def _enter(self, key: str | None) -> None:
        wait = _current_wait.get()
        started = time.monotonic()
        timeout, yields = None, False
        if wait is not None:
            # A free model is taken even after the deadline: the request is here, and it costs no one a wait.
            timeout = None if math.isinf(wait.deadline) else max(wait.deadline - started, 0.0)
            yields = wait.yields
        acquired = self._acquire(timeout, yields, key)
        try:
            if wait is None:
                return
            wait.waited += time.monotonic() - started
            if not acquired:
                raise ServiceError(
                    503,
                    "worker_timeout",
                    f"the model was busy with other requests: waited {wait.waited:.1f} s, the request's "
                    f"time limit ({wait.limit:g} s); it was not processed",
                )
            if wait.admit is not None:
                wait.admit()
        except BaseException:  # a refusal, or an RQ job timeout raised here: never keep the model
            if acquired:
                self._release(key)
            raise

    def _acquire(self, timeout: float | None, yields: bool, key: str | None) -> bool:
        """Wait until a place is free and this waiter is next (:meth:`_next`), for ``timeout`` seconds at
        most (None: as long as it takes); True once held."""
        deadline = None if timeout is None else time.monotonic() + timeout
        me = _Waiter(yields, key)
        with self._cond:
            self._queue.append(me)
            try:
                while self._next() is not me:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(left)
                self._held.append(key)
                return True
            finally:
                self._queue.remove(me)
                # Whoever is next now (this one gave up, or took a place and left the queue) re-checks.
                self._cond.notify_all()

    def _next(self) -> _Waiter | None:
        """The waiter the next free place goes to, or None while no place is free for any of them."""
        if len(self._held) >= self.slots:
            return None
        ready = [w for w in self._queue if w.key is None or w.key not in self._held]
        return next((w for w in ready if not w.yields), ready[0] if ready else None)

    def _release(self, key: str | None) -> None:
        with self._cond:
            self._held.remove(key)
            self._cond.notify_all()

    @contextlib.contextmanager
    def background(self, key: str | None = None) -> Iterator[None]:
        """Hold a place for background work on the image ``key``, which yields to every request that waits
        or comes while it waits (:func:`yielding`)."""
        with waiting_until(yielding()), self.hold(key):
            yield

    @property
    def holding(self) -> int:
        """How many holds are in progress now (at most ``slots``)."""
        return len(self._held)

    def locked(self) -> bool:
        """Whether someone holds a place (as ``threading.Lock.locked``)."""
        return bool(self._held)

    @property
    def waiting(self) -> int:
        """How many threads are waiting for the model now."""
        return len(self._queue)
