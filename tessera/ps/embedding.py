"""One server's shard of a sharded embedding table: lookups, updates, eviction.

Recommendation models keep one row per user, item or feature value; the ids come
from an open, hashed space (any int64), so the table cannot be allocated up front
and does not fit one machine. PERSIA (Lian et al., "PERSIA: An Open, Hybrid System
Scaling Deep Learning-based Recommenders up to 100 Trillion Parameters", KDD 2022)
and Monolith (Liu et al., "Monolith: Real Time Recommendation System With
Collisionless Embedding Table", 2022) keep such tables on parameter servers. The
concepts, one module each:

1. **Placement by hash and lazy rows** (:mod:`tessera.ps.embedding_ids`): row ``id``
   lives on server ``owner_of(id)``, and exists only once it is touched, starting
   from a value that is a pure function of ``(seed, id)``.
2. **Storage** (:mod:`tessera.ps.embedding_index`): rows in reusable slots, found
   through a sorted id index, with the clock of each row's last touch.
3. **Admission** (Monolith's frequency filter, here): an id is stored only once it
   has been looked up ``admit_after`` times; until then lookups answer the initial
   row and updates to it are dropped, so one-off ids do not fill the memory.
4. **Expiry** (Monolith's expirable embeddings, here): rows untouched for
   ``evict_after`` clocks are dropped, and ``max_rows`` bounds a server's rows by
   dropping the least recently touched ones.
4b. **A byte cap** (``memory_bytes``, ``[model] table_memory_mb``): everything the
   shard keeps is allocated once at the cap (:class:`Capacity`) and reused in place;
   new rows evict by time to live, then LRU or LFU with decay (``eviction``), and
   admission counts live in a counting Bloom filter (:mod:`tessera.ps.bloom`) of
   fixed size inside the cap, not in the exact (unbounded) pending map.
5. **Sparse optimizers** (:mod:`tessera.ps.embedding_optim`): only rows in the
   gradient change; state exists only for rows that have been updated.
6. **Checkpoints** (:mod:`tessera.ps.embedding_state`): exact export, and import
   with re-sharding onto another number of servers.

This module is pure logic (no sockets, no threads): the server
(:mod:`tessera.ps.table_server`) calls ``lookup`` to answer pulls and ``apply`` once
per clock with the workers' averaged gradient.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tessera.config.schema import OptimizerConfig
from tessera.ps.bloom import CountingBloom
from tessera.ps.embedding_ids import TableError, initial_rows
from tessera.ps.embedding_index import (IdIndex, Slots, fault_ahead, fill_rows, gather_rows,
                                         grown, prefault, return_freed_memory, scatter_rows,
                                         zero_rows)
from tessera.ps.embedding_optim import STATE_NAMES, check_sparse_optimizer, initial_state, sparse_step
from tessera.ps.embedding_state import ShardState
from tessera.transport.wire import TableSpec  # noqa: F401 - re-exported


#: Hash functions of the admission filter.
BLOOM_HASHES = 3
#: A capped shard's hash buckets are at least this many times its row capacity (the
#: index is cleaned in place at 70% used buckets).
_BUCKETS_PER_ROW = 2.5
#: Rows freed at once when a capped shard is full: at least this fraction of its
#: capacity (the scan for victims is amortised over many new rows).
_EVICT_FRACTION = 1 / 64


class Capacity:
    """How a byte cap (``TableSpec.memory_bytes``) is spent: ``rows`` of capacity,
    ``buckets`` of the id index, ``filter`` counters of the admission filter, and the
    total ``nbytes`` that storage takes (<= the cap)."""

    def __init__(self, spec: TableSpec, num_state: int):
        cap = spec.memory_bytes
        self.filter = 0
        if spec.admit_after > 1:
            self.filter = spec.filter_bytes or max(4096, cap // 16)
        # Per row: value and optimizer state rows, the row -> state slot map, the index's
        # per-id arrays, the LFU count (float32), the state slots' free list.
        self.per_row = (spec.dim * 4 * (1 + num_state) + 8 + IdIndex.bytes_per_id()
                        + (4 if spec.eviction == "lfu" else 0) + (8 if num_state else 0))
        left = cap - self.filter
        self.rows = self.buckets = 0
        buckets = 1 << 10
        while 16 * buckets < left:
            rows = min(int(buckets / _BUCKETS_PER_ROW), (left - 16 * buckets) // self.per_row)
            if rows > self.rows:
                self.rows, self.buckets = rows, buckets
            buckets *= 2
        if self.rows < 1:
            raise TableError(
                f"table {spec.name!r}: memory_bytes = {cap} (model.table_memory_mb) cannot "
                f"hold one row: it needs at least {self.filter + 16 * 1024 + self.per_row} "
                f"bytes with its admission filter and index; raise table_memory_mb "
                f"(memory_mb of tessera.nn.ShardedEmbedding)")
        self.nbytes = self.rows * self.per_row + 16 * self.buckets + self.filter


class EmbeddingShard(ShardState):
    """The rows of one table that one server owns, and their optimizer.

    Storage is a sorted id -> slot index (:class:`IdIndex`) over growable fp32
    arrays; freed slots are reused.
    Optimizer state lives in its own slots, allocated at a row's first update.
    """

    def __init__(self, spec: TableSpec, optimizer: OptimizerConfig):
        check_sparse_optimizer(spec.name, optimizer)
        self.spec = spec
        self.optimizer = optimizer
        #: Number of apply() calls: torch's ``step`` for lr decay and bias correction.
        self.steps = 0
        #: Rows evicted to make room under a byte cap (not counting expiry).
        self.evictions = 0
        self._rows = IdIndex()
        self._values = torch.empty((0, spec.dim), dtype=torch.float32)
        self._state_slot = np.empty(0, dtype=np.int64)  # row slot -> state slot; -1: none
        self._state_slots = Slots()
        self._num_state_rows = 0
        self._state = {name: torch.empty((0, spec.dim), dtype=torch.float32)
                       for name in STATE_NAMES[optimizer.name]}
        # Ids seen by lookup but not yet admitted, with their lookup counts (exact: a
        # shard without a byte cap).
        self._pending = IdIndex()
        self._pending_count = np.empty(0, dtype=np.int64)
        #: Under a byte cap (``spec.memory_bytes``): the storage plan, all of it
        #: allocated here once (big arrays mapped: pages taken as rows fill them); the
        #: LFU lookup counts (decayed to the clock of each row's last touch); the counting
        #: Bloom filter
        #: that admits new ids (in place of the exact counts above); the next slot the
        #: victim scan looks at and the clock of the next expiry sweep.
        self.capacity: Capacity | None = None
        self._freq = np.empty(0, dtype=np.float32)
        #: The slots the last lookup answered (each id's, all stored), which the push of
        #: the same rows usually follows: :meth:`_slots_of` checks them instead of
        #: probing the index again.
        self._looked_up: np.ndarray | None = None
        self._bloom: CountingBloom | None = None
        self._hand = 0
        self._next_sweep = 0
        if spec.memory_bytes:
            self._allocate_capped()

    def _allocate_capped(self) -> None:
        spec = self.spec
        cap = self.capacity = Capacity(spec, len(self._state))
        return_freed_memory()  # the cap is held in the process's RSS, not only in counts
        n = cap.rows
        self._rows = IdIndex(capacity=n, buckets=cap.buckets)
        self._values = zero_rows(n, (spec.dim,), torch.float32)
        self._state_slot = np.full(n, -1, dtype=np.int64)
        self._state = {name: zero_rows(n, (spec.dim,), torch.float32) for name in self._state}
        if spec.eviction == "lfu":
            self._freq = np.zeros(n, dtype=np.float32)
        if cap.filter:
            self._bloom = CountingBloom(cap.filter, BLOOM_HASHES)

    # ---- validation -------------------------------------------------------------

    def _range(self) -> str:
        n = self.spec.num_embeddings
        return f"[0, {n})" if n is not None else "[0, 2**63) (unbounded hashed ids)"

    def check_ids(self, ids: np.ndarray) -> None:
        """Raise :class:`TableError` unless ``ids`` is a 1-D int64 array of valid ids."""
        where = f"table {self.spec.name!r}"
        if not isinstance(ids, np.ndarray):
            raise TableError(f"{where}: ids must be a numpy int64 array, got "
                             f"{type(ids).__name__}; convert with np.asarray(ids, np.int64)")
        if ids.dtype != np.int64:
            raise TableError(f"{where}: ids must be int64, got dtype {ids.dtype}; "
                             "convert integer ids with ids.astype(np.int64)")
        if ids.ndim != 1:
            raise TableError(f"{where}: ids must be 1-D, got shape {ids.shape}; "
                             "flatten them with ids.reshape(-1)")
        n = self.spec.num_embeddings
        if len(ids) == 0 or (ids.min() >= 0 and (n is None or ids.max() < n)):
            return
        bad = ids < 0 if n is None else (ids < 0) | (ids >= n)
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            raise TableError(f"{where}: id {int(ids[pos])} (position {pos}) is outside "
                             f"{self._range()}; check the feature's id mapping"
                             + ("" if n is None else
                                " or raise num_embeddings (None: unbounded)"))

    def check_update(self, ids: np.ndarray, grads: torch.Tensor) -> None:
        """Raise :class:`TableError` (changing nothing) unless ``apply(ids, grads)`` is
        well formed: valid unique ids, fp32 ``[len(ids), dim]`` finite gradients."""
        where = f"table {self.spec.name!r}"
        self.check_ids(ids)
        # Strictly increasing ids (what np.unique gives the callers) are unique
        # without sorting; otherwise sort and compare neighbours.
        if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            ordered = np.sort(ids)
            num_distinct = len(ids) - int(np.count_nonzero(ordered[1:] == ordered[:-1]))
            if num_distinct != len(ids):
                raise TableError(f"{where}: apply() needs unique ids (sum the gradients of "
                                 f"repeated ids first); got {len(ids)} ids, {num_distinct} "
                                 f"distinct")
        if not isinstance(grads, torch.Tensor) or grads.dtype != torch.float32:
            got = grads.dtype if isinstance(grads, torch.Tensor) else type(grads).__name__
            raise TableError(f"{where}: grads must be a float32 torch.Tensor, got {got}")
        if tuple(grads.shape) != (len(ids), self.spec.dim):
            raise TableError(f"{where}: grads must have shape (len(ids), dim) = "
                             f"({len(ids)}, {self.spec.dim}), got {tuple(grads.shape)}")
        # One pass, no temporaries: min and max propagate NaN, and any +-inf is the
        # max or the min, so both are finite exactly when every element is.
        if grads.numel() and not all(map(math.isfinite, map(float, torch.aminmax(grads)))):
            row = int(torch.nonzero(~torch.isfinite(grads))[0, 0])
            raise TableError(f"{where}: gradient of id {int(ids[row])} is not finite; "
                             "skip this update (or unscale the loss) before applying")

    # ---- storage ----------------------------------------------------------------

    def _create(self, ids: np.ndarray, clock: int) -> np.ndarray:
        first_fresh = self._rows.slots.end
        slots = self._rows.insert(ids, clock)
        end = self._rows.slots.end
        self._values = grown(self._values, end)
        self._state_slot = grown(self._state_slot, end)
        spec = self.spec
        n = len(slots)
        prefault(self._values[first_fresh:end])
        if self.capacity is None:  # the next request's fresh rows, faulted in meanwhile
            fault_ahead(self._values, end, 2 * (end - first_fresh))
        if n and slots[0] == first_fresh and end - first_fresh == n:
            # Only fresh slots, in order (no freed ones to reuse): the initial rows are
            # computed straight into their storage.
            initial_rows(ids, spec.dim, spec.seed, spec.init_scale,
                         out=self._values[first_fresh:end].numpy())
        else:
            scatter_rows(self._values, slots,
                         initial_rows(ids, spec.dim, spec.seed, spec.init_scale))
        self._state_slot[slots] = -1
        return slots

    def _initial_state(self, name: str, n: int) -> torch.Tensor:
        return initial_state(self.optimizer, name, n, self.spec.dim)

    def _state_of(self, slots: np.ndarray) -> np.ndarray:
        """State slots of row ``slots``, allocating (initialised) ones where missing.

        New state rows are allocated in bulk: storage grows at most once per call, and
        rows never used before are zero already (:func:`grown`; their pages are faulted
        in here, at once, :func:`prefault`), so only reused rows, or any rows when the
        initial value is not 0 (adagrad's ``initial_accumulator_value``), are filled."""
        missing = slots[self._state_slot[slots] < 0]
        if len(missing):
            first_fresh = self._state_slots.end
            new = self._state_slots.take(len(missing))
            for name, array in self._state.items():
                array = grown(array, self._state_slots.end)
                fill = self.optimizer.initial_accumulator_value if name == "sum" else 0.0
                zero = fill == 0 and math.copysign(1.0, fill) > 0  # +0.0, as fresh rows
                fill_at = new[new < first_fresh] if zero else new
                if len(fill_at):
                    fill_rows(array, fill_at, fill)
                fresh = array[first_fresh:self._state_slots.end]
                if zero and not prefault(fresh):
                    fresh.zero_()  # written once here, not read then written by the step
                if self.capacity is None:
                    fault_ahead(array, self._state_slots.end,
                                2 * (self._state_slots.end - first_fresh))
                self._state[name] = array
            self._state_slot[missing] = new
            self._num_state_rows += len(new)
        return self._state_slot[slots]

    @property
    def num_rows(self) -> int:
        """Rows stored (admitted and not evicted)."""
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        """Bytes of stored values plus optimizer state (allocated capacity, up to 2x
        after growth, is not counted); under a byte cap, the storage allocated for it
        (rows, state, index, filter: at most the cap)."""
        if self.capacity is not None:
            return self.capacity.nbytes
        row_bytes = self.spec.dim * 4
        return (self.num_rows + self._num_state_rows * len(self._state)) * row_bytes

    # ---- requests -----------------------------------------------------------------

    def lookup(self, ids: np.ndarray, clock: int, checked: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Current rows of ``ids`` (repeats allowed): a new fp32 ``[len(ids), dim]``, or
        ``out`` (fp32 ``[len(ids), dim]``, contiguous) written with them.

        Unknown ids are created from :func:`initial_rows` once admitted. Each call
        counts one lookup per distinct id toward ``admit_after``; ids not yet
        admitted answer their initial row without storing it. ``checked``: the
        caller has passed ``ids`` through :meth:`check_ids` already.
        """
        if not checked:
            self.check_ids(ids)
        if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
            unique, inverse = ids, None  # increasing: unique already (what clients send)
        else:
            unique, inverse = np.unique(ids, return_inverse=True)
            inverse = inverse.reshape(-1)
        if self.capacity is not None:
            return self._lookup_capped(unique, inverse, clock, out)
        slots = self._rows.find(unique)
        self._rows.touch(slots[slots >= 0], clock)
        absent = slots < 0
        if absent.any():
            admitted = self._admit(unique[absent], clock)
            where = np.flatnonzero(absent)[admitted]
            budget = self.spec.max_rows
            if budget and len(self._rows) + len(where) > budget:
                # The row budget holds on pulls too: rows beyond it are answered with
                # their initial value (a pure function of the id) without being stored;
                # an update creates them, evicting the least recently touched.
                where = where[:max(0, budget - len(self._rows))]
            slots[where] = self._create(unique[where], clock)
            # (only where every row is stored: -1 is no slot to check)
            self._looked_up = slots if len(where) == np.count_nonzero(absent) else None
        else:
            self._looked_up = slots
        return self._answer(unique, inverse, slots, out)

    def _answer(self, unique: np.ndarray, inverse, slots: np.ndarray,
                into: torch.Tensor | None = None) -> torch.Tensor:
        """The rows of ``unique`` (stored at ``slots``, -1: not stored, answered with
        the initial value), per position through ``inverse`` when given; written into
        ``into`` when given."""
        stored = slots >= 0
        if stored.all():
            # Every row is stored: one gather of the rows straight into the answer
            # (slot per position, repeats included), no per-unique-id intermediate.
            return gather_rows(self._values, slots if inverse is None else slots[inverse],
                               into)
        out = torch.empty((len(unique), self.spec.dim), dtype=torch.float32) \
            if into is None or inverse is not None else into
        out[torch.from_numpy(stored)] = gather_rows(self._values, slots[stored])
        spec = self.spec
        out[torch.from_numpy(~stored)] = initial_rows(unique[~stored], spec.dim,
                                                      spec.seed, spec.init_scale)
        if inverse is None:
            return out
        if into is None:
            return out[torch.from_numpy(inverse)]
        torch.index_select(out, 0, torch.from_numpy(inverse), out=into)
        return into

    # ---- under a byte cap ----------------------------------------------------------

    def _find_live(self, ids: np.ndarray, clock: int) -> np.ndarray:
        """Slots of ``ids`` (-1: absent); rows past their time to live are dropped
        here first (the periodic sweep frees the others), so an expired row is never
        answered or updated."""
        slots = self._rows.find(ids)
        ttl = self.spec.evict_after
        if ttl:
            found = np.flatnonzero(slots >= 0)
            old = found[clock - self._rows.last[slots[found]] >= ttl]
            if len(old):
                self._drop(slots[old])
                slots[old] = -1
        return slots

    def _lookup_capped(self, unique: np.ndarray, inverse, clock: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        slots = self._find_live(unique, clock)
        found = slots[slots >= 0]
        if len(found):
            self._count(found, clock, 1.0)
            self._rows.touch(found, clock)
        absent = slots < 0
        if absent.any():
            if self._bloom is None:
                where = np.flatnonzero(absent)
                seen = np.ones(len(where), dtype=np.float32)
            else:
                est = self._bloom.add(unique[absent])
                admitted = est >= self.spec.admit_after
                where = np.flatnonzero(absent)[admitted]
                seen = est[admitted].astype(np.float32)
            where, seen = where[:self.capacity.rows], seen[:self.capacity.rows]
            if len(where):
                if self._make_room(len(where), clock):
                    kept = np.flatnonzero(~absent)  # rows touched now were evicted too
                    slots[kept] = self._rows.find(unique[kept])
                slots[where] = self._create(unique[where], clock)
                if len(self._freq):
                    self._freq[slots[where]] = seen
        return self._answer(unique, inverse, slots, out)

    def _count(self, slots: np.ndarray, clock: int, add: float) -> None:
        """LFU: decay the lookup counts of ``slots`` to ``clock``, then add ``add``."""
        if not len(self._freq):
            return
        self._freq[slots] = self._decayed(slots, clock) + np.float32(add)

    def _decayed(self, slots: np.ndarray, clock: int) -> np.ndarray:
        freq = self._freq[slots]
        half = self.spec.lfu_half_life
        if half:
            age = (clock - self._rows.last[slots]).astype(np.float32)
            freq = freq * np.exp2(-np.maximum(age, 0) / np.float32(half))
        return freq

    def _drop(self, slots: np.ndarray) -> None:
        """Remove the rows at ``slots`` (and their optimizer state)."""
        if not len(slots):
            return
        state = self._state_slot[slots]
        state = state[state >= 0]
        self._state_slots.give(state)
        self._num_state_rows -= len(state)
        self._state_slot[slots] = -1
        self._rows.remove(slots)

    def _make_room(self, n: int, clock: int) -> bool:
        """Evict until ``n`` more rows fit the capacity: at least a 1/64th of it at once,
        chosen by the policy (rows past their time to live first, then LRU: least
        recently touched; LFU: fewest decayed lookups, then least recent) in windows of
        slots that a hand walks round (approximate, as Redis' and CacheLib's are: no
        sort of the whole table, no temporaries its size). Rows touched at ``clock``
        are evicted only when nothing else is left; returns True if any was."""
        cap, rows = self.capacity.rows, self._rows
        need = len(rows) + n - cap
        if need <= 0:
            return False
        target = min(len(rows), max(need, int(cap * _EVICT_FRACTION)))
        window = min(cap, max(4 * target, 1 << 16))
        freed, scanned, current = 0, 0, False
        ttl = self.spec.evict_after
        while freed < need or (freed < target and scanned < cap):
            start = self._hand
            span = np.arange(start, start + window) % cap
            self._hand = (start + window) % cap
            scanned += window
            live = span[rows.ids[span] >= 0]
            last = rows.last[live]
            if not current:
                live, last = live[last < clock], last[last < clock]
            if not len(live):
                if scanned >= cap:
                    current = True  # only rows of this clock are left: they go too
                continue
            if len(self._freq):
                key = self._decayed(live, clock)
            else:
                key = last.astype(np.float64)
            if ttl:
                key = np.where(clock - last >= ttl, -np.inf, key)
            take = min(len(live), target - freed)
            if take < len(live):
                order = np.lexsort((last, key))[:take]
            else:
                order = np.arange(len(live))
            self._drop(live[order])
            freed += take
            if scanned >= 2 * cap:
                current = True
        self.evictions += freed
        return current

    def _sweep(self, clock: int) -> None:
        """Free the rows past their time to live, a chunk of slots at a time; at most
        every quarter of the time to live (rows a lookup finds expired are dropped
        at once, :meth:`_find_live`)."""
        ttl = self.spec.evict_after
        if not ttl or clock < self._next_sweep:
            return
        self._next_sweep = clock + max(1, ttl // 4)
        rows, chunk = self._rows, 1 << 16
        for start in range(0, rows.slots.end, chunk):
            ids = rows.ids[start:start + chunk]
            old = np.flatnonzero((ids >= 0) & (clock - rows.last[start:start + chunk] >= ttl))
            self._drop(old + start)

    def _admit(self, ids: np.ndarray, clock: int) -> np.ndarray:
        """Count one lookup of each (absent, unique) id; mask of those now admitted."""
        if self.spec.admit_after == 1:
            return np.ones(len(ids), dtype=bool)
        pending = self._pending
        slots = pending.find(ids)
        new = slots < 0
        if new.any():
            slots[new] = pending.insert(ids[new], clock)
            self._pending_count = grown(self._pending_count, pending.slots.end)
            self._pending_count[slots[new]] = 0
        pending.touch(slots, clock)
        self._pending_count[slots] += 1
        admitted = self._pending_count[slots] >= self.spec.admit_after
        pending.remove(slots[admitted])
        budget = self.spec.max_rows
        if budget and len(pending) > budget:  # admission counts are bounded the same way
            pending.remove(pending.expired(clock, 0, budget))
        return admitted

    def apply(self, ids: np.ndarray, grads: torch.Tensor, clock: int,
              checked: bool = False) -> None:
        """One optimizer step on rows ``ids`` (unique) with ``grads`` (fp32, averaged).

        Called exactly once per clock, with zero ids if none were pushed: the step
        count advances on every call. Updates to ids not admitted yet are dropped;
        with ``admit_after = 1`` a missing row is created from its initial value
        first, as a single process would hold it. Evicts afterwards. ``checked``: the
        caller has passed ``(ids, grads)`` through :meth:`check_update` already (a
        push is validated once).
        """
        if not checked:
            self.check_update(ids, grads)
        self.steps += 1
        capped = self.capacity is not None
        slots = self._find_live(ids, clock) if capped else self._slots_of(ids)
        missing = slots < 0
        if missing.any() and self.spec.admit_after == 1:
            where = np.flatnonzero(missing)
            if capped:
                where = where[:self.capacity.rows]
                if self._make_room(len(where), clock):
                    kept = np.flatnonzero(~missing)
                    slots[kept] = self._rows.find(ids[kept])
            slots[where] = self._create(ids[where], clock)
            if len(self._freq):
                self._freq[slots[where]] = 1.0
        keep = slots >= 0
        if not keep.all():
            slots, grads = slots[keep], grads[torch.from_numpy(keep)]
        if len(slots):
            self._rows.touch(slots, clock)
            self._step(slots, grads)
        if capped:
            self._sweep(clock)
        else:
            self.evict(clock)

    def _slots_of(self, ids: np.ndarray) -> np.ndarray:
        """``self._rows.find(ids)``. Where the last lookup answered the same number of
        ids, its slots are checked first: if each still holds its id (the index's
        slot -> id array says so), they are the answer, as a probe would have found
        them (an id is stored in one slot at most); otherwise the index is probed. One
        gather and compare of ``len(ids)`` ids against a probe per id."""
        last, self._looked_up = self._looked_up, None
        if last is not None and len(last) == len(ids) and \
                np.array_equal(self._rows.ids[last], ids):
            return last
        return self._rows.find(ids)

    def _step(self, slots: np.ndarray, grad: torch.Tensor) -> None:
        state_index = self._state_of(slots) if self._state else None
        sparse_step(self.optimizer, self.steps, self._values, self._state,
                    slots, state_index, grad)

    def evict(self, clock: int) -> int:
        """Drop rows untouched for ``evict_after`` clocks, then the least recently
        touched beyond ``max_rows``; returns the number of rows dropped.

        Admission counts of ids not yet admitted expire by the same rules. A dropped
        row that is touched again starts over from its initial value (and, with
        ``admit_after > 1``, must be admitted again).
        """
        spec = self.spec
        if spec.evict_after == 0 and spec.max_rows == 0:
            return 0
        pending = self._pending.expired(clock, spec.evict_after, spec.max_rows)
        self._pending.remove(pending)
        dropped = self._rows.expired(clock, spec.evict_after, spec.max_rows)
        if len(dropped):
            state = self._state_slot[dropped]
            state = state[state >= 0]
            self._state_slots.give(state)
            self._num_state_rows -= len(state)
            self._rows.remove(dropped)
        return len(dropped)
