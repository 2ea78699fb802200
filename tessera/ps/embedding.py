"""One server's shard of a sharded embedding table: storage and sparse update rule.

Recommendation models keep one row per user, item or feature value; the ids come
from an open, hashed space (any int64), so the table cannot be allocated up front
and does not fit one machine. PERSIA (Lian et al., "PERSIA: An Open, Hybrid System
Scaling Deep Learning-based Recommenders up to 100 Trillion Parameters", KDD 2022)
and Monolith (Liu et al., "Monolith: Real Time Recommendation System With
Collisionless Embedding Table", 2022) keep such tables on parameter servers:

1. **Placement by hash.** Row ``id`` lives on server ``owner_of(id)``: a 64-bit
   mixing hash of the id modulo the number of servers. Consecutive ids (a new
   user block, a vocabulary) spread evenly, and every process computes the same
   owner without a map.
2. **Lazy rows.** A row exists only once it is touched. Its first value is a pure
   function of ``(seed, id)`` -- counter-based random numbers in the sense of
   Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3" (SC 2011), here
   SplitMix64 (Steele, Lea & Flood, "Fast Splittable Pseudorandom Number
   Generators", OOPSLA 2014) -- so a row created on any server, at any time, after
   any eviction, equals the row a single-process reference holds.
3. **Admission** (Monolith's frequency filter): an id is stored only once it has
   been looked up ``admit_after`` times; until then lookups answer the initial row
   and updates to it are dropped, so one-off ids do not fill the memory.
4. **Expiry** (Monolith's expirable embeddings): rows untouched for
   ``evict_after`` clocks are dropped, and ``max_rows`` bounds a server's rows by
   dropping the least recently touched ones.
5. **Sparse optimizers.** Only rows in the gradient change, and optimizer state
   exists only for rows that have been updated. ``sgd`` and ``adagrad`` are the
   ``torch.optim`` arithmetic applied row by row (identical to the dense optimizer
   wherever the dense one would leave a zero-gradient row unchanged, i.e. without
   weight decay); ``adam`` is lazy Adam, exactly ``torch.optim.SparseAdam``.
   The step count in learning-rate decay and bias correction is the shard's own
   number of :meth:`EmbeddingShard.apply` calls, as torch counts ``step()`` calls.

This module is pure logic (no sockets, no threads): the server calls ``lookup``
to answer pulls and ``apply`` once per clock with the workers' averaged gradient.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tessera.config.schema import OptimizerConfig
from tessera.transport.wire import TableSpec  # noqa: F401 - re-exported

_MASK64 = (1 << 64) - 1
#: SplitMix64's increment, 2^64 / golden ratio (Steele, Lea & Flood 2014).
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)

#: Rows of storage allocated at first growth; later growth doubles (amortised O(1)).
_MIN_CAPACITY = 64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 output for state ``x`` (uint64 array, wraps mod 2^64), in place."""
    with np.errstate(over="ignore"):
        x += _GAMMA
        x ^= x >> np.uint64(30)
        x *= _MUL1
        x ^= x >> np.uint64(27)
        x *= _MUL2
        x ^= x >> np.uint64(31)
    return x


def _as_uint64(ids: np.ndarray) -> np.ndarray:
    """A fresh uint64 copy holding the two's-complement bits of int64 ``ids``."""
    return np.array(ids, dtype=np.int64, copy=True).reshape(-1).view(np.uint64)


def owner_of(ids: np.ndarray, num_servers: int) -> np.ndarray:
    """The server (``0 .. num_servers - 1``, int64) that stores each id's row.

    ``splitmix64(id) mod num_servers``: the same in every process and run.
    """
    if num_servers < 1:
        raise ValueError(f"num_servers must be >= 1, got {num_servers}")
    h = _splitmix64(_as_uint64(ids))
    return (h % np.uint64(num_servers)).astype(np.int64)


#: Rows of :func:`initial_rows` computed per block: the uint64 temporaries of one
#: block (``_INIT_BLOCK_ELEMENTS`` x 8 bytes each) stay in the CPU cache.
_INIT_BLOCK_ELEMENTS = 1 << 15


