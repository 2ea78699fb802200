"""A parameter server: owns partitions, applies updates, answers pulls.

One thread runs :meth:`ParameterServer.serve`, a loop over one ROUTER socket;
ZeroMQ's I/O thread receives the next partitions while this thread applies the
optimizer to the current one, so receiving and updating overlap.

A server is put together from parts, each a module that teaches its concept:

* :mod:`tessera.ps.consistency`: sync, async and ssp (Ho et al., NIPS 2013), the
  workers a clock waits for (departures, joins) and two-phase verdicts for loss
  scaling. Each partition keeps its own clock; embedding tables
  (:mod:`tessera.ps.table_server`) follow the same rule and the same membership.
* :mod:`tessera.ps.replication`: a backup copy of each partition on the next server,
  kept bit-identical, promoted when the primary dies.
* :mod:`tessera.ps.snapshots`: checkpoint snapshots written in the background;
  :mod:`tessera.ps.optim`: ``torch.optim`` on each partition's fp32 master.

This module is the serve loop, validation, the update and the replies: in sync
mode a partition (:mod:`tessera.ps.partition`) sums a clock's pushes and applies
their mean once (under loss scaling, once a pull brings the cluster's ``commit``);
in async/ssp each push, scaled by ``1 / workers``, is applied as it comes.

Every request is validated before any state changes (partition ids must be this
server's, payload frames exactly the lengths it expects); one that fails is answered
with an :class:`Error` and forgotten. Each push carries ``(worker, seq)``; a push
already applied is not applied again.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Optional

import msgspec
import numpy as np
import torch
import zmq

from tessera.amp.finite import all_finite
from tessera.profiler.recorder import OFF, SpanRecorder
from tessera.ps import kernels, optim_state
from tessera.ps.agreement import KEEP_CLOCKS, Agreement, check_inputs
from tessera.ps.consistency import NotABackup, RequestError, make_consistency
from tessera.ps.options import ServerHooks, ServerOptions
from tessera.ps.optim import as_spec, make_rule
from tessera.ps.push_checks import check_held, check_push
from tessera.ps.partition import PartitionState, Reply
from tessera.ps.replication import REPLACED, Replicas, Replicator, window
from tessera.ps.server_profile import MessageCosts, profile_apply, profile_push
from tessera.ps.snapshots import Snapshots
from tessera.transport import wire
from tessera.transport.endpoint import ServerEndpoint, small_frames
from tessera.transport.frames import frame_to_tensor, itemsize, torch_dtype
from tessera.transport.shm import Shared

#: Async/ssp pushes of fp32 frames below this many bytes are scaled with numpy (less
#: per-call overhead than torch, the same result bit for bit); larger ones with torch.
_NUMPY_BELOW = 1 << 20
#: The requests whose small replies wait while the server drains its queue
#: (``ServerEndpoint.hold``: one wake of ZeroMQ's I/O thread for the batch).
_HELD = (wire.Push, wire.Pull)
#: The longest handling time, in seconds, a held reply waits for before it is sent.
HOLD_S = 0.001


class ParameterServer:
    """One server: ``ParameterServer(options, endpoint=..., partitions=..., optimizer=...)``
    then :meth:`serve`. A push goes through (1) validation, (2) the consistency rule
    (held into the clock's sum, or applied at once), (3) replication to the backup,
    (4) the update, (5) the reply, now or when the rule lets it go."""

    def __init__(self, options: ServerOptions, *, endpoint: ServerEndpoint,
                 partitions: list[wire.PartitionInfo], optimizer: wire.OptimSpec,
                 tables: Optional[list[wire.TableSpec]] = None, hooks: ServerHooks = ServerHooks(),
                 replicas: Replicas = Replicas(), checkpoint_store=None,
                 profiler: SpanRecorder = OFF):
        self.options = options
        self.rank = options.rank
        self.endpoint = endpoint
        self.optimizer = as_spec(optimizer)
        self.hooks = hooks
        self.profiler = profiler
        self.policy = make_consistency(options.mode, options.num_workers, options.staleness)
        self.members = self.policy.members
        self.two_phase = options.two_phase and self.policy.sums_clock
        #: Whether a reply may be the master itself, or one half-width copy of it made once
        #: a clock (_frame): sync, whether a clock is applied at once or held for the
        #: cluster's decision (loss scaling, clipping). Either way a worker pushes clock c+1
        #: only after it has received the values of clock c, and the master changes only
        #: when every live worker has pushed (docs/architecture.md, "Replies without copies").
        self._shares_master = self.policy.sums_clock
        self.parts = {p.id: PartitionState(info=p) for p in partitions}
        #: Copies this server keeps for its primary (replication).
        self.backups = {p.id: PartitionState(info=p) for p in replicas.backups}
        #: Started by the launcher in a dead server's place (it holds only copies).
        self.replacement = dict(replicas.lives).get(options.rank, 0) > 0
        self.stats = dict(bytes_received=0, bytes_sent=0, pushes=0, updates=0, pulls=0,
                          errors=0, skipped=0, apply_s=0.0, max_clock_gap=0, short_clocks=0,
                          departures=0, joins=0, replicated=0, promoted=0, checkpoints=0,
                          stale_pushes=0, retries=0, pending_pushes=0, words_lost=0)
        self.tables = None
        shared = dict(parts=self.parts, backups=self.backups, policy=self.policy,
                      new_rule=self._new_rule, stats=self.stats)
        self.replication = Replicator(options, hooks, replicas, endpoint=endpoint,
                                      handle=self.handle, **shared)
        if tables:
            from tessera.ps.table_server import TableService
            # Replicated tables: this server backs up its primary's shards (the ring of
            # the dense partitions) and forwards its own shards' updates to its backup.
            # A replacement server holds no shard of its own: it is given copies; nor
            # does a server started mid-job (tessera scale): shards move to it.
            backup_of = replicas.primary if replicas.primary != options.rank else -1
            replacement = self.replacement or options.scaled_in
            self.tables = TableService(rank=options.rank, tables=tables, policy=self.policy,
                                       send=self.replication.reply, ack=endpoint.send,
                                       stats=self.stats, replicate=self.replication.send_rows,
                                       backup_of=backup_of, own=not replacement,
                                       reply_buffer=endpoint.reply_buffer)
            self.replication.tables = self.tables  # re-replication copies its shards too
            self.tables.follow_dead = lambda: self.replication.follow(
                self.replication.membership()[1])
        self.snapshots = Snapshots(options, hooks, checkpoint_store, tables=self.tables, **shared)
        if self.tables is not None:  # a table's checkpoint: before the next clock's lookups
            self.tables.before_wake = self.snapshots.maybe
        #: Per-request CPU by phase (tessera.ps.server_profile); None: not measured.
        self.costs = MessageCosts() if options.cost_breakdown else None
        from tessera.ps.elastic import Mover
        self.mover = Mover(self, orders=hooks.moves, report=hooks.report_moved,
                           connect=replicas.connect, timeout_s=options.timeout_s,
                           addresses=hooks.addresses)
        #: Held sync clocks decided among the servers (tessera.ps.agreement); None: by
        #: the workers' commits.
        self.agreement = None
        if options.agree and self.policy.sums_clock:
            self.agreement = Agreement(options.rank, {p.id for p in replicas.partitions} or
                                       set(self.parts), peers=self._peer_ranks,
                                       connect=replicas.connect)
        #: Scaled away (tessera scale): it stopped holding nothing; no final checkpoint.
        self.retired = False
        self.stats["busy_s"] = 0.0
        self.stats["table_busy_s"] = 0.0  # the part of it serving table rows
        self._reply = self._answer  # bound once: every waiting request carries it
        #: A push's reply: the pushing worker reads it before it pushes again (_frame).
        self._reply_push = functools.partial(self._answer, shared=True)
        #: While a completed clock wakes its waiters: the request their answers wait for.
        self._reply_after: Optional[int] = None
        #: Sync under loss scaling: the workers' words (``Word``) by clock, kept a few
        #: clocks, so that a pending push after its word completes instead of waiting for
        #: good (Tessera's client never sends one: its pushes and words share a socket,
        #: in order, and no judged push is sent again; a guard, not a path).
        self._words: dict[int, dict[int, str]] = {}
        #: (clock, worker) -> the partitions summing its pending pushes, awaiting its word.
        self._awaiting: dict[tuple[int, int], list[PartitionState]] = {}

    # ------------------------------------------------------------------ loop

    def serve(self) -> None:
        """Serve until ``should_stop()``; ``check()`` raises on a cluster failure."""
        deferred = self.replication.deferred
        replication = self.replication
        costs = self.costs
        endpoint = self.endpoint
        while not self.hooks.should_stop():
            self.hooks.check()
            self._follow_membership()
            self.snapshots.finish_writes()
            replication.take_acks()
            while deferred:
                self.handle(deferred.pop(0))
            due = replication.flush_in()  # a batch for the backup, waiting for more
            # (whole milliseconds, as ZeroMQ polls: a shorter wait would be none, a spin)
            if not self._poll(0.1 if due is None else min(0.1, math.ceil(due * 1e3) / 1e3)):
                continue
            try:
                self._drain(costs)
            finally:  # nothing held while the server waits, or once it stops
                endpoint.release()
        deadline = time.monotonic() + self.options.timeout_s
        replication.flush()
        while replication.pending() and time.monotonic() < deadline:  # answers held for Acks
            self.hooks.check()
            self._poll(0.01)
            replication.take_acks()
        if not self.retired:
            self.snapshots.final()
        self.stats["messages_in"] = self.endpoint.messages_in  # counted by the socket's side
        if costs is not None:
            self.stats["cpu_us_per_msg"] = costs.per_message_us()
            self.stats["cpu_messages"] = costs.messages
            if self.profiler.enabled:
                for phase, ns in costs.ns.items():
                    self.profiler.count(f"cpu_ns.{phase}", ns)

    def _drain(self, costs) -> None:
        """Handle what is queued (after a poll said something is), up to 256 messages
        before the loop checks health again. The small replies to small pushes and to
        pulls are held while it drains, and sent together (``ServerEndpoint.hold``) when
        the queue is empty, before any other request or a large push is handled, or once
        they have waited :data:`HOLD_S` of handling."""
        endpoint, replication = self.endpoint, self.replication
        held_s = 0.0
        for i in range(256):
            if costs is not None:
                costs.start()
            # (the first one the poll saw; then None once the queue is empty)
            got = endpoint.recv(wait=i == 0)
            if got is None:
                return
            if isinstance(got.msg, _HELD) and small_frames(got.frames):
                endpoint.hold()
            else:  # (an order, a move, table rows, a large push: what is held goes first)
                endpoint.release()
                held_s = 0.0
            if costs is not None:
                costs.lap("decode")
                held_s += self.handle(got)
                costs.done(isinstance(got.msg, _HELD))
            else:
                held_s += self.handle(got)
            # Its frames go now, not at the next message: a client waits for
            # frames it lent (tessera.transport.shm) to be let go of.
            got = None
            if held_s > HOLD_S:
                endpoint.release()
                held_s = 0.0
            if replication.waiting():  # answers held for Acks: release them promptly
                replication.take_acks()

    def _on_snapshot_tables(self, peer: bytes, msg: wire.SnapshotTables) -> None:
        """Hybrid mode: copy the tables into the checkpoint at ``msg.clock`` (worker 0 asks
        while every worker waits at a barrier, so the rows are those of that clock)."""
        if msg.clock <= 0:
            raise RequestError(f"a table snapshot needs a clock > 0, got {msg.clock}")
        if msg.clock > self.snapshots.last:
            self.snapshots.snapshot(msg.clock)
        self.endpoint.send(peer, wire.Ack(req=msg.req))

    def _poll(self, timeout_s: float) -> bool:
        """Wait for a request, or for the backup's Acks while answers are held for them."""
        socks = self.replication.sockets()
        if len(socks) == 1:
            return self.endpoint.poll(timeout_s)
        ready, _, _ = zmq.select(socks, [], [], timeout_s)
        return self.endpoint.sock in ready

    def restore(self, restore: wire.Restore) -> None:
        """Load partitions, backups and table rows from a checkpoint (before serving)."""
        self.snapshots.restore(restore)
        self.snapshots.maybe()  # written (if due) before a lookup changes a table

    def handle(self, got) -> float:
        """Handle one message; the seconds it took."""
        started = time.perf_counter()
        try:
            self._handle(got)
        finally:
            # (read by the heartbeat: the coordinator rebalances by it)
            took = time.perf_counter() - started
            self.stats["busy_s"] += took
            if isinstance(got.msg, (wire.PullRows, wire.PushRows)):
                self.stats["table_busy_s"] += took
        return took

    def _slow(self, msg) -> None:
        """TESSERA_SLOW_SERVER: a server made hot on purpose (benchmarks, tests)."""
        if isinstance(msg, (wire.Push, wire.Pull)) and not self.options.slow_rows_only:
            time.sleep(self.options.slow_ms * len(msg.partitions) / 1000.0)
        elif isinstance(msg, (wire.PullRows, wire.PushRows)):
            time.sleep(self.options.slow_ms * max(1, len(msg.tables)) / 1000.0)

    def _handle(self, got) -> None:
        msg = got.msg
        if msg is None:
            self._refuse(got.peer, got.req, got.error)
            return
        if self.options.slow_ms > 0:
            self._slow(msg)
        try:
            if isinstance(msg, wire.Push):
                if self.profiler.enabled:
                    profile_push(self.profiler, msg, got.frames, self.parts,
                                 self.policy.sums_clock)
                self._on_push(got.peer, msg, got.frames)
            elif isinstance(msg, wire.Pull):
                self._on_pull(got.peer, msg, got.frames)
            elif isinstance(msg, wire.InitParams):
                self._on_init(got.peer, msg, got.frames)
            elif isinstance(msg, wire.OptimState):
                self._on_optim_state(got.peer, msg, got.frames)
            elif isinstance(msg, wire.Judged) and self.agreement is not None:
                if got.frames:
                    raise RequestError("Judged carries no payload frames")
                self.agreement.heard(msg)
                self._decide(msg.clock)
            elif isinstance(msg, wire.Word):
                self._on_word(got.peer, msg, got.frames)
            elif isinstance(msg, wire.Join):
                self._on_join(got.peer, msg)
            elif isinstance(msg, wire.Replicate) and msg.kind == "move":
                self.mover.on_move(got.peer, msg, got.frames)
            elif isinstance(msg, wire.Replicate) and msg.kind == "tablemove" and self.tables:
                self.mover.on_table_move(got.peer, msg, got.frames)
            elif isinstance(msg, wire.Replicate) and msg.kind in ("rows", "tablecopy") \
                    and self.tables:
                self.tables.on_replicate(got.peer, msg, got.frames)
            elif isinstance(msg, wire.Replicate):
                self.replication.on_replicate(got.peer, msg, got.frames)
            elif isinstance(msg, wire.PullRows) and self.tables is not None:
                self.mover.served_rows(msg.shard)
                self.tables.on_pull(got.peer, msg, got.frames)
            elif isinstance(msg, wire.PushRows) and self.tables is not None:
                self.mover.served_rows(msg.shard)
                self.tables.on_push(got.peer, msg, got.frames)
            elif isinstance(msg, wire.DumpRows) and self.tables is not None:
                self.tables.on_dump(got.peer, msg)
            elif isinstance(msg, wire.SnapshotTables) and self.tables is not None:
                self._on_snapshot_tables(got.peer, msg)
            else:
                raise RequestError(f"a parameter server does not serve {type(msg).__name__} requests")
        except RequestError as exc:
            why = str(exc)
            if isinstance(exc, NotABackup) and self._replaced_empty():
                why += f": {REPLACED}"  # the sender's backup died; it drops it (Replicator)
            self._refuse(got.peer, getattr(msg, "req", 0), why)
        self.snapshots.maybe()

    def _replaced_empty(self) -> bool:
        """A replacement server given no copy yet: a Replicate reaching it was meant for
        the process it replaced (the sender has not heard of that death yet)."""
        return self.replacement and not self.backups and \
            not (self.tables is not None and any(self.tables.copies.values()))

    def _refuse(self, peer: bytes, req: int, why: str) -> None:
        self.stats["errors"] += 1
        self.endpoint.send(peer, wire.Error(req=req, message=f"server {self.rank}: {why}"))

    # ------------------------------------------------------------ validation

    def _states(self, ids: list[int], frames: Optional[list], dtype: str) -> list[PartitionState]:
        if not ids:
            raise RequestError("request names no partitions")
        if len(ids) > 1 and len(set(ids)) != len(ids):
            raise RequestError("request names a partition twice")
        if self.mover.moved_to:
            self.mover.check(ids)  # moved away (elastic): the client follows
        self.mover.served(ids)
        states = []
        for pid in ids:
            st = self.parts.get(pid)
            if st is None and pid in self.backups:
                st = self.replication.promote_for(pid)
            if st is None:
                raise RequestError(f"partition {pid} is not held by this server "
                                   f"(it holds {sorted(self.parts)})"
                                   + (f": {REPLACED}" if self.replacement else ""))
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
                try:
                    st.rule = self._new_rule(values, st.info)
                except ValueError as exc:
                    raise RequestError(str(exc)) from None
                self.stats["bytes_received"] += len(frame)
                fresh.append((st, values))
        for st, values in fresh:
            self.replication.forward("init", st, values)
        self.replication.reply(peer, wire.Ack(req=msg.req))
        self.policy.wake(states)

    def _on_optim_state(self, peer: bytes, msg: wire.OptimState, frames: list) -> None:
        """A worker's ``optimizer.state_dict()`` or ``load_state_dict()``
        (:mod:`tessera.ps.optim_state`)."""
        states = self._states(msg.partitions, None, "float32")
        if not msg.load:
            if frames:
                raise RequestError("a request for optimizer state carries no payload frames")
            reply, out = optim_state.answer(msg, states)
            self.replication.reply(peer, reply, out)
            return
        optim_state.load(msg, states, frames, self.replication.backs_up)
        self.replication.reply(peer, wire.Ack(req=msg.req))

    def _on_pull(self, peer: bytes, msg: wire.Pull, frames: list) -> None:
        if frames:
            raise RequestError("a pull carries no payload frames")
        states = self._states(msg.partitions, None, msg.dtype)
        self.stats["pulls"] += 1
        if msg.agree:
            if self.agreement is None:
                raise RequestError("this job's servers do not decide held clocks among "
                                   "themselves (--replication 2): send the decision (commit)")
            check_inputs(msg, len(self.agreement.partitions))
            self.agreement.asked(msg.clock - 1, msg.agree, msg.clip, msg.norm_type)
            self._decide(msg.clock - 1)
        elif msg.commit is not None:
            if not (0.0 < msg.coef < float("inf")):
                raise RequestError(f"a commit's clipping coefficient must be a positive finite "
                                   f"number, got {msg.coef}")
            self._commit(states, msg.clock - 1, msg.commit, msg.coef)
        self.policy.wait_or_answer(Reply(self.policy.pull_clock(msg.clock), states, self._reply,
                                          peer, msg.req, msg.dtype))

    def _on_push(self, peer: bytes, msg: wire.Push, frames: list) -> None:
        costs = self.costs
        states = self._states(msg.partitions, frames, msg.dtype)
        check_push(msg, states, self.options.num_workers)
        if costs is not None:
            costs.lap("validation")
        policy = self.policy
        worker, seq = msg.worker, msg.seq
        if len(states) == 1:  # most pushes: one partition, no list to build
            all_fresh = any_fresh = seq > states[0].last_seq.get(worker, -1)
        else:
            fresh = [seq > st.last_seq.get(worker, -1) for st in states]
            any_fresh, all_fresh = any(fresh), all(fresh)
        if not any_fresh:
            # A retried push: not applied again. Answered as the original will be: at
            # once if its clock is done, else when it is.
            self.stats["retries"] += 1
            if policy.sums_clock and any(msg.worker in st.pushed_by for st in states):
                policy.wait_or_answer(Reply(policy.push_clock(msg.clock), states, self._reply_push,
                                            peer, msg.req, msg.dtype))
            else:
                self._send_params(peer, msg.req, states, msg.dtype)
            return
        answer = None
        if not all_fresh:  # (several partitions: one alone is either)
            # A re-sent batch (after a failover) that some of its partitions applied
            # already (the backup had their updates, not the others'): applied to the rest
            # only, answered with all.
            answer = states
            kept = [i for i, new in enumerate(fresh) if new]
            states, frames = [states[i] for i in kept], [frames[i] for i in kept]
        held = msg.hold or (self.two_phase and not msg.judged)
        check_held(msg, states, held, policy)
        policy.report(msg.worker, msg.clock, msg.weight, msg.rate)  # balance (h-straggler)
        if policy.stale_push(states, msg.worker, msg.clock):
            # Applied already (a re-sent push after a failover, or its clock was
            # completed without it): answer with the current values.
            self.stats["stale_pushes"] += 1
            self._send_params(peer, msg.req, answer or states, msg.dtype)
            return
        # Validated: from here on the push is applied (or held), exactly once.
        for st in states:
            st.last_seq[msg.worker] = msg.seq
            if msg.hparams is not None:  # applied with this clock's update (and replicated)
                st.hparams = msg.hparams
        self.members.pushed(msg.worker, msg.clock)
        self.snapshots.ask(msg.checkpoint)
        self.stats["pushes"] += 1
        if costs is not None:
            costs.lap("dedup")
        if policy.sums_clock:
            self._hold(peer, msg, states, frames, answer)
        else:
            self._apply_now(peer, msg, states, frames, answer)

    def _apply_now(self, peer: bytes, msg: wire.Push, states: list[PartitionState],
                   frames: list, answer: Optional[list[PartitionState]] = None) -> None:
        """Async/ssp: apply each push as it comes, scaled by 1/workers (``answer``: the
        partitions the reply carries, when not all of ``states``)."""
        answer = answer or states
        policy = self.policy
        # async: the answer waits for this worker's updates before this one, as many
        # pushes back as it keeps (mark, window)
        replication = self.replication
        mark = replication.mark(msg.worker, min(window(st.numel) for st in states)
                                if replication.windowed else 1)
        # Scaled by 1/workers so that the W pushes of one "round" move the
        # parameters as far as one sync step: the same lr serves both modes.
        scale = (1.0 / msg.scale) / self.options.num_workers
        fused = self._fuses_half(msg, states)
        folded = not fused and self._folds(msg, states, scale)
        if fused:  # the bits as they came: the kernel widens and scales them
            grads = [np.frombuffer(f.buffer, np.uint16) for f in frames]
        elif folded:  # read where they lie: the step scales them (TorchOptimRule.apply_folded)
            grads = [frame_to_tensor(f.buffer, "float32", st.numel) for st, f in zip(states, frames)]
        elif msg.dtype == "float32" and scale != 1.0:
            grads = [self._scaled32(st, f, scale) for st, f in zip(states, frames)]
        else:
            grads = [self._scaled(st, frame_to_tensor(f.buffer, msg.dtype, st.numel), scale)
                     for st, f in zip(states, frames)]
        self.stats["bytes_received"] += len(frames[0]) if len(frames) == 1 \
            else sum(len(f) for f in frames)
        costs = self.costs
        if costs is not None:
            costs.lap("copy")
        # Finiteness is tested only under loss scaling (the scale divides, and the
        # worker's own test at the cast names what overflowed): a plain fp32 push is
        # applied as torch.optim would apply it, without a pass over it to check.
        if msg.nonfinite or (msg.scale != 1.0
                             and not all(all_finite(g) for g in grads)):
            self.stats["skipped"] += 1
            self._send_params(peer, msg.req, answer, msg.dtype, skipped=True)
            policy.counted(states, msg.worker, msg.clock)  # a refused push still ends the clock
            policy.advance(states)
            return
        if costs is not None:
            costs.lap("validation")
        for i, (st, grad, frame) in enumerate(zip(states, grads, frames)):
            if folded:
                self._apply(st, grad, scale=scale)
                continue
            if fused and self._update_half(st, msg.dtype, msg.dtype, grad, scale):
                continue
            if fused:  # no reply buffer free: torch's three passes
                grad = self._scaled(st, frame_to_tensor(frame.buffer, msg.dtype, st.numel),
                                    scale)
            self._update(st, grad, pushes=1, worker=msg.worker, seq=msg.seq,
                         keep=msg.unused[i] if msg.unused is not None else None)
        if policy.answers_at_once:
            self._send_params(peer, msg.req, answer, msg.dtype, after=mark)
            return
        policy.counted(states, msg.worker, msg.clock)
        policy.wait_or_answer(Reply(policy.push_clock(msg.clock), answer, self._reply_push, peer,
                                     msg.req, msg.dtype, run_clock=msg.clock + 1))
        policy.advance(states)

    def _folds(self, msg: wire.Push, states: list[PartitionState], scale: float) -> bool:
        """Whether an async/ssp push's fp32 partitions take plain SGD's step with the
        scale folded into the learning rate (:meth:`TorchOptimRule.apply_folded`): a
        power-of-two scale (1/workers, no loss scaling), no pending hyperparameters and no
        backup (a backup is sent the scaled gradient it applies)."""
        if msg.dtype != "float32" or scale == 1.0:
            return False
        return self._steps_plainly(msg, states, lambda rule: rule.folds(scale))

    def _steps_plainly(self, msg: wire.Push, states: list[PartitionState], takes) -> bool:
        """What both one-pass plain SGD steps of an async/ssp push (:meth:`_folds`,
        :meth:`_fuses_half`) need: no loss scaling, and in every partition a rule that
        ``takes(rule)`` says can, no pending hyperparameters and no backup."""
        if msg.scale != 1.0 or msg.nonfinite or msg.unused is not None:
            return False  # (unused ranges: :meth:`_update` leaves them alone)
        replication = self.replication
        for st in states:  # (a loop: a generator costs a small push a frame and two calls)
            if st.hparams is not None or not takes(st.rule) or replication.backs_up(st):
                return False
        return True

    @staticmethod
    def _scaled32(st: PartitionState, frame, scale: float) -> torch.Tensor:
        """:meth:`_scaled` of an fp32 frame (its length checked by :meth:`_states`): numpy's
        multiply into the partition's buffer, the same fp32 product as ``torch.mul`` bit
        for bit (tests/test_server_inproc.py), at a third of its per-call cost, which a
        small partition pays per push (benchmarks/server_load.py)."""
        if len(frame) >= _NUMPY_BELOW:  # torch may use several threads on a large one
            return torch.mul(frame_to_tensor(frame.buffer, "float32", st.numel), scale,
                             out=st.buffer())
        np.multiply(np.frombuffer(frame.buffer, np.float32), scale, out=st.buffer_np())
        return st.scratch

    @staticmethod
    def _scaled(st: PartitionState, grad: torch.Tensor, scale: float) -> torch.Tensor:
        """Async/ssp: ``grad * scale`` in fp32, in the partition's reused buffer (the
        received frame itself when it is fp32 and the scale 1); applied before the
        partition's next push is taken."""
        if scale == 1.0:
            return grad  # fp32, or half-width (_update casts it unless the rule takes it)
        if grad.dtype == torch.float32:
            return torch.mul(grad, scale, out=st.buffer())
        return st.buffer().copy_(grad).mul_(scale)  # cast, then scale in fp32 (as before)

    def _hold(self, peer: bytes, msg: wire.Push, states: list[PartitionState],
              frames: list, answer: Optional[list[PartitionState]] = None) -> None:
        """Sync: add the push to its clock's sum; the clock completes with the last one.
        A clock applied at once sums the pushes divided by the workers (the mean comes
        out directly); a held one keeps the sum its verdict is computed on."""
        unscale = msg.weight / msg.scale  # weight: balance (1.0 unless train.balance)
        held = msg.hold or (self.two_phase and not msg.judged)
        workers = 1 if held else self.options.num_workers
        direct = workers == 1 and not held
        for i, (st, frame) in enumerate(zip(states, frames)):
            self.stats["bytes_received"] += len(frame)
            st.add(frame_to_tensor(frame.buffer, msg.dtype, st.numel), unscale, msg.worker,
                   msg.nonfinite, workers, direct, msg.dtype,
                   msg.unused[i] if msg.unused is not None else None)
        if self.costs is not None:
            self.costs.lap("copy")
        released = []
        if msg.pending:  # its sender's word on the whole gradient follows
            self.stats["pending_pushes"] += 1
            self._await_word(msg.worker, msg.clock, states)
        elif msg.judged:  # it carries the word: for the sender's pending pushes here too
            released = self._word_in(msg.worker, msg.clock, msg.nonfinite)
        if held:  # one partition (checked): answered with its verdict
            states[0].held = True
            states[0].norm_type = max(states[0].norm_type, msg.norm_type)
            states[0].verdict_waiters.append((peer, msg.req))
        else:
            self.policy.wait_or_answer(Reply(self.policy.push_clock(msg.clock),
                                             answer or states, self._reply_push, peer, msg.req,
                                             msg.dtype))
        self._complete(states + released if released else states)

    def _complete(self, states: list[PartitionState]) -> None:
        """Sync: apply (or, under loss scaling, judge) every clock all live workers pushed."""
        advanced = []
        decide_at = None  # a held clock judged here: the servers may decide it now
        mark = self.replication.mark()  # answer_early: the answers wait for the clock before
        for st in states:
            if st.verdict is not None or st.awaiting or not self.policy.complete(st):
                continue
            if len(st.pushed_by) < self.options.num_workers:
                self.stats["short_clocks"] += 1
            if st.held:
                verdict = self.policy.judge(st)
                for w_peer, w_req in st.verdict_waiters:
                    self.replication.reply(w_peer, msgspec.structs.replace(verdict, req=w_req))
                st.verdict_waiters.clear()
                if self.agreement is not None:
                    self.agreement.judged(st.clock, st.info.id, verdict.finite, verdict.norm)
                    decide_at = st.clock
                continue
            if st.overflows:  # judged pushes: a worker's gradient overflowed somewhere
                self._skip(st)
                advanced.append(st)
                continue
            # The backup gets the mean this server applies (bit for bit the same update);
            # the replicator keeps it until the backup's Ack, and the answers to these
            # pushes wait for that Ack.
            grad, n, unused = st.take_mean()
            self._update(st, grad, pushes=n, reply_dtype=st.wire_dtype, keep=unused)
            advanced.append(st)
        self._reply_after = mark
        try:
            self.policy.wake(advanced)
        finally:
            self._reply_after = None
        if decide_at is not None:
            self._decide(decide_at)

    def _await_word(self, worker: int, clock: int, states: list[PartitionState]) -> None:
        """Pending judged pushes (``Push.pending``) of ``worker`` at ``clock``, summed into
        ``states``: their clock waits for the worker's word (a :class:`~tessera.transport.
        wire.Word`, or a judged push that is not pending), unless it came already
        (``_words``)."""
        word = self._words.get(clock, {}).get(worker)
        if word is None:
            for st in states:
                st.awaiting.add(worker)
            self._awaiting.setdefault((clock, worker), []).extend(states)
        elif word:
            for st in states:
                st.overflows.append(wire.Overflow(worker=worker, param=word))

    def _word_in(self, worker: int, clock: int, word: str) -> list[PartitionState]:
        """``worker``'s word on its whole gradient of ``clock`` (``word``: its first
        overflow, "" for none), from a Word or a judged push that is not pending: kept a
        few clocks, and given to its pending pushes here; -> the partitions it released."""
        words = self._words.get(clock)
        if words is None:
            words = self._words[clock] = {}
            while len(self._words) > KEEP_CLOCKS:  # a worker is at most a clock ahead
                del self._words[min(self._words)]
        words.setdefault(worker, word)
        due = [st for st in self._awaiting.pop((clock, worker), ())
               if st.clock == clock and worker in st.awaiting]
        for st in due:
            st.awaiting.discard(worker)
            if word:
                st.overflows.append(wire.Overflow(worker=worker, param=word))
        return due

    def _on_word(self, peer: bytes, msg: wire.Word, frames: list) -> None:  # noqa: ARG002
        """A worker's word on its whole gradient of ``msg.clock`` (one-way): the clocks of
        its pending pushes here complete with it, skipped where it names an overflow."""
        if frames:
            raise RequestError("Word carries no payload frames")
        if not self.two_phase:
            raise RequestError("a Word (a worker's word on its gradient) is for sync mode "
                               "under loss scaling (--precision fp16)")
        if not 0 <= msg.worker < self.options.num_workers:
            raise RequestError(f"worker {msg.worker} is not in this job")
        due = self._word_in(msg.worker, msg.clock, msg.overflow)
        if due:
            self._complete(due)

    def _drop_awaiting(self, workers: set[int]) -> None:
        """Workers declared dead, finished or joined again (a new incarnation): no word
        will come from the process that sent their pending pushes. Those pushes stay in
        their clock's sum, as any push a worker sent before it died does; an overflow in
        their own partitions skips that partition's clock (``Push.nonfinite``). Their kept
        words go too: a next incarnation's pushes wait for its own."""
        for key in [k for k in self._awaiting if k[1] in workers]:
            self.stats["words_lost"] += 1
            for st in self._awaiting.pop(key):
                st.awaiting.discard(key[1])
        for words in self._words.values():
            for worker in workers:
                words.pop(worker, None)

    def _skip(self, st: PartitionState) -> None:
        """Skip ``st``'s current clock: a clock of judged pushes (``Push.judged``) one of
        which names an overflow (every worker sent its word on its whole gradient to every
        server, so every server skips it), or a held clock the cluster decided to skip.
        The replies at the next clock say so, and who overflowed where (also to pushes
        that were not held, where a restarted worker's held first step shared the clock)."""
        st.skip_overflows = st.overflows
        st.take_mean()
        st.clock += 1
        st.skipped_clock = st.clock
        st.arrivals.clear()
        self.stats["skipped"] += 1

    def _decide(self, clock: int) -> None:
        """Servers that agree: commit held ``clock`` once every server's verdicts and a
        worker's inputs are in (:mod:`tessera.ps.agreement`)."""
        decision = self.agreement.decision(clock)
        if decision is None:
            return
        self.agreement.forget(clock)
        self._commit(list(self.parts.values()), clock, *decision)

    def _peer_ranks(self) -> list[int]:
        """The other live servers (those started mid-job too, not those scaled away): where
        verdicts go."""
        _, dead = self.hooks.membership()
        gone = {int(r) for r in dead} | {int(r) for r in self.hooks.retired()}
        ranks = set(range(self.options.num_servers)) | {int(r) for r in self.hooks.addresses()}
        return sorted(r for r in ranks if r != self.rank and r not in gone)

    def _commit(self, states: list[PartitionState], clock: int, apply: bool,
                coef: float = 1.0) -> None:
        """The cluster's decision on the held means of ``clock``: apply them (times the
        clipping coefficient ``coef``) or skip."""
        due = self.policy.decided(states, clock, apply)
        for st in due:
            if not apply:
                self._skip(st)
                continue
            grad, n, unused = st.take_mean()
            self._update(st, st.rule.clip(grad, coef), pushes=n, keep=unused)
        self.policy.wake(due)

    # ------------------------------------------------------------ membership

    def _follow_membership(self) -> None:
        """Apply the coordinator's latest word on dead workers and servers."""
        departed, dead_servers = self.hooks.membership()
        gone = [w for w, inc in departed.items() if self.members.depart(int(w), int(inc))]
        self.stats["departures"] += len(gone)
        # A worker that finished while others go on (uneven inputs: its data ran out
        # first) is not waited for either: the clocks after its last complete without it,
        # as after a departure, the mean over the workers still training.
        done = [w for w in self.hooks.finished() if self.members.finish(int(w))]
        if gone or done:
            self._drop_awaiting({int(w) for w in (*gone, *done)})
            states = list(self.parts.values())
            self._complete(states)  # sync: clocks that waited only for them
            self.policy.advance(states)  # ssp: they no longer hold the slowest count down
            if self.tables is not None:
                self.tables.follow_membership()
        self.replication.follow(dead_servers)
        self.replication.follow_lives()
        self.mover.follow()
        if self.tables is not None:
            self.tables.follow_servers(dead_servers)
        if self.agreement is not None:
            self.agreement.follow()

    def _on_join(self, peer: bytes, msg: wire.Join) -> None:
        states = self._states(msg.partitions, None, msg.dtype) if msg.partitions else []
        if not 0 <= msg.worker < self.options.num_workers:
            raise RequestError(f"worker {msg.worker} is not in this job")
        if not states and self.tables is None:
            raise RequestError("request names no partitions")
        # The join holds for this server's table shards too: none may be past its clock.
        tables = self.tables.units() if self.tables is not None else []
        wait = self.policy.join([*states, *tables], msg.worker, msg.clock)
        self.members.join(msg.worker, msg.incarnation)
        self._drop_awaiting({msg.worker})
        self.replication.forward_join(msg.worker, msg.incarnation,
                                      self.members.joined_at.get(msg.worker, 0))
        self.stats["joins"] += 1
        if wait is None:
            self._send_params(peer, msg.req, states, msg.dtype)
            return
        self._complete(list(self.parts.values()))
        if self.tables is not None:
            # A join that arrives before the departure it follows (a fast restart):
            # table clocks that waited only for the dead incarnation complete now too.
            self.tables.follow_membership()
        if not states:  # only table shards here: the join holds from now on
            self._send_params(peer, msg.req, states, msg.dtype)
            return
        self.policy.wait_or_answer(Reply(wait, states, self._reply, peer, msg.req, msg.dtype))

    # --------------------------------------------------------------- replies

    def _new_rule(self, values: torch.Tensor, info: wire.PartitionInfo):
        """The update rule of a partition: the job's optimizer on its groups; buffers
        averaged (sync: replaced by the clock's mean; else a running mean over workers)."""
        keep = 0.0 if self.policy.sums_clock else 1.0 - 1.0 / self.options.num_workers
        # Sync: the master where same-host workers read their replies from (_frame).
        alloc = self.endpoint.shared_empty if self._shares_master else None
        return make_rule(values, self.optimizer, info.start, info.stop, keep, alloc)

    def _update(self, st: PartitionState, grad: torch.Tensor, pushes: int, worker: int = -1,
                seq: int = -1, reply_dtype: str = "float32",
                keep: Optional[list[int]] = None) -> None:
        """Replicate, then apply, one update (with the hyperparameters worker 0 last sent).
        A half-width gradient (one worker, unscaled) is cast into the fp32 buffer first:
        a cast and an fp32 ``add_`` cost less than one mixed-dtype ``add_`` (torch 2.13 CPU,
        benchmarks/HISTORY.md, precision.py), with the same bits. Where the replies go out
        in a half-width ``reply_dtype`` (sync), the fused step may take it instead
        (:meth:`_update_half`). ``keep``: ranges no worker used (``Push.unused``), left
        alone (:meth:`TorchOptimRule.apply`)."""
        fusable = (reply_dtype != "float32" and kernels.ENABLED and not keep
                   and not self.replication.backs_up(st))
        if grad.dtype != torch.float32 and not fusable:
            grad = st.buffer().copy_(grad)
            if self.costs is not None:
                self.costs.lap("copy")
        self._replicate(st, "grad", grad, pushes=pushes, worker=worker, seq=seq, keep=keep)
        if fusable and st.rule.fuses_half():
            dtype = "float32" if grad.dtype == torch.float32 else reply_dtype
            if self._update_half(st, reply_dtype, dtype, kernels.array_of(grad), 1.0, pushes):
                return
        if grad.dtype != torch.float32:
            grad = st.buffer().copy_(grad)
        self._apply(st, grad, pushes=pushes, keep=keep)

    def _fuses_half(self, msg: wire.Push, states: list[PartitionState]) -> bool:
        """Whether an async/ssp push's partitions take the fused half-width step
        (:meth:`_update_half`): a bf16 or fp16 frame without loss scaling, plain SGD,
        compiled kernels, and no backup (a backup is sent the fp32 gradient it applies)."""
        if msg.dtype == "float32" or not kernels.ENABLED:
            return False
        return self._steps_plainly(msg, states, lambda rule: rule.fuses_half())

    def _update_half(self, st: PartitionState, reply_dtype: str, grad_dtype: str,
                     grad: np.ndarray, scale: float, pushes: int = 1) -> bool:
        """:meth:`_update` in one pass, for replies in a half-width ``reply_dtype``: the
        plain SGD step from ``grad`` (a numpy array of ``grad_dtype``: a half-width push
        as it came, or a sync clock's fp32 mean) writes the reply into a free reply
        buffer as it goes (:meth:`ReplyBuffers.update_into`; sync: its one buffer,
        :meth:`_frame`); False, with nothing applied, where no buffer is free or the
        partition is below pyzmq's copy size."""
        t0 = time.perf_counter()
        start = self.profiler.now()
        rule = st.rule
        if not st.replies.update_into(rule, torch_dtype(reply_dtype), lambda reply: rule.apply_half(
                grad, grad_dtype, scale, reply, reply_dtype), settled=self._shares_master):
            return False
        self._applied(st, pushes, start, time.perf_counter() - t0)
        return True

    def _replicate(self, st: PartitionState, kind: str, tensor: torch.Tensor, pushes: int,
                   worker: int = -1, seq: int = -1, keep: Optional[list[int]] = None) -> None:
        """Send the backup the update this server applies next (answers wait for its Ack)."""
        self.replication.forward(kind, st, tensor, pushes=pushes, worker=worker, seq=seq,
                                 hparams=st.hparams, skip=keep or None)
        if st.hparams is not None:
            st.rule.set_hparams(st.hparams)
            st.hparams = None
        if self.costs is not None:
            self.costs.lap("replicate")

    def _apply(self, st: PartitionState, grad: torch.Tensor, pushes: int = 1,
               scale: float = 1.0, keep: Optional[list[int]] = None) -> None:
        t0 = time.perf_counter()
        start = self.profiler.now()
        if keep:
            st.rule.apply(grad, keep)
        elif scale == 1.0:
            st.rule.apply(grad)
        else:  # where _folds said so
            st.rule.apply_folded(grad, scale)
        self._applied(st, pushes, start, time.perf_counter() - t0)

    def _applied(self, st: PartitionState, pushes: int, start: int, elapsed: float) -> None:
        """The books of one update applied to ``st`` (``elapsed`` seconds from ``start``)."""
        self.policy.updated(st)
        st.applied_pushes += pushes
        self.stats["updates"] += 1
        self.stats["apply_s"] += elapsed
        if self.profiler.enabled:
            profile_apply(self.profiler, st, start, elapsed)
        if self.costs is not None:
            self.costs.lap("apply")

    def _frame(self, st: PartitionState, dtype: str, shared: bool = False, peer: bytes = b""):
        """A reply frame of ``st``'s values in ``dtype``, without a fresh allocation.
        ``shared``: the reply to a worker's push, which that worker reads before it
        pushes this partition again. ``peer``: the client it goes to."""
        if self._shares_master and dtype == "float32":
            # The master itself, zero-copy: in sync mode the master changes only once
            # every live worker has pushed the next clock, and each worker pushes it
            # only after it has received this reply, so ZeroMQ has sent these bytes by
            # then (docs/architecture.md, "Replies without copies"; a fresh copy per
            # reply cost ~1.5 ms per 4 MiB in page faults: ps_roundtrip).
            if shared:  # the same argument holds while that worker reads it from shared
                # memory, later than ZeroMQ would have sent it: through the segment it
                # goes as the master's place in the arena (tessera.transport.shm).
                return st.rule.master.numpy().view(np.uint8).view(Shared)
            return st.replies.master(st.rule.master)
        if self._shares_master:  # a half-width wire: by the same argument, one buffer
            # holding the master cast at this clock, written again at the next
            return st.replies.settled(st.rule, dtype)
        if dtype == "float32" and peer:
            # A client on this host: the values copied once, into the place in its
            # shared-memory segment it reads them from (not into a reply buffer that
            # the segment's producer then copies again); None over TCP or when small.
            master = st.rule.master
            place = self.endpoint.reply_buffer(peer, master.numel() * 4)
            if place is not None:
                torch.from_numpy(place.view(np.float32)).copy_(master)
                return place
        # ZeroMQ sends later and the master moves on: a reused buffer that ZeroMQ is done
        # with (its MessageTracker), or the one that already holds these values.
        return st.replies.frame(st.rule, dtype)

    def _send_params(self, peer: bytes, req: int, states: list[PartitionState], dtype: str,
                     skipped: bool = False, after: Optional[int] = None,
                     shared: bool = False) -> None:
        costs = self.costs
        if costs is not None:
            costs.lap("other")
        if shared and not self.endpoint.shares_memory_with(peer):
            shared = False  # over TCP: the master's frame made once (_frame)
        if len(states) == 1:  # most replies: one partition, no comprehensions
            st = states[0]
            frames = [self._frame(st, dtype, shared, peer)]
            self.stats["bytes_sent"] += len(frames[0])
            clock, ids = st.clock, [st.info.id]
        else:
            frames = [self._frame(st, dtype, shared, peer) for st in states]
            self.stats["bytes_sent"] += sum(len(f) for f in frames)
            clock = min((st.clock for st in states), default=0)
            ids = [st.info.id for st in states]
        if costs is not None:
            costs.lap("copy")
        overflows = []
        if states and states[0].skipped_clock == clock:  # sync: a judged clock skipped
            skipped, overflows = True, states[0].skip_overflows
        self.replication.reply(peer, wire.Params(req=req, partitions=ids,
                                             clock=clock, dtype=dtype, skipped=skipped,
                                             overflows=overflows,
                                             sent_ns=self.profiler.now() if self.profiler.enabled
                                             else 0, rates=self.policy.rates(clock)),
                                 frames, after=after)
        if costs is not None:
            costs.lap("encode")

    def _answer(self, w: Reply, shared: bool = False) -> None:
        if w.run_clock >= 0:
            gap = w.run_clock - min(st.clock for st in w.units)
            self.stats["max_clock_gap"] = max(self.stats["max_clock_gap"], gap)
        self._send_params(w.peer, w.req, w.units, w.dtype, after=self._reply_after,
                          shared=shared)
