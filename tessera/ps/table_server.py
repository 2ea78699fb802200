"""Serving sharded embedding tables: row pulls and row-sparse pushes on a server.

Each server holds, for every table, the rows whose ids hash to it
(:func:`tessera.ps.embedding.owner_of`) in an :class:`EmbeddingShard`, which
creates rows on first touch, applies the sparse optimizer and evicts. This
module adds the consistency rules, per table, mirroring the dense partitions:

* ``sync``: the pushes of clock c from all W workers are merged (gradients of the
  same id summed, then divided by W) and applied once; a pull for clock c waits
  until clock c - 1 has been applied. Every worker pushes every table to every
  server once per clock (with no rows if it touched none there), so the server
  knows when a clock is complete.
* ``async``: each push is applied at once, scaled by 1/W.
* ``ssp``: as async, but the push reply (which lets the worker start its next
  clock) waits until the slowest worker is within ``staleness`` clocks.

Only the rows a batch touches travel: ids are int64 frames, rows raw frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from tessera.ps.embedding import EmbeddingShard, TableError
from tessera.transport import wire
from tessera.transport.frames import frame_to_tensor, itemsize, tensor_to_frame, torch_dtype


class RowRequestError(ValueError):
    pass


@dataclass
class _TableState:
    spec: wire.TableSpec
    shard: EmbeddingShard
    clock: int = 0
    pending: list = field(default_factory=list)  # sync: (ids, grads) of the current clock
    pushed_by: set = field(default_factory=set)
    counts: dict = field(default_factory=dict)  # ssp: clocks pushed per worker
    waiters: list = field(default_factory=list)  # (needed clock, callback)


def _ids_from(frame, table: str) -> np.ndarray:
    buf = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
    if buf.nbytes % 8:
        raise RowRequestError(f"table {table!r}: ids payload of {buf.nbytes} bytes is not int64")
    return np.frombuffer(buf, dtype=np.int64)


class TableService:
    def __init__(self, *, rank: int, tables: list[wire.TableSpec], num_workers: int, mode: str,
                 staleness: int, send: Callable, stats: dict):
        self.rank = rank
        self.tables = {t.name: _TableState(t, EmbeddingShard(t, t.optimizer)) for t in tables}
        self.num_workers, self.mode, self.staleness = num_workers, mode, staleness
        self.send = send
        self.stats = stats
        self.last_seq: dict[int, int] = {}
        stats.update(rows_pulled=0, rows_pushed=0)

    def _table(self, name: str) -> _TableState:
        st = self.tables.get(name)
        if st is None:
            raise RowRequestError(f"no table {name!r} (tables: {sorted(self.tables)})")
        return st

    # ----------------------------------------------------------------- pulls

    def on_pull(self, peer: bytes, msg: wire.PullRows, frames: list) -> None:
        st = self._table(msg.table)
        if len(frames) != 1:
            raise RowRequestError(f"a row pull carries one ids frame, got {len(frames)}")
        ids = _ids_from(frames[0], msg.table).copy()
        try:
            st.shard.check_ids(ids)
        except TableError as exc:
            raise RowRequestError(str(exc)) from None
        needed = {"sync": msg.clock, "ssp": msg.clock - self.staleness}.get(self.mode, 0)

        def answer() -> None:
            rows = st.shard.lookup(ids, st.clock).to(torch_dtype(msg.dtype))
            self.stats["rows_pulled"] += len(ids)
            self.stats["bytes_sent"] += rows.numel() * itemsize(msg.dtype)
            self.send(peer, wire.Rows(req=msg.req, table=msg.table, clock=st.clock,
                                      dtype=msg.dtype), [tensor_to_frame(rows.contiguous())])

        self._when(st, needed, answer)

    # ----------------------------------------------------------------- pushes

    def on_push(self, peer: bytes, msg: wire.PushRows, frames: list) -> None:
        st = self._table(msg.table)
        if len(frames) != 2:
            raise RowRequestError(f"a row push carries an ids frame and a rows frame, "
                                  f"got {len(frames)} frames")
        if not 0 <= msg.worker < self.num_workers:
            raise RowRequestError(f"worker {msg.worker} is not in this job")
        if msg.scale <= 0 or msg.scale != msg.scale:
            raise RowRequestError(f"loss scale must be a positive number, got {msg.scale}")
        ids = _ids_from(frames[0], msg.table).copy()
        dim = st.spec.dim
        grads = frame_to_tensor_checked(frames[1], msg.dtype, len(ids) * dim, msg.table)
        grads = grads.to(torch.float32).reshape(len(ids), dim) / msg.scale
        try:
            st.shard.check_ids(ids)
        except TableError as exc:
            raise RowRequestError(str(exc)) from None
        if len(np.unique(ids)) != len(ids):
            raise RowRequestError(f"table {msg.table!r}: pushed ids must be unique")
        if not bool(torch.isfinite(grads).all()):
            raise RowRequestError(f"table {msg.table!r}: gradient rows are not finite")
        if msg.seq <= self.last_seq.get(msg.worker, -1):
            self.send(peer, wire.Ack(req=msg.req))  # a retry: already applied
            return
        if self.mode == "sync":
            if msg.clock != st.clock:
                raise RowRequestError(f"table {msg.table!r}: push for clock {msg.clock} but the "
                                      f"table is at clock {st.clock} (sync mode)")
            if msg.worker in st.pushed_by:
                raise RowRequestError(f"table {msg.table!r}: worker {msg.worker} already pushed "
                                      f"clock {msg.clock}")
        self.last_seq[msg.worker] = msg.seq
        self.stats["rows_pushed"] += len(ids)
        self.stats["bytes_received"] += len(ids) * (8 + dim * itemsize(msg.dtype))
        if self.mode == "sync":
            st.pending.append((msg.worker, ids, grads))
            st.pushed_by.add(msg.worker)
            self.send(peer, wire.Ack(req=msg.req))
            if len(st.pushed_by) == self.num_workers:
                self._apply_clock(st)
            return
        st.shard.apply(ids, grads / self.num_workers, st.clock)
        if self.mode == "async":
            self.send(peer, wire.Ack(req=msg.req))
            return
        st.counts[msg.worker] = max(st.counts.get(msg.worker, 0), msg.clock + 1)
        self._when(st, msg.clock + 1 - self.staleness, lambda: self.send(peer, wire.Ack(req=msg.req)))
        if len(st.counts) == self.num_workers:
            slowest = min(st.counts.values())
            if slowest > st.clock:
                st.clock = slowest
                self._wake(st)

    def _apply_clock(self, st: _TableState) -> None:
        st.pending.sort(key=lambda p: p[0])  # by worker: the same sum order every run
        ids = np.concatenate([i for _, i, _ in st.pending])
        grads = torch.cat([g for _, _, g in st.pending])
        uniq, inverse = np.unique(ids, return_inverse=True)
        summed = torch.zeros(len(uniq), st.spec.dim)
        summed.index_add_(0, torch.from_numpy(inverse.astype(np.int64)), grads)
        st.shard.apply(uniq.astype(np.int64), summed / self.num_workers, st.clock)
        st.pending.clear()
        st.pushed_by.clear()
        st.clock += 1
        self.stats["updates"] += 1
        self._wake(st)

    # --------------------------------------------------------------- waiting

    def _when(self, st: _TableState, clock: int, callback: Callable[[], None]) -> None:
        if st.clock >= clock:
            callback()
        else:
            st.waiters.append((clock, callback))

    def _wake(self, st: _TableState) -> None:
        ready = [cb for c, cb in st.waiters if st.clock >= c]
        st.waiters = [(c, cb) for c, cb in st.waiters if st.clock < c]
        for cb in ready:
            cb()

    def table_stats(self) -> dict:
        return {f"rows.{name}": st.shard.num_rows for name, st in self.tables.items()} | \
               {f"table_bytes.{name}": st.shard.nbytes for name, st in self.tables.items()}


def frame_to_tensor_checked(frame, dtype: str, numel: int, table: str) -> torch.Tensor:
    try:
        return frame_to_tensor(frame.buffer if hasattr(frame, "buffer") else frame, dtype, numel)
    except ValueError as exc:
        raise RowRequestError(f"table {table!r}: {exc}") from None
