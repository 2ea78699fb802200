"""Checkpointing an embedding shard: export its rows exactly, import and re-shard them.

A shard's state is more than its values: the clock each row was last touched
(expiry), optimizer state for the rows updated so far, the step count (learning
rate decay, Adam's bias correction) and the admission counts of ids not stored
yet. :meth:`ShardState.export_state` writes all of it as named CPU tensors in
increasing id order (what safetensors stores); :meth:`ShardState.import_state`
loads one such dict, optionally only the rows a new owner keeps, so a checkpoint
taken on N servers restores onto M: each server imports from every old shard the
ids with ``owner_of(id, M) == rank`` (:mod:`tessera.ps.embedding_ids`). A shard
restored this way answers and updates bit-identically to the one exported.
"""

from __future__ import annotations

import numpy as np
import torch

from tessera.ps.embedding_ids import TableError
from tessera.ps.embedding_index import grown
from tessera.ps.embedding_optim import STATE_NAMES


class ShardState:
    """Export and import of :class:`~tessera.ps.embedding.EmbeddingShard` state (a
    mixin: the shard's storage fields are its own)."""

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

        * under a byte cap: with ``eviction = "lfu"``, ``freq`` fp32 ``[n]`` (each row's
          lookup count, decayed to its last touch); with an admission filter,
          ``bloom`` uint8 (its counters) and ``bloom_added`` int64 0-d; ``evict_at``
          int64 ``[3]``: the next slot the victim scan looks at, the next expiry sweep,
          the slots handed out; ``slot`` int64 ``[n]`` (each row's slot) and
          ``free_slots`` (the free list): a restore into an empty shard of the same
          capacity keeps the layout, so eviction goes on exactly as it would have.

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
        self._export_rows_state(slots, out)
        out["steps"] = torch.tensor(self.steps, dtype=torch.int64)
        if len(self._freq):
            out["freq"] = torch.from_numpy(self._freq[slots].copy())
        if self.capacity is not None:
            out["evict_at"] = torch.tensor([self._hand, self._next_sweep, self._rows.slots.end],
                                           dtype=torch.int64)
            out["slot"] = torch.from_numpy(slots.copy())
            out["free_slots"] = torch.from_numpy(self._rows.slots._free.copy())
        if self._bloom is not None:
            out["bloom"] = torch.from_numpy(self._bloom.counters.copy())
            out["bloom_added"] = torch.tensor(self._bloom.added, dtype=torch.int64)
        if self.spec.admit_after > 1 and self.capacity is None:
            pending = self._pending.live()
            out["pending_ids"] = torch.from_numpy(self._pending.ids[pending].copy())
            out["pending_count"] = torch.from_numpy(self._pending_count[pending].copy())
            out["pending_last"] = torch.from_numpy(self._pending.last[pending].copy())
        return out

    def _layout(self, state: dict, everything: bool):
        """(slots, end, free list) of a capped checkpoint that an empty shard of the same
        capacity can take as it is; None otherwise."""
        if self.capacity is None or len(self._rows) or not everything or \
                not all(k in state for k in ("slot", "free_slots", "evict_at")):
            return None
        slot = state["slot"].numpy().astype(np.int64)
        end = int(state["evict_at"][2])
        free = state["free_slots"].numpy().astype(np.int64)
        if end > self.capacity.rows or len(slot) != len(state["ids"]) or \
                len(slot) + len(free) != end:
            return None
        return slot, end, free

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

        names = STATE_NAMES[self.optimizer.name]
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

        freq = (tensor("freq", (torch.float32,), (n,)).numpy()
                if "freq" in state and len(self._freq) else np.ones(max(n, 0), np.float32))
        bloom = state.get("bloom") if self._bloom is not None else None
        if isinstance(bloom, torch.Tensor) and tuple(bloom.shape) != (self._bloom.size,):
            bloom = None  # a filter of another size (another cap): admission counts restart
        if bloom is not None:
            bloom = tensor("bloom", (torch.uint8,), (self._bloom.size,)).numpy()
            bloom_added = int(tensor("bloom_added", (torch.int64,), ()).item())
        take_pending = (self.spec.admit_after > 1 and "pending_ids" in state
                        and self.capacity is None)
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
        if self.capacity is not None:
            room = self.capacity.rows - len(self._rows)
            if len(sel) > room:  # a smaller cap (or fewer servers): the most recent rows
                recent = np.lexsort((-ids[sel], -last[sel]))[:max(room, 0)]
                sel = np.sort(sel[recent])
        ids, last, has, freq = ids[sel], last[sel], has[sel], freq[sel]
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
            layout = self._layout(state, len(sel) == n)
            if layout is not None:
                slots = layout[0][sel]
                self._rows.insert_at(ids, slots, layout[1], layout[2], last)
            else:
                slots = self._rows.insert(ids, 0)
            self._rows.last[slots] = last
            end = self._rows.slots.end
            self._values = grown(self._values, end)
            self._state_slot = grown(self._state_slot, end)
            self._values.index_copy_(0, torch.from_numpy(slots), values.index_select(0, index))
            self._state_slot[slots] = -1
            if len(self._freq):
                self._freq[slots] = freq
            with_state = slots[has]
            if names and len(with_state):
                new = self._state_slots.take(len(with_state))
                rows = index[torch.from_numpy(has)]
                for name in names:
                    array = grown(self._state[name], self._state_slots.end)
                    array.index_copy_(0, torch.from_numpy(new),
                                      rows_state[name].index_select(0, rows))
                    self._state[name] = array
                self._state_slot[with_state] = new
                self._num_state_rows += len(new)
        if bloom is not None and (len(sel) or not n):
            # A filter counts the lookups of its own server's ids: taken (counter-wise
            # maximum, over re-sharded shards) from a shard that gives this one rows.
            self._bloom.merge(bloom, bloom_added)
        if "evict_at" in state and self.capacity is not None and len(ids):
            at = state["evict_at"]
            self._hand = int(at[0]) % self.capacity.rows
            self._next_sweep = max(self._next_sweep, int(at[1]))
        if len(p_ids):
            p_slots = self._pending.insert(p_ids, 0)
            self._pending.last[p_slots] = p_last
            self._pending_count = grown(self._pending_count, self._pending.slots.end)
            self._pending_count[p_slots] = p_count
        return len(ids)

    def _export_rows_state(self, slots: np.ndarray, out: dict) -> None:
        """Into ``out``: the optimizer state of the rows at ``slots`` (``state.<name>``;
        rows without state show the state they would start from) and ``has_state``."""
        if not self._state:
            return
        state_slots = self._state_slot[slots]
        has = state_slots >= 0
        has_t = torch.from_numpy(has.copy())
        for name, array in self._state.items():
            rows = self._initial_state(name, len(slots))
            rows[has_t] = array.index_select(0, torch.from_numpy(state_slots[has]))
            out[f"state.{name}"] = rows
        out["has_state"] = has_t

    # ---- delta checkpoints (tessera.ps.snapshots, tessera.ps.checkpoint.apply_delta) ----

    def export_touched(self, since: int) -> dict[str, torch.Tensor]:
        """:meth:`export_state` of only the rows touched at clock ``since`` or later (a
        delta checkpoint's rows: every row that changed since a snapshot taken at clock
        ``since``, plus rows only looked up since), with ``all_ids``: every stored id,
        increasing (the rows dropped since are the base's ids missing from it). The
        optimizer step count and the pending admission counts are whole, as in
        :meth:`export_state`. :func:`tessera.ps.checkpoint.apply_delta` of this onto the
        export taken at ``since`` gives :meth:`export_state` now, bit for bit."""
        live = self._rows.live()
        slots = live[self._rows.last[live] >= since]
        index = torch.from_numpy(slots)
        out = {
            "ids": torch.from_numpy(self._rows.ids[slots].copy()),
            "values": self._values.index_select(0, index).contiguous(),
            "last": torch.from_numpy(self._rows.last[slots].copy()),
            "stored": torch.tensor(len(live), dtype=torch.int64),
        }
        if self.spec.evict_after or self.spec.max_rows:  # rows may have been dropped since
            out["all_ids"] = torch.from_numpy(self._rows.ids[live].copy())
        self._export_rows_state(slots, out)
        out["steps"] = torch.tensor(self.steps, dtype=torch.int64)
        if self.spec.admit_after > 1:
            pending = self._pending.live()
            out["pending_ids"] = torch.from_numpy(self._pending.ids[pending].copy())
            out["pending_count"] = torch.from_numpy(self._pending_count[pending].copy())
            out["pending_last"] = torch.from_numpy(self._pending.last[pending].copy())
        return out
