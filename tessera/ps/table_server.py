"""Serving sharded embedding tables: row pulls and row-sparse pushes on a server.

Each server holds, for every table, the rows whose ids hash to it
(:func:`tessera.ps.embedding_ids.owner_of`) in an :class:`EmbeddingShard`, which
creates rows on first touch, applies the sparse optimizer and evicts. A table is a
:class:`~tessera.ps.consistency.Clocked` unit like a dense partition, and follows
the server's consistency rule and membership (:mod:`tessera.ps.consistency`):

* ``sync``: the pushes of clock c from the live workers are merged (gradients of the
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
from typing import Callable, Optional

import numpy as np
import torch

from tessera.ps.consistency import Clocked, Consistency, RequestError, Waiter
from tessera.ps.embedding import EmbeddingShard, TableError
from tessera.transport import wire
from tessera.transport.frames import frame_to_tensor, itemsize, tensor_to_frame, torch_dtype


@dataclass(eq=False, kw_only=True)
class _TableState(Clocked):
    spec: wire.TableSpec
    shard: EmbeddingShard
    #: sync: (worker, ids, grads) of the current clock.
    pending: list = field(default_factory=list)

    def named(self) -> tuple[str, str]:
        return f"table {self.spec.name!r}: ", "the table"


@dataclass(eq=False)
class _RowReply(Waiter):
    """A row pull (answered with Rows) or an ssp push (answered with an Ack), waiting."""

    peer: bytes = b""
    msg: object = None
    #: The ids a pull asks for; None for a push's Ack.
    ids: Optional[np.ndarray] = None


def _ids_from(frame, table: str) -> np.ndarray:
    buf = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
    if buf.nbytes % 8:
        raise RequestError(f"table {table!r}: ids payload of {buf.nbytes} bytes is not int64")
    return np.frombuffer(buf, dtype=np.int64)


class TableService:
    def __init__(self, *, rank: int, tables: list[wire.TableSpec], policy: Consistency,
                 send: Callable, stats: dict):
        self.rank = rank
        self.tables = {t.name: _TableState(spec=t, shard=EmbeddingShard(t, t.optimizer))
                       for t in tables}
        self.policy = policy
        self.num_workers = policy.members.num_workers
        self.send = send
        self.stats = stats
        self.last_seq: dict[int, int] = {}
        self._reply = self._answer  # bound once: every waiting request carries it
        stats.update(rows_pulled=0, rows_pushed=0)

    def _table(self, name: str) -> _TableState:
        st = self.tables.get(name)
        if st is None:
            raise RequestError(f"no table {name!r} (tables: {sorted(self.tables)})")
        return st

    # ----------------------------------------------------------------- pulls

    def on_dump(self, peer: bytes, msg: wire.DumpRows) -> None:
        """Every row of a table this server holds, with its id (a run's export)."""
        st = self._table(msg.table)
        state = st.shard.export_state()
        self.send(peer, wire.Rows(req=msg.req, table=msg.table, clock=st.clock, dtype="float32"),
                  [tensor_to_frame(state["values"].contiguous()),
                   tensor_to_frame(state["ids"].contiguous())])

    def on_pull(self, peer: bytes, msg: wire.PullRows, frames: list) -> None:
        st = self._table(msg.table)
        if len(frames) != 1:
            raise RequestError(f"a row pull carries one ids frame, got {len(frames)}")
        ids = _ids_from(frames[0], msg.table).copy()
        try:
            st.shard.check_ids(ids)
        except TableError as exc:
            raise RequestError(str(exc)) from None
        self.policy.wait_or_answer(_RowReply(self.policy.pull_clock(msg.clock), [st],
                                             self._reply, peer, msg, ids))

    def _answer(self, w: _RowReply) -> None:
        msg, st = w.msg, w.units[0]
        if w.ids is None:
            self.send(w.peer, wire.Ack(req=msg.req))
            return
        rows = st.shard.lookup(w.ids, st.clock).to(torch_dtype(msg.dtype))
        self.stats["rows_pulled"] += len(w.ids)
        self.stats["bytes_sent"] += rows.numel() * itemsize(msg.dtype)
        self.send(w.peer, wire.Rows(req=msg.req, table=msg.table, clock=st.clock,
                                    dtype=msg.dtype), [tensor_to_frame(rows.contiguous())])

    # ----------------------------------------------------------------- pushes

    def on_push(self, peer: bytes, msg: wire.PushRows, frames: list) -> None:
        st = self._table(msg.table)
        if len(frames) != 2:
            raise RequestError(f"a row push carries an ids frame and a rows frame, "
                               f"got {len(frames)} frames")
        if not 0 <= msg.worker < self.num_workers:
            raise RequestError(f"worker {msg.worker} is not in this job")
        if msg.scale <= 0 or msg.scale != msg.scale:
            raise RequestError(f"loss scale must be a positive number, got {msg.scale}")
        ids = _ids_from(frames[0], msg.table).copy()
        dim = st.spec.dim
        grads = frame_to_tensor_checked(frames[1], msg.dtype, len(ids) * dim, msg.table)
        grads = grads.to(torch.float32).reshape(len(ids), dim) / msg.scale
        try:
            st.shard.check_ids(ids)
        except TableError as exc:
            raise RequestError(str(exc)) from None
        if len(np.unique(ids)) != len(ids):
            raise RequestError(f"table {msg.table!r}: pushed ids must be unique")
        if not bool(torch.isfinite(grads).all()):
            raise RequestError(f"table {msg.table!r}: gradient rows are not finite")
        if msg.seq <= self.last_seq.get(msg.worker, -1):
            self.send(peer, wire.Ack(req=msg.req))  # a retry: already applied
            return
        policy = self.policy
        policy.check_turn(st, msg.worker, msg.clock)
        self.last_seq[msg.worker] = msg.seq
        self.stats["rows_pushed"] += len(ids)
        self.stats["bytes_received"] += len(ids) * (8 + dim * itemsize(msg.dtype))
        if policy.sums_clock:
            st.pending.append((msg.worker, ids, grads))
            st.pushed_by.add(msg.worker)
            self.send(peer, wire.Ack(req=msg.req))
            if policy.complete(st):
                self._apply_clock(st)
            return
        st.shard.apply(ids, grads / self.num_workers, st.clock)
        if policy.answers_at_once:
            self.send(peer, wire.Ack(req=msg.req))
            return
        policy.counted([st], msg.worker, msg.clock)
        policy.wait_or_answer(_RowReply(policy.push_clock(msg.clock), [st], self._reply, peer, msg))
        policy.advance([st])

    def _apply_clock(self, st: _TableState) -> None:
        st.pending.sort(key=lambda p: p[0])  # by worker: the same sum order every run
        ids = np.concatenate([i for _, i, _ in st.pending])
        grads = torch.cat([g for _, _, g in st.pending])
        uniq, inverse = np.unique(ids, return_inverse=True)
        summed = torch.zeros(len(uniq), st.spec.dim)
        summed.index_add_(0, torch.from_numpy(inverse.astype(np.int64)), grads)
        st.shard.apply(uniq.astype(np.int64), summed / len(st.pending), st.clock)
        st.pending.clear()
        st.pushed_by.clear()
        self.policy.updated(st)
        self.stats["updates"] += 1
        self.policy.wake([st])

    def follow_membership(self) -> None:
        """A worker left: complete the sync clocks that waited only for it, and let ssp
        clocks move past it."""
        for st in self.tables.values():
            if self.policy.complete(st):
                self._apply_clock(st)
        self.policy.advance(self.tables.values())

    def table_stats(self) -> dict:
        return {f"rows.{name}": st.shard.num_rows for name, st in self.tables.items()} | \
               {f"table_bytes.{name}": st.shard.nbytes for name, st in self.tables.items()}


def frame_to_tensor_checked(frame, dtype: str, numel: int, table: str) -> torch.Tensor:
    try:
        return frame_to_tensor(frame.buffer if hasattr(frame, "buffer") else frame, dtype, numel)
    except ValueError as exc:
        raise RequestError(f"table {table!r}: {exc}") from None
