"""Replication: a backup copy of every partition, kept bit-identical, promoted on failure.

With ``--replication 2`` each partition has a primary (its server in the shard map)
and a backup (the next server, ``rank + 1``). The protocol is primary-backup
replication in its plainest form (Alsberg and Day, 1976; the chain of two that
ps-lite and Parameter Server (Li et al., OSDI 2014) replicate key ranges with):

1. The primary forwards the gradient it applies
   (:class:`~tessera.transport.wire.Replicate`) and applies it too; every answer to a
   client sent after that is held until the backup's Ack for it has come back
   (:meth:`Replicator.forward`, :meth:`Replicator.reply`). The serve loop goes on
   meanwhile, so the round trip to the backup overlaps the primary's own work and
   further requests instead of blocking them, and acknowledged still means on both.
   With ``answer_early`` a push waits only for the updates before its own (sync: the
   previous clock's; async: its own worker's; :meth:`Replicator.mark`): its worker keeps
   it and sends it again after a failover, so the round trip to the backup leaves the
   step's critical path. The loop wakes for the backup's Acks only while an answer waits
   for them; the others are taken at its next turn (:meth:`Replicator.take_acks`).
2. The backup applies the same gradient with the same optimizer, so the copies stay
   bit-identical; a push sequence number (or the clock) keeps a re-sent update from
   being applied twice.
3. While waiting for an Ack a server keeps serving Replicate requests from *its*
   primary (other requests are deferred to the serve loop), so two servers backing
   each other up never wait on each other.
4. When the coordinator declares the primary dead, or a client first asks the backup
   for one of those partitions, the backup is promoted: it owns them from then on;
   pushes for a clock it has already applied are answered, not applied again.
5. When the backup dies, the primary drops it (the held answers go out).
6. Re-replication: after any server death each live server's backup is the next live
   server in the ring. A primary whose backup changed (its backup died, or it was
   promoted) streams a full copy of its partitions (values, optimizer state, clock,
   counters) to the new backup (``kind="copy"``), then forwards updates there as
   before, and tells the coordinator (``report``), which from then on counts that copy
   as the partitions' second one: a later death of the primary is survived too.
7. A replacement server (``--max-restarts``) joins empty, as a backup: a server without
   a backup whose next live server it is sends it the same full copy
   (:meth:`Replicator.follow_lives`). A server with a live backup keeps it. The
   replacement takes its predecessor's address, so a primary that has not heard of the
   death yet may forward an update to it: it refuses, naming itself a replacement
   (:data:`REPLACED`), and the primary drops that backup as if it were declared dead.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from tessera.ps.consistency import Consistency, NotABackup, RequestError
from tessera.ps.options import ServerHooks, ServerOptions
from tessera.ps.push_checks import check_ranges
from tessera.transport import wire
from tessera.transport.endpoint import TransportError
from tessera.transport.frames import frame_to_tensor, tensor_to_frame

#: In a refusal: the server backs the partition up and will own it once the coordinator's
#: word that its primary died arrives; the client asks again (PSClient).
NOT_PROMOTED = "not promoted yet"
#: A replacement server's answer for a partition it does not hold: it took its dead
#: predecessor's address, so a client that has not heard of the death yet reaches it
#: (the client routes again and retries, as for :data:`NOT_PROMOTED`).
REPLACED = "a replacement holding none of its predecessor's partitions"


#: Async/ssp with ``answer_early``: a worker keeps up to this many of its last answered
#: pushes of a partition (:func:`window`), and the primary answers a push once the
#: backup has acked the worker's update that many pushes back, not the one just before:
#: the updates in between may wait on the primary and travel to the backup together.
WINDOW = 8
#: ... but no more of them than fit in this many bytes (a large partition keeps one, and
#: its worker's memory for kept pushes stays what it was).
WINDOW_BYTES = 4 << 20
#: A batch of updates (async/ssp) goes to the backup once it is this old, holds this many
#: bytes, holds half a window (:data:`FLUSH_PUSHES`) of one worker's pushes, or an answer
#: waits for it, whichever comes first. The answers wait for an update a window back, not
#: for the batch, so its age costs no step time; each batch costs both servers a message
#: and a turn of their loops (2 ms: about 3 updates a batch in a digits job with
#: --replication 2, 1.3-1.5x the unreplicated job's time; 10 ms: about 12, 1.13-1.16x).
FLUSH_S = 0.010
FLUSH_BYTES = 1 << 20
#: ... and once one worker has this many pushes in it, so that its Ack is back well
#: before an answer :data:`WINDOW` pushes on waits for it, however fast the steps.
FLUSH_PUSHES = WINDOW // 2


def window(numel: int, cap: int = WINDOW) -> int:
    """How many answered pushes of a partition of ``numel`` fp32 elements its worker
    keeps, and how many pushes back the primary's answers wait for (async/ssp)."""
    return max(1, min(cap, WINDOW_BYTES // max(1, 4 * numel)))


@dataclass(frozen=True)
class Replicas:
    """What one server knows of replication: whose partitions it backs up, and who
    backs up its own (``peer``: a ClientEndpoint to server ``rank + 1``).

    For re-replication: ``partitions`` (every partition of the job), ``connect(rank)``
    (a connected ClientEndpoint to server ``rank``, or None if it died meanwhile) and
    ``report(backup, partition ids)`` (tells the coordinator a full copy is there)."""

    backups: tuple[wire.PartitionInfo, ...] = ()
    peer: object = None
    primary: int = -1
    partitions: tuple[wire.PartitionInfo, ...] = ()
    connect: Optional[Callable[[int], object]] = None
    report: Callable[[int, list], None] = lambda backup, pids: None
    #: Answer a push once the updates before its own are on the backup (the clients
    #: keep their last answered push: PSClient ``retain``); False: once its own is.
    answer_early: bool = False
    #: At start: the servers dead now, and those replaced ((rank, times) pairs): a
    #: replacement server starts from the coordinator's word, not from none.
    dead: tuple[int, ...] = ()
    lives: tuple[tuple[int, int], ...] = ()


class Replicator:
    """The replication side of one server: sends to its backup, applies for its primary."""

    def __init__(self, options: ServerOptions, hooks: ServerHooks, replicas: Replicas, *,
                 endpoint, handle: Callable, parts: dict, backups: dict, policy: Consistency,
                 new_rule, stats: dict):
        self.rank, self.num_servers = options.rank, options.num_servers
        self.timeout_s = options.timeout_s
        self.peer = replicas.peer
        self.primary = replicas.primary
        self.parts, self.backups = parts, backups  # the server's dicts, shared
        self.policy, self.new_rule, self.stats = policy, new_rule, stats
        self.endpoint, self.handle = endpoint, handle
        self.check, self.membership = hooks.check, hooks.membership
        self.infos = {p.id: p for p in replicas.partitions}
        self.connect, self.report = replicas.connect, replicas.report
        self.answer_early = replicas.answer_early
        #: Async/ssp answers wait for the update :func:`window` pushes back; batches may
        #: then span turns of the loop (:meth:`flush_in`). Sync: one turn's updates.
        self.windowed = replicas.answer_early and not policy.sums_clock
        #: Requests taken while waiting for an Ack; the serve loop handles them next.
        self.deferred: list = []
        self._dead_servers: set[int] = set(replicas.dead)
        #: Servers replaced (rank -> times) as far as this server has followed.
        self._lives: dict[int, int] = dict(replicas.lives)
        self.servers = hooks.servers
        #: The server's TableService (set by the server when it has tables).
        self.tables = None
        #: The table shards (by the server their rows hash to) the backup has a copy of:
        #: their row updates go there (:meth:`send_rows`). At first the server's own.
        self.rows_replicated: set[int] = {self.rank} if replicas.peer is not None else set()
        #: The backup's rank (-1: none), and the partitions it holds a copy of.
        self.peer_rank = (self.rank + 1) % max(1, self.num_servers) if self.peer else -1
        self.replicated: set[int] = set(parts) if self.peer else set()
        #: Which primary each backed-up partition came from.
        self.source = {pid: self.primary for pid in backups}
        #: Replicate requests sent and not yet acknowledged: (req, sent at, kept buffers).
        self._unacked: deque = deque()
        #: Updates forwarded this turn of the serve loop, not sent yet (:meth:`flush`);
        #: their request is ``_unacked``'s last.
        self._batch: list = []
        self._batch_bytes = 0
        #: Pushes of each worker in the batch (:data:`FLUSH_PUSHES`).
        self._batch_pushes: dict[int, int] = {}
        #: Answers held until the backup acked ``req``: (req, peer, msg, frames).
        self._held: deque = deque()
        #: Each worker's last pushes forwarded, (seq, request) (answer_early, async: a
        #: push's answer waits only for its worker's updates :func:`window` pushes before
        #: it, :meth:`mark`).
        self._pushes_of: dict[int, deque] = {}
        #: Re-replication in flight: the copies' last request, and what to report.
        self._copy: Optional[tuple[int, int, list]] = None
        self._sockets = None

    # --------------------------------------------------------------- primary

    def backs_up(self, st) -> bool:
        """Whether :meth:`forward` sends ``st``'s updates to a backup."""
        return self.peer is not None and st.info.id in self.replicated

    def forward(self, kind: str, st, tensor: torch.Tensor, pushes: int = 0, worker: int = -1,
                seq: int = -1, hparams: Optional[list] = None,
                skip: Optional[list[int]] = None) -> None:
        """Send the backup what the primary applies now, without waiting: answers sent
        from here on (:meth:`reply`) wait for its Ack (:meth:`take_acks`).

        The updates of one turn of the serve loop travel together: they join a batch
        that :meth:`flush` sends as one ``Replicate`` (kind ``batch``) with one Ack, when
        the loop has drained what was queued (at :meth:`take_acks`) or before anything
        else goes to the backup. One request number names the batch from its first
        update on, so answers and :meth:`mark` wait for it as for a single update."""
        peer = self.peer
        if peer is None or st.info.id not in self.replicated:
            return
        keep = tensor.detach().clone()  # the caller's tensor may change before it is sent
        if not self._batch:  # its request, made now: "sent at" is when the batch began
            self._batch_bytes = 0
            self._batch_pushes.clear()
            self._unacked.append((peer.new_req(), time.monotonic(), []))
        req, _, kept = self._unacked[-1]
        kept.append(keep)
        self._batch.append(wire.ReplicaUpdate(kind=kind, partition=st.info.id, clock=st.clock,
                                              pushes=pushes, worker=worker, seq=seq,
                                              hparams=hparams, keep=skip))
        self._batch_bytes += keep.numel() * keep.element_size()
        if worker >= 0:
            pushes_of = self._pushes_of.get(worker)
            if pushes_of is None:
                pushes_of = self._pushes_of[worker] = deque(maxlen=WINDOW)
            if pushes_of and pushes_of[-1][0] == seq:  # the same push, another partition
                pushes_of[-1] = (seq, req)
                count = self._batch_pushes.get(worker, 0)
            else:
                pushes_of.append((seq, req))
                count = self._batch_pushes[worker] = self._batch_pushes.get(worker, 0) + 1
            if count >= FLUSH_PUSHES:
                self.flush()
                return
        if self._batch_bytes >= FLUSH_BYTES:
            self.flush()

    def flush_in(self) -> Optional[float]:
        """Seconds until the batch is due to go (None: there is none; sync: 0)."""
        if not self._batch:
            return None
        if not self.windowed:
            return 0.0
        return max(0.0, FLUSH_S - (time.monotonic() - self._unacked[-1][1]))

    def _flush_if_due(self) -> None:
        if not self._batch:
            return
        req, began, _ = self._unacked[-1]
        if not self.windowed or any(held[0] >= req for held in self._held) or \
                time.monotonic() - began >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Send the batch :meth:`forward` gathered (one update: as a plain Replicate)."""
        batch = self._batch
        if not batch:
            return
        self._batch = []
        req, _, kept = self._unacked[-1]
        if len(batch) == 1:
            u = batch[0]
            msg = wire.Replicate(req=req, kind=u.kind, partitions=[u.partition], clock=u.clock,
                                 pushes=u.pushes, worker=u.worker, seq=u.seq, hparams=u.hparams,
                                 keep=u.keep)
        else:  # one frame: through shared memory when it is large enough (same host)
            msg = wire.Replicate(req=req, kind="batch", partitions=[u.partition for u in batch],
                                 clock=batch[-1].clock, updates=batch)
            kept[:] = [torch.cat(kept)]
        self._put(msg, kept)

    def send_rows(self, st, ids, grads: torch.Tensor, pushes: int, worker: int = -1,
                  seq: int = -1) -> None:
        """Tables: forward to the backup the row update this server applies next to its
        shard of ``st``'s table (``st.owner``: its own or one it took over), without
        waiting, as :meth:`forward` does for dense partitions: answers sent from here on
        (:meth:`reply`) wait for its Ack (:meth:`take_acks`). Only to a backup that has
        a copy of that shard (the first backup, or one :meth:`_recopy` sent it to)."""
        peer = self.peer
        if peer is None or st.owner not in self.rows_replicated:
            return
        keep_ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64).copy())
        keep = grads.detach().to(torch.float32).contiguous().clone()
        self._send(wire.Replicate(req=peer.new_req(), kind="rows", partitions=[st.owner],
                                  clock=st.clock, pushes=pushes, worker=worker, seq=seq,
                                  table=st.spec.name), [keep_ids, keep])

    def _send(self, msg: wire.Replicate, tensors: list) -> None:
        """Send the backup a request of its own (after the batch before it: in order)."""
        self.flush()
        if self.peer is None:  # the flush failed it
            return
        self._unacked.append((msg.req, time.monotonic(), tensors))
        self._put(msg, tensors)

    def _put(self, msg: wire.Replicate, tensors: list) -> None:
        try:
            self.peer.send(msg, [tensor_to_frame(t) for t in tensors])
        except TransportError as exc:
            self._fail(f"backup {self.peer.peer_name} did not take replication: {exc}")

    def reply(self, peer: bytes, msg, frames: list = (), after: Optional[int] = None) -> None:
        """Answer a client: now, or once the backup has every update sent before
        (``after``: only those up to that request, :meth:`mark`)."""
        needed = self._unacked[-1][0] if self._unacked else -1
        if after is not None:
            needed = min(needed, after)
        if needed >= 0 and self._unacked and needed >= self._unacked[0][0]:
            self._held.append((needed, peer, msg, list(frames)))
        else:
            self.endpoint.send(peer, msg, frames)

    def mark(self, worker: Optional[int] = None, back: int = 1) -> Optional[int]:
        """The last request forwarded so far (``worker``: the request of that worker's
        push ``back`` pushes before the one about to be forwarded; -1: none is
        unacknowledged; None: answers wait for every update, ``answer_early`` is off).

        Pushes are answered once the backup acked the updates forwarded *before* theirs
        (:meth:`reply` ``after=mark()``; sync: the clock before; async: only those of
        the same worker, ``mark(worker)``), not their own: the client keeps its last
        answered push per partition and sends it again to the new owner after a
        failover (:class:`~tessera.ps.client.PSClient`, ``retain``), so the one update
        the backup may lack is never lost, and the round trip to the backup leaves the
        push's critical path.

        Why a worker's own updates are enough (async): the backup takes the forwarded
        updates in order, so after a failover it lacks a suffix of them. An answered
        push of worker w had w's earlier updates acked, so of w's updates at most one
        answered one is in that suffix: w's last answered push, which w keeps and sends
        again. Waiting for every worker's updates (``mark()``) would put another worker's
        round trip to the backup on this push's critical path.

        With ``back`` = k > 1 (async/ssp, :func:`window`), the same argument with the
        worker keeping its last k answered pushes: at most k of w's answered updates are
        in the suffix, and w sends all k again, in order (the new owner skips those it
        has by sequence number)."""
        if not self.answer_early:
            return None
        if not self._unacked:
            return -1
        if worker is None:
            return self._unacked[-1][0]
        pushes_of = self._pushes_of.get(worker)
        if not pushes_of or len(pushes_of) < back:
            return -1
        last = pushes_of[-back][1]
        return last if last >= self._unacked[0][0] else -1

    def pending(self) -> bool:
        return bool(self._unacked)

    def waiting(self) -> bool:
        """Whether something waits for the backup's next Acks: answers held for them, or
        a re-replication copy to report."""
        return bool(self._held) or self._copy is not None

    def take_acks(self) -> None:
        """Take the backup's Acks that have arrived; send the answers they release."""
        self._flush_if_due()
        peer = self.peer
        while self._unacked and peer is not None:
            req, sent, _ = self._unacked[0]
            try:
                got = peer.take(req)  # never waits: the serve loop polls the backup's socket
            except TransportError as exc:  # a malformed reply: fail now, not at the timeout
                self._fail(f"backup {peer.peer_name} answered replication with a malformed "
                           f"reply: {exc}")
                return
            if got is None:  # not yet
                if time.monotonic() - sent > self.timeout_s:
                    if self._backup_dead():
                        self._drop_backup("it was declared dead")
                    else:
                        self._fail(f"backup {peer.peer_name} did not acknowledge replication "
                                   f"within {self.timeout_s:g} s")
                return
            msg = got[0]
            if isinstance(msg, wire.Error) and REPLACED in msg.message:
                self._drop_backup(self._replaced(msg))
                return
            if isinstance(msg, wire.Error):
                self._fail(f"backup {peer.peer_name} refused replication: {msg.message}")
                return
            if not isinstance(msg, wire.Ack):
                self._fail(f"backup {peer.peer_name} answered replication with "
                           f"{type(msg).__name__}, not an Ack")
                return
            self._unacked.popleft()
            self.stats["replicated"] += 1
            if self._held:  # held in order of arrival; each waits for its own request
                still: deque = deque()
                for entry in self._held:
                    if entry[0] <= req or not self._unacked:
                        self.endpoint.send(entry[1], entry[2], entry[3])
                    else:
                        still.append(entry)
                self._held = still
            if self._copy is not None and self._copy[0] == req:
                _, backup, pids = self._copy
                self._copy = None
                print(f"server {self.rank}: {copied(pids)} copied to server "
                      f"{backup}, the new backup: two copies again", flush=True)
                self.report(backup, sorted(pids))

    def _replaced(self, refusal: wire.Error) -> str:
        """Why the backup is dropped when a replacement answered for it: the backup died
        and a new, empty process took its address before the coordinator's word of the
        death reached this server. Its updates are here; the replacement is sent a full
        copy once the coordinator names it (:meth:`follow_lives`)."""
        return (f"it died and a replacement took its address before its death was "
                f"declared; the replacement refused: {refusal.message}")

    def _release_held(self) -> None:
        while self._held:
            _, to, reply, frames = self._held.popleft()
            self.endpoint.send(to, reply, frames)

    def _fail(self, why: str) -> None:
        """The backup failed us (not declared dead): refuse every held answer, naming it."""
        print(f"server {self.rank}: {why}", flush=True)
        while self._held:
            _, to, reply, _ = self._held.popleft()
            self.endpoint.send(to, wire.Error(req=getattr(reply, "req", 0),
                                              message=f"server {self.rank}: {why}"))
        self._unacked.clear()
        self._batch = []
        self._pushes_of.clear()
        self.stats["errors"] += 1

    def sockets(self) -> list:
        """What the serve loop polls: the server's socket, and the backup's while
        something waits for its Acks (:meth:`waiting`). Other Acks wait in the socket's
        queue for the loop's next turn (:meth:`take_acks`): waking the loop for each
        costs a turn of it per update, and nothing is released by them."""
        return [self.endpoint.sock] + ([self.peer.sock] if self.peer is not None
                                       and self._unacked and self.waiting() else [])

    def _replicated_ids(self) -> set[int]:
        return set(self.parts)

    def _backup_dead(self) -> bool:
        _, dead = self.membership()
        return self.peer_rank in dead

    def _drop_backup(self, why: str) -> None:
        if self.peer is None:
            return
        print(f"server {self.rank}: backup server {self.peer_rank} is gone ({why}); "
              f"partitions {sorted(self._replicated_ids())} have one copy until re-replicated",
              flush=True)
        self._release_held()  # their updates are here; the backup is gone
        self._unacked.clear()
        self._batch = []
        self._pushes_of.clear()
        self._copy = None
        self.rows_replicated = set()
        # Not closed here: its owner closes it (the process's context, at the end).
        self.peer, self.peer_rank = None, -1
        self.replicated = set()

    def _serve_replication_meanwhile(self) -> None:
        """While our backup has not answered, answer our primary's Replicate requests
        (two servers backing each other up would otherwise wait on each other)."""
        while self.endpoint.poll(0):
            got = self.endpoint.recv()
            if isinstance(got.msg, wire.Replicate):
                self.handle(got)
            else:
                self.deferred.append(got)

    # ---------------------------------------------------------------- backup

    def on_replicate(self, peer: bytes, msg: wire.Replicate, frames: list) -> None:
        if msg.kind == "copy":
            self._on_copy(peer, msg, frames)
            return
        if msg.kind == "join":
            self._on_join(peer, msg, frames)
            return
        if msg.kind == "batch":
            updates = msg.updates
            if not updates or len(frames) != 1 or \
                    [u.partition for u in updates] != list(msg.partitions):
                raise RequestError(f"a batch Replicate carries one partition per update and "
                                   f"their values in one frame: {len(updates)} updates, "
                                   f"{len(frames)} frames, {len(msg.partitions)} partitions")
        elif len(msg.partitions) != 1 or len(frames) != 1:
            raise RequestError("a Replicate request carries one partition and one frame")
        else:
            updates = [wire.ReplicaUpdate(kind=msg.kind, partition=msg.partitions[0],
                                          clock=msg.clock, pushes=msg.pushes, worker=msg.worker,
                                          seq=msg.seq, hparams=msg.hparams, keep=msg.keep)]
        # Every update is checked before any is applied: a refused batch changes nothing.
        inits = {u.partition for u in updates if u.kind == "init"}  # before a grad in a batch
        checked = [(u, self._replica_of(u, inits)) for u in updates]
        nbytes = sum(st.numel * 4 for _, st in checked)
        if len(frames[0]) != nbytes:
            raise RequestError(f"replica payload of partitions {list(msg.partitions)} is "
                               f"{len(frames[0])} bytes; their float32 elements are {nbytes} "
                               f"bytes")
        view, at = memoryview(frames[0].buffer).cast("B"), 0
        for u, st in checked:
            self._apply_replica(u, st, view[at:at + st.numel * 4])
            at += st.numel * 4
        # Applied, then acknowledged (docs/architecture.md: acking on receipt would be as
        # safe, and gains nothing while the Ack is off the answers' critical path).
        self.endpoint.send(peer, wire.Ack(req=msg.req))

    def _replica_of(self, u, inits: set):
        """The backup copy one update is for, once the update is checked against it."""
        st = self.backups.get(u.partition)
        if st is None:
            owned = "it owns that partition now" if u.partition in self.parts else \
                "it is not this partition's backup"
            raise NotABackup(f"replication of partition {u.partition} refused: {owned}")
        if u.kind not in ("init", "grad", "sum"):
            raise RequestError(f"unknown replication kind {u.kind!r}")
        if u.kind != "init" and st.rule is None and u.partition not in inits:
            raise RequestError(f"partition {st.info.id} replica has no initial values")
        if u.keep is not None:
            check_ranges(u.keep, st.numel, f"replication of partition {st.info.id}: keep")
        return st

    def _apply_replica(self, u, st, buf) -> None:
        values = frame_to_tensor(buf, "float32", st.numel)
        if u.kind == "init":
            if st.rule is None:
                st.rule = self.new_rule(values.clone(), st.info)
            return
        fresh = (u.seq > st.last_seq.get(u.worker, -1)) if u.seq >= 0 else u.clock >= st.clock
        if fresh:
            if u.hparams is not None:
                st.rule.set_hparams(u.hparams)
            grad = values.clone()
            if u.kind == "sum" and u.pushes > 1:  # the primary's take_mean, same op
                grad.div_(u.pushes)
            st.rule.apply(grad, u.keep)
            self.policy.replayed(st, u.clock)
            st.applied_pushes += u.pushes
            if u.seq >= 0:
                st.last_seq[u.worker] = u.seq

    def _on_copy(self, peer: bytes, msg: wire.Replicate, frames: list) -> None:
        """A primary's full copy of one partition: this server is its backup now."""
        from tessera.ps.partition import PartitionState
        if len(msg.partitions) != 1:
            raise RequestError("a copy carries one partition")
        pid = msg.partitions[0]
        info = self.infos.get(pid)
        if info is None or pid in self.parts:
            raise RequestError(f"copy of partition {pid} refused: "
                               f"{'it is owned here' if info else 'no such partition'}")
        if len(frames) != len(msg.names) or (frames and msg.names[0] != "values"):
            raise RequestError(f"a copy of partition {pid} names {len(msg.names)} tensors "
                               f"but carries {len(frames)} frames")
        st = PartitionState(info=info)
        if frames:
            numel = info.stop - info.start
            if len(frames[0]) != numel * 4:
                raise RequestError(f"copy of partition {pid}: values are {len(frames[0])} "
                                   f"bytes, expected {numel * 4}")
            st.rule = self.new_rule(frame_to_tensor(frames[0].buffer, "float32", numel).clone(),
                                    info)
            state = {}
            if len(msg.dtypes) != len(frames):
                raise RequestError(f"a copy of partition {pid} gives {len(msg.dtypes)} dtypes "
                                   f"for {len(frames)} frames")
            for name, frame, dtype in zip(msg.names[1:], frames[1:], msg.dtypes[1:]):
                kind = getattr(torch, dtype.removesuffix("[]"), None)
                if not isinstance(kind, torch.dtype):
                    raise RequestError(f"copy of partition {pid}: {dtype!r} is not a dtype")
                raw = bytearray(frame.buffer)
                if len(raw) % kind.itemsize:
                    raise RequestError(f"copy of partition {pid}: {name} is {len(raw)} bytes, "
                                       f"not a whole number of {dtype} elements")
                value = torch.frombuffer(raw, dtype=kind) if raw else torch.zeros(0, dtype=kind)
                state[name] = value.reshape(()) if dtype.endswith("[]") else value
            if state:
                try:
                    st.rule.load_state(state)
                except (RuntimeError, ValueError, KeyError) as exc:
                    raise RequestError(f"copy of partition {pid}: bad optimizer state: {exc}")
        st.clock, st.applied_pushes = msg.clock, msg.pushes
        st.last_seq = dict(msg.last_seq)
        members = self.policy.members
        for worker, incarnation in msg.members.items():
            if 0 <= worker < members.num_workers and incarnation > \
                    members.incarnations.get(worker, 0):
                members.join(worker, incarnation)
        self.backups[pid] = st
        self.source[pid] = msg.source
        self.stats["copies_received"] = self.stats.get("copies_received", 0) + 1
        self.endpoint.send(peer, wire.Ack(req=msg.req))

    def forward_join(self, worker: int, incarnation: int, clock: int) -> None:
        """A worker joined again here: the backup's membership follows (a replacement
        server sees no Join of its own, and would wait for a departed incarnation's
        clocks, or not for the new one's, once promoted)."""
        if self.peer is None or not (self.replicated or self.rows_replicated):
            return
        self._send(wire.Replicate(req=self.peer.new_req(), kind="join", partitions=[],
                                  clock=clock, worker=worker, seq=incarnation), [])

    def _on_join(self, peer: bytes, msg: wire.Replicate, frames: list) -> None:
        members = self.policy.members
        if frames or msg.partitions or not 0 <= msg.worker < members.num_workers \
                or msg.seq < 0:
            raise RequestError("a join Replicate names a worker of this job and an "
                               "incarnation, without partitions or frames")
        members.join(msg.worker, msg.seq)
        if msg.clock > 0:
            members.joined_at[msg.worker] = max(members.joined_at.get(msg.worker, 0), msg.clock)
        self.endpoint.send(peer, wire.Ack(req=msg.req))

    def promote(self, why: str, pids=None) -> None:
        """Take over the partitions we back up (``pids``: those; default all): their
        primary is dead."""
        pids = sorted(self.backups if pids is None else pids)
        if not pids:
            return
        for pid in pids:
            st = self.backups.pop(pid)
            self.source.pop(pid, None)
            st.waiters, st.accum = [], None
            st.pushed_by = set()
            self.policy.taken_over(st)
            self.parts[pid] = st
        self.stats["promoted"] += len(pids)
        print(f"server {self.rank}: promoted to primary of partitions {pids} ({why})",
              flush=True)

    def promote_for(self, pid: int) -> Optional[object]:
        """A client asked for ``pid``, which we back up: it sends here once the coordinator
        declared the primary dead. Take over once the coordinator told us too (the
        client asks again meanwhile: :data:`NOT_PROMOTED`). The partition, or None.

        A copy without values yet (the primary died before replicating worker 0's
        initial values) is taken over too: worker 0 sends them here again, and pulls
        wait for them."""
        if pid not in self.backups:
            return None
        _, dead = self.membership()
        self.follow(dead)
        if pid in self.parts:
            return self.parts[pid]
        raise RequestError(f"partition {pid} is backed up here and {NOT_PROMOTED}: its "
                           f"primary, server {self.source.get(pid, self.primary)}, is not "
                           f"declared dead yet")

    # ------------------------------------------------------- re-replication

    def _live_after(self, server: int, step: int) -> int:
        n = max(1, self.num_servers)
        for k in range(1, n):
            candidate = (server + step * k) % n
            if candidate not in self._dead_servers:
                return candidate
        return -1

    def follow(self, dead_servers) -> bool:
        """Apply the coordinator's word on dead servers: promote what a dead primary's
        partitions we hold, then make sure our partitions have a copy on the next live
        server. True when a server died since the last call."""
        new = set(dead_servers) - self._dead_servers
        if not new:
            return False
        self._dead_servers |= new
        for server in sorted(new):
            mine = [pid for pid, src in self.source.items() if src == server]
            self.promote(f"server {server} was declared dead", mine)
        if self.tables is not None:  # table shards too, before they are copied on
            self.tables.follow_servers(self._dead_servers)
        self.primary = self._live_after(self.rank, -1)
        if self.peer_rank in new:
            self._drop_backup("it was declared dead")
        # A live backup is kept (after a replacement joined it may not be the next live
        # server: moving would leave a copy behind that no longer follows).
        backup = self.peer_rank if self.peer is not None else self._live_after(self.rank, +1)
        if backup < 0 or backup == self.rank:
            return True  # the last server: one copy
        if backup != self.peer_rank:
            self._drop_backup(f"server {backup} is the next live one now")
            if self.connect is None:
                return True
            self.peer = self.connect(backup)
            if self.peer is None:
                return True  # it died meanwhile: the coordinator says so next
            self.peer_rank = backup
        self._recopy()
        return True

    def follow_lives(self) -> None:
        """Apply the coordinator's word on replaced servers: a rank whose count went up
        died (followed now if its death came and went between two heartbeats) and has a
        new, empty process, which joined the ring again. A server without a backup whose
        next live server it is streams it a full copy of its partitions (:meth:`_recopy`:
        the same ``copy`` transfer as re-replication) and reports it once acknowledged."""
        dead, lives, _ = self.servers()
        fresh = {int(r): int(n) for r, n in lives.items() if int(n) > self._lives.get(int(r), 0)}
        if not fresh:
            return
        missed = set(fresh) - self._dead_servers
        if missed:  # died and came back between two heartbeats: its death first
            self.follow(self._dead_servers | missed | set(dead))
        for r, n in sorted(fresh.items()):
            self._lives[r] = n
            if r not in dead:
                self._dead_servers.discard(r)
                print(f"server {self.rank}: server {r} was replaced (replacement {n}); it "
                      f"is in the ring again", flush=True)
        served = self.tables.served() if self.tables is not None else []
        if self.peer is not None or not (self.parts or served) or self.connect is None:
            return  # a live backup is kept; nothing to copy
        backup = self._live_after(self.rank, +1)
        if backup < 0 or backup == self.rank or backup not in fresh:
            return
        self.peer = self.connect(backup)
        if self.peer is None:
            return  # it died meanwhile: the coordinator says so next
        self.peer_rank = backup
        print(f"server {self.rank}: copying {copied([*self.parts, *map(shard_key, served)])} "
              f"to server {backup}, its new backup", flush=True)
        self._recopy()

    def _live_members(self) -> dict[int, int]:
        return live_members(self.policy.members)

    def _recopy(self) -> None:
        """Stream a full copy of every partition and table shard the backup does not
        have yet, then report them once acknowledged (table shard ``s`` reported as
        ``-(s + 1)``: :func:`shard_key`)."""
        missing = sorted(set(self.parts) - self.replicated)
        shards = sorted(set(self.tables.served()) - self.rows_replicated) \
            if self.tables is not None else []
        if (not missing and not shards) or self.peer is None:
            return
        for pid in missing:
            st = self.parts[pid]
            # sync: the backup's dedupe is by clock (a held push is sent again); async/ssp:
            # by sequence, as the primary's.
            msg, tensors = partition_copy(
                pid, st, self.peer.new_req(), "copy", self.rank,
                last_seq={} if self.policy.sums_clock else dict(st.last_seq),
                members=self._live_members())
            self._send(msg, tensors)
            self.replicated.add(pid)
        for shard in shards:  # on the same socket as, and ahead of, their row updates
            for st in self.tables.shard_units(shard):
                msg, tensors = self.tables.copy_message(st, self.peer.new_req(), self.rank,
                                                        self._live_members())
                self._send(msg, tensors)
            self.rows_replicated.add(shard)
        if self._unacked:  # reported once the last is acked (in order: all before it too)
            prior = self._copy[2] if self._copy is not None and \
                self._copy[1] == self.peer_rank else []
            self._copy = (self._unacked[-1][0], self.peer_rank,
                          sorted({*prior, *missing, *map(shard_key, shards)}))
        self.stats["recopied"] = self.stats.get("recopied", 0) + len(missing) + len(shards)


def live_members(members) -> dict[int, int]:
    """The live workers and their incarnations, as a copy or move of a partition carries."""
    return {w: members.incarnations.get(w, 0) for w in sorted(members.live)}


def partition_copy(pid: int, st, req: int, kind: str, source: int, *, last_seq: dict,
                   members: dict, seq: int = -1) -> tuple[wire.Replicate, list]:
    """One partition whole, as a ``Replicate`` of ``kind`` (re-replication's ``copy``,
    an elastic ``move``) and its tensors: values and optimizer state (none before the
    partition has values), clock, applied pushes, ``last_seq``, the live ``members``."""
    from tessera.ps.checkpoint import partition_tensors
    names, tensors = [], []
    if st.rule is not None:
        for key, value in partition_tensors(pid, st.rule).items():
            names.append("values" if key.endswith("/values") else key.split("/state/", 1)[1])
            tensors.append(value.contiguous())
    msg = wire.Replicate(req=req, kind=kind, partitions=[pid], clock=st.clock,
                         pushes=st.applied_pushes, source=source, names=names,
                         dtypes=[str(t.dtype).split(".")[-1] + ("[]" if t.dim() == 0 else "")
                                 for t in tensors],
                         last_seq=last_seq, members=members, seq=seq)
    return msg, tensors


def shard_key(shard: int) -> int:
    """Table shard ``shard`` (the rows hashed to server ``shard``) where partition ids are
    reported and routed (wire.Replicated ``partitions``, the coordinator's ``owners``):
    ``-(shard + 1)``, never a partition id. Its own inverse."""
    return -(shard + 1)


def copied(pids) -> str:
    """'partitions [..]', 'table shards of servers [..]' or both, for a log line."""
    parts = sorted(p for p in pids if p >= 0)
    shards = sorted(shard_key(p) for p in pids if p < 0)
    words = ([f"partitions {parts}"] if parts else []) + \
        ([f"table shards of servers {shards}"] if shards else [])
    return " and ".join(words) or "nothing"