def initial_rows(ids: np.ndarray, dim: int, seed: int, scale: float) -> torch.Tensor:
    """The initial values of rows ``ids``: fp32 ``[len(ids), dim]``, uniform in
    ``(-scale, scale)``.

    Column ``c`` of row ``id`` is the ``c``-th output of a SplitMix64 generator
    seeded with ``splitmix64(splitmix64(seed) xor id)``; its top 24 bits ``k`` give
    ``(2k + 1 - 2^24) / 2^24`` (exact in fp32, symmetric around 0), times ``scale``
    in fp32. A row depends on ``(seed, id)`` only, not on the batch it comes in.

    Computed in blocks of rows into preallocated buffers (no full-size uint64
    temporaries), with two exact shortcuts: SplitMix64's ``+ gamma`` is folded into
    the column offsets (addition mod 2^64 is associative), and its last
    ``z ^= z >> 31`` is skipped because it does not change the top 24 bits.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    seed_key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    row_key = _splitmix64(_as_uint64(ids) ^ seed_key)
    n = len(row_key)
    out = np.empty((n, dim), dtype=np.float32)
    with np.errstate(over="ignore"):
        # State of column c before mixing: row_key + c * gamma, plus splitmix's gamma.
        columns = np.arange(1, dim + 1, dtype=np.uint64) * _GAMMA
    block = max(1, _INIT_BLOCK_ELEMENTS // dim)
    h_buf = np.empty((min(block, n), dim), dtype=np.uint64)
    t_buf = np.empty_like(h_buf)
    # (2k + 1 - 2^24) / 2^24 == k * 2^-23 + (2^-24 - 1): every term and the sum are
    # exact in fp32 (k < 2^24), so this equals the integer formula bit for bit.
    step, offset, fscale = np.float32(2.0 ** -23), np.float32(2.0 ** -24 - 1), np.float32(scale)
    for start in range(0, n, block):
        stop = min(start + block, n)
        h, t = h_buf[:stop - start], t_buf[:stop - start]
        np.add(row_key[start:stop, None], columns[None, :], out=h)
        np.right_shift(h, np.uint64(30), out=t)
        h ^= t
        h *= _MUL1
        np.right_shift(h, np.uint64(27), out=t)
        h ^= t
        h *= _MUL2
        h >>= np.uint64(40)  # top 24 bits; the skipped ``h ^= h >> 31`` keeps them
        unit = out[start:stop]
        np.copyto(unit, h.view(np.int64), casting="unsafe")
        unit *= step
        unit += offset
        unit *= fscale
    return torch.from_numpy(out)


class TableError(ValueError):
    """A bad lookup or update request; the message names the table and the fault."""


def _grown(array, needed: int):
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


class _Slots:
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


class _IdIndex:
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
        self.slots = _Slots()
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
        self.ids = _grown(self.ids, self.slots.end)
        self.last = _grown(self.last, self.slots.end)
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


#: Per-row optimizer state arrays, named as ``torch.optim`` names them.
_STATE_NAMES = {"sgd": (), "adagrad": ("sum",), "adam": ("exp_avg", "exp_avg_sq")}


class EmbeddingShard:
    """The rows of one table that one server owns, and their optimizer.

    Storage is a sorted id -> slot index (:class:`_IdIndex`) over growable fp32
    arrays; freed slots are reused.
    Optimizer state lives in its own slots, allocated at a row's first update.
    """

    def __init__(self, spec: TableSpec, optimizer: OptimizerConfig):
        where = f"embedding table {spec.name!r}"
        if optimizer.name not in _STATE_NAMES:
            raise ValueError(
                f"optimizer.name {optimizer.name!r} is not supported by {where}: use 'sgd', "
                "'adagrad' or 'adam' (lazy Adam, as torch.optim.SparseAdam). Dense rules "
                "would change every row at every step.")
        if optimizer.name == "sgd" and optimizer.momentum != 0:
            raise ValueError(
                f"optimizer.momentum = {optimizer.momentum} is not supported by {where} with "
                "sgd: set momentum = 0, or use 'adagrad' or 'adam' for per-row state")
        if optimizer.name == "adam" and (optimizer.weight_decay != 0 or optimizer.amsgrad):
            raise ValueError(
                f"{where} runs adam as torch.optim.SparseAdam, which has no weight_decay or "
                f"amsgrad: got weight_decay = {optimizer.weight_decay}, amsgrad = "
                f"{optimizer.amsgrad}; set weight_decay = 0 and amsgrad = false")
        self.spec = spec
        self.optimizer = optimizer
        #: Number of apply() calls: torch's ``step`` for lr decay and bias correction.
        self.steps = 0
        self._rows = _IdIndex()
        self._values = torch.empty((0, spec.dim), dtype=torch.float32)
        self._state_slot = np.empty(0, dtype=np.int64)  # row slot -> state slot; -1: none
        self._state_slots = _Slots()
        self._num_state_rows = 0
        self._state = {name: torch.empty((0, spec.dim), dtype=torch.float32)
                       for name in _STATE_NAMES[optimizer.name]}
        # Ids seen by lookup but not yet admitted, with their lookup counts.
        self._pending = _IdIndex()
        self._pending_count = np.empty(0, dtype=np.int64)

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

    def _check_update(self, ids: np.ndarray, grads: torch.Tensor) -> None:
        """Raise :class:`TableError` (changing nothing) unless ``apply(ids, grads)`` is
        well formed: valid unique ids, fp32 ``[len(ids), dim]`` finite gradients."""
        where = f"table {self.spec.name!r}"
        self.check_ids(ids)
        # Strictly increasing ids (what np.unique gives the callers) are unique
        # without sorting; otherwise sort and compare neighbours.
        increasing = ids if bool(np.all(ids[1:] > ids[:-1])) else np.sort(ids)
        num_distinct = len(ids) - int(np.count_nonzero(increasing[1:] == increasing[:-1]))
        if num_distinct != len(ids):
            raise TableError(f"{where}: apply() needs unique ids (sum the gradients of "
                             f"repeated ids first); got {len(ids)} ids, {num_distinct} distinct")
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
        slots = self._rows.insert(ids, clock)
        end = self._rows.slots.end
        self._values = _grown(self._values, end)
        self._state_slot = _grown(self._state_slot, end)
        spec = self.spec
        self._values.index_copy_(0, torch.from_numpy(slots),
                                 initial_rows(ids, spec.dim, spec.seed, spec.init_scale))
        self._state_slot[slots] = -1
        return slots

    def _initial_state(self, name: str, n: int) -> torch.Tensor:
        fill = self.optimizer.initial_accumulator_value if name == "sum" else 0.0
        return torch.full((n, self.spec.dim), fill, dtype=torch.float32)

    def _state_of(self, slots: np.ndarray) -> np.ndarray:
        """State slots of row ``slots``, allocating (initialised) ones where missing."""
        missing = slots[self._state_slot[slots] < 0]
        if len(missing):
            new = self._state_slots.take(len(missing))
            for name, array in self._state.items():
                array = _grown(array, self._state_slots.end)
                fill = self.optimizer.initial_accumulator_value if name == "sum" else 0.0
                array.index_fill_(0, torch.from_numpy(new), fill)
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
        after growth, is not counted)."""
        row_bytes = self.spec.dim * 4
        return (self.num_rows + self._num_state_rows * len(self._state)) * row_bytes

    # ---- requests -----------------------------------------------------------------

    def lookup(self, ids: np.ndarray, clock: int) -> torch.Tensor:
        """Current rows of ``ids`` (repeats allowed): a new fp32 ``[len(ids), dim]``.

        Unknown ids are created from :func:`initial_rows` once admitted. Each call
        counts one lookup per distinct id toward ``admit_after``; ids not yet
        admitted answer their initial row without storing it.
        """
        self.check_ids(ids)
        unique, inverse = np.unique(ids, return_inverse=True)
        inverse = inverse.reshape(-1)
        slots = self._rows.find(unique)
        self._rows.touch(slots[slots >= 0], clock)
        absent = slots < 0
        if absent.any():
            admitted = self._admit(unique[absent], clock)
            where = np.flatnonzero(absent)[admitted]
            slots[where] = self._create(unique[where], clock)
        stored = slots >= 0
        if stored.all():
            # Every row is stored: one gather of the rows straight into the answer
            # (slot per position, repeats included), no per-unique-id intermediate.
            return self._values.index_select(0, torch.from_numpy(slots[inverse]))
        out = torch.empty((len(unique), self.spec.dim), dtype=torch.float32)
        out[torch.from_numpy(stored)] = self._values.index_select(
            0, torch.from_numpy(slots[stored]))
        spec = self.spec
        out[torch.from_numpy(~stored)] = initial_rows(unique[~stored], spec.dim,
                                                      spec.seed, spec.init_scale)
        return out[torch.from_numpy(inverse)]

    def _admit(self, ids: np.ndarray, clock: int) -> np.ndarray:
        """Count one lookup of each (absent, unique) id; mask of those now admitted."""
        if self.spec.admit_after == 1:
            return np.ones(len(ids), dtype=bool)
        pending = self._pending
        slots = pending.find(ids)
        new = slots < 0
        if new.any():
            slots[new] = pending.insert(ids[new], clock)
            self._pending_count = _grown(self._pending_count, pending.slots.end)
            self._pending_count[slots[new]] = 0
        pending.touch(slots, clock)
        self._pending_count[slots] += 1
        admitted = self._pending_count[slots] >= self.spec.admit_after
        pending.remove(slots[admitted])
        return admitted

    def apply(self, ids: np.ndarray, grads: torch.Tensor, clock: int) -> None:
        """One optimizer step on rows ``ids`` (unique) with ``grads`` (fp32, averaged).

        Called exactly once per clock, with zero ids if none were pushed: the step
        count advances on every call. Updates to ids not admitted yet are dropped;
        with ``admit_after = 1`` a missing row is created from its initial value
        first, as a single process would hold it. Evicts afterwards.
        """
        self._check_update(ids, grads)
        self.steps += 1
        slots = self._rows.find(ids)
        missing = slots < 0
        if missing.any() and self.spec.admit_after == 1:
            slots[missing] = self._create(ids[missing], clock)
        keep = slots >= 0
        if not keep.all():
            slots, grads = slots[keep], grads[torch.from_numpy(keep)]
        if len(slots):
            self._rows.touch(slots, clock)
            self._step(slots, grads)
        self.evict(clock)

    def _step(self, slots: np.ndarray, grad: torch.Tensor) -> None:
        # Each branch repeats the per-element operations of torch's single-tensor
        # implementation, in the same order, on the gathered rows.
        opt = self.optimizer
        index = torch.from_numpy(slots)
        param = self._values.index_select(0, index)
        if opt.name == "sgd":
            if opt.weight_decay != 0:
                grad = grad.add(param, alpha=opt.weight_decay)
            param.add_(grad, alpha=-opt.lr)
            self._values.index_copy_(0, index, param)
            return
        state_index = torch.from_numpy(self._state_of(slots))
        if opt.name == "adagrad":  # torch.optim.adagrad._single_tensor_adagrad
            state_sum = self._state["sum"].index_select(0, state_index)
            if opt.weight_decay != 0:
                grad = grad.add(param, alpha=opt.weight_decay)
            clr = opt.lr / (1 + (self.steps - 1) * opt.lr_decay)
            state_sum.addcmul_(grad, grad, value=1)
            std = state_sum.sqrt().add_(opt.eps)
            param.addcdiv_(grad, std, value=-clr)
            self._state["sum"].index_copy_(0, state_index, state_sum)
        else:  # adam: torch.optim._functional.sparse_adam
            beta1, beta2 = opt.betas
            old_exp_avg = self._state["exp_avg"].index_select(0, state_index)
            old_exp_avg_sq = self._state["exp_avg_sq"].index_select(0, state_index)
            exp_avg_update = grad.sub(old_exp_avg).mul_(1 - beta1)
            self._state["exp_avg"].index_copy_(0, state_index, old_exp_avg + exp_avg_update)
            exp_avg_sq_update = grad.pow(2).sub_(old_exp_avg_sq).mul_(1 - beta2)
            self._state["exp_avg_sq"].index_copy_(0, state_index,
                                               old_exp_avg_sq + exp_avg_sq_update)
            numer = exp_avg_update.add_(old_exp_avg)
            denom = exp_avg_sq_update.add_(old_exp_avg_sq).sqrt_().add_(opt.eps)
            bias_correction1 = 1 - beta1 ** self.steps
            bias_correction2 = 1 - beta2 ** self.steps
            step_size = opt.lr * math.sqrt(bias_correction2) / bias_correction1
            param.add_(-step_size * numer.div_(denom))
        self._values.index_copy_(0, index, param)

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

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Stored rows in increasing id order, for checkpoints and tests.

        ``ids`` (int64 ``[n]``), ``values`` (fp32 ``[n, dim]``), ``last_clock`` (int64
        ``[n]``, last touch) and the optimizer's per-row state (``sum`` for adagrad;
        ``exp_avg``, ``exp_avg_sq`` for adam), aligned with ``ids``; a row never updated
        shows the state it would start from. The step count is :attr:`steps`.
        """
        slots = self._rows.live()
        index = torch.from_numpy(slots)
        out = {
            "ids": torch.from_numpy(self._rows.ids[slots].copy()),
            "values": self._values[index],
            "last_clock": torch.from_numpy(self._rows.last[slots].copy()),
        }
        state_slots = self._state_slot[slots]
        has = state_slots >= 0
        for name, array in self._state.items():
            rows = self._initial_state(name, len(slots))
            rows[torch.from_numpy(has)] = array[torch.from_numpy(state_slots[has])]
            out[name] = rows
        return out

    # ---- checkpoints ------------------------------------------------------------

    def export_state(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild this shard exactly, as named CPU tensors (for
        safetensors): contiguous copies, rows in increasing id order.

        * ``ids`` int64 ``[n]``, ``values`` fp32 ``[n, dim]``, ``last`` int64 ``[n]``
          (clock of each row's last touch);
        * per optimizer state array (``sum`` for adagrad; ``exp_avg``, ``exp_avg_sq``
          for adam): ``state.<name>`` fp32 ``[n, dim]``, plus ``has_state`` bool
          ``[n]`` (False: the row was never updated, holds no state and its
          ``state.*`` rows show the state it would start from); none for sgd;
        * ``steps``: int64 0-d, the number of :meth:`apply` calls;
        * with ``admit_after > 1``, the ids looked up but not admitted yet, increasing:
          ``pending_ids``, ``pending_count`` (lookups so far), ``pending_last`` (clock
          of the last lookup), all int64 ``[p]``.

        :meth:`import_state` into a fresh shard of the same spec and optimizer gives
        a shard whose answers and updates are bit-identical to this one's.
        """
        slots = self._rows.live()
        index = torch.from_numpy(slots)
        out = {
            "ids": torch.from_numpy(self._rows.ids[slots].copy()),
            "values": self._values.index_select(0, index).contiguous(),
            "last": torch.from_numpy(self._rows.last[slots].copy()),
        }
        if self._state:
            state_slots = self._state_slot[slots]
            has = state_slots >= 0
            has_t = torch.from_numpy(has.copy())
            for name, array in self._state.items():
                rows = self._initial_state(name, len(slots))
                rows[has_t] = array.index_select(0, torch.from_numpy(state_slots[has]))
                out[f"state.{name}"] = rows
            out["has_state"] = has_t
        out["steps"] = torch.tensor(self.steps, dtype=torch.int64)
        if self.spec.admit_after > 1:
            pending = self._pending.live()
            out["pending_ids"] = torch.from_numpy(self._pending.ids[pending].copy())
            out["pending_count"] = torch.from_numpy(self._pending_count[pending].copy())
            out["pending_last"] = torch.from_numpy(self._pending.last[pending].copy())
        return out

    def import_state(self, state: dict[str, torch.Tensor],
                     keep: np.ndarray | torch.Tensor | None = None, *,
                     keep_pending: np.ndarray | torch.Tensor | None = None) -> int:
        """Load the rows of one :meth:`export_state` dict into this shard (empty or
        not); returns the number of rows loaded.

        ``keep`` (bool ``[n]``, aligned with ``state["ids"]``; None: all) selects the
        rows to load, ``keep_pending`` (bool, aligned with ``state["pending_ids"]``)
        the admission counts: to re-shard onto ``new_num_servers`` servers, server
        ``rank`` passes ``owner_of(ids, new_num_servers) == rank`` for both, and
        calls this once per old shard. ``keep_pending`` is required when ``keep`` is
        given and the dict holds pending ids (this shard has ``admit_after > 1``).

        The step count is taken from the dict while this shard has ``steps == 0``;
        afterwards every dict must carry the same count. An id may be loaded once:
        one already stored or pending here is an error. Nothing is evicted here; the
        next :meth:`apply` evicts as usual. Raises :class:`TableError` naming the
        table, changing nothing, if the dict does not fit this shard (keys, dtypes,
        shapes, optimizer, ids).
        """
        where = f"table {self.spec.name!r}"
        dim = self.spec.dim

        def fail(msg: str) -> TableError:
            return TableError(f"{where}: cannot import checkpoint state: {msg}")

        if not isinstance(state, dict):
            raise fail(f"expected a dict of tensors, got {type(state).__name__}")

        def tensor(key: str, dtypes: tuple, shape: tuple) -> torch.Tensor:
            if key not in state:
                raise fail(f"missing tensor {key!r} (has {sorted(state)})")
            t = state[key]
            if not isinstance(t, torch.Tensor):
                raise fail(f"{key!r} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in dtypes:
                raise fail(f"{key!r} must have dtype "
                           f"{' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
            if tuple(t.shape) != shape:
                raise fail(f"{key!r} must have shape {shape}, got {tuple(t.shape)}"
                           + (f" (this table has dim {dim})" if len(shape) == 2 else ""))
            return t.detach().cpu()

        def mask(m, n: int, name: str, of: str) -> np.ndarray:
            if m is None:
                return np.ones(n, dtype=bool)
            m = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
            if m.dtype != np.bool_ or m.shape != (n,):
                raise fail(f"{name} must be a bool mask of shape ({n},) aligned with "
                           f"{of!r}, got dtype {m.dtype}, shape {m.shape}")
            return m

        names = _STATE_NAMES[self.optimizer.name]
        got = sorted(k[len("state."):] for k in state if k.startswith("state."))
        if got != sorted(names):
            raise fail(f"it holds optimizer state {got} but this table's optimizer "
                       f"{self.optimizer.name!r} keeps {sorted(names)}")
        ids_t = state.get("ids")
        n = ids_t.shape[0] if isinstance(ids_t, torch.Tensor) and ids_t.ndim == 1 else -1
        ids = tensor("ids", (torch.int64,), (max(n, 0),)).numpy()
        values = tensor("values", (torch.float32,), (n, dim))
        last = tensor("last", (torch.int64,), (n,)).numpy()
        rows_state = {name: tensor(f"state.{name}", (torch.float32,), (n, dim))
                      for name in names}
        has = (tensor("has_state", (torch.bool, torch.uint8), (n,)).numpy().astype(bool)
               if names else np.zeros(n, dtype=bool))
        steps = int(tensor("steps", (torch.int64,), ()).item())
        if self.steps != 0 and steps != self.steps:
            raise fail(f"its step count {steps} differs from this shard's {self.steps} "
                       "(every shard of a table applies once per clock; mixing "
                       "checkpoints of different steps?)")
        keep_rows = mask(keep, n, "keep", "ids")
        self.check_ids(ids)

        take_pending = self.spec.admit_after > 1 and "pending_ids" in state
        if take_pending:
            p_ids_t = state["pending_ids"]
            p = (p_ids_t.shape[0] if isinstance(p_ids_t, torch.Tensor)
                 and p_ids_t.ndim == 1 else -1)
            p_ids = tensor("pending_ids", (torch.int64,), (max(p, 0),)).numpy()
            p_count = tensor("pending_count", (torch.int64,), (p,)).numpy()
            p_last = tensor("pending_last", (torch.int64,), (p,)).numpy()
            if keep is not None and keep_pending is None and p:
                raise fail("keep selects rows but not the pending admission counts: pass "
                           "keep_pending too, e.g. owner_of(state['pending_ids'].numpy(), "
                           "num_servers) == rank")
            keep_p = mask(keep_pending, p, "keep_pending", "pending_ids")
            self.check_ids(p_ids)
            p_ids, p_count, p_last = p_ids[keep_p], p_count[keep_p], p_last[keep_p]
        else:
            p_ids = np.empty(0, dtype=np.int64)

        sel = np.flatnonzero(keep_rows)
        ids, last, has = ids[sel], last[sel], has[sel]
        everything = np.concatenate([ids, p_ids])
        unique, counts = np.unique(everything, return_counts=True)
        if (counts > 1).any():
            raise fail(f"id {int(unique[np.argmax(counts > 1)])} appears more than once "
                       "in it")
        clash = (self._rows.find(everything) >= 0) | (self._pending.find(everything) >= 0)
        if clash.any():
            raise fail(f"id {int(everything[np.argmax(clash)])} is already in this shard "
                       "(each id belongs to one old shard)")

        # Validated: from here on nothing fails.
        self.steps = steps if self.steps == 0 else self.steps
        if len(ids):
            index = torch.from_numpy(sel)
            slots = self._rows.insert(ids, 0)
            self._rows.last[slots] = last
            end = self._rows.slots.end
            self._values = _grown(self._values, end)
            self._state_slot = _grown(self._state_slot, end)
            self._values.index_copy_(0, torch.from_numpy(slots), values.index_select(0, index))
            self._state_slot[slots] = -1
            with_state = slots[has]
            if names and len(with_state):
                new = self._state_slots.take(len(with_state))
                rows = index[torch.from_numpy(has)]
                for name in names:
                    array = _grown(self._state[name], self._state_slots.end)
                    array.index_copy_(0, torch.from_numpy(new),
                                      rows_state[name].index_select(0, rows))
                    self._state[name] = array
                self._state_slot[with_state] = new
                self._num_state_rows += len(new)
        if len(p_ids):
            p_slots = self._pending.insert(p_ids, 0)
            self._pending.last[p_slots] = p_last
            self._pending_count = _grown(self._pending_count, self._pending.slots.end)
            self._pending_count[p_slots] = p_count
        return len(ids)
