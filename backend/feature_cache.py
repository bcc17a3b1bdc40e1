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

    Features grow after they are cached (memoised prompt masks and cells, a detection's dense heads), so every
    access measures the entries again before evicting. An entry larger than the whole budget is returned but
    not kept. Entries must not change while :meth:`get` runs (the runtimes call it, and change features, only
    under their lock).
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = max(int(capacity_bytes), 0)
        self._items: OrderedDict[str, T] = OrderedDict()
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
        """Bytes the cached entries hold now."""
        with self._lock:
            return sum(item.nbytes for item in self._items.values())

    def peek(self, key: str) -> T | None:
        """The cached entry of ``key``, or None; neither a hit nor a use (the LRU order stays as it was)."""
        with self._lock:
            return self._items.get(key)

    def get(self, key: str, compute: Callable[[], T]) -> tuple[T, bool]:
        """The cached entry of ``key`` (and True), or ``compute()``'s, cached if it fits (and False)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                value = self._items[key]
                self._evict()
                return value, True
            self.misses += 1
        value = compute()
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            self._evict()
        return value, False

    def trim(self) -> None:
        """Measure the entries again and evict until they fit: call it after an entry grew (a prompt ran
        part of the trunk on it), so the budget holds before the next access."""
        with self._lock:
            self._evict()

    def _evict(self) -> None:
        """Drop every entry that alone exceeds the budget (not the others for its sake), then least recently
        used ones until the rest fit."""
        sizes = {key: item.nbytes for key, item in self._items.items()}
        for key in [key for key, size in sizes.items() if size > self.capacity_bytes]:
            del self._items[key], sizes[key]
        total = sum(sizes.values())
        while total > self.capacity_bytes:
            key, _ = self._items.popitem(last=False)
            total -= sizes.pop(key)
