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
                 should_stop: Callable[[], bool] = lambda: False):
        self.rank = rank
        self.endpoint = endpoint
        self.parts = {p.id: PartitionState(p) for p in partitions}
        self.optimizer = optimizer
        self.num_workers = num_workers
        self.mode = mode
        self.staleness = staleness
        self.two_phase = two_phase and mode == "sync"
        self.profiler = profiler
        self.check = check
        self.should_stop = should_stop
        self.last_seq: dict[int, int] = {}
        self.stats = dict(bytes_received=0, bytes_sent=0, pushes=0, updates=0, pulls=0,
                          errors=0, skipped=0, apply_s=0.0, max_clock_gap=0)
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
            if not self.endpoint.poll(0.1):
                continue
            for _ in range(256):  # drain what is queued before checking health again
                self.handle(self.endpoint.recv())
                if not self.endpoint.poll(0):
                    break

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
        for st, frame in zip(states, frames):
            if st.rule is None:  # first writer wins: a re-sent init changes nothing
                values = frame_to_tensor(frame.buffer, msg.dtype, st.numel).to(torch.float32)
                st.rule = make_rule(values, self.optimizer)
                self.stats["bytes_received"] += len(frame)
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
        if msg.scale <= 0 or msg.scale != msg.scale:
            raise RequestError(f"loss scale must be a positive number, got {msg.scale}")
        if msg.seq <= self.last_seq.get(msg.worker, -1):
            # A retried push that was already applied: answer, do not apply again.
            self._send_params(peer, msg.req, states, msg.dtype)
            return
        if self.two_phase and len(states) != 1:
            raise RequestError("with loss scaling, push one partition per message")
        if self.mode == "sync":
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
        self.last_seq[msg.worker] = msg.seq
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
                self._apply(st, grad)
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
            st = states[0]
            st.verdict_waiters.append((peer, msg.req))
            if len(st.pushed_by) == self.num_workers:
                st.verdict = not st.overflows and bool(torch.isfinite(st.accum).all())
                verdict = wire.Verdict(req=0, partitions=[st.info.id], clock=st.clock,
                                       finite=st.verdict, overflows=st.overflows)
                for w_peer, w_req in st.verdict_waiters:
                    verdict.req = w_req
                    self.endpoint.send(w_peer, verdict)
                st.verdict_waiters.clear()
            return
        self._wait_or_answer(_Waiter(peer, msg.req, msg.clock + 1, msg.dtype, states))
        advanced = []
        for st in states:
            if len(st.pushed_by) == self.num_workers:
                grad = st.accum.div_(self.num_workers) if self.num_workers > 1 else st.accum
                st.accum = None
                st.pushed_by.clear()
                self._apply(st, grad)
                advanced.append(st)
        self._wake(advanced)

    def _advance_ssp(self, states: list[PartitionState]) -> None:
        """A partition's ssp clock is the slowest worker's count of pushed clocks."""
        moved = []
        for st in states:
            slowest = (min(st.counts.get(w, 0) for w in range(self.num_workers))
                       if len(st.counts) == self.num_workers else 0)
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
            grad = st.accum.div_(self.num_workers)
            st.accum, st.verdict = None, None
            st.pushed_by.clear()
            st.overflows = []
            if apply:
                self._apply(st, grad)
            else:
                st.clock += 1
                st.arrivals.clear()
                self.stats["skipped"] += 1
            advanced.append(st)
        self._wake(advanced)

    # --------------------------------------------------------------- replies

    def _apply(self, st: PartitionState, grad: torch.Tensor) -> None:
        t0 = time.perf_counter()
        start = self.profiler.now()
        st.rule.apply(grad)
        if self.mode != "ssp":  # in ssp the clock is the slowest worker's, not the updates'
            st.clock += 1
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
