"""Elastic servers, the server's side: move dense partitions live to another server.

The coordinator orders moves (``tessera scale``, or ``[ps] rebalance`` away from a hot
server: :mod:`tessera.cluster.elastic`); its heartbeat replies carry them
(``HeartbeatAck.moves``: partition -> the server to move it to). A server that owns an
ordered partition moves it at its next quiet moment (no push of the current clock held,
no request waiting on it), between two requests of its one serve loop:

1. it sends the partition whole (values, optimizer state, clock, applied-push count,
   every worker's last push sequence number, the live workers) to the new owner
   (``Replicate`` of kind ``move``, the format of re-replication's ``copy``), and waits
   for its Ack (the new owner takes it as its own: it serves it from that message on);
2. it drops the partition and answers every later request for it with
   :data:`MOVED` and where it went; the client follows and sends the request again,
   with the same sequence number (:class:`tessera.ps.client.PSClient`), so an update is
   applied on one server only, once;
3. it tells the coordinator (``Moved``), which from then on names the new owner in
   ``owners`` (clients and checkpoints follow it) and stops ordering the move.

Every push the old owner applied is in the copy; every push it refused goes to the new
owner: nothing acknowledged is lost, nothing applied twice.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Optional

from tessera.ps.consistency import RequestError
from tessera.transport import wire

#: In a refusal: the partitions named moved to another server; ``pid->server`` pairs follow.
MOVED = "moved (elastic):"
#: A move refused for now (the target is a checkpoint ahead of the source): tried again.
LATER = "moves later"
_PAIR = re.compile(r"(-?\d+)->(\d+)")


def moved_pairs(message: str) -> dict[int, int]:
    """The ``partition -> server`` pairs of a :data:`MOVED` refusal (a table shard ``k``
    as ``-(k + 1)``: :func:`tessera.ps.replication.shard_key`)."""
    _, _, tail = message.partition(MOVED)
    return {int(p): int(s) for p, s in _PAIR.findall(tail)}


def quiet(st) -> bool:
    """A partition with nothing in flight: it can move between two requests."""
    return (not st.waiters and st.accum is None and not st.pushed_by and not st.held
            and not st.verdict_waiters)


class Mover:
    """One server's moves: out (the coordinator's orders), in (``kind="move"``), and the
    refusals for what moved away."""

    def __init__(self, server, *, orders: Callable[[], dict], report: Callable[[int, list], None],
                 connect: Optional[Callable[[int], object]], timeout_s: float,
                 addresses: Callable[[], dict] = lambda: {}):
        self.server = server
        self.addresses = addresses
        self.orders, self.report, self.connect = orders, report, connect
        self.timeout_s = timeout_s
        #: Partition -> the server it moved to (answered :data:`MOVED`).
        self.moved_to: dict[int, int] = {}
        #: Partitions that moved here (their requests are counted: the log says it served).
        self.arrived: set[int] = set()
        self._peers: dict[int, object] = {}
        #: A move the target put off (:data:`LATER`): not tried again before this.
        self._later = 0.0
        self.stats = server.stats
        for key in ("moved_out", "moved_in", "served_moved", "served_moved_rows"):
            self.stats.setdefault(key, 0)

    # ------------------------------------------------------------------ refusals

    def check(self, pids) -> None:
        """Refuse a request naming a partition that moved away (all of them named)."""
        gone = {pid: self.moved_to[pid] for pid in pids if pid in self.moved_to}
        if gone:
            pairs = " ".join(f"{p}->{s}" for p, s in sorted(gone.items()))
            raise RequestError(f"partitions {sorted(gone)} are no longer here: {MOVED} {pairs}")

    # ----------------------------------------------------------------- moving out

    def follow(self) -> None:
        """Carry out the coordinator's orders for partitions this server owns and that
        are quiet now (the others at a later turn)."""
        orders = self.orders()
        if not orders or time.monotonic() < self._later:
            return
        parts = self.server.parts
        by_target: dict[int, list[int]] = {}
        for pid, target in sorted(orders.items()):
            pid, target = int(pid), int(target)
            if pid >= 0 and target != self.server.rank and pid in parts \
                    and parts[pid].rule is not None and quiet(parts[pid]):
                by_target.setdefault(target, []).append(pid)
        for target, pids in by_target.items():
            self._move(target, pids)
        tables = self.server.tables
        if tables is None:
            return
        for key, target in sorted(orders.items()):
            shard, target = -int(key) - 1, int(target)
            if shard >= 0 and target != self.server.rank and shard in tables.served() \
                    and tables.quiet(shard) and time.monotonic() >= self._later:
                self._move_shard(target, shard)

    def _peer(self, target: int):
        peer = self._peers.get(target)
        now_at = self.addresses().get(target)
        if peer is not None and now_at and getattr(peer, "address", now_at) != now_at:
            peer.close()  # a rank scaled away and started again, at another address
            peer = self._peers[target] = None
        if peer is None and self.connect is not None:
            peer = self._peers[target] = self.connect(target)
        return peer

    def _await_acks(self, peer, reqs: list[int], what: str, late: str) -> list:
        """The target's replies to ``reqs`` (a move's messages), in order: an Ack, or an
        Error (refused, or :data:`LATER`). Requests wait meanwhile, but a server moving
        something here is answered (two servers moving to each other never wait on each
        other). Raises :class:`RequestError` (``late`` ...) past ``timeout_s``."""
        from tessera.transport.endpoint import PeerTimeout
        deadline = time.monotonic() + self.timeout_s
        replies = []
        for req in reqs:
            while True:
                self.server.hooks.check()
                try:
                    reply, _ = peer.wait(req, 0.05, what)
                    break
                except PeerTimeout:
                    self.server.replication._serve_replication_meanwhile()
                    if time.monotonic() > deadline:
                        raise RequestError(f"{late} within {self.timeout_s:g} s") from None
            replies.append(reply)
        return replies

    def _move(self, target: int, pids: list[int]) -> None:
        from tessera.ps.replication import live_members, partition_copy
        from tessera.transport.frames import tensor_to_frame
        peer = self._peer(target)
        if peer is None:
            return  # it died meanwhile: the coordinator drops the order
        self.server.replication.flush()  # updates waiting for the backup go before
        live = live_members(self.server.policy.members)
        reqs = []
        for pid in pids:
            st = self.server.parts[pid]
            msg, tensors = partition_copy(pid, st, peer.new_req(), "move", self.server.rank,
                                          last_seq=dict(st.last_seq), members=live,
                                          seq=self.server.snapshots.last)
            peer.send(msg, [tensor_to_frame(t) for t in tensors])
            reqs.append(msg.req)
        replies = self._await_acks(peer, reqs, "partition move",
                                   f"server {target} did not take partitions {pids}")
        taken = []
        for pid, reply in zip(pids, replies):
            if isinstance(reply, wire.Error):
                if LATER not in reply.message:
                    raise RequestError(f"server {target} refused partition {pid}: "
                                       f"{reply.message}")
                self._later = time.monotonic() + 0.2  # it stays here; tried again later
                continue
            taken.append(pid)
        pids = taken
        if not pids:
            return
        for pid in pids:
            del self.server.parts[pid]
            self.moved_to[pid] = target
            self.arrived.discard(pid)
        self.stats["moved_out"] += len(pids)
        print(f"server {self.server.rank}: moved partitions {pids} to server {target}",
              flush=True)
        self.report(target, pids)

    def _move_shard(self, target: int, shard: int) -> None:
        """Table shard ``shard`` (the rows hashed to server ``shard``) whole to ``target``,
        one message per table; dropped here once every table is acked."""
        from tessera.ps.replication import live_members, shard_key
        from tessera.transport.frames import tensor_to_frame
        peer = self._peer(target)
        if peer is None:
            return
        live = live_members(self.server.policy.members)
        msgs = self.server.tables.move_messages(shard, peer.new_req, self.server.rank, live,
                                                self.server.snapshots.last)
        for msg, tensors in msgs:
            peer.send(msg, [tensor_to_frame(t) for t in tensors])
        replies = self._await_acks(peer, [msg.req for msg, _ in msgs], "table shard move",
                                   f"server {target} did not take the table rows of server "
                                   f"{shard}")
        refused = next((r.message for r in replies if isinstance(r, wire.Error)), "")
        if refused:
            if LATER not in refused:
                raise RequestError(f"server {target} refused the table rows of server "
                                   f"{shard}: {refused}")
            self._later = time.monotonic() + 0.2  # they stay here; tried again later
            return
        self.server.tables.drop(shard, target)
        self.arrived.discard(shard_key(shard))
        self.stats["moved_out"] += 1
        print(f"server {self.server.rank}: moved the table rows of server {shard} to server "
              f"{target}", flush=True)
        self.report(target, [shard_key(shard)])

    # ------------------------------------------------------------------ moving in

    def on_table_move(self, peer: bytes, msg: wire.Replicate, frames: list) -> None:
        """One table of a shard moved here (the last one: serve the shard from now on)."""
        shard = msg.partitions[0] if len(msg.partitions) == 1 else -1
        snapshots = self.server.snapshots
        empty = not self.server.parts and not self.server.tables.units()
        if snapshots.last != msg.seq and not (empty and snapshots.last < msg.seq):
            # Each checkpoint holds the shard once, as of its clock: it moves between two
            # servers that wrote the same last one (or to one that holds nothing, which
            # then has written the source's: it writes that clock no more).
            raise RequestError(f"table rows of server {shard} {LATER}: this server wrote the "
                               f"checkpoint at clock {snapshots.last}, its source at "
                               f"{msg.seq}")
        if empty:
            snapshots.last = msg.seq
        if self.server.tables.on_move(peer, msg, frames):
            self.arrived.add(-shard - 1)
            self.stats["moved_in"] += 1
            print(f"server {self.server.rank}: serves the table rows of server {shard} "
                  f"(moved here from server {msg.source})", flush=True)

    def on_move(self, peer: bytes, msg: wire.Replicate, frames: list) -> None:
        """A partition moved here whole: serve it from now on."""
        replication = self.server.replication
        pid = msg.partitions[0] if len(msg.partitions) == 1 else -1
        if self.server.snapshots.last > msg.seq:
            # This server wrote a checkpoint its source has not yet: that one's file of it
            # must hold the partition (tessera.cluster.elastic, file_owners).
            raise RequestError(f"partition {pid} {LATER}: this server wrote the checkpoint at "
                               f"clock {self.server.snapshots.last}, its source not yet")
        if pid in self.server.backups:
            raise RequestError(f"a move of partition {pid} to a server that backs it up")
        replication._on_copy(peer, msg, frames)  # the copy's checks and state; Acks it
        replication.promote(f"moved here from server {msg.source}", [pid])
        st = self.server.parts[pid]
        st.last_seq = dict(msg.last_seq)
        self.moved_to.pop(pid, None)
        self.arrived.add(pid)
        self.stats["moved_in"] += 1

    def served(self, pids) -> None:
        if self.arrived and any(pid in self.arrived for pid in pids):
            self.stats["served_moved"] += 1

    def served_rows(self, shard: int) -> None:
        """A row request for table shard ``shard`` (counted if the shard moved here)."""
        if self.arrived and -(self.server.rank if shard < 0 else shard) - 1 in self.arrived:
            self.stats["served_moved"] += 1
            self.stats["served_moved_rows"] += 1

    def close(self) -> None:
        for peer in self._peers.values():
            if peer is not None:
                peer.close()
        self._peers.clear()
