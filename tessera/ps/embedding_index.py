"""Row storage for an embedding shard: slots handed out and reused, and an id index.

A shard stores rows in growable arrays (values, optimizer state) addressed by
*slot*. :class:`Slots` hands slot numbers out and takes them back when rows are
evicted, so storage stays as large as the live rows (plus doubling slack).
:class:`IdIndex` maps int64 ids to slots and remembers the clock each id was last
touched, which is what admission (Monolith's frequency filter: an id is stored only
after ``admit_after`` lookups) and expiry (Monolith's expirable embeddings: rows
untouched for ``evict_after`` clocks, or the least recently touched beyond
``max_rows``, are dropped) need. The index works on whole batches of ids with numpy
(sorted keys and ``searchsorted``), never with a Python loop per id.
"""

from __future__ import annotations

import numpy as np
import torch

#: Rows of storage allocated at first growth; later growth doubles (amortised O(1)).
_MIN_CAPACITY = 64


def grown(array, needed: int):
    """``array`` (numpy or torch, rows first) with at least ``needed`` rows, doubling."""
    have = array.shape[0]
    if have >= needed:
        return array
    rows = max(needed, 2 * have, _MIN_CAPACITY)
    if isinstance(array, torch.Tensor):
        out = torch.empty((rows, *array.shape[1:]), dtype=array.dtype)
    else:
        out = np.empty((rows, *array.shape[1:]), dtype=array.dtype)
    out[:have] = array
    return out


class Slots:
    """Slot numbers ``0 .. end - 1`` handed out and taken back; freed ones are reused."""

    def __init__(self) -> None:
        self.end = 0
        self._free = np.empty(0, dtype=np.int64)

    def take(self, n: int) -> np.ndarray:
        reused = self._free[len(self._free) - min(n, len(self._free)):]
        self._free = self._free[:len(self._free) - len(reused)]
        fresh = np.arange(self.end, self.end + n - len(reused), dtype=np.int64)
        self.end += len(fresh)
        return np.concatenate([reused, fresh])

    def give(self, slots: np.ndarray) -> None:
        self._free = np.concatenate([self._free, slots])


class IdIndex:
    """A set of int64 ids, each at a slot, with the clock each was last touched.

    Per slot: ``ids`` (the id stored there; -1: free) and ``last`` (clock of its
    last touch). To map ids to slots without a per-id Python loop, the index also
    keeps ``_keys``, the stored ids in increasing order, and ``_key_slots``, the
    slot of each key:

    * :meth:`find` is one ``np.searchsorted`` of the query ids into ``_keys``
      (O(k log n) in C for k queries against n ids);
    * :meth:`insert` merges the new ids into ``_keys`` with one ``np.insert``
      (O(n + k log k));
    * :meth:`remove` drops keys with one ``np.delete`` (O(n)).

    Requests come in batches of thousands of ids, so the O(n) merge per batch
    costs far less than a dict operation per id.
    """

    def __init__(self) -> None:
        self.slots = Slots()
        self.ids = np.empty(0, dtype=np.int64)   # id at each slot; -1: free
        self.last = np.empty(0, dtype=np.int64)  # clock of last touch
        self._keys = np.empty(0, dtype=np.int64)       # stored ids, increasing
        self._key_slots = np.empty(0, dtype=np.int64)  # slot of each key

    def __len__(self) -> int:
        return len(self._keys)

    def _positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index into ``_keys`` of each id (clipped), and whether the id is there."""
        pos = np.searchsorted(self._keys, ids)
        if len(self._keys) == 0:
            return pos, np.zeros(len(ids), dtype=bool)
        np.minimum(pos, len(self._keys) - 1, out=pos)
        return pos, self._keys[pos] == ids

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each id (any order, repeats allowed); -1 where absent."""
        pos, found = self._positions(ids)
        slots = np.full(len(ids), -1, dtype=np.int64)
        if len(self._keys):
            np.copyto(slots, self._key_slots[pos], where=found)
        return slots

    def insert(self, ids: np.ndarray, clock: int) -> np.ndarray:
        """Slots for ``ids`` (absent and unique); arrays grow to ``self.slots.end``."""
        slots = self.slots.take(len(ids))
        self.ids = grown(self.ids, self.slots.end)
        self.last = grown(self.last, self.slots.end)
        self.ids[slots] = ids
        self.last[slots] = clock
        order = np.argsort(ids)
        new_keys = ids[order]
        at = np.searchsorted(self._keys, new_keys)
        self._keys = np.insert(self._keys, at, new_keys)
        self._key_slots = np.insert(self._key_slots, at, slots[order])
        return slots

    def touch(self, slots: np.ndarray, clock: int) -> None:
        # max: in async mode a late request may carry an older clock.
        self.last[slots] = np.maximum(self.last[slots], clock)

    def remove(self, slots: np.ndarray) -> None:
        if len(slots) == 0:
            return
        pos, _ = self._positions(self.ids[slots])
        self._keys = np.delete(self._keys, pos)
        self._key_slots = np.delete(self._key_slots, pos)
        self.ids[slots] = -1
        self.slots.give(slots)

    def live(self) -> np.ndarray:
        """Occupied slots, in increasing id order."""
        return self._key_slots.copy()

    def expired(self, clock: int, evict_after: int, max_rows: int) -> np.ndarray:
        """Slots untouched for ``evict_after`` clocks, then the least recently
        touched beyond ``max_rows`` (ties: smaller id first, so it is deterministic)."""
        slots = np.flatnonzero(self.ids[:self.slots.end] >= 0)
        old = np.zeros(len(slots), dtype=bool)
        if evict_after > 0:
            old = clock - self.last[slots] >= evict_after
        if max_rows > 0 and len(slots) - old.sum() > max_rows:
            kept = slots[~old]
            order = np.lexsort((self.ids[kept], self.last[kept]))
            return np.concatenate([slots[old], kept[order[:len(kept) - max_rows]]])
        return slots[old]
