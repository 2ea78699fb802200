"""Replication: a backup copy of every partition, kept bit-identical, promoted on failure.

With ``--replication 2`` each partition has a primary (its server in the shard map)
and a backup (the next server, ``rank + 1``). The protocol is primary-backup
replication in its plainest form (Alsberg and Day, 1976; the chain of two that
ps-lite and Parameter Server (Li et al., OSDI 2014) replicate key ranges with):

1. Before answering any push, the primary forwards the gradient it applies
   (:class:`~tessera.transport.wire.Replicate`) and waits for the backup's Ack.
2. The backup applies the same gradient with the same optimizer, so the copies stay
   bit-identical; a push sequence number (or the clock) keeps a re-sent update from
   being applied twice.
3. While waiting for an Ack a server keeps serving Replicate requests from *its*
   primary (other requests are deferred to the serve loop), so two servers backing
   each other up never wait on each other.
4. When the coordinator declares the primary dead, or a client first asks the backup
   for one of those partitions, the backup is promoted: it owns them from then on;
   pushes for a clock it has already applied are answered, not applied again.
5. When the backup dies, the primary drops it and carries on with one copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from tessera.ps.consistency import Consistency, RequestError
from tessera.ps.options import ServerHooks, ServerOptions
from tessera.transport import wire
from tessera.transport.frames import frame_to_tensor, tensor_to_frame


@dataclass(frozen=True)
class Replicas:
    """What one server knows of replication: whose partitions it backs up, and who
    backs up its own (``peer``: a ClientEndpoint to server ``rank + 1``)."""

    backups: tuple[wire.PartitionInfo, ...] = ()
    peer: object = None
    primary: int = -1


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
        #: Requests taken while waiting for an Ack; the serve loop handles them next.
        self.deferred: list = []
        self._dead_servers: set[int] = set()

    # --------------------------------------------------------------- primary

    def send(self, kind: str, st, tensor: torch.Tensor, pushes: int = 0, worker: int = -1,
             seq: int = -1, hparams: Optional[list] = None) -> None:
        """Have the backup apply the same thing, and wait for its Ack."""
        peer = self.peer
        if peer is None or st.info.server != self.rank:
            return
        from tessera.transport.endpoint import TransportError
        req = peer.new_req()
        peer.send(wire.Replicate(req=req, kind=kind, partitions=[st.info.id], clock=st.clock,
                                 pushes=pushes, worker=worker, seq=seq, hparams=hparams),
                  [tensor_to_frame(tensor.contiguous())])
        deadline = time.monotonic() + self.timeout_s
        while True:
            self.check()
            try:
                msg, _ = peer.wait(req, 0.01, "replication")
                break
            except TransportError:
                pass
            self._serve_replication_meanwhile()
            if self._backup_dead():
                self._drop_backup("it was declared dead")
                return
            if time.monotonic() > deadline:
                raise RequestError(f"backup {peer.peer_name} did not acknowledge replication "
                                   f"within {self.timeout_s:g} s")
        if isinstance(msg, wire.Error):
            raise RequestError(f"backup {peer.peer_name} refused replication: {msg.message}")
        self.stats["replicated"] += 1

    def send_rows(self, st, ids, grads: torch.Tensor, pushes: int, worker: int = -1,
                  seq: int = -1) -> None:
        """Tables: have the backup apply the same row update to its copy of this
        server's shard of ``st``'s table (``st.owner``), and wait for its Ack."""
        peer = self.peer
        if peer is None or st.owner != self.rank:
            return
        req = peer.new_req()
        peer.send(wire.Replicate(req=req, kind="rows", partitions=[self.rank], clock=st.clock,
                                 pushes=pushes, worker=worker, seq=seq, table=st.spec.name),
                  [ids.tobytes(), tensor_to_frame(grads.to(torch.float32).contiguous())])
        self._await_ack(req, f"table {st.spec.name!r}")

    def _await_ack(self, req: int, what: str) -> None:
        """Wait for the backup's Ack of ``req``, serving our primary's Replicate
        requests meanwhile; a dead backup is dropped, a refusal raises."""
        from tessera.transport.endpoint import TransportError
        peer = self.peer
        deadline = time.monotonic() + self.timeout_s
        while True:
            self.check()
            try:
                msg, _ = peer.wait(req, 0.01, "replication")
                break
            except TransportError:
                pass
            self._serve_replication_meanwhile()
            if self._backup_dead():
                self._drop_backup("it was declared dead")
                return
            if time.monotonic() > deadline:
                raise RequestError(f"backup {peer.peer_name} did not acknowledge replication "
                                   f"of {what} within {self.timeout_s:g} s")
        if isinstance(msg, wire.Error):
            raise RequestError(f"backup {peer.peer_name} refused replication of {what}: "
                               f"{msg.message}")
        if not isinstance(msg, wire.Ack):
            raise RequestError(f"backup {peer.peer_name} answered replication of {what} with "
                               f"{type(msg).__name__}, not an Ack")
        self.stats["replicated"] += 1

    def _replicated_ids(self) -> set[int]:
        return {pid for pid, st in self.parts.items() if st.info.server == self.rank}

    def _backup_dead(self) -> bool:
        _, dead = self.membership()
        return (self.rank + 1) % max(1, self.num_servers) in dead

    def _drop_backup(self, why: str) -> None:
        print(f"server {self.rank}: backup server {(self.rank + 1) % self.num_servers} is "
              f"gone ({why}); partitions {sorted(self._replicated_ids())} now have one copy",
              flush=True)
        self.peer = None

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
        if len(msg.partitions) != 1 or len(frames) != 1:
            raise RequestError("a Replicate request carries one partition and one frame")
        st = self.backups.get(msg.partitions[0])
        if st is None:
            owned = "it owns that partition now" if msg.partitions[0] in self.parts else \
                "it is not this partition's backup"
            raise RequestError(f"replication of partition {msg.partitions[0]} refused: {owned}")
        if len(frames[0]) != st.numel * 4:
            raise RequestError(f"partition {st.info.id} replica payload is {len(frames[0])} "
                               f"bytes; {st.numel} float32 elements are {st.numel * 4} bytes")
        values = frame_to_tensor(frames[0].buffer, "float32", st.numel)
        if msg.kind == "init":
            if st.rule is None:
                st.rule = self.new_rule(values.clone(), st.info)
        elif msg.kind == "grad":
            if st.rule is None:
                raise RequestError(f"partition {st.info.id} replica has no initial values")
            fresh = (msg.seq > st.last_seq.get(msg.worker, -1)) if msg.seq >= 0 \
                else msg.clock >= st.clock
            if fresh:
                if msg.hparams is not None:
                    st.rule.set_hparams(msg.hparams)
                st.rule.apply(values.clone())
                self.policy.replayed(st, msg.clock)
                st.applied_pushes += msg.pushes
                if msg.seq >= 0:
                    st.last_seq[msg.worker] = msg.seq
        else:
            raise RequestError(f"unknown replication kind {msg.kind!r}")
        self.endpoint.send(peer, wire.Ack(req=msg.req))

    def promote(self, why: str) -> None:
        """Take over the partitions we back up: their primary is dead."""
        if not self.backups:
            return
        for pid, st in self.backups.items():
            st.waiters, st.accum = [], None
            st.pushed_by = set()
            self.policy.taken_over(st)
            self.parts[pid] = st
        self.stats["promoted"] += len(self.backups)
        print(f"server {self.rank}: promoted to primary of partitions {sorted(self.backups)} "
              f"({why})", flush=True)
        self.backups.clear()

    def promote_for(self, pid: int) -> Optional[object]:
        """A client asked for ``pid``, which we back up: clients only send here once the
        coordinator declared the primary dead, so take over. The partition, or None."""
        st = self.backups.get(pid)
        if st is None or st.rule is None:
            return None
        self.promote(f"a client asked for partition {pid}")
        return self.parts.get(pid)

    def follow(self, dead_servers) -> None:
        """Apply the coordinator's word on dead servers: promote if our primary is one."""
        for server in dead_servers:
            if server in self._dead_servers:
                continue
            self._dead_servers.add(server)
            if server == self.primary and self.backups:
                self.promote(f"server {server} was declared dead")
