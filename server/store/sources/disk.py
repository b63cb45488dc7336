"""The disk as a cache tier: fetched adapters are kept in the store least recently used first, within
`store_max_bytes`. Uploaded adapters are not counted and never evicted; pinned adapters and names in
flight (being fetched or loaded) are skipped; the one just fetched is kept even when it alone is over.

This module only decides; the registry deletes the victims it names (store and host cache together).
Recency is this process's: at start it follows the fetch times recorded in the manifests.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from adapterserve.server.store.manifest import Manifest

# The served manifest of a name, or None (AdapterStore.current).
Current = Callable[[str], "Manifest | None"]


class DiskTier:
    """Least-recently-used order of the fetched adapters in the store. Thread-safe."""

    def __init__(self, manifests: list[Manifest], current: Current, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self._current = current
        self._lock = threading.Lock()
        self._order: OrderedDict[str, None] = OrderedDict()  # least recently used first
        fetched = [m for m in manifests if m.origin is not None]
        for manifest in sorted(fetched, key=lambda m: m.origin.fetched_at):  # type: ignore[union-attr]
            self._order[manifest.name] = None
        self.evictions = 0

    def touch(self, name: str) -> None:
        """`name` was used (or fetched) now."""
        with self._lock:
            self._order[name] = None
            self._order.move_to_end(name)

    def forget(self, name: str) -> None:
        with self._lock:
            self._order.pop(name, None)

    def _fetched(self) -> list[tuple[str, int]]:
        """(name, bytes on disk) of the fetched adapters still served, least recently used first."""
        out = []
        for name in list(self._order):
            manifest = self._current(name)
            if manifest is None or manifest.origin is None:  # deleted, or replaced by an upload
                self.forget(name)
                continue
            out.append((name, manifest.size))
        return out

    def bytes(self) -> int:
        """Bytes of the fetched adapters on disk."""
        return sum(size for _, size in self._fetched())

    def entries(self) -> int:
        return len(self._fetched())

    def victims(self, protected: set[str]) -> list[str]:
        """Names to evict, least recently used first, until the fetched adapters fit `max_bytes`;
        never one in `protected`."""
        if self.max_bytes is None:
            return []
        fetched = self._fetched()
        total = sum(size for _, size in fetched)
        out = []
        for name, size in fetched:
            if total <= self.max_bytes:
                break
            if name in protected:
                continue
            out.append(name)
            total -= size
        return out

    def evicted(self, name: str) -> None:
        self.forget(name)
        self.evictions += 1
