"""A parameter server: owns partitions, applies updates, answers pulls.

One thread runs :meth:`ParameterServer.serve`, a loop over one ROUTER socket;
ZeroMQ's I/O thread receives the next partitions while this thread applies the
optimizer to the current one, so receiving and updating overlap.

Consistency, per partition (each partition keeps its own clock):

* ``sync``: a partition at clock ``c`` sums the pushes for ``c`` from every worker,
  divides by the number of workers (the mean, as DDP averages), applies the
  optimizer once, moves to ``c + 1`` and answers all of those pushes with the new
  values. A pull for clock ``c`` waits until the partition has reached ``c``.
* ``async``: each push, scaled by ``1 / workers``, is applied the moment it
  arrives and answered with the values it produced; pulls never wait
  (Hogwild-style, as MXNet ``dist_async``). The scaling keeps one learning rate
  right for both modes: W async pushes move the parameters as far as one sync step.
* ``ssp`` (stale synchronous parallel; Ho et al., "More Effective Distributed ML
  via a Stale Synchronous Parallel Parameter Server", NIPS 2013, as Petuum's
  Bosen ships it): pushes are applied as in async, but a partition counts the
  clocks each worker has pushed, and its clock is the *slowest* worker's count.
  The reply to worker w's push for clock c (which lets w start clock c + 1) is
  held until that slowest count is at least c + 1 - K: no worker computes more
  than K clocks ahead of the slowest. K = 0 is lock-step; K = infinity is async.

With loss scaling (``two_phase``, fp16 in sync mode) a complete clock is not
applied at once: the server answers the pushes with a :class:`Verdict` (is the
sum finite, and which workers sent non-finite values), holds the sum, and
applies or drops it when a worker's next pull carries the cluster's decision
(``commit``). Every worker derives the same decision from the same verdicts, so
a step is skipped on every server or on none. Async mode never applies a
non-finite push.

Membership (``--max-restarts``): a worker the coordinator declares dead is dropped
from the workers a sync clock waits for (the clock completes with the live
workers' pushes, averaged over the pushes received, and the shortfall is
counted), and from the slowest-worker minimum of ssp. A restarted worker sends
:class:`Join` naming a future clock; from that clock on its pushes count again.

Replication (``--replication 2``): each partition has a primary (its server in the
shard map) and a backup (the next server). Before answering any push, the primary
forwards the gradient it applies (:class:`Replicate`) and waits for the backup's
Ack; the backup applies the same gradient with the same optimizer, so the copies
stay bit-identical. When the primary dies, the backup owns the partitions from the
first client request for them on (clients re-route once the coordinator says the
primary is dead); pushes for a clock it has already applied are answered, not
applied again. While waiting for an Ack a server keeps serving Replicate requests,
so two servers backing each other up never wait on each other.

Checkpoints: when a checkpoint clock is due (every ``checkpoint_every`` clocks in
sync mode, or when worker 0's push asks for one), the server copies its partitions'
masters and optimizer state at that clock and writes them in a background thread
(:mod:`tessera.ps.checkpoint`); ``on_checkpoint`` reports the file.

Every request is validated before any state changes: partition ids must be this
server's, payload frames must have exactly the lengths this server expects.
A request that fails validation is answered with an :class:`Error` and forgotten.
Each push carries ``(worker, seq)``; a push already applied is not applied again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from tessera.config.schema import OptimizerConfig
from tessera.profiler.recorder import OFF, SpanRecorder
from tessera.ps.optim import UpdateRule, make_rule
from tessera.transport import wire
from tessera.transport.endpoint import ServerEndpoint
from tessera.transport.frames import frame_to_tensor, itemsize, tensor_to_frame, torch_dtype


@dataclass(eq=False)
class _Waiter:
    """A request answered once all its partitions are initialised and at ``clock``."""

    peer: bytes
    req: int
    clock: int
    dtype: str
    states: list["PartitionState"]
    #: ssp: the clock the worker will compute once answered (for the staleness record).
    run_clock: int = -1

    def ready(self) -> bool:
        return all(st.rule is not None and st.clock >= self.clock for st in self.states)


@dataclass
class PartitionState:
    info: wire.PartitionInfo
    rule: Optional[UpdateRule] = None
    clock: int = 0
    accum: Optional[torch.Tensor] = None
    pushed_by: set[int] = field(default_factory=set)
    waiters: list[_Waiter] = field(default_factory=list)
    overflows: list[wire.Overflow] = field(default_factory=list)
    #: ssp: clocks pushed by each worker (``clock`` is then their minimum).
    counts: dict[int, int] = field(default_factory=dict)
    #: Aligned arrival time of each worker's push for the current clock (profiling).
    arrivals: dict[int, int] = field(default_factory=dict)
    #: Two-phase: the verdict on the held sum of clock ``clock`` (None: not complete).
    verdict: Optional[bool] = None
    verdict_waiters: list[tuple[bytes, int]] = field(default_factory=list)
    #: Last push sequence number applied, per worker (a retried push is not applied again).
    last_seq: dict[int, int] = field(default_factory=dict)
    #: Worker pushes folded into applied updates (the "nothing lost" counter).
    applied_pushes: int = 0

    @property
    def numel(self) -> int:
        return self.info.stop - self.info.start


class RequestError(ValueError):
    """A request this server refuses; the message goes back to the sender."""


class ParameterServer:
    def __init__(self, *, rank: int, endpoint: ServerEndpoint, partitions: list[wire.PartitionInfo],
                 optimizer: OptimizerConfig, num_workers: int, mode: str, staleness: int = 0,
                 two_phase: bool = False, profiler: SpanRecorder = OFF,
                 tables: Optional[list[wire.TableSpec]] = None,
                 check: Callable[[], None] = lambda: None,
                 should_stop: Callable[[], bool] = lambda: False,
                 membership: Callable[[], tuple[dict, list]] = lambda: ({}, []),
                 backups: Optional[list[wire.PartitionInfo]] = None,
                 backup_peer=None, primary_of_backups: int = -1,
                 checkpoint_store=None, checkpoint_every: int = 0,
                 on_checkpoint: Callable[[int, str, int], None] = lambda *a: None,
                 timeout_s: float = 30.0, num_servers: int = 1):
        self.rank = rank
        self.endpoint = endpoint
        self.parts = {p.id: PartitionState(p) for p in partitions}
        #: Copies this server keeps for its primary ``primary_of_backups`` (replication).
        self.backups = {p.id: PartitionState(p) for p in (backups or [])}
        self.backup_peer = backup_peer  # ClientEndpoint to the server backing us up
        self.primary_of_backups = primary_of_backups
        self.membership = membership
        self.timeout_s = timeout_s
        self._num_servers = num_servers
        self._deferred: list = []  # requests taken while waiting for a backup's Ack
        self._dead_servers: set[int] = set()
        #: Workers whose pushes a sync clock waits for, and from which clock on.
        self.live: set[int] = set(range(num_workers))
        self.joined_at: dict[int, int] = {}
        self.incarnations: dict[int, int] = {}
        #: Clocks each worker has pushed (async/ssp progress, for checkpoints).
        self.worker_clock: dict[int, int] = {}
        self.checkpoint_store = checkpoint_store
        self.checkpoint_every = checkpoint_every
        self.on_checkpoint = on_checkpoint
        self.ckpt_target = 0
        self.last_ckpt = -1
        self._writes: list = []
        self.optimizer = optimizer
        self.num_workers = num_workers
        self.mode = mode
        self.staleness = staleness
        self.two_phase = two_phase and mode == "sync"
        self.profiler = profiler
        self.check = check
        self.should_stop = should_stop
        self.stats = dict(bytes_received=0, bytes_sent=0, pushes=0, updates=0, pulls=0,
                          errors=0, skipped=0, apply_s=0.0, max_clock_gap=0, short_clocks=0,
                          departures=0, joins=0, replicated=0, promoted=0, checkpoints=0,
                          stale_pushes=0, retries=0)
        self.tables = None
        if tables:
            from tessera.ps.table_server import TableService
            self.tables = TableService(rank=rank, tables=tables, num_workers=num_workers,
                                       mode=mode, staleness=staleness, send=endpoint.send,
                                       stats=self.stats)

    # ------------------------------------------------------------------ loop

    def serve(self) -> None:
        """Serve until ``should_stop()``; ``check()`` raises on a cluster failure."""
        while not self.should_stop():
            self.check()
            self._follow_membership()
            self._finish_writes()
            while self._deferred:
                self.handle(self._deferred.pop(0))
            if not self.endpoint.poll(0.1):
                continue
            for _ in range(256):  # drain what is queued before checking health again
                self.handle(self.endpoint.recv())
                if not self.endpoint.poll(0):
                    break
        self.final_checkpoint()

    def final_checkpoint(self) -> None:
        """At the end of a run with checkpoints, save the final state and wait for writes."""
        if self.checkpoint_store is not None and self.checkpoint_every:
            clock = self._progress()
            if clock > self.last_ckpt:
                self._snapshot(clock)
        for thread, _ in self._writes:
            thread.join(timeout=self.timeout_s * 4)
        self._finish_writes()

    def handle(self, got) -> None:
        msg = got.msg
        if msg is None:
            self._refuse(got.peer, 0, got.error)
            return
        try:
            if isinstance(msg, wire.Push):
                if self.profiler.enabled:
                    self._profile_push(msg, got.frames)
                self._on_push(got.peer, msg, got.frames)
            elif isinstance(msg, wire.Pull):
                self._on_pull(got.peer, msg, got.frames)
            elif isinstance(msg, wire.InitParams):
                self._on_init(got.peer, msg, got.frames)
            elif isinstance(msg, wire.Join):
                self._on_join(got.peer, msg)
            elif isinstance(msg, wire.Replicate):
                self._on_replicate(got.peer, msg, got.frames)
            elif isinstance(msg, (wire.PullRows, wire.PushRows)) and self.tables is not None:
                from tessera.ps.table_server import RowRequestError
                try:
                    if isinstance(msg, wire.PullRows):
                        self.tables.on_pull(got.peer, msg, got.frames)
                    else:
                        self.tables.on_push(got.peer, msg, got.frames)
                except RowRequestError as exc:
                    raise RequestError(str(exc)) from None
            else:
                raise RequestError(f"a parameter server does not serve {type(msg).__name__} requests")
        except RequestError as exc:
            self._refuse(got.peer, getattr(msg, "req", 0), str(exc))
        self._maybe_checkpoint()

    def _profile_push(self, msg: wire.Push, frames: list) -> None:
        now = self.profiler.now()
        prof = self.profiler
        if msg.sent_ns:
            # Time from the worker's send to this server taking the message: the wire
            # plus the queue behind earlier messages (clocks aligned at start-up).
            prof.count(f"queue_ns.w{msg.worker}", max(0, now - msg.sent_ns))
        nbytes = sum(len(f) for f in frames)
        prof.count(f"bytes.w{msg.worker}", nbytes)
        prof.count("pushes")
        for pid, frame in zip(msg.partitions, frames):
            prof.count(f"bytes.p{pid}", len(frame))
            st = self.parts.get(pid)
            if st is not None and self.mode == "sync":
                st.arrivals[msg.worker] = now

    def _refuse(self, peer: bytes, req: int, why: str) -> None:
        self.stats["errors"] += 1
        self.endpoint.send(peer, wire.Error(req=req, message=f"server {self.rank}: {why}"))

    # ------------------------------------------------------------ validation

    def _states(self, ids: list[int], frames: Optional[list], dtype: str) -> list[PartitionState]:
        if not ids:
            raise RequestError("request names no partitions")
        if len(set(ids)) != len(ids):
            raise RequestError("request names a partition twice")
        states = []
        for pid in ids:
            st = self.parts.get(pid)
            if st is None and pid in self.backups and self.backups[pid].rule is not None:
                # Clients only send here once the coordinator declared the primary dead.
                self._promote(f"a client asked for partition {pid}")
                st = self.parts.get(pid)
            if st is None:
                raise RequestError(f"partition {pid} is not held by this server "
                                   f"(it holds {sorted(self.parts)})")
            states.append(st)
        if frames is not None:
            if len(frames) != len(ids):
                raise RequestError(f"{len(ids)} partitions named but {len(frames)} payload frames sent")
            for st, frame in zip(states, frames):
                expected = st.numel * itemsize(dtype)
                if len(frame) != expected:
                    raise RequestError(f"partition {st.info.id} payload is {len(frame)} bytes; "
                                       f"{st.numel} {dtype} elements are {expected} bytes")
        return states

    # -------------------------------------------------------------- handlers

    def _on_init(self, peer: bytes, msg: wire.InitParams, frames: list) -> None:
        states = self._states(msg.partitions, frames, msg.dtype)
        fresh = []
        for st, frame in zip(states, frames):
            if st.rule is None:  # first writer wins: a re-sent init changes nothing
                values = frame_to_tensor(frame.buffer, msg.dtype, st.numel).to(torch.float32)
                st.rule = make_rule(values, self.optimizer)
                self.stats["bytes_received"] += len(frame)
                fresh.append((st, values))
        for st, values in fresh:
            self._replicate("init", st, values)
        self.endpoint.send(peer, wire.Ack(req=msg.req))
        self._wake(states)

    def _on_pull(self, peer: bytes, msg: wire.Pull, frames: list) -> None:
        if frames:
            raise RequestError("a pull carries no payload frames")
        states = self._states(msg.partitions, None, msg.dtype)
        self.stats["pulls"] += 1
        if msg.commit is not None:
            self._commit(states, msg.clock - 1, msg.commit)
        # Async pulls never wait for a clock, only for initial values; ssp pulls wait
        # until the slowest worker is within the staleness bound of the asked clock.
        clock = {"sync": msg.clock, "ssp": msg.clock - self.staleness}.get(self.mode, 0)
        self._wait_or_answer(_Waiter(peer, msg.req, clock, msg.dtype, states))

    def _on_push(self, peer: bytes, msg: wire.Push, frames: list) -> None:
        states = self._states(msg.partitions, frames, msg.dtype)
        for st in states:
            if st.rule is None:
                raise RequestError(f"partition {st.info.id} has not been initialised yet "
                                   f"(worker 0 sends initial values first)")
        if not 0 <= msg.worker < self.num_workers:
            raise RequestError(f"worker {msg.worker} is not in this job "
                               f"(workers are 0..{self.num_workers - 1})")
        if msg.seq < 0:
            raise RequestError(f"push sequence numbers start at 0, got {msg.seq}")
        if msg.clock < 0:
            raise RequestError(f"push clocks start at 0, got {msg.clock}")
        if not (0 < msg.scale < float("inf")):
            raise RequestError(f"loss scale must be a positive finite number, got {msg.scale}")
        if msg.checkpoint < 0 or msg.checkpoint > msg.clock + 1:
            raise RequestError(f"a push for clock {msg.clock} can only ask for a checkpoint at "
                               f"clock {msg.clock + 1}, got {msg.checkpoint}")
        if all(msg.seq <= st.last_seq.get(msg.worker, -1) for st in states):
            # A retried push: not applied again. Answered as the original will be: at
            # once if its clock is done, else when it is.
            self.stats["retries"] += 1
            if self.mode == "sync" and any(msg.worker in st.pushed_by for st in states):
                self._wait_or_answer(_Waiter(peer, msg.req, msg.clock + 1, msg.dtype, states))
            else:
                self._send_params(peer, msg.req, states, msg.dtype)
            return
        if self.two_phase and len(states) != 1:
            raise RequestError("with loss scaling, push one partition per message")
        if self.mode == "sync":
            if msg.worker not in self.live:
                raise RequestError(f"worker {msg.worker} left the job (declared dead); a "
                                   f"restarted worker joins again with a Join request")
            if all(msg.clock < st.clock for st in states):
                # Applied already (a re-sent push after a failover, or its clock was
                # completed without it): answer with the current values.
                self.stats["stale_pushes"] += 1
                self._send_params(peer, msg.req, states, msg.dtype)
                return
            for st in states:
                if st.verdict is not None:
                    raise RequestError(f"partition {st.info.id} waits for the commit of clock "
                                       f"{st.clock}; pull with commit before pushing again")
                if msg.clock != st.clock:
                    raise RequestError(f"push for clock {msg.clock} but partition {st.info.id} "
                                       f"is at clock {st.clock} (sync mode)")
                if msg.worker in st.pushed_by:
                    raise RequestError(f"worker {msg.worker} already pushed partition "
                                       f"{st.info.id} for clock {msg.clock}")
        # Validated: from here on the push is applied (or held), exactly once.
        for st in states:
            st.last_seq[msg.worker] = msg.seq
        self.worker_clock[msg.worker] = max(self.worker_clock.get(msg.worker, 0), msg.clock + 1)
        if msg.checkpoint > self.last_ckpt:
            self.ckpt_target = max(self.ckpt_target, msg.checkpoint)
        self.stats["pushes"] += 1
        unscale = 1.0 / msg.scale
        if self.mode in ("async", "ssp"):
            # Scaled by 1/workers so that the W pushes of one "round" move the
            # parameters as far as one sync step: the same lr serves both modes.
            grads = [frame_to_tensor(f.buffer, msg.dtype, st.numel).to(torch.float32)
                     .mul(unscale / self.num_workers) for st, f in zip(states, frames)]
            self.stats["bytes_received"] += sum(len(f) for f in frames)
            if msg.nonfinite or not all(bool(torch.isfinite(g).all()) for g in grads):
                self.stats["skipped"] += 1
                self._send_params(peer, msg.req, states, msg.dtype, skipped=True)
                if self.mode == "ssp":  # a refused push still ends the worker's clock
                    for st in states:
                        st.counts[msg.worker] = max(st.counts.get(msg.worker, 0), msg.clock + 1)
                    self._advance_ssp(states)
                return
            for st, grad in zip(states, grads):
                self._replicate("grad", st, grad, pushes=1, worker=msg.worker, seq=msg.seq)
                self._apply(st, grad, pushes=1)
            if self.mode == "async":
                self._send_params(peer, msg.req, states, msg.dtype)
                return
            for st in states:
                st.counts[msg.worker] = max(st.counts.get(msg.worker, 0), msg.clock + 1)
            self._wait_or_answer(_Waiter(peer, msg.req, msg.clock + 1 - self.staleness,
                                         msg.dtype, states, run_clock=msg.clock + 1))
            self._advance_ssp(states)
            return
        for st, frame in zip(states, frames):
            grad = frame_to_tensor(frame.buffer, msg.dtype, st.numel)
            self.stats["bytes_received"] += len(frame)
            if st.accum is None:
                st.accum = grad.to(torch.float32, copy=True)
                if unscale != 1.0:
                    st.accum.mul_(unscale)
            else:
                st.accum.add_(grad.to(torch.float32), alpha=unscale)
            st.pushed_by.add(msg.worker)
            if msg.nonfinite:
                st.overflows.append(wire.Overflow(worker=msg.worker, param=msg.nonfinite))
        if self.two_phase:
            states[0].verdict_waiters.append((peer, msg.req))
        else:
            self._wait_or_answer(_Waiter(peer, msg.req, msg.clock + 1, msg.dtype, states))
        self._complete(states)

    def _expected(self, st: PartitionState) -> set[int]:
        """The workers whose pushes partition ``st``'s current sync clock waits for."""
        return {w for w in self.live if self.joined_at.get(w, 0) <= st.clock}

    def _complete(self, states: list[PartitionState]) -> None:
        """Sync: apply (or, under loss scaling, judge) every clock all live workers pushed."""
        advanced = []
        for st in states:
            if not st.pushed_by or st.verdict is not None or not st.pushed_by >= self._expected(st):
                continue
            if len(st.pushed_by) < self.num_workers:
                self.stats["short_clocks"] += 1
            if self.two_phase:
                st.verdict = not st.overflows and bool(torch.isfinite(st.accum).all())
                verdict = wire.Verdict(req=0, partitions=[st.info.id], clock=st.clock,
                                       finite=st.verdict, overflows=st.overflows)
                for w_peer, w_req in st.verdict_waiters:
                    verdict.req = w_req
                    self.endpoint.send(w_peer, verdict)
                st.verdict_waiters.clear()
                continue
            n = len(st.pushed_by)
            grad = st.accum.div_(n) if n > 1 else st.accum
            st.accum = None
            st.pushed_by.clear()
            self._replicate("grad", st, grad, pushes=n)
            self._apply(st, grad, pushes=n)
            advanced.append(st)
        self._wake(advanced)

    def _advance_ssp(self, states: list[PartitionState]) -> None:
        """A partition's ssp clock is the slowest worker's count of pushed clocks."""
        moved = []
        for st in states:
            slowest = min((st.counts.get(w, 0) for w in self.live), default=0)
            if slowest > st.clock:
                st.clock = slowest
                moved.append(st)
        self._wake(moved)

    def _commit(self, states: list[PartitionState], clock: int, apply: bool) -> None:
        """The cluster's decision on the held sums of ``clock``: apply them or skip."""
        for st in states:
            if st.verdict is None or st.clock != clock:
                continue  # already decided by another worker's pull (or nothing held)
            if apply and not st.verdict:
                raise RequestError(f"commit to apply clock {clock}, but partition {st.info.id}'s "
                                   f"gradient sum is not finite")
        advanced = []
        for st in states:
            if st.verdict is None or st.clock != clock:
                continue
            n = max(1, len(st.pushed_by))
            grad = st.accum.div_(n)
            st.accum, st.verdict = None, None
            st.pushed_by.clear()
            st.overflows = []
            if apply:
                self._apply(st, grad, pushes=n)
            else:
                st.clock += 1
                st.arrivals.clear()
                self.stats["skipped"] += 1
            advanced.append(st)
        self._wake(advanced)


    # ------------------------------------------------------------ membership

    def _follow_membership(self) -> None:
        """Apply the coordinator's latest word on dead workers and servers."""
        departed, dead_servers = self.membership()
        for worker, incarnation in departed.items():
            self.depart(int(worker), int(incarnation))
        for server in dead_servers:
            if server in self._dead_servers:
                continue
            self._dead_servers.add(server)
            if server == self.primary_of_backups and self.backups:
                self._promote(f"server {server} was declared dead")

    def depart(self, worker: int, incarnation: int) -> None:
        """Stop waiting for ``worker`` (its incarnation ``incarnation`` died)."""
        if worker not in self.live or self.incarnations.get(worker, 0) > incarnation:
            return
        self.live.discard(worker)
        self.stats["departures"] += 1
        states = list(self.parts.values())
        if self.mode == "sync":
            self._complete(states)
        elif self.mode == "ssp":
            self._advance_ssp(states)

    def _on_join(self, peer: bytes, msg: wire.Join) -> None:
        states = self._states(msg.partitions, None, msg.dtype)
        if not 0 <= msg.worker < self.num_workers:
            raise RequestError(f"worker {msg.worker} is not in this job")
        if self.mode == "sync":
            late = [st for st in states if st.clock > msg.clock]
            if late:
                raise RequestError(f"join at clock {msg.clock} is too late: partition "
                                   f"{late[0].info.id} is at clock {late[0].clock}")
        self.incarnations[msg.worker] = max(self.incarnations.get(msg.worker, 0), msg.incarnation)
        self.live.add(msg.worker)
        self.stats["joins"] += 1
        if self.mode == "sync":
            # Counted from msg.clock on; a clock before it no longer waits for this worker.
            self.joined_at[msg.worker] = msg.clock
            self._complete(list(self.parts.values()))
            self._wait_or_answer(_Waiter(peer, msg.req, msg.clock, msg.dtype, states))
            return
        if self.mode == "ssp":  # not behind the slowest: it must not hold the others back
            for st in states:
                st.counts[msg.worker] = max(st.counts.get(msg.worker, 0), st.clock, msg.clock)
        self._send_params(peer, msg.req, states, msg.dtype)

    # ----------------------------------------------------------- replication

    def _replicate(self, kind: str, st: PartitionState, tensor: torch.Tensor, pushes: int = 0,
                   worker: int = -1, seq: int = -1) -> None:
        """Primary: have the backup apply the same thing, and wait for its Ack."""
        peer = self.backup_peer
        if peer is None or st.info.id not in self._replicated_ids():
            return
        from tessera.transport.endpoint import TransportError
        req = peer.new_req()
        peer.send(wire.Replicate(req=req, kind=kind, partitions=[st.info.id], clock=st.clock,
                                 pushes=pushes, worker=worker, seq=seq),
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

    def _replicated_ids(self) -> set[int]:
        return {pid for pid, st in self.parts.items() if st.info.server == self.rank}

    def _backup_dead(self) -> bool:
        _, dead = self.membership()
        backup = (self.rank + 1) % max(1, self._num_servers)
        return backup in dead

    def _drop_backup(self, why: str) -> None:
        print(f"server {self.rank}: backup server {(self.rank + 1) % self._num_servers} is "
              f"gone ({why}); partitions {sorted(self._replicated_ids())} now have one copy",
              flush=True)
        self.backup_peer = None

    def _serve_replication_meanwhile(self) -> None:
        """While our backup has not answered, answer our primary's Replicate requests
        (two servers backing each other up would otherwise wait on each other)."""
        while self.endpoint.poll(0):
            got = self.endpoint.recv()
            if isinstance(got.msg, wire.Replicate):
                self.handle(got)
            else:
                self._deferred.append(got)

    def _on_replicate(self, peer: bytes, msg: wire.Replicate, frames: list) -> None:
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
                st.rule = make_rule(values.clone(), self.optimizer)
        elif msg.kind == "grad":
            if st.rule is None:
                raise RequestError(f"partition {st.info.id} replica has no initial values")
            fresh = (msg.seq > st.last_seq.get(msg.worker, -1)) if msg.seq >= 0 \
                else msg.clock >= st.clock
            if fresh:
                st.rule.apply(values.clone())
                if self.mode != "ssp":
                    st.clock += 1
                else:
                    st.clock = max(st.clock, msg.clock)
                st.applied_pushes += msg.pushes
                if msg.seq >= 0:
                    st.last_seq[msg.worker] = msg.seq
        else:
            raise RequestError(f"unknown replication kind {msg.kind!r}")
        self.endpoint.send(peer, wire.Ack(req=msg.req))

    def _promote(self, why: str) -> None:
        """Take over the partitions we back up: their primary is dead."""
        if not self.backups:
            return
        for pid, st in self.backups.items():
            st.waiters, st.accum = [], None
            st.pushed_by = set()
            if self.mode == "ssp":
                st.counts = {w: st.clock for w in self.live}
            self.parts[pid] = st
        self.stats["promoted"] += len(self.backups)
        print(f"server {self.rank}: promoted to primary of partitions {sorted(self.backups)} "
              f"({why})", flush=True)
        self.backups = {}

    # ------------------------------------------------------------ checkpoints

    def _progress(self) -> int:
        """The clock every worker has completed, as far as this server knows."""
        owned = [st for st in self.parts.values() if st.rule is not None]
        if self.mode in ("sync", "ssp"):
            return min((st.clock for st in owned), default=0)
        return min((self.worker_clock.get(w, 0) for w in self.live), default=0)

    def _maybe_checkpoint(self) -> None:
        if self.checkpoint_store is None:
            return
        progress = self._progress() if self.mode == "sync" else 0
        if (self.checkpoint_every and progress > self.last_ckpt and progress > 0
                and progress % self.checkpoint_every == 0):
            self.ckpt_target = max(self.ckpt_target, progress)
        target = self.ckpt_target
        if target <= 0 or target <= self.last_ckpt:
            return
        if self.mode == "sync" and progress < target:
            return  # every partition reaches ``target`` before any passes it (see docs)
        self._snapshot(target)

    def _snapshot(self, clock: int) -> None:
        from tessera.ps.checkpoint import partition_tensors
        self.last_ckpt = clock
        tensors: dict = {}
        parts = []
        for pid, st in sorted(self.parts.items()):
            if st.rule is None:
                continue
            tensors.update(partition_tensors(pid, st.rule))
            parts.append([pid, st.info.start, st.info.stop])
        tables = []
        if self.tables is not None:
            for name, ts in self.tables.tables.items():
                for key, value in ts.shard.export_state().items():
                    tensors[f"t/{name}/{key}"] = value
                tables.append(name)
        meta = {"rank": self.rank, "clock": clock, "partitions": parts, "tables": tables,
                "mode": self.mode}
        store, rank = self.checkpoint_store, self.rank
        result: dict = {}

        def write() -> None:
            try:
                result["file"], result["nbytes"] = store.write_shard(clock, rank, tensors, meta)
            except Exception as exc:  # reported by the serve loop, with the location
                result["error"] = f"{type(exc).__name__}: {exc}"

        import threading
        thread = threading.Thread(target=write, name=f"checkpoint-{clock}", daemon=True)
        thread.start()
        self._writes.append((thread, (clock, result)))

    def _finish_writes(self) -> None:
        still = []
        for thread, (clock, result) in self._writes:
            if thread.is_alive():
                still.append((thread, (clock, result)))
                continue
            if "error" in result:
                print(f"server {self.rank}: checkpoint at clock {clock} could not be written to "
                      f"{self.checkpoint_store.url}: {result['error']}", flush=True)
                continue
            self.stats["checkpoints"] += 1
            self.on_checkpoint(clock, result["file"], result["nbytes"])
        self._writes = still

    def restore(self, restore: wire.Restore) -> None:
        """Load this server's partitions (however the map cuts them now), backups and
        table rows from a checkpoint."""
        from tessera.ps.checkpoint import CheckpointStore, read_partition
        store = CheckpointStore(restore.path)
        files: dict = {}
        for st in [*self.parts.values(), *self.backups.values()]:
            values, state = read_partition(store, restore, files, st.info.start, st.info.stop)
            st.rule = make_rule(values, self.optimizer)
            st.rule.load_state(state)
            st.clock = restore.clock
            st.counts = {w: restore.clock for w in range(self.num_workers)}
        # Into another location, the restored state is this run's first checkpoint;
        # never rewrite the files of the complete checkpoint being read.
        same = self.checkpoint_store is not None and self.checkpoint_store.url == restore.path
        self.last_ckpt = restore.clock if same else -1
        self.worker_clock = {w: restore.clock for w in range(self.num_workers)}
        if self.tables is not None:
            from tessera.ps.embedding import owner_of
            names = [n for n in restore.files if n]
            for name in names:
                if name not in files:
                    files[name] = store.open_shard(restore.clock, name)
                f = files[name]
                for table, ts in self.tables.tables.items():
                    prefix = f"t/{table}/"
                    state = {k[len(prefix):]: f.get(k) for k in f.keys() if k.startswith(prefix)}
                    if not state:
                        continue
                    keep = owner_of(state["ids"].numpy(), self._num_servers) == self.rank
                    pending = state.get("pending_ids")
                    kp = (owner_of(pending.numpy(), self._num_servers) == self.rank
                          if pending is not None else None)
                    ts.shard.import_state(state, keep, keep_pending=kp)
                    ts.clock = restore.clock

    # --------------------------------------------------------------- replies

    def _apply(self, st: PartitionState, grad: torch.Tensor, pushes: int = 1) -> None:
        t0 = time.perf_counter()
        start = self.profiler.now()
        st.rule.apply(grad)
        if self.mode != "ssp":  # in ssp the clock is the slowest worker's, not the updates'
            st.clock += 1
        st.applied_pushes += pushes
        self.stats["updates"] += 1
        elapsed = time.perf_counter() - t0
        self.stats["apply_s"] += elapsed
        if self.profiler.enabled:
            self.profiler.add("apply", "server", start, int(elapsed * 1e9), partition=st.info.id)
            self.profiler.count(f"apply_ns.p{st.info.id}", elapsed * 1e9)
            self._barrier_done(st)

    def _barrier_done(self, st: PartitionState) -> None:
        """Each worker's push waited from its arrival until the last worker's arrived."""
        if st.arrivals:
            last = max(st.arrivals.values())
            for worker, at in st.arrivals.items():
                self.profiler.count(f"barrier_ns.w{worker}", last - at)
            st.arrivals.clear()

    def _values(self, st: PartitionState, dtype: str) -> torch.Tensor:
        if self.mode == "sync" and not self.two_phase and dtype == "float32":
            # No copy: in sync mode the master changes only once every worker has
            # pushed the next clock, and each worker pushes it only after it has
            # received this reply, so ZeroMQ has sent these bytes by then. (A fresh
            # copy per reply cost ~1.5 ms per 4 MiB in page faults: ps_roundtrip.)
            return st.rule.master
        # A copy: ZeroMQ sends from the buffer later, and the master moves on.
        return st.rule.master.to(torch_dtype(dtype), copy=True)

    def _send_params(self, peer: bytes, req: int, states: list[PartitionState], dtype: str,
                     skipped: bool = False) -> None:
        values = [self._values(st, dtype) for st in states]
        frames = [tensor_to_frame(v) for v in values]
        self.stats["bytes_sent"] += sum(f.nbytes for f in frames)
        clock = min(st.clock for st in states)
        self.endpoint.send(peer, wire.Params(req=req, partitions=[st.info.id for st in states],
                                             clock=clock, dtype=dtype, skipped=skipped,
                                             sent_ns=self.profiler.now() if self.profiler.enabled
                                             else 0), frames)

    def _answer(self, w: _Waiter) -> None:
        if w.run_clock >= 0:
            gap = w.run_clock - min(st.clock for st in w.states)
            self.stats["max_clock_gap"] = max(self.stats["max_clock_gap"], gap)
        self._send_params(w.peer, w.req, w.states, w.dtype)

    def _wait_or_answer(self, w: _Waiter) -> None:
        if w.ready():
            self._answer(w)
        else:
            for st in w.states:
                st.waiters.append(w)

    def _wake(self, states: list[PartitionState]) -> None:
        """Answer every request waiting on ``states`` that is now ready."""
        for st in states:
            still = []
            for w in st.waiters:
                if not w.ready():
                    still.append(w)
                    continue
                self._answer(w)
                for other in w.states:
                    if other is not st:
                        other.waiters.remove(w)
            st.waiters = still
