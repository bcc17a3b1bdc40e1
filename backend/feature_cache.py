"""The per-image feature cache every model process keeps (a worker's or embedded server's runtime, and the
CVAT functions): an LRU keyed by the image's content hash, bounded in bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Measured(Protocol):
    """What a :class:`FeatureCache` keeps: anything that knows the bytes it holds."""

    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=Measured)


class FeatureCache(Generic[T]):
    """LRU of per-image features keyed by the image's content hash, bounded in bytes (thread-safe).

    Features grow after they are cached (memoised prompt masks and cells, a detection's dense heads, trunk
    levels completed later), so whoever changes an entry measures it again with :meth:`trim`: ``trim(key)``
    measures that entry alone (a runtime serving several requests at once must not measure an image
    another request is changing), ``trim()`` every entry handed out since the last ``trim()`` (for a single
    caller; measuring every entry on every access cost a quarter of a busy server's time with 50 images
    cached). Other entries keep their last sizes. An entry larger than the whole budget is returned but
    not kept.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = max(int(capacity_bytes), 0)
        self._items: OrderedDict[str, T] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._handed: set[str] = set()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes the cached entries held when last measured."""
        with self._lock:
            return sum(self._sizes.values())

    def peek(self, key: str) -> T | None:
        """The cached entry of ``key``, or None; neither a hit nor a use (the LRU order stays as it was)."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._handed.add(key)
            return value

    def get(self, key: str, compute: Callable[[], T]) -> tuple[T, bool]:
        """The cached entry of ``key`` (and True), or ``compute()``'s, cached if it fits (and False)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self._handed.add(key)
                self.hits += 1
                return self._items[key], True
            self.misses += 1
        value = compute()
        size = value.nbytes
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            self._sizes[key] = size
            self._handed.add(key)
            self._evict()
        return value, False

    def touch(self, value: T) -> None:
        """Mark the cached entry ``value`` (found by identity; nothing when it is not cached) as about to
        change, so the next trim measures it again: for callers that keep an entry across trims (the CVAT
        agent reuses one image's features for all its clicks)."""
        with self._lock:
            key = next((k for k, item in self._items.items() if item is value), None)
            if key is not None:
                self._handed.add(key)

    def trim(self, key: str | None = None) -> None:
        """Measure the entry ``key`` again (None: every entry handed out since the last ``trim()``) and
        evict until every entry fits: call it after changing an entry (a prompt ran part of the trunk on
        it), so the budget holds before the next access."""
        with self._lock:
            keys = set(self._handed) if key is None else {key}
            for changed in keys & self._items.keys():
                self._sizes[changed] = self._items[changed].nbytes
            self._handed -= keys
            self._evict()

    def _evict(self) -> None:
        """Drop every entry that alone exceeds the budget (not the others for its sake), then least recently
        used ones until the rest fit."""
        for key in [key for key, size in self._sizes.items() if size > self.capacity_bytes]:
            self._drop(key)
        total = sum(self._sizes.values())
        while total > self.capacity_bytes:
            key = next(iter(self._items))
            total -= self._sizes[key]
            self._drop(key)

    def _drop(self, key: str) -> None:
        del self._items[key], self._sizes[key]
        self._handed.discard(key)
