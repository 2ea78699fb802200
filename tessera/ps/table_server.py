"""Serving sharded embedding tables: row pulls and row-sparse pushes on a server.

Each server holds, for every table, the rows whose ids hash to it
(:func:`tessera.ps.embedding_ids.owner_of`) in an :class:`EmbeddingShard`, which
creates rows on first touch, applies the sparse optimizer and evicts. A table is a
:class:`~tessera.ps.consistency.Clocked` unit like a dense partition, and follows
the server's consistency rule and membership (:mod:`tessera.ps.consistency`):

* ``sync``: the pushes of clock c from the live workers are merged (gradients of the
  same id summed, then divided by their number) and applied once; the pushes are
  answered then, and a pull for clock c waits until clock c - 1 has been applied.
  Every worker pushes every table to every server once per clock (with no rows if
  it touched none there), so the server knows when a clock is complete. A worker
  the coordinator declares dead leaves the set a clock waits for, and a restarted
  one counts again from the clock it joined at (the dense partitions' Join sets it
  for every unit of the server, tables included).
* ``async``: each push is applied at once, scaled by 1/W.
* ``ssp``: as async, but the push reply (which lets the worker start its next
  clock) waits until the slowest worker is within ``staleness`` clocks.

Only the rows a batch touches travel: ids are int64 frames, rows raw frames. A pull
whose reply would exceed :data:`MAX_ROWS_REPLY_BYTES` is refused (the client splits
big pulls into chunks below it), and a pull never stores rows beyond the table's
``max_rows`` budget.

Faults, the same seam as dense partitions:

* Exactly once: every push carries ``(worker, seq)``; each shard keeps the last
  ``seq`` applied per worker, so a re-sent push is answered, not applied again; in
  sync mode a push for a clock the shard has passed is answered too (it was
  applied, or its clock completed without it).
* Replication (``--replication 2``): server ``r``'s shard of every table has a copy
  on server ``r + 1``. Before a push is answered, the update it took part in (the
  ids and the fp32 gradient rows applied, with the clock and the ``(worker, seq)``)
  is forwarded to the backup (:meth:`Replicator.send_rows`, not blocking: the answer
  is held until its Ack, :meth:`Replicator.reply`), which applies it with the same
  sparse optimizer. When the primary dies, clients send that shard's requests
  (``shard`` names it) to the server the coordinator says holds its copy, which takes
  the shard over.
* Re-replication: after a death, a server whose backup changed (its backup died) or
  that took a shard over streams a full copy of each shard it serves and its backup
  lacks (rows, ids, sparse optimizer state, clock, applied pushes, per-worker
  sequence numbers: ``Replicate(kind="tablecopy")``, :meth:`TableService.on_copy`)
  on the replication socket, ahead of the row updates that follow, and reports it to
  the coordinator (:meth:`Replicator._recopy`), which from then on routes the shard to
  that copy when its server dies: a shard survives one death after another, as long
  as its copy was reported before the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import msgspec
import numpy as np
import torch

from tessera.ps.consistency import Clocked, Consistency, NotABackup, RequestError, Waiter
from tessera.ps.embedding import EmbeddingShard, TableError
from tessera.ps.replication import NOT_PROMOTED
from tessera.transport import wire
from tessera.transport.frames import frame_to_tensor, itemsize, raw, tensor_to_frame, torch_dtype

#: The most bytes of rows one PullRows may be answered with (the client splits bigger
#: pulls into chunks below it: :func:`ids_per_pull`).
MAX_ROWS_REPLY_BYTES = 64 << 20


def ids_per_pull(dim: int, dtype: str) -> int:
    """The most ids one row pull of a ``dim``-wide table may ask for in ``dtype``."""
    return max(1, MAX_ROWS_REPLY_BYTES // (max(1, dim) * itemsize(dtype)))


@dataclass(eq=False, kw_only=True)
class _TableState(Clocked):
    spec: wire.TableSpec
    shard: EmbeddingShard
    #: The server whose rows (``owner_of``) this shard holds.
    owner: int = 0
    #: sync: (worker, ids, grads) of the current clock.
    pending: list = field(default_factory=list)
    #: Last push sequence number applied, per worker (a re-sent push is not applied again).
    last_seq: dict[int, int] = field(default_factory=dict)
    #: Worker pushes folded into applied updates (the "nothing lost" counter).
    applied_pushes: int = 0

    def named(self) -> tuple[str, str]:
        return f"table {self.spec.name!r}: ", "the table"


@dataclass(eq=False)
class _RowReply(Waiter):
    """A row pull (answered with Rows) or a push (answered with an Ack), waiting."""

    peer: bytes = b""
    msg: object = None
    #: The ids a pull asks for (a list, one per unit: a pull of several tables); None
    #: for a push's Ack.
    ids: Optional[np.ndarray | list] = None


def _ids_from(frame, table: str) -> np.ndarray:
    buf = memoryview(raw(frame))
    if buf.nbytes % 8:
        raise RequestError(f"table {table!r}: ids payload of {buf.nbytes} bytes is not int64")
    return np.frombuffer(buf, dtype=np.int64)


def _new_states(tables: list[wire.TableSpec], owner: int) -> dict[str, _TableState]:
    return {t.name: _TableState(spec=t, shard=EmbeddingShard(t, t.optimizer), owner=owner)
            for t in tables}


class TableService:
    """The tables of one server: its own shard of each, and (``--replication 2``) a
    copy of its primary's shards, which it takes over when that server dies."""

    def __init__(self, *, rank: int, tables: list[wire.TableSpec], policy: Consistency,
                 send: Callable, stats: dict, replicate: Optional[Callable] = None,
                 backup_of: int = -1, ack: Optional[Callable] = None, own: bool = True,
                 reply_buffer: Optional[Callable] = None):
        self.rank = rank
        self.specs = {t.name: t for t in tables}
        #: This server's own shard of each table; none on a replacement server (``own``
        #: False: its rank's rows are served where their copy was; it is given copies).
        self.tables = _new_states(tables, rank) if own else {}
        #: The server this one backs up first (replication; -1: none).
        self.backup_of = backup_of
        #: Copies of other servers' shards (shard -> table -> state), until promoted, and
        #: the server each copy's updates come from (its primary: when it dies, the copy
        #: is taken over). At first: server ``backup_of``'s shards, from that server.
        self.copies: dict[int, dict[str, _TableState]] = \
            {backup_of: _new_states(tables, backup_of)} if backup_of >= 0 else {}
        self.source: dict[int, int] = {backup_of: backup_of} if backup_of >= 0 else {}
        #: The copies taken over after their primary died: (shard, table) -> state.
        self.promoted: dict[tuple[int, str], _TableState] = {}
        self.policy = policy
        self.num_workers = policy.members.num_workers
        #: Answers to clients (replication: held until the backup acked the updates
        #: forwarded before them, :meth:`Replicator.reply`).
        self.send = send
        #: Acks of our primary's Replicate requests: sent at once (two servers backing
        #: each other up would otherwise wait on each other).
        self.ack = ack or send
        #: reply_buffer(peer, nbytes): writable bytes in ``peer``'s shared-memory segment
        #: that a pull's rows are gathered into, sent without a copy; or None (over TCP).
        self.reply_buffer = reply_buffer or (lambda peer, nbytes: None)
        self.stats = stats
        #: replicate(unit, ids, grads, pushes, worker, seq): the backup applies it first.
        self.replicate = replicate
        self._reply = self._answer  # bound once: every waiting request carries it
        #: Called when a sync clock is applied, before the pulls waiting for it are
        #: answered (the server's checkpoint): lookups change a capped or admitting
        #: table, so a checkpoint of clock c holds no lookup of clock c + 1.
        self.before_wake: Callable = lambda: None
        #: Follow the coordinator's word on dead servers now (the server's replication:
        #: copies whose primary died are promoted, :meth:`follow_servers`).
        self.follow_dead: Callable = lambda: None
        #: Elastic servers: shard -> the server it moved to (answered "moved": the client
        #: follows), and the tables of shards moving here, until all have come.
        self.moved_to: dict[int, int] = {}
        self._arriving: dict[int, dict[str, _TableState]] = {}
        stats.update(rows_pulled=0, rows_pushed=0, table_stale_pushes=0)

    @property
    def backups(self) -> dict[str, _TableState]:
        """The copies of server ``backup_of``'s shards (checkpoint restore), until promoted."""
        return self.copies.get(self.backup_of, {})

    def units(self) -> list[_TableState]:
        """The shards this server serves (its own and those it took over)."""
        return [*self.tables.values(), *self.promoted.values()]

    def served(self) -> list[int]:
        """The shards (by the server their rows hash to) this server serves."""
        return sorted(({self.rank} if self.tables else set()) |
                      {shard for shard, _ in self.promoted})

    def shard_units(self, shard: int) -> list[_TableState]:
        """The served states of ``shard``, one per table, in table order."""
        if shard == self.rank and self.tables:
            return list(self.tables.values())
        return [self.promoted[(shard, name)] for name in self.specs
                if (shard, name) in self.promoted]

    def _table(self, name: str, shard: int = -1) -> _TableState:
        if name not in self.specs:
            raise RequestError(f"no table {name!r} (tables: {sorted(self.specs)})")
        if self.moved_to:
            self._check_moved(self.rank if shard < 0 else shard)
        if (shard < 0 or shard == self.rank) and self.tables:
            return self.tables[name]
        shard = self.rank if shard < 0 else shard
        if shard in self.copies:
            # A client sends a shard here once the coordinator told it the primary died, or
            # (a replacement at the rows' home address) before it heard of the replacement:
            # taken over only once this server hears of that death too (the client asks
            # again meanwhile: NOT_PROMOTED), never while its primary lives.
            self.follow_dead()
            if shard in self.copies:
                raise RequestError(f"table {name!r}: the rows of server {shard} are backed up "
                                   f"here and {NOT_PROMOTED}: their primary, server "
                                   f"{self.source.get(shard, shard)}, is not declared dead "
                                   f"yet")
        st = self.promoted.get((shard, name))
        if st is None:
            raise RequestError(f"table {name!r}: the rows of server {shard} are not held by "
                               f"server {self.rank}")
        return st

    # ------------------------------------------------------------ elastic moves

    def _check_moved(self, shard: int) -> None:
        from tessera.ps.elastic import MOVED
        target = self.moved_to.get(shard)
        if target is not None:  # keyed -(shard + 1), as the coordinator's owners
            raise RequestError(f"the table rows of server {shard} are no longer here: "
                               f"{MOVED} {-shard - 1}->{target}")

    def quiet(self, shard: int) -> bool:
        """A served shard with nothing in flight (no push of its clock held, no request
        waiting on it): it can move between two requests."""
        units = self.shard_units(shard)
        return bool(units) and all(not st.waiters and not st.pending and not st.pushed_by
                                   for st in units)

    def move_messages(self, shard: int, new_req: Callable, source: int,
                      members: dict, seq: int) -> list[tuple[wire.Replicate, list]]:
        """A served shard whole, one message per table (``kind="tablemove"``): its rows,
        optimizer state, clock, applied pushes and every worker's last sequence number."""
        out = []
        for st in self.shard_units(shard):
            msg, tensors = self.copy_message(st, new_req(), source, members)
            out.append((msgspec.structs.replace(msg, kind="tablemove", last_seq=dict(st.last_seq),
                                                seq=seq), tensors))
        return out

    def drop(self, shard: int, target: int) -> None:
        """A shard moved to ``target``: no longer served here; its requests are answered
        "moved"."""
        if shard == self.rank and self.tables:
            self.tables = {}
        for name in self.specs:
            self.promoted.pop((shard, name), None)
        self.moved_to[shard] = target

    def on_move(self, peer: bytes, msg: wire.Replicate, frames: list) -> bool:
        """One table of a shard moving here (:meth:`move_messages`); once every table of
        it has come, this server serves the shard. True then."""
        shard = msg.partitions[0] if len(msg.partitions) == 1 else -1
        if shard < 0 or shard in self.served():
            raise RequestError(f"a move of table {msg.table!r}'s rows of server {shard} "
                               f"refused: this server serves them already")
        st = self._copy_state(msg, frames)
        self._arriving.setdefault(shard, {})[msg.table] = st
        if set(self._arriving[shard]) != set(self.specs):
            self.ack(peer, wire.Ack(req=msg.req))
            return False
        for name, st in self._arriving.pop(shard).items():
            st.waiters, st.pending, st.pushed_by = [], [], set()
            self.policy.taken_over(st)
            self.promoted[(shard, name)] = st
        self.moved_to.pop(shard, None)
        self.ack(peer, wire.Ack(req=msg.req))
        return True

    # ----------------------------------------------------------------- pulls

    def on_dump(self, peer: bytes, msg: wire.DumpRows) -> None:
        """Every row of a table this server serves, with its id (a run's export), a
        page of at most :data:`MAX_ROWS_REPLY_BYTES` from ``msg.start`` on."""
        if msg.table not in self.specs:
            raise RequestError(f"no table {msg.table!r} (tables: {sorted(self.specs)})")
        states = [st for st in self.units() if st.spec.name == msg.table]
        if not states:
            raise RequestError(f"table {msg.table!r}: server {self.rank} serves no rows of it")
        parts = [st.shard.export_state() for st in states]
        values = torch.cat([p["values"].reshape(-1, states[0].spec.dim) for p in parts])
        ids = torch.cat([p["ids"] for p in parts])
        if msg.start < 0:
            raise RequestError(f"table {msg.table!r}: an export starts at row 0 or later, "
                               f"got {msg.start}")
        # One page: the client's frame limit is far above MAX_ROWS_REPLY_BYTES.
        page = ids_per_pull(states[0].spec.dim, "float32")
        order = torch.argsort(ids)[msg.start:msg.start + page]
        more = msg.start + len(order) < len(ids)
        self.send(peer, wire.Rows(req=msg.req, table=msg.table, clock=states[0].clock,
                                  dtype="float32", more=more),
                  [tensor_to_frame(values[order].contiguous()),
                   tensor_to_frame(ids[order].contiguous())])

    def on_pull(self, peer: bytes, msg: wire.PullRows, frames: list) -> None:
        if msg.dtype not in ("float32", "bfloat16", "float16"):
            raise RequestError(f"table {msg.table or msg.tables!r}: rows dtype {msg.dtype!r} "
                               f"is not one of float32, bfloat16, float16")
        if msg.tables:
            sts, ids = self._many(msg, frames, 0)
        else:
            sts = [self._table(msg.table, msg.shard)]
            if len(frames) != 1:
                raise RequestError(f"a row pull carries one ids frame, got {len(frames)}")
            ids = [_ids_from(frames[0], msg.table)]
        answer = sum(len(i) * st.spec.dim for st, i in zip(sts, ids)) * itemsize(msg.dtype)
        if answer > MAX_ROWS_REPLY_BYTES:
            name = msg.table or ", ".join(msg.tables)
            raise RequestError(
                f"table {name!r}: a row pull of {sum(map(len, ids))} ids would answer "
                f"{answer} bytes, over the {MAX_ROWS_REPLY_BYTES}-byte reply limit; pull at "
                f"most {ids_per_pull(sts[0].spec.dim, msg.dtype)} ids at once")
        ids = [i.copy() for i in ids]
        for st, i in zip(sts, ids):
            try:
                st.shard.check_ids(i)
            except TableError as exc:
                raise RequestError(str(exc)) from None
        self.policy.wait_or_answer(_RowReply(self.policy.pull_clock(msg.clock), sts,
                                             self._reply, peer, msg,
                                             ids if msg.tables else ids[0]))

    def _many(self, msg, frames: list, grad_frames: int) -> tuple[list, list]:
        """The shards and ids of a request for several tables (:class:`wire.PullRows` or
        :class:`wire.PushRows` with ``tables``): the distinct id frames come first."""
        names = msg.tables
        if msg.table or len(set(names)) != len(names):
            raise RequestError(f"a request for several tables names each once and no "
                               f"'table'; got table {msg.table!r}, tables {names}")
        n_ids = len(frames) - grad_frames
        if len(msg.ids_frame) != len(names) or n_ids < 1 or \
                sorted(set(msg.ids_frame)) != list(range(n_ids)):
            raise RequestError(f"a request for tables {names} carries {len(frames)} frames "
                               f"with ids_frame {msg.ids_frame}: expected its distinct id "
                               f"frames, each used by a table, then {grad_frames} gradient "
                               f"frames")
        sts = [self._table(name, msg.shard) for name in names]
        id_frames = [_ids_from(f, names[msg.ids_frame.index(j)])
                     for j, f in enumerate(frames[:n_ids])]
        return sts, [id_frames[j] for j in msg.ids_frame]

    def _answer(self, w: _RowReply) -> None:
        msg, st = w.msg, w.units[0]
        if w.ids is None:
            self.send(w.peer, wire.Ack(req=msg.req))
            return
        many = isinstance(w.ids, list)
        frames = []
        for st, ids in zip(w.units, w.ids if many else [w.ids]):
            out = None
            if msg.dtype == "float32":  # gathered where the peer reads them (same host)
                buf = self.reply_buffer(w.peer, len(ids) * st.spec.dim * 4)
                if buf is not None:
                    out = torch.from_numpy(buf.view(np.float32).reshape(len(ids), st.spec.dim))
            rows = st.shard.lookup(ids, st.clock, checked=True, out=out).to(torch_dtype(msg.dtype))
            self.stats["rows_pulled"] += len(ids)
            self.stats["bytes_sent"] += rows.numel() * itemsize(msg.dtype)
            frames.append(tensor_to_frame(rows.contiguous()))
        self.send(w.peer, wire.Rows(req=msg.req, table=msg.table, clock=w.units[0].clock,
                                    dtype=msg.dtype, tables=msg.tables), frames)

    # ----------------------------------------------------------------- pushes

    def on_push(self, peer: bytes, msg: wire.PushRows, frames: list) -> None:
        if not 0 <= msg.worker < self.num_workers:
            raise RequestError(f"worker {msg.worker} is not in this job")
        if msg.scale <= 0 or msg.scale != msg.scale or msg.scale == float("inf"):
            raise RequestError(f"loss scale must be a positive finite number, got {msg.scale}")
        if msg.seq < 0 or msg.clock < 0:
            raise RequestError(f"push sequence numbers and clocks start at 0, got seq "
                               f"{msg.seq}, clock {msg.clock}")
        if msg.tables:
            sts, ids = self._many(msg, frames, len(msg.tables))
            grad_frames = frames[len(frames) - len(sts):]
        else:
            sts = [self._table(msg.table, msg.shard)]
            if len(frames) != 2:
                raise RequestError(f"a row push carries an ids frame and a rows frame, "
                                   f"got {len(frames)} frames")
            ids, grad_frames = [_ids_from(frames[0], msg.table)], frames[1:]
        items = [(st, *self._pushed_rows(st, i, f, msg))
                 for st, i, f in zip(sts, ids, grad_frames)]
        self._take(peer, msg, items)

    def _pushed_rows(self, st: _TableState, ids: np.ndarray, frame,
                     msg: wire.PushRows) -> tuple[np.ndarray, torch.Tensor]:
        """The ids and fp32 gradient rows of one table of a push, validated (once)."""
        name, dim = st.spec.name, st.spec.dim
        grads = frame_to_tensor_checked(frame, msg.dtype, len(ids) * dim, name)
        grads = grads.to(torch.float32).reshape(len(ids), dim)
        if msg.scale != 1.0:
            grads = grads / msg.scale
        try:  # the one validation of a push: ids, uniqueness, shape, finite rows
            st.shard.check_update(ids, grads)
        except TableError as exc:
            raise RequestError(str(exc)) from None
        return ids.copy(), grads

    def _take(self, peer: bytes, msg: wire.PushRows, items: list) -> None:
        """Apply (or hold, sync) a validated push of one or more tables, exactly once, and
        answer it once, when every table's rule allows."""
        policy = self.policy
        sts = [st for st, _, _ in items]
        if any(msg.seq <= st.last_seq.get(msg.worker, -1) for st in sts):
            # A re-sent push, already taken: answered as the original will be.
            self.stats["retries"] += 1
            self._ack_when(peer, msg, [st for st in sts if msg.worker in st.pushed_by])
            return
        if policy.sums_clock:
            if msg.worker not in policy.members.live:
                raise RequestError(f"worker {msg.worker} left the job (declared dead); a "
                                   f"restarted worker joins again with a Join request")
            fresh = [item for item in items if msg.clock >= item[0].clock]
            # The rest were applied already (re-sent after a failover), or their clock
            # completed without them (the worker was declared dead meanwhile): answered.
            self.stats["table_stale_pushes"] += len(items) - len(fresh)
            if not fresh:
                self.send(peer, wire.Ack(req=msg.req))
                return
            items, sts = fresh, [st for st, _, _ in fresh]
        for st in sts:
            policy.check_turn(st, msg.worker, msg.clock)
        # Validated: from here on the push is applied (or held), exactly once.
        for st, ids, _ in items:
            st.last_seq[msg.worker] = msg.seq
            self.stats["rows_pushed"] += len(ids)
            self.stats["bytes_received"] += len(ids) * (8 + st.spec.dim * itemsize(msg.dtype))
        if policy.sums_clock:
            for st, ids, grads in items:
                st.pending.append((msg.worker, ids, grads))
                st.pushed_by.add(msg.worker)
            self._ack_when(peer, msg, sts)
            for st in sts:
                if policy.complete(st):
                    self._apply_clock(st)
            return
        for st, ids, grads in items:
            if self.num_workers != 1:
                grads = grads / self.num_workers
            self._replicate(st, ids, grads, pushes=1, worker=msg.worker, seq=msg.seq)
            st.shard.apply(ids, grads, st.clock, checked=True)
            st.applied_pushes += 1
        if policy.answers_at_once:
            self.send(peer, wire.Ack(req=msg.req))
            return
        policy.counted(sts, msg.worker, msg.clock)
        policy.wait_or_answer(_RowReply(policy.push_clock(msg.clock), sts, self._reply, peer, msg))
        policy.advance(sts)

    def _ack_when(self, peer: bytes, msg: wire.PushRows, held: list) -> None:
        """Sync: a push held in its clock's sum (of the tables ``held``) is answered once
        those clocks are applied."""
        if self.policy.sums_clock and held:
            self.policy.wait_or_answer(_RowReply(self.policy.push_clock(msg.clock), held,
                                                 self._reply, peer, msg))
        else:
            self.send(peer, wire.Ack(req=msg.req))

    def _apply_clock(self, st: _TableState) -> None:
        st.pending.sort(key=lambda p: p[0])  # by worker: the same sum order every run
        ids = np.concatenate([i for _, i, _ in st.pending])
        grads = torch.cat([g for _, _, g in st.pending])
        uniq, inverse = np.unique(ids, return_inverse=True)
        summed = torch.zeros(len(uniq), st.spec.dim)
        summed.index_add_(0, torch.from_numpy(inverse.astype(np.int64).reshape(-1)), grads)
        n = len(st.pending)
        if n < self.num_workers:
            self.stats["short_clocks"] += 1
        mean, uniq = summed / n, uniq.astype(np.int64)
        self._replicate(st, uniq, mean, pushes=n)
        st.shard.apply(uniq, mean, st.clock)
        st.applied_pushes += n
        st.pending.clear()
        st.pushed_by.clear()
        self.policy.updated(st)
        self.stats["updates"] += 1
        self.before_wake()
        self.policy.wake([st])

    def _replicate(self, st: _TableState, ids: np.ndarray, grads: torch.Tensor, pushes: int,
                   worker: int = -1, seq: int = -1) -> None:
        if self.replicate is not None:  # a shard served here: its own or one taken over
            self.replicate(st, ids, grads, pushes, worker, seq)

    # ------------------------------------------------------------ replication

    def on_replicate(self, peer: bytes, msg: wire.Replicate, frames: list) -> None:
        """Backup: apply the update the primary applied to its shard of ``msg.table``."""
        if msg.kind == "tablecopy":
            self.on_copy(peer, msg, frames)
            return
        if len(msg.partitions) != 1 or len(frames) != 2:
            raise RequestError("a rows Replicate request names one shard and carries ids "
                               "and rows")
        shard = msg.partitions[0]
        st = self.copies.get(shard, {}).get(msg.table)
        if st is None:
            owned = "it owns that shard now" if shard in self.served() else \
                "it is not this shard's backup"
            raise NotABackup(f"replication of table {msg.table!r}'s rows of server "
                               f"{shard} refused: {owned}")
        ids = _ids_from(frames[0], msg.table).copy()
        grads = frame_to_tensor_checked(frames[1], "float32", len(ids) * st.spec.dim, msg.table)
        fresh = (msg.seq > st.last_seq.get(msg.worker, -1)) if msg.seq >= 0 \
            else msg.clock >= st.clock
        if fresh:
            try:
                st.shard.apply(ids, grads.reshape(len(ids), st.spec.dim).clone(), msg.clock)
            except TableError as exc:
                raise RequestError(str(exc)) from None
            self.policy.replayed(st, msg.clock)
            st.applied_pushes += msg.pushes
            if msg.seq >= 0:
                st.last_seq[msg.worker] = msg.seq
        self.ack(peer, wire.Ack(req=msg.req))

    def copy_message(self, st: _TableState, req: int, source: int,
                     members: dict) -> tuple[wire.Replicate, list]:
        """Re-replication: a full copy of one served shard of one table, for the backup
        (:meth:`on_copy`): the shard's exported state (rows, ids, optimizer state, step
        count) as frames, with its clock, applied pushes and per-worker sequence numbers
        (sync: none; its dedupe is by clock, as the primary's is for an unapplied clock)."""
        state = st.shard.export_state()
        names = sorted(state)
        tensors = [state[n].contiguous() for n in names]
        dtypes = [str(t.dtype).split(".")[-1] + ("[]" if t.dim() == 0 else "") for t in tensors]
        seqs = {} if self.policy.sums_clock else dict(st.last_seq)
        msg = wire.Replicate(req=req, kind="tablecopy", partitions=[st.owner], clock=st.clock,
                             pushes=st.applied_pushes, source=source, names=names,
                             dtypes=dtypes, last_seq=seqs, members=members,
                             table=st.spec.name)
        return msg, tensors

    def on_copy(self, peer: bytes, msg: wire.Replicate, frames: list) -> None:
        """A full copy of one shard of one table (:meth:`copy_message`): kept as a copy of
        that shard, updated by ``msg.source`` from now on, taken over when it dies."""
        if len(msg.partitions) != 1:
            raise RequestError("a table copy names one shard")
        shard = msg.partitions[0]
        spec = self.specs.get(msg.table)
        if spec is None:
            raise RequestError(f"a copy of table {msg.table!r}: no such table here")
        if shard in self.served():
            raise RequestError(f"copy of table {msg.table!r}'s rows of server {shard} "
                               f"refused: this server serves them")
        st = self._copy_state(msg, frames)
        self.copies.setdefault(shard, {})[msg.table] = st
        self.source[shard] = msg.source
        self.stats["table_copies_received"] = self.stats.get("table_copies_received", 0) + 1
        self.ack(peer, wire.Ack(req=msg.req))

    def _copy_state(self, msg: wire.Replicate, frames: list) -> _TableState:
        """The state a full copy of one shard of one table carries (:meth:`copy_message`)."""
        shard = msg.partitions[0]
        spec = self.specs.get(msg.table)
        if spec is None:
            raise RequestError(f"a copy of table {msg.table!r}: no such table here")
        if len(frames) != len(msg.names) or len(msg.dtypes) != len(frames):
            raise RequestError(f"a copy of table {msg.table!r} names {len(msg.names)} tensors "
                               f"and {len(msg.dtypes)} dtypes but carries {len(frames)} frames")
        state = {}
        for name, frame, dtype in zip(msg.names, frames, msg.dtypes):
            kind = getattr(torch, dtype.removesuffix("[]"), None)
            if not isinstance(kind, torch.dtype):
                raise RequestError(f"copy of table {msg.table!r}: {dtype!r} is not a dtype")
            data = bytearray(raw(frame))
            if len(data) % kind.itemsize:
                raise RequestError(f"copy of table {msg.table!r}: {name} is {len(data)} bytes, "
                                   f"not a whole number of {dtype} elements")
            value = torch.frombuffer(data, dtype=kind) if data else torch.zeros(0, dtype=kind)
            if dtype.endswith("[]"):
                value = value.reshape(())
            elif name in ("values",) or name.startswith("state."):
                value = value.reshape(-1, spec.dim)
            state[name] = value
        st = _TableState(spec=spec, shard=EmbeddingShard(spec, spec.optimizer), owner=shard)
        try:
            st.shard.import_state(state)
        except TableError as exc:
            raise RequestError(str(exc)) from None
        st.clock, st.applied_pushes = msg.clock, msg.pushes
        st.last_seq = dict(msg.last_seq)
        members = self.policy.members
        for worker, incarnation in msg.members.items():  # as a dense copy's (tables only)
            if 0 <= worker < members.num_workers and incarnation > \
                    members.incarnations.get(worker, 0):
                members.join(worker, incarnation)
        return st

    def promote(self, why: str, shard: Optional[int] = None) -> None:
        """Take over the copies of ``shard`` (default: of server ``backup_of``): their
        primary is dead."""
        shard = self.backup_of if shard is None else shard
        copies = self.copies.pop(shard, {})
        self.source.pop(shard, None)
        if not copies:
            return
        for name, st in copies.items():
            st.waiters, st.pending, st.pushed_by = [], [], set()
            self.policy.taken_over(st)
            self.promoted[(shard, name)] = st
        self.stats["promoted"] += len(copies)
        print(f"server {self.rank}: promoted to primary of the table shards of server "
              f"{shard} ({why})", flush=True)

    def follow_servers(self, dead_servers) -> None:
        """Take over the copies whose primary is declared dead."""
        dead = set(dead_servers)
        for shard, source in sorted(self.source.items()):
            if source in dead:
                self.promote(f"server {source} was declared dead", shard)

    # ------------------------------------------------------------ membership

    def follow_membership(self) -> None:
        """A worker left: complete the sync clocks that waited only for it, and let ssp
        clocks move past it."""
        units = self.units()
        for st in units:
            if self.policy.complete(st):
                self._apply_clock(st)
        self.policy.advance(units)

    def table_stats(self) -> dict:
        out: dict = {}
        for st in self.units():
            name = st.spec.name
            out[f"rows.{name}"] = out.get(f"rows.{name}", 0) + st.shard.num_rows
            out[f"table_bytes.{name}"] = out.get(f"table_bytes.{name}", 0) + st.shard.nbytes
            if st.shard.capacity is not None:  # under a byte cap (model.table_memory_mb)
                out[f"table_capacity.{name}"] = (out.get(f"table_capacity.{name}", 0)
                                                 + st.shard.capacity.rows)
                out[f"table_evictions.{name}"] = (out.get(f"table_evictions.{name}", 0)
                                                  + st.shard.evictions)
            out[f"table_applied.{name}.s{st.owner}"] = st.applied_pushes
        for copies in self.copies.values():
            for st in copies.values():
                out[f"backup_table_applied.{st.spec.name}.s{st.owner}"] = st.applied_pushes
        return out


def frame_to_tensor_checked(frame, dtype: str, numel: int, table: str) -> torch.Tensor:
    try:
        return frame_to_tensor(raw(frame), dtype, numel)
    except ValueError as exc:
        raise RequestError(f"table {table!r}: {exc}") from None
