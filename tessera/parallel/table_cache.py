"""A worker's cache of hot table rows, bounded in rows, with a staleness bound.

Each sharded table may keep up to ``capacity`` rows it pulled, each stamped with the
clock the pull asked for (the clock whose rows it carries: in sync mode a pull for
clock c is answered after clock c - 1 was applied). A lookup at clock c takes a
cached row only if it was pulled for a clock >= c - ``staleness``; older rows (and
ids not cached) are pulled again, and the fresh copy replaces the old one. Pushes
are unchanged: every gradient still goes to the servers, the cache never applies
one itself, so a cached row lacks at most ``staleness`` clocks of updates.

When full, the least recently used rows make room (evicted in one vectorised pass).
The index is a sorted id array searched with ``np.searchsorted``; inserts and
evictions are array copies, so one step's bookkeeping costs a few passes over the
cache's ids, never a Python loop per row.
"""

from __future__ import annotations

import numpy as np
import torch


class RowCache:
    def __init__(self, capacity: int, staleness: int, dim: int, dtype: torch.dtype):
        if capacity < 1 or staleness < 0:
            raise ValueError(f"a row cache needs capacity >= 1 and staleness >= 0, got "
                             f"{capacity}, {staleness}")
        self.capacity, self.staleness, self.dim = capacity, staleness, dim
        self.rows = torch.zeros(capacity, dim, dtype=dtype)
        self.fetched = np.zeros(capacity, dtype=np.int64)  # clock each slot was pulled for
        self.used = np.zeros(capacity, dtype=np.int64)     # last lookup (a counter)
        self.keys = np.empty(0, dtype=np.int64)            # cached ids, increasing
        self.slot = np.empty(0, dtype=np.int64)            # their slots
        self.free = np.arange(capacity - 1, -1, -1, dtype=np.int64)
        self._tick = 0
        #: Lookups served from the cache / asked of it (the benchmark's hit rate).
        self.hits = 0
        self.asked = 0

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each id: whether it is cached, and its position in ``keys``."""
        pos = np.searchsorted(self.keys, ids)
        inside = pos < len(self.keys)
        found = np.zeros(len(ids), dtype=bool)
        found[inside] = self.keys[pos[inside]] == ids[inside]
        return found, pos

    def lookup(self, ids: np.ndarray, clock: int) -> tuple[np.ndarray, torch.Tensor]:
        """Unique ``ids`` looked up at ``clock``: (mask of the ids served from the cache,
        their rows in order). Rows pulled for a clock before ``clock - staleness`` miss."""
        self._tick += 1
        self.asked += len(ids)
        found, pos = self._find(ids)
        slots = self.slot[pos[found]]
        fresh = self.fetched[slots] >= clock - self.staleness
        found[found] = fresh
        slots = slots[fresh]
        self.used[slots] = self._tick
        self.hits += len(slots)
        return found, self.rows[torch.from_numpy(slots)]

    def insert(self, ids: np.ndarray, rows: torch.Tensor, clock: int) -> None:
        """Store freshly pulled rows of unique, increasing ``ids`` (pulled for ``clock``)."""
        if not len(ids):
            return
        if len(ids) > self.capacity:  # keep the last ones (any subset is correct)
            ids, rows = ids[-self.capacity:], rows[-self.capacity:]
        found, pos = self._find(ids)
        new_ids = ids[~found]
        self.used[self.slot[pos[found]]] = self._tick  # refreshed now: evicted last
        while len(new_ids) > len(self.free):  # make room in bulk (an eighth of the cache)
            self._evict(min(max(len(new_ids) - len(self.free), self.capacity // 8),
                            len(self.keys)))
            found, pos = self._find(ids)
            new_ids = ids[~found]
        take = len(self.free) - len(new_ids)
        new_slots = self.free[take:].copy()
        self.free = self.free[:take]
        slots = np.empty(len(ids), dtype=np.int64)
        slots[found], slots[~found] = self.slot[pos[found]], new_slots
        self.rows[torch.from_numpy(slots)] = rows.to(self.rows.dtype)
        self.fetched[slots] = clock
        self.used[slots] = self._tick
        if len(new_ids):  # a merge: both sides are sorted
            at = pos[~found]
            self.keys = np.insert(self.keys, at, new_ids)
            self.slot = np.insert(self.slot, at, new_slots)

    def _evict(self, count: int) -> None:
        """Free the ``count`` least recently used slots."""
        used = self.used[self.slot]
        drop = np.argpartition(used, count - 1)[:count] if count < len(used) \
            else np.arange(len(used))
        self.free = np.concatenate([self.free, self.slot[drop]])
        self.keys, self.slot = np.delete(self.keys, drop), np.delete(self.slot, drop)
