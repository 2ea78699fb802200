"""The worker's side of the parameter servers: push, pull, and their handles.

Phases of one client step (the calls :class:`tessera.parallel.ps.PSDataParallel` makes):

1. ``push(partition, grad, clock)`` as soon as backward has produced a
   partition's gradient. The send is queued and returns a :class:`Handle` at
   once; ZeroMQ's I/O thread moves the bytes while backward continues.
2. The server answers a push with the partition's values after the update the
   push took part in: push and pull in one round trip.
3. ``handle.wait()`` before the next forward returns those values.

``pull(partitions, clock)`` fetches values without pushing (start-up, and a
worker that rejoins: :meth:`PSClient.join`).

Failover (``--replication 2``): ``dead_servers()`` reports the servers the
coordinator declared dead. Their partitions then belong to their backups (server
s is backed up by server s + 1 mod S), and every request still outstanding at a
dead server is sent again, same sequence number, to the new owner, which applies
it at most once (:meth:`PSClient.reroute`; a batch of several partitions is split
there, one push per partition, each deduplicated and clock-checked on its own).
All sockets are used from the calling thread only; ``wait`` polls in 100 ms slices
and runs ``check`` between them, so a cluster failure seen by the heartbeat thread
surfaces here instead of a hang.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Optional

import msgspec
import numpy as np
import torch
import zmq

from tessera.errors import TesseraError
from tessera.profiler.recorder import OFF, SpanRecorder
from tessera.ps.consistency import NOT_CAUGHT_UP
from tessera.ps.elastic import MOVED, moved_pairs
from tessera.ps.replication import NOT_PROMOTED, REPLACED, window
from tessera.ps.sharding import ShardMap
from tessera.transport import wire
from tessera.transport import shm
from tessera.transport.endpoint import ClientEndpoint, PeerTimeout, TransportError
from tessera.transport.frames import (frame_to_tensor, itemsize, raw, tensor_to_frame,
                                      torch_dtype)


#: Refusals that mean "not here (yet)": nothing was applied, so the client routes the
#: request again (:meth:`PSClient.reroute`) and retries it within its timeout. A backup
#: not promoted yet, a replacement server reached at its predecessor's address, and a
#: promoted copy a clock behind the primary that answered this worker (sync).
RETRY_ELSEWHERE = (NOT_PROMOTED, REPLACED, NOT_CAUGHT_UP)
#: For table rows also a table server's answer for rows it does not serve
#: (tessera.ps.table_server: "the rows of server k are not held by server j"): asked
#: there before this client heard that their server died or was replaced (a row pull
#: named ahead by prefetch, most of all).
ROWS_NOT_HELD = "are not held by server"


class ServerError(TesseraError):
    """A server refused a request; the message says which server and why."""


class Handle:
    """An outstanding request.

    :meth:`wait` returns ``{partition id: tensor}`` for pulls and pushes, or the
    :class:`~tessera.transport.wire.Verdict` for a push under loss scaling in sync
    mode. ``skipped`` is True when an async server refused a non-finite push.
    """

    def __init__(self, client: "PSClient", server: int, req: int, what: str, keep=None,
                 request=None):
        self._client, self._server, self._req, self._what = client, server, req, what
        self._keep = keep  # buffers ZeroMQ may still be sending from
        self._request = request  # (message, frames), to send again after a failover
        #: Once split on a re-send (PSClient.reroute): the handles of its pieces, each
        #: sent on its own to its partitions' owner; wait() joins their answers.
        self._parts: Optional[list[Handle]] = None
        self._result = None
        self.skipped = False
        #: The server clock of the values a Params reply carried.
        self.clock = 0

    def release(self) -> None:
        """Drop the received buffers (after their values were copied out)."""
        self._result = {}

    def wait(self, timeout_s: Optional[float] = None):
        if self._result is None:
            self._result, self.skipped = self._client._finish_handle(self, timeout_s)
            self._keep = self._request = None
        return self._result


class _Part:
    """One partition's share of a batched push (:meth:`PSClient.push`, ``batch_bytes``):
    wait() sends what is still waiting, then -> ``{partition: values}`` from the batch's
    one reply."""

    __slots__ = ("_batch", "_pid", "_result")

    def __init__(self, batch: "_Batch", pid: int):
        self._batch, self._pid, self._result = batch, pid, None

    @property
    def skipped(self) -> bool:
        return self._batch.handle is not None and self._batch.handle.skipped

    @property
    def clock(self) -> int:
        return self._batch.handle.clock if self._batch.handle is not None else 0

    def release(self) -> None:
        self._result = {}

    def wait(self, timeout_s: Optional[float] = None):
        if self._result is None:
            batch = self._batch
            if batch.handle is None:
                batch.client.flush()
            values = batch.handle.wait(timeout_s)
            self._result = {self._pid: values[self._pid]}
        return self._result


class _Batch:
    """Pushes of small partitions to one server, waiting to go as one message."""

    __slots__ = ("client", "server", "clock", "fields", "hparams", "pids", "payloads",
                 "nbytes", "handle")

    def __init__(self, client: "PSClient", server: int, clock: int, fields: tuple,
                 hparams):
        self.client, self.server, self.clock = client, server, clock
        self.fields, self.hparams = fields, hparams
        self.pids: list[int] = []
        self.payloads: list[torch.Tensor] = []
        self.nbytes = 0
        self.handle: Optional[Handle] = None  # once sent

    def takes(self, server: int, clock: int, fields: tuple, hparams) -> bool:
        return (server == self.server and clock == self.clock and fields == self.fields
                and hparams is self.hparams)


class _Chunks:
    """A row pull sent as several requests: wait() -> their rows, concatenated."""

    def __init__(self, handles: list):
        self._handles = handles

    def wait(self, timeout_s: Optional[float] = None) -> torch.Tensor:
        return torch.cat([h.wait(timeout_s) for h in self._handles])

    def release(self) -> None:
        for h in self._handles:
            h.release()


class _Each:
    """Several requests standing for one: wait() -> their results, in order."""

    def __init__(self, handles: list):
        self._handles = handles

    def wait(self, timeout_s: Optional[float] = None) -> list:
        return [h.wait(timeout_s) for h in self._handles]

    def release(self) -> None:
        for h in self._handles:
            h.release()


def _distinct(ids: list) -> tuple[list, list[int]]:
    """The distinct arrays of ``ids`` (equal ones sent once) and, per array, its index
    among them."""
    frames: list = []
    index: list[int] = []
    for i in ids:
        for j, f in enumerate(frames):
            if f is i or (len(f) == len(i) and np.array_equal(f, i)):
                index.append(j)
                break
        else:
            index.append(len(frames))
            frames.append(i)
    return frames, index


def _piece(msg, frames: list, index: list[int]):
    """The request ``msg`` (with its payload ``frames``, one per partition, or none)
    restricted to its partitions at positions ``index``: (message, frames)."""
    fields = {"partitions": [msg.partitions[i] for i in index]}
    unused = getattr(msg, "unused", None)
    if unused is not None:  # a Push naming unused ranges: theirs follow their partitions
        fields["unused"] = [unused[i] for i in index]
    return (msgspec.structs.replace(msg, **fields),
            [frames[i] for i in index] if frames else [])


class PSClient:
    def __init__(self, *, ctx: zmq.Context, shard_map: ShardMap, server_addresses: list[str],
                 secret: str, worker: int, timeout_s: float = 30.0, wire_dtype: str = "float32",
                 check: Callable[[], None] = lambda: None, profiler: SpanRecorder = OFF,
                 incarnation: int = 0, dead_servers: Callable[[], list] = lambda: [],
                 retain: int = 0,
                 servers: Optional[Callable[[], tuple[list, dict, dict]]] = None,
                 batch_bytes: int = 0,
                 elastic: Callable[[], tuple[dict, list]] = lambda: ({}, [])):
        if len(server_addresses) != shard_map.num_servers:
            raise ValueError(f"{len(server_addresses)} server addresses for a shard map of "
                             f"{shard_map.num_servers} servers")
        self.shard_map = shard_map
        self.worker = worker
        self.timeout_s = timeout_s
        self.wire_dtype = wire_dtype
        self.check = check
        self.servers = [ClientEndpoint(ctx, addr, secret, f"server {i}", sndtimeo_s=timeout_s)
                        for i, addr in enumerate(server_addresses)]
        #: The arena :meth:`shared_zeros` lends gradients from (None: not made).
        self.lend: Optional[shm.Arena] = None
        #: Elastic servers: (server rank -> address, servers scaled away), as last heard;
        #: a server started mid-job is connected to when a partition moves to it.
        self._elastic = elastic
        self._ctx, self._secret = ctx, secret
        self._retired_seen: list = []
        self.parts = {p.id: p for p in shard_map.partitions}
        #: Partition -> the server that owns it now (its backup once its primary died).
        self.owner = {p.id: p.server for p in shard_map.partitions}
        #: Table rows hashed to server s -> the server serving them now (where the
        #: coordinator says their copy was, once the server serving them died).
        self.shard_owner = list(range(shard_map.num_servers))
        self._dead_servers = dead_servers
        self._failed_over: set[int] = set()
        #: The coordinator's (dead servers, replaced servers -> times, moved partitions ->
        #: owner) from one heartbeat (None: dead servers only, routed by the ring).
        self._servers = servers
        self._lives: dict[int, int] = {}
        #: Servers that ever died (without the coordinator's word on table shards, a
        #: replacement is never routed table rows: it holds no shard of its own).
        self._ever_failed: set[int] = set()
        #: Replication: the last answered pushes per partition, (message, frames, buffers),
        #: at most ``retain`` of them (0: none; fewer for a large partition:
        #: :func:`tessera.ps.replication.window`). A server answers a push once its
        #: backup has this worker's updates that many pushes back; those after it the
        #: backup may lack, so after a failover they are sent again, in order (each
        #: applied at most once).
        self.retain = int(retain)
        self._retained: dict[int, deque] = {}
        self._outstanding: dict[tuple[int, int], Handle] = {}
        #: Pushes of partitions smaller than this many bytes wait to go to their server
        #: together, as one message (0: every push goes at once, on its own; jobs take
        #: ``[ps] batch_kib``). A caller that drives several clients from one thread
        #: (tests) keeps it 0: a batch leaves at this client's wait(), not another's.
        self.batch_bytes = batch_bytes
        self._overflows: list = []
        #: The batch still waiting, per server.
        self._batches: dict[int, _Batch] = {}
        # A restarted worker's sequence numbers start above all of its earlier lives'.
        self.seq = incarnation << 40
        self.pushes_acked = 0
        self._reply_clock = 0
        self.bytes_pushed = 0
        self.bytes_pulled = 0
        self.profiler = profiler
        #: Latest server send time of a reply seen (aligned clock; profiling only).
        self.last_reply_ns = 0
        #: Balance (tessera.train.balance): every push carries this weight and rate, and
        #: ``rates[clock]`` keeps the workers' rates the replies at ``clock`` carried.
        self.weight, self.rate = 1.0, 0.0
        self.rates: dict[int, list[list[float]]] = {}

    def connect(self, timeout_s: Optional[float] = None) -> None:
        for server, ep in enumerate(self.servers):
            def check(server=server) -> None:  # a server declared dead: its backup serves
                self.check()
                if server in self._dead_servers():
                    raise PSClient._Failover()
            try:
                ep.wait_connected(timeout_s or self.timeout_s, check)
            except PSClient._Failover:
                pass
        self._follow_failures()

    # --------------------------------------------------------------- failover

    class _Failover(Exception):
        pass

    def _news(self) -> bool:
        """A server died (or was replaced) since the last :meth:`_follow_failures`."""
        if self._servers is None:
            dead = self._dead_servers()  # (no sets built while none is dead)
            return bool(dead) and not self._failed_over.issuperset(dead)
        dead, lives, _ = self._servers()
        return bool(set(dead) - self._failed_over) or \
            any(n > self._lives.get(r, 0) for r, n in lives.items())

    def _check(self) -> None:
        self.check()
        if self._news():
            raise PSClient._Failover()

    def _next_live(self, server: int) -> int:
        """The server that holds ``server``'s partitions now: the first live one after it
        in the ring (its backup; with re-replication, the backup's backup and so on)."""
        n = len(self.servers)
        for step in range(1, n):
            candidate = (server + step) % n
            if candidate not in self._failed_over:
                return candidate
        return -1

    def _follow_failures(self) -> None:
        """Re-route the partitions of newly dead servers and re-send what is pending."""
        if self._servers is not None:
            dead, lives, owners = self._servers()
            fresh = {r: n for r, n in lives.items() if n > self._lives.get(r, 0)}
        else:
            dead, fresh, owners = self._dead_servers(), {}, {}
        # A replaced server died, even if its death came and went between two heartbeats.
        for server in sorted((set(dead) | set(fresh)) - self._failed_over):
            self._failed_over.add(server)
            self._ever_failed.add(server)
        replaced = set(fresh)
        for server, n in fresh.items():  # back in the ring (as a backup: it owns nothing)
            self._lives[server] = n
            if server not in dead:
                self._failed_over.discard(server)
        for server in sorted(self._failed_over | replaced):
            moved = [pid for pid, s in self.owner.items() if s == server]
            shards = [k for k, s in enumerate(self.shard_owner) if s == server]
            if not moved and not shards:
                continue
            backup = self._next_live(server)
            for pid in moved:  # where the coordinator says its copy is (else: the ring)
                self.owner[pid] = owners.get(pid, backup)
                if self.owner[pid] < 0 or self.owner[pid] in dead:
                    raise ServerError(f"server {server} died and no server is left: partition "
                                      f"{pid} has no copy left")
            for k in shards:  # table shards: where the coordinator says (re-replicated)
                if -k - 1 in owners:  # keyed -(k + 1): tessera.ps.replication.shard_key
                    target = owners[-k - 1]
                    self.shard_owner[k] = target if target >= 0 and target not in dead \
                        else -1
                    continue
                nxt = (k + 1) % len(self.servers)  # else: the ring's first copy, k + 1
                self.shard_owner[k] = nxt if server == k and nxt not in self._ever_failed \
                    and len(self.servers) > 1 else -1
            again = []
            for pid in moved:  # answered, maybe not yet on the backup: first, in order
                for msg, frames, keep in self._retained.pop(pid, ()):
                    # One partition at a time, even when it went in a batch: the batch's
                    # partitions may have reached the backup at different clocks (its
                    # update of one forwarded before the death, of another not), and each
                    # is deduplicated and clock-checked on its own there. Oldest first:
                    # the backup lacks a suffix of them, if any.
                    msg, frames = _piece(msg, frames, [msg.partitions.index(pid)])
                    again.append(Handle(self, server, msg.req, f"re-sent answered push of "
                                        f"partition {pid}", keep=keep, request=(msg, frames)))
                    self._resend(again[-1], self.owner[pid])
            for handle in again:  # not counted again: "push" does not start its name
                handle.wait()  # before the next clock's pushes (sync takes them in turn)
            for (srv, req), handle in list(self._outstanding.items()):
                if srv == server and handle._request is not None:
                    self.reroute(handle)

    @property
    def num_shards(self) -> int:
        """Table rows hash over this many servers (those launched): servers started mid-job
        (``tessera scale``) add connections, not shards."""
        return len(self.shard_owner)

    def _shard_target(self, shard: int) -> int:
        """The server serving the table rows hashed to ``shard`` now."""
        target = self.shard_owner[shard]
        if target < 0:
            raise ServerError(f"the table rows of server {shard} have no copy left: the "
                              f"servers holding them died before they were copied again")
        return target

    def reroute(self, handle: "Handle") -> None:
        """Send an outstanding request again, same (worker, seq), to whoever holds what it
        names now: after its server died (failover), was replaced, answered that it is not
        promoted yet or does not hold it, or (``tessera scale``) moved it away.

        * Table rows (``PullRows``, ``PushRows``): to the server serving their shard now.
        * A push of several partitions (a batch, ``[ps] batch_kib``): split, one push per
          partition, each to its partition's owner. Each keeps the batch's (worker, seq),
          so a partition that already applied it is answered without applying it again
          (its dedup key is per partition), and each is clock-checked alone: the batch's
          partitions may have reached their new owners at different clocks.
        * Other requests naming partitions (pulls, initial values, joins): to their
          owner, split by owner if they now have several.
        * Requests naming no partition (a join of a server holding only table rows):
          to the same server, or its ring successor once it died.

        The handle's wait() then joins the pieces' answers (``{partition: values}``)."""
        msg, frames = handle._request
        if isinstance(msg, (wire.PullRows, wire.PushRows)):
            self._resend(handle, self._shard_target(msg.shard))
            return
        pids = list(getattr(msg, "partitions", None) or [])
        if not pids:
            server = handle._server
            self._resend(handle, self._next_live(server) if server in self._failed_over
                         else server)
            return
        groups: dict[int, list[int]] = {}
        if isinstance(msg, wire.Push):
            for i, pid in enumerate(pids):
                groups[i] = [i]
            owners = {i: self.owner[pids[i]] for i in groups}
        else:
            for i, pid in enumerate(pids):
                groups.setdefault(self.owner[pid], []).append(i)
            owners = {k: k for k in groups}
        if len(groups) == 1:
            self._resend(handle, owners[next(iter(groups))])
            return
        self._outstanding.pop((handle._server, handle._req), None)
        parts = []
        for key, index in groups.items():
            sub_msg, sub_frames = _piece(msg, frames, index)
            names = [pids[i] for i in index]
            what = (handle._what.replace(f"partitions {pids}", f"partition {names[0]}")
                    if len(names) == 1 else f"{handle._what} (partitions {names})")
            part = Handle(self, handle._server, sub_msg.req, what, keep=handle._keep,
                          request=(sub_msg, sub_frames))
            self._resend(part, owners[key])
            parts.append(part)
        handle._parts = parts
        handle._request = None

    def _resend(self, handle: "Handle", server: int) -> None:
        """Send a handle's request again, same (worker, seq), to ``server``."""
        msg, frames = handle._request
        ep = self.servers[server]
        new_req = ep.new_req()
        # (Never a judged push: fp16 sync jobs refuse --replication 2 and tessera scale,
        # the paths that re-send one; tessera.cluster.elastic.scale_problem.)
        msg = msgspec.structs.replace(msg, req=new_req)
        ep.send(msg, frames)
        self._outstanding.pop((handle._server, handle._req), None)
        handle._server, handle._req = server, new_req
        handle._request = (msg, frames)
        self._outstanding[(server, new_req)] = handle

    def _by_server(self, pids) -> dict[int, list[int]]:
        """``pids`` grouped by the server holding each (routed first: the owners this
        client knows now)."""
        self._route()
        by_server: dict[int, list[int]] = {}
        for pid in pids:
            by_server.setdefault(self.owner[pid], []).append(pid)
        return by_server

    def _route(self) -> None:
        """Before sending: re-route first if the coordinator declared a server dead."""
        if self._news():
            self._follow_failures()
        retired = self._elastic()[1]
        if retired and retired != self._retired_seen and self._servers is not None:
            # Servers scaled away (tessera scale) exit: route what this client still
            # thinks is there by the coordinator's owners (sent since their moves).
            owners = self._servers()[2]
            for pid, s in list(self.owner.items()):
                if s in retired and owners.get(pid, s) != s:
                    self._connect_scaled(owners[pid])
                    self.owner[pid] = owners[pid]
            for k, s in enumerate(self.shard_owner):  # table shard k keyed -(k + 1)
                if s in retired and owners.get(-k - 1, s) != s:
                    self._connect_scaled(owners[-k - 1])
                    self.shard_owner[k] = owners[-k - 1]
            self._retired_seen = list(retired)

    def _connect_scaled(self, server: int) -> None:
        """Elastic servers: connect (authenticated, as at start-up) to ``server`` and any
        rank below it started mid-job by ``tessera scale``, or started again at another
        address, once the coordinator's heartbeat replies carry their addresses."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            addresses = self._elastic()[0]
            stale = [r for r in range(server + 1) if r >= len(self.servers)
                     or (addresses.get(r) and addresses[r] != self.servers[r].address)]
            if not stale:
                return
            if all(r in addresses for r in stale):
                break
            self.check()
            if time.monotonic() > deadline:
                raise ServerError(f"server {server}, started by tessera scale: its address "
                                  f"did not reach this worker within {self.timeout_s:g} s")
            time.sleep(0.02)
        for r in stale:
            ep = ClientEndpoint(self._ctx, addresses[r], self._secret, f"server {r}",
                                sndtimeo_s=self.timeout_s)
            ep.lend = self.lend
            ep.wait_connected(self.timeout_s, self.check)
            if r < len(self.servers):
                self.servers[r].close()
                self.servers[r] = ep
            else:
                self.servers.append(ep)

    def _track(self, handle: Handle) -> Handle:
        self._outstanding[(handle._server, handle._req)] = handle
        return handle

    def join(self, clock: int, incarnation: int, timeout_s: Optional[float] = None,
             tables: bool = False) -> list[Handle]:
        """A restarted worker joins at ``clock``: one handle per server; a handle's wait()
        raises ServerError when that server is already past ``clock``. With ``tables``,
        servers that hold only table rows are joined too."""
        by_server = self._by_server(self.parts)
        if tables:
            for server in self.shard_owner:
                if server >= 0:  # -1: no copy left (a row request names it)
                    by_server.setdefault(server, [])
        handles = []
        for server, pids in by_server.items():
            ep = self.servers[server]
            msg = wire.Join(req=ep.new_req(), worker=self.worker, incarnation=incarnation,
                            clock=clock, partitions=pids, dtype=self.wire_dtype)
            ep.send(msg)
            handles.append(self._track(Handle(self, server, msg.req, f"join at clock {clock}",
                                              request=(msg, []))))
        return handles

    def close(self) -> None:
        for ep in self.servers:
            ep.close()
        if self.lend is not None:
            self.lend.close()

    # ---------------------------------------------------- lent gradients

    def shared_zeros(self, n: int) -> Optional[torch.Tensor]:
        """``n`` fp32 zeros in memory that a server on this host reads in place when a
        slice of it is pushed (lent to it, not copied into the shared-memory segment:
        :mod:`tessera.transport.shm`); None when this client has one already or the
        memory cannot be made (then ordinary memory serves, and pushes are copied). The
        bytes of a push must not be written again until :meth:`wait_lent` returned.
        Segments set up before this call do not lend."""
        if self.lend is not None or n <= 0:
            return None
        try:
            self.lend = shm.Arena(-(-n * 4 // 4096) * 4096, name="tessera-lend")
        except (OSError, ValueError, AttributeError):  # no memfd here (or ulimit -v)
            return None
        for ep in self.servers:
            ep.lend = self.lend
        return torch.from_numpy(self.lend.empty(n))  # a new memfd's pages read as zeros

    def wait_lent(self, timeout_s: Optional[float] = None) -> None:
        """Wait until every server has let go of the gradients lent to it (normally at
        once: a server drops its views of a push before or just after answering it, a
        replicated one once it was forwarded to the backup). A server that ended reads
        nothing any more."""
        if self.lend is None:
            return
        limit = timeout_s or self.timeout_s
        deadline, pause = 0.0, 0.0
        for ep in self.servers:
            while ep.lent():
                now = time.monotonic()
                if not deadline:
                    deadline = now + limit
                elif now > deadline:
                    raise PeerTimeout(f"{ep.peer_name} still reads gradients lent to it "
                                      f"{limit:g} s after answering their push")
                self.check()
                time.sleep(pause)
                pause = min(1e-3, 2 * pause or 2e-5)

    # ----------------------------------------------------------------- calls

    def init_params(self, flat: torch.Tensor) -> None:
        """Send every partition's initial values (worker 0 only) and wait for the acks.
        A server that dies meanwhile: its backup gets them (the first init wins)."""
        flat = flat.detach().to("cpu", torch.float32).contiguous()
        by_server = self._by_server(p.id for p in self.shard_map.partitions)
        handles = []
        for server, ids in by_server.items():
            ep = self.servers[server]
            frames = [tensor_to_frame(flat[self.parts[i].start:self.parts[i].stop]) for i in ids]
            msg = wire.InitParams(req=ep.new_req(), partitions=ids, dtype="float32")
            ep.send(msg, frames)
            handles.append(self._track(Handle(self, server, msg.req, "initial values",
                                              keep=flat, request=(msg, frames))))
        for handle in handles:
            handle.wait()

    def pull(self, partitions: Optional[list[int]] = None, clock: int = 0,
             commit: Optional[bool] = None, coef: float = 1.0, agree: int = 0,
             clip: float = 0.0, norm_type: float = 2.0) -> list[Handle]:
        """Ask each server for its partitions (all by default) at ``clock``; one handle per
        server. ``commit``/``coef``: the workers' decision on the held clock before it;
        ``agree``/``clip``/``norm_type``: what the servers need to take it themselves
        (:mod:`tessera.ps.agreement`)."""
        ids = list(self.parts) if partitions is None else partitions
        self.flush()  # pushes before this pull go before it
        by_server = self._by_server(ids)
        handles = []
        for server, pids in by_server.items():
            ep = self.servers[server]
            req = ep.new_req()
            msg = wire.Pull(req=req, worker=self.worker, partitions=pids, clock=clock,
                            dtype=self.wire_dtype, commit=commit, coef=coef, agree=agree,
                            clip=clip, norm_type=norm_type)
            ep.send(msg)
            handles.append(self._track(Handle(self, server, req,
                                              f"pull of partitions {pids} at clock {clock}",
                                              request=(msg, []))))
        return handles

    def push(self, partition: int, grad: torch.Tensor, clock: int, *, scale: float = 1.0,
             nonfinite: str = "", checkpoint: int = 0, hold: bool = False,
             norm_type: float = 0.0, hparams: Optional[list] = None,
             dtype: Optional[str] = None, judged: bool = False, pending: bool = False,
             unused: Optional[list[int]] = None) -> Handle:
        """Send one partition's gradient for ``clock``; the handle yields the new values.
        ``judged``/``pending``: :class:`~tessera.transport.wire.Push`'s (a pending push's
        word follows, :meth:`word`).
        ``unused``: the element ranges of parameters the step gave no gradient
        (``Push.unused``; such a push goes alone, not in a batch).

        ``grad`` may already be in the wire dtype (then it is sent without a copy).
        The values are views of what was received: copy them out before ``release()``
        and never write into them (in sync mode on one host they are the server's
        master itself, mapped read-only: ``tessera.transport.shm``).
        """
        info = self.parts[partition]
        dtype = dtype or self.wire_dtype
        want = torch_dtype(dtype)
        if grad.dtype is want and grad.is_cpu and not grad.requires_grad \
                and grad.is_contiguous():
            payload = grad  # (most pushes: four reads instead of three tensor calls)
        else:
            payload = grad.detach().to("cpu", want).contiguous()
        if self.retain and payload.data_ptr() == grad.data_ptr():
            payload = payload.clone()  # kept after the answer (retain): not the live gradient
        if payload.numel() != info.stop - info.start:
            raise ValueError(f"partition {partition} has {info.stop - info.start} elements, "
                             f"gradient has {payload.numel()}")
        self._route()
        server = self.owner[partition]
        if self.batch_bytes and payload.nbytes < self.batch_bytes and not hold \
                and not unused and (judged or (not nonfinite and scale == 1.0)):
            # A small partition waits for others to its server: one message, one header,
            # one reply for many (sent when the batch is full, when the push's fields
            # change, or at the first wait() or pull()). Held pushes, and loss-scaled or
            # overflowing ones that are not judged (an async server refuses a scaled
            # message whole), go alone.
            fields = (dtype, checkpoint, norm_type, self.weight, self.rate, scale, nonfinite,
                      judged, pending)
            batch = self._batches.get(server)
            if batch is not None and not batch.takes(server, clock, fields, hparams):
                self._send_batch(batch)
                batch = None
            if batch is None:
                batch = self._batches[server] = _Batch(self, server, clock, fields, hparams)
            batch.pids.append(partition)
            batch.payloads.append(payload)
            batch.nbytes += payload.nbytes
            part = _Part(batch, partition)
            if batch.nbytes >= self.batch_bytes:
                self._send_batch(batch)
            return part
        return self._send_push(server, [partition], [payload], clock, dtype, scale=scale,
                               nonfinite=nonfinite, checkpoint=checkpoint, hold=hold,
                               norm_type=norm_type, hparams=hparams, judged=judged,
                               pending=pending, unused=[unused] if unused else None)

    def word(self, server: int, clock: int, overflow: str) -> None:
        """This worker's word on its whole gradient of ``clock`` (``overflow``: the first
        parameter that overflowed, "" for none) to ``server``, after the pending pushes it
        completes there (:class:`~tessera.transport.wire.Word`, one-way: the pushes'
        replies answer it)."""
        self.flush(server)  # (a batch of those pushes waiting: it goes first)
        ep = self.servers[server]
        ep.send(wire.Word(req=ep.new_req(), worker=self.worker, clock=clock, overflow=overflow))

    def take_overflows(self) -> list:
        """The overflows the replies of a skipped judged clock named (``Push.judged``),
        since the last call."""
        out, self._overflows = self._overflows, []
        return out

    def flush(self, server: Optional[int] = None) -> None:
        """Send every batch of pushes still waiting (:meth:`push`), or only the one for
        ``server`` (nothing when none waits for it)."""
        if server is not None:
            batch = self._batches.get(server)
            if batch is not None:
                self._send_batch(batch)
            return
        while self._batches:
            self._send_batch(next(iter(self._batches.values())))

    def _send_batch(self, batch: _Batch) -> None:
        del self._batches[batch.server]
        dtype, checkpoint, norm_type, _, _, scale, nonfinite, judged, pending = batch.fields
        payload = dict(zip(batch.pids, batch.payloads))
        # Routed as it leaves: a server's death heard of since the batch opened moved some
        # of its partitions, and sent to the dead server after the failover was followed,
        # nothing would re-send it. Never sent before, it goes whole to each owner now.
        handles = [self._send_push(server, pids, [payload[pid] for pid in pids], batch.clock,
                                   dtype, checkpoint=checkpoint, norm_type=norm_type,
                                   hparams=batch.hparams, scale=scale, nonfinite=nonfinite,
                                   judged=judged, pending=pending)
                   for server, pids in self._by_server(batch.pids).items()]
        if len(handles) == 1:
            batch.handle = handles[0]
            return
        # Its partitions now on several servers: their answers joined, as reroute() joins
        # the pieces of a batch split after it was sent.
        batch.handle = Handle(self, batch.server, -1,
                              f"push of partitions {batch.pids} at clock {batch.clock}")
        batch.handle._parts = handles

    def _send_push(self, server: int, pids: list[int], payloads: list, clock: int,
                   dtype: str, *, scale: float = 1.0, nonfinite: str = "", checkpoint: int = 0,
                   hold: bool = False, norm_type: float = 0.0,
                   hparams: Optional[list] = None, judged: bool = False,
                   pending: bool = False, unused: Optional[list[list[int]]] = None) -> Handle:
        """One Push message of ``pids``' gradients (one frame each) to ``server``."""
        frames = [tensor_to_frame(p) for p in payloads]
        ep = self.servers[server]
        req = ep.new_req()
        self.seq += 1
        msg = wire.Push(req=req, worker=self.worker, seq=self.seq, clock=clock,
                        partitions=pids, dtype=dtype, scale=scale,
                        nonfinite=nonfinite, checkpoint=checkpoint, hold=hold,
                        norm_type=norm_type, hparams=hparams, weight=self.weight,
                        rate=self.rate, judged=judged, pending=pending, unused=unused,
                        sent_ns=time.time_ns() + self.profiler.offset_ns
                        if self.profiler.enabled else 0)
        ep.send(msg, frames)
        self.bytes_pushed += sum(f.nbytes for f in frames)
        what = f"push of partition {pids[0]}" if len(pids) == 1 else \
            f"push of partitions {pids}"
        return self._track(Handle(self, server, req, f"{what} at clock {clock}",
                                  keep=payloads[0] if len(payloads) == 1 else payloads,
                                  request=(msg, frames)))

    def pull_rows(self, table: str, server: int, ids: np.ndarray, clock: int,
                  dim: Optional[int] = None):
        """Rows of ``table`` for unique int64 ``ids`` that hash to ``server``; wait() ->
        the rows, flat ([n * dim]). With ``dim``, a pull whose reply would exceed the
        servers' limit goes as several requests (each answered on its own)."""
        from tessera.ps.table_server import ids_per_pull
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        step = ids_per_pull(dim, self.wire_dtype) if dim else max(1, len(ids))
        if len(ids) > step:
            return _Chunks([self.pull_rows(table, server, ids[i:i + step], clock)
                            for i in range(0, len(ids), step)])
        self._route()
        target = self._shard_target(server)
        ep = self.servers[target]
        req = ep.new_req()
        msg = wire.PullRows(req=req, worker=self.worker, table=table, clock=clock,
                            dtype=self.wire_dtype, shard=server)
        frames = [ids.tobytes()]
        ep.send(msg, frames)
        self.bytes_pushed += ids.nbytes
        return self._track(Handle(self, target, req, f"row pull of table {table!r} at clock "
                                  f"{clock}", keep=ids, request=(msg, frames)))

    def pull_tables(self, server: int, requests: list, clock: int):
        """Rows of several tables in one message to ``server`` (the server their ids hash
        to): ``requests`` is ``[(table, unique int64 ids, dim), ...]``; tables whose ids are
        the same array (or equal) send them once. wait() -> a list of flat rows, one per
        request. A pull whose reply would exceed the servers' limit goes table by table."""
        from tessera.ps.table_server import MAX_ROWS_REPLY_BYTES
        ids = [np.ascontiguousarray(i, dtype=np.int64) for _, i, _ in requests]
        answer = sum(len(i) * dim for i, (_, _, dim) in zip(ids, requests)) * \
            itemsize(self.wire_dtype)
        if answer > MAX_ROWS_REPLY_BYTES:
            return _Each([self.pull_rows(t, server, i, clock, dim=dim)
                          for i, (t, _, dim) in zip(ids, requests)])
        frames, ids_frame = _distinct(ids)
        self._route()
        target = self._shard_target(server)
        ep = self.servers[target]
        req = ep.new_req()
        tables = [t for t, _, _ in requests]
        msg = wire.PullRows(req=req, worker=self.worker, table="", clock=clock,
                            dtype=self.wire_dtype, shard=server, tables=tables,
                            ids_frame=ids_frame)
        payload = [f.tobytes() for f in frames]
        ep.send(msg, payload)
        self.bytes_pushed += sum(f.nbytes for f in frames)
        return self._track(Handle(self, target, req, f"row pull of tables {tables} at clock "
                                  f"{clock}", keep=frames, request=(msg, payload)))

    def push_tables(self, server: int, items: list, clock: int, scale: float = 1.0) -> Handle:
        """Row-sparse gradients of several tables for ``clock`` in one message to ``server``
        (possibly no rows): ``items`` is ``[(table, unique int64 ids, grads), ...]``; tables
        with the same ids send them once. wait() -> True once the server answered it."""
        ids = [np.ascontiguousarray(i, dtype=np.int64) for _, i, _ in items]
        payloads = [g.detach().to("cpu", torch_dtype(self.wire_dtype)).contiguous()
                    for _, _, g in items]
        frames, ids_frame = _distinct(ids)
        self._route()
        target = self._shard_target(server)
        ep = self.servers[target]
        req = ep.new_req()
        self.seq += 1
        tables = [t for t, _, _ in items]
        msg = wire.PushRows(req=req, worker=self.worker, seq=self.seq, clock=clock, table="",
                            dtype=self.wire_dtype, scale=scale, shard=server, tables=tables,
                            ids_frame=ids_frame)
        out = [f.tobytes() for f in frames] + [tensor_to_frame(p) for p in payloads]
        ep.send(msg, out)
        self.bytes_pushed += sum(f.nbytes for f in frames) + sum(p.nbytes for p in payloads)
        return self._track(Handle(self, target, req, f"row push of tables {tables} at clock "
                                  f"{clock}", keep=(frames, payloads), request=(msg, out)))

    def row_servers(self) -> list[int]:
        """The servers that serve table rows now (each dead server's backup for it)."""
        self._route()
        return sorted({self._shard_target(k) for k in range(len(self.shard_owner))})

    def dump_rows(self, table: str, server: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row of ``table`` that ``server`` holds: (ids int64 [n], rows fp32 [n, dim])."""
        ep = self.servers[server]
        all_ids, all_rows, start, dim = [], [], 0, 0
        while True:  # pages of at most MAX_ROWS_REPLY_BYTES (the server's)
            req = ep.new_req()
            ep.send(wire.DumpRows(req=req, table=table, start=start))
            reply, frames = self._expect(server, req, f"export of table {table!r}", None,
                                         wire.Rows)
            if len(frames) != 2 or len(frames[1]) % 8:
                raise ServerError(f"{ep.peer_name} answered the export of table {table!r} "
                                  f"with {len(frames)} frames; expected rows and ids")
            raws = [raw(f) for f in frames]
            ids = np.frombuffer(raws[1], dtype=np.int64).copy()
            rows = np.frombuffer(raws[0], dtype=np.float32).copy()
            if len(ids):
                if len(rows) % len(ids) or (dim and len(rows) // len(ids) != dim):
                    raise ServerError(f"{ep.peer_name} answered the export of table "
                                      f"{table!r} with {len(rows)} values for {len(ids)} ids")
                dim = len(rows) // len(ids)
                all_ids.append(ids)
                all_rows.append(rows.reshape(len(ids), dim))
            start += len(ids)
            if not reply.more or not len(ids):
                break
        if not all_ids:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, 0)
        return (torch.from_numpy(np.concatenate(all_ids)),
                torch.from_numpy(np.concatenate(all_rows)))

    def optim_state(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every partition's optimizer state (name -> flat float32 tensor, or a 0-dim one
        for a scalar), asked of the servers holding them (:mod:`tessera.ps.optim_state`)."""
        asked = []
        for server, ids in self._by_server(p.id for p in self.shard_map.partitions).items():
            ep = self.servers[server]
            req = ep.new_req()
            ep.send(wire.OptimState(req=req, partitions=ids))
            asked.append((server, req, ids))
        out: dict[int, dict[str, torch.Tensor]] = {}
        for server, req, ids in asked:
            what = "the optimizer's state"
            reply, frames = self._expect(server, req, what, None, wire.OptimState)
            name = self.servers[server].peer_name
            if reply.partitions != ids or len(reply.names) != len(ids) or \
                    [len(n) for n in reply.names] != [len(s) for s in reply.scalar] or \
                    len(frames) != sum(len(n) for n in reply.names):
                raise ServerError(f"{name} answered {what} for partitions {ids} with "
                                  f"{reply.partitions}, {len(frames)} frames")
            at = 0
            for pid, names, scalar in zip(ids, reply.names, reply.scalar):
                part, state = self.parts[pid], {}
                for key, is_scalar in zip(names, scalar):
                    got = raw(frames[at])
                    try:
                        t = frame_to_tensor(got, "float32",
                                            1 if is_scalar else part.stop - part.start).clone()
                    except ValueError as exc:
                        raise ServerError(f"{name} answered {what} of partition {pid} "
                                          f"({key!r}): {exc}") from None
                    state[key] = t.reshape(()) if is_scalar else t
                    at += 1
                out[pid] = state
        return out

    def load_optim_state(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        """Give the servers these partitions' optimizer state (as :meth:`optim_state`
        returns it) and wait until every one holds it."""
        asked = []
        for server, ids in self._by_server(sorted(states)).items():
            ep = self.servers[server]
            tensors = [t.detach().to("cpu", torch.float32).reshape(-1).contiguous()
                       for pid in ids for t in states[pid].values()]
            msg = wire.OptimState(req=ep.new_req(), partitions=ids, load=True,
                                  names=[list(states[pid]) for pid in ids],
                                  scalar=[[t.dim() == 0 for t in states[pid].values()]
                                          for pid in ids])
            ep.send(msg, [tensor_to_frame(t) for t in tensors])
            asked.append((server, msg.req, tensors))
        for server, req, _kept in asked:  # (the frames' tensors live until answered)
            self._expect(server, req, "the loaded optimizer state", None, wire.Ack)

    def snapshot_tables(self, clock: int) -> None:
        """Hybrid mode: every server copies its tables into the checkpoint at ``clock``."""
        reqs = []
        for server, ep in enumerate(self.servers):
            req = ep.new_req()
            ep.send(wire.SnapshotTables(req=req, clock=clock))
            reqs.append((server, req))
        for server, req in reqs:
            self._expect(server, req, f"table snapshot at clock {clock}", None, wire.Ack)

    def push_rows(self, table: str, server: int, ids: np.ndarray, grads: torch.Tensor,
                  clock: int, scale: float = 1.0) -> Handle:
        """Row-sparse gradient of ``table`` for ``clock`` (possibly no rows) for the rows
        that hash to ``server``; wait() -> True once the server answered it."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        payload = grads.detach().to("cpu", torch_dtype(self.wire_dtype)).contiguous()
        frame = tensor_to_frame(payload)
        self._route()
        target = self._shard_target(server)
        ep = self.servers[target]
        req = ep.new_req()
        self.seq += 1
        msg = wire.PushRows(req=req, worker=self.worker, seq=self.seq, clock=clock, table=table,
                            dtype=self.wire_dtype, scale=scale, shard=server)
        frames = [ids.tobytes(), frame]
        ep.send(msg, frames)
        self.bytes_pushed += ids.nbytes + frame.nbytes
        return self._track(Handle(self, target, req, f"row push of table {table!r} at clock "
                                  f"{clock}", keep=(ids, payload), request=(msg, frames)))

    # -------------------------------------------------------------- replies

    def _expect(self, server: int, req: int, what: str, timeout_s, kind):
        try:
            msg, frames = self.servers[server].wait(req, timeout_s or self.timeout_s, what,
                                                    self._check)
        except TransportError:
            raise
        if isinstance(msg, wire.Error):
            raise ServerError(f"{self.servers[server].peer_name} refused {what}: {msg.message}")
        if not isinstance(msg, kind):
            raise ServerError(f"{self.servers[server].peer_name} answered {what} with "
                              f"{type(msg).__name__}")
        return msg, frames

    def _finish_handle(self, handle: Handle, timeout_s):
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            if handle._parts is not None:  # split on a re-send (reroute)
                return self._join_parts(handle, timeout_s)
            try:
                result = self._finish(handle._server, handle._req, handle._what, timeout_s)
            except PSClient._Failover:
                self._follow_failures()
                continue
            except ServerError as exc:
                if MOVED in str(exc) and handle._request is not None:
                    # tessera scale moved partitions away: their new owners, then the
                    # request again to them, as after a failover.
                    self._moved_to(moved_pairs(str(exc)))
                    self.reroute(handle)
                    continue
                # A backup not yet promoted (it has not heard of its primary's death from
                # the coordinator yet): ask again until it has, within the timeout.
                # Or a replacement at a dead server's address that this client has not
                # heard of, or table rows asked of a server that does not serve them (yet,
                # or any more): route again (the coordinator's word arrives) and retry.
                if handle._request is None or not self._retry_elsewhere(handle, str(exc)):
                    raise
                if time.monotonic() > deadline:
                    raise ServerError(f"{exc} (still after {timeout_s or self.timeout_s:g} s "
                                      f"of retries)") from None
                time.sleep(0.05)
                self.check()
                sent = (handle._server, handle._req)
                self._route()
                # _route may have re-sent it already (a death it just heard of re-routes
                # every outstanding request, and may split this one): not twice.
                if handle._parts is None and (handle._server, handle._req) == sent:
                    self.reroute(handle)
                continue
            self._outstanding.pop((handle._server, handle._req), None)
            handle.clock = self._reply_clock
            if handle._what.startswith(("push", "row push")) and not result[1]:
                # A batched row push acknowledges every table it carries (the servers
                # count each table's push as applied).
                # A batched dense push, every partition it carries.
                msg = handle._request[0] if handle._request is not None else None
                tables = getattr(msg, "tables", None)
                pids = getattr(msg, "partitions", None)
                self.pushes_acked += len(tables) if tables else len(pids) if pids else 1
            if handle._what.startswith("push") and self.retain and handle._request is not None:
                msg, frames = handle._request
                for pid in msg.partitions:
                    kept = self._retained.get(pid)
                    if kept is None:
                        part = self.parts[pid]
                        kept = self._retained[pid] = deque(
                            maxlen=window(part.stop - part.start, self.retain))
                    kept.append((msg, frames, handle._keep))
            return result

    def _moved_to(self, pairs: dict[int, int]) -> None:
        """Where moved partitions and table shards are now (a "moved" refusal's pairs;
        table shard k keyed ``-(k + 1)``): the one place a move changes routing. A server
        started mid-job by ``tessera scale`` is connected to first."""
        for key, server in pairs.items():
            if key < 0 and -key - 1 < len(self.shard_owner):
                self._connect_scaled(server)
                self.shard_owner[-key - 1] = server
            elif key in self.owner:
                self._connect_scaled(server)
                self.owner[key] = server

    @staticmethod
    def _retry_elsewhere(handle: Handle, why: str) -> bool:
        """A refusal that means "not here (yet)": route again (reroute) and retry."""
        if any(marker in why for marker in RETRY_ELSEWHERE):
            return True
        return ROWS_NOT_HELD in why and isinstance(handle._request[0],
                                                   (wire.PullRows, wire.PushRows))

    def _join_parts(self, handle: Handle, timeout_s):
        """The answer of a request split on a re-send (:meth:`reroute`): its pieces'
        answers joined (each piece counted as acknowledged, and kept, on its own)."""
        result, skipped, clocks = {}, False, []
        for part in handle._parts:
            got = part.wait(timeout_s)
            if isinstance(got, dict):
                result.update(got)
            elif not result:
                result = got
            skipped = skipped or part.skipped
            clocks.append(part.clock)
        self._outstanding.pop((handle._server, handle._req), None)
        handle.clock = min(clocks)
        return result, skipped

    def _finish(self, server: int, req: int, what: str, timeout_s):
        msg, frames = self._expect(server, req, what, timeout_s,
                                   (wire.Params, wire.Verdict, wire.Rows, wire.Ack))
        if isinstance(msg, wire.Verdict):
            return msg, False
        if isinstance(msg, wire.Ack):
            return True, False
        if isinstance(msg, wire.Rows) and msg.tables:
            if len(frames) != len(msg.tables):
                raise ServerError(f"{self.servers[server].peer_name} sent {len(frames)} frames "
                                  f"for the rows of tables {msg.tables}")
            out = []
            for frame in frames:
                buf = frame.buffer
                self.bytes_pulled += len(frame)
                out.append(frame_to_tensor(buf, msg.dtype, len(buf) // itemsize(msg.dtype)))
            return out, False
        if isinstance(msg, wire.Rows):
            if len(frames) != 1:
                raise ServerError(f"{self.servers[server].peer_name} sent {len(frames)} frames "
                                  f"for rows of table {msg.table!r}")
            buf = frames[0].buffer
            self.bytes_pulled += len(frames[0])
            rows = frame_to_tensor(buf, msg.dtype, len(buf) // itemsize(msg.dtype))
            return rows, False
        self.last_reply_ns = max(self.last_reply_ns, msg.sent_ns)
        self._reply_clock = msg.clock
        if msg.rates is not None and msg.clock not in self.rates:
            if len(self.rates) > 4:
                self.rates.pop(min(self.rates))
            self.rates[msg.clock] = msg.rates
        if len(frames) != len(msg.partitions):
            raise ServerError(f"{self.servers[server].peer_name} sent {len(frames)} frames "
                              f"for {len(msg.partitions)} partitions")
        out = {}
        for pid, frame in zip(msg.partitions, frames):
            info = self.parts.get(pid)
            if info is None or self.owner[pid] != server:
                raise ServerError(f"{self.servers[server].peer_name} sent partition {pid}, "
                                  f"which it does not hold")
            out[pid] = frame_to_tensor(frame.buffer, msg.dtype, info.stop - info.start)
            self.bytes_pulled += len(frame)
        if msg.overflows:  # a judged clock skipped: who overflowed where (take_overflows)
            self._overflows.extend(msg.overflows)
        return out, msg.skipped

