"""Data parallelism over parameter servers: the model wrapper a worker trains.

(One concept, one step's phases, so one module of about 420 lines; what happens after a
failure, rejoining and overflow reports, is in :mod:`tessera.parallel.ps_faults`.)

The wrapper lays the model's parameters (and their gradients) end to end in two
flat buffers of the policy's parameter dtype, so that a partition of the shard
map is a plain slice of each, sent and received without gathering.

Phases of one step (STYLE: numbered, as the code runs them):

1. Forward runs on the parameters the last step pulled (under the precision
   policy's autocast; see :meth:`PSDataParallel.autocast`).
2. Backward (of ``scale_loss(loss)``): a post-accumulate-grad hook on every
   parameter counts down the partitions that parameter touches; when a
   partition's last gradient has arrived, its slice of the flat gradient is
   pushed at once in the wire dtype, so pushes of the last layers overlap the
   backward of the first (DDP's bucketing, in the order the PS needs). Under loss
   scaling the push also names the first parameter whose gradient overflowed (in
   its own partitions); in sync mode it leaves *pending* (``Push.pending``): the
   worker's word on its whole gradient follows, with the push of the partition
   backward finishes last, and in phase 3 to the other servers (from a CPU worker
   to a server on its host, through shared memory, the push waits for phase 3 and
   carries the word: :meth:`PSDataParallel._keeps_judged`).
   Inside ``with model.no_sync():`` nothing is pushed: gradients accumulate in
   the flat buffer (DDP's gradient accumulation), and the next backward outside
   it pushes the sum. The first step's pushes wait for phase 3 too: a second
   backward in it (accumulation without ``no_sync()``) makes every step's pushes
   wait for phase 3 and carry the sum; a second backward in a later step is refused.
3. :meth:`PSDataParallel.unscale_`, :meth:`PSDataParallel.clip_grad_norm_` or
   :meth:`PSDataParallel.step` pushes what backward did not touch (unused
   parameters push zeros) and waits for the replies:
   - for a plain push, each reply carries the partition's new values;
   - for a *judged* push (sync mode under loss scaling, a step not held), too: the
     worker's word on its whole gradient (the first overflow, or none) goes to
     every server it pushed to during backward (the last push of backward carries
     it; a ``Word`` to the others), so every server applies or skips the clock as
     soon as every worker's pushes and words are in, all alike, and says which in
     the replies;
   - for a *held* push (sync mode, under loss scaling or while the script clips
     its gradients), the server keeps the clock's mean gradient and answers with
     a verdict: is it finite, and its norm. The decision (skip if any partition
     overflowed anywhere; the clipping coefficient from the norm of all
     partitions together, which is the norm of the workers' averaged gradient, as
     one process with batch W·b computes it) is the servers' own where they agree
     (:mod:`tessera.ps.agreement`): the pull of the next clock leaves at once with
     ``max_norm``, and brings the new (or, when skipped, unchanged) values. With
     ``--replication 2`` every worker derives it from the same verdicts and sends
     it with that pull. The loss scaler moves the same way on every worker.
4. The values are copied into the flat parameter buffer; the clock advances.

Whether a step's pushes are held is decided one step ahead, since they leave
during backward: the first step of a sync job is held, and every step after one
that clipped. So a script clips on every step or on none (:meth:`clip_grad_norm_`
says so otherwise). Worker 0's first push of each step carries the optimizer's
param-group hyperparameters when a scheduler (or the script) changed them, so the
servers apply them to that step's update, as ``optimizer.step()`` would.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from tessera.amp.finite import all_finite
from tessera.errors import UsageError
from tessera.parallel.embedding import push_tables
from tessera.parallel.prefetch import send_named
from tessera.parallel.flat import flatten_buffers, flatten_model
from tessera.parallel.protocol import Amp, DistributedModel, Hooks
from tessera.parallel.ps_faults import OverflowReport, Rejoin
from tessera.profiler.recorder import EVAL_SPAN
from tessera.ps.agreement import decide
from tessera.ps.client import Handle, PSClient
from tessera.ps.sharding import ShardMap
from tessera.transport.frames import torch_dtype
from tessera.transport.wire import Verdict


@dataclass(frozen=True)
class PSComm:
    """How this worker's pushes are consumed by the servers."""

    #: consistency: "sync", "async" or "ssp".
    mode: str = "sync"
    #: loss-scaled sync training: skips are decided cluster-wide (tessera.amp.scaler).
    two_phase: bool = False
    #: async/ssp: worker 0 asks for a checkpoint every this many clocks (0: never).
    checkpoint_every: int = 0
    #: sync: the servers decide a held clock among themselves, and the pull of the next
    #: clock leaves with the pushes (tessera.ps.agreement; tessera.cluster.role.agrees).
    agree: bool = False
    #: ``tessera.distribute(..., find_unused_parameters=True)``: each push names the
    #: parameters the step gave no gradient, which the servers leave alone where no
    #: worker used them (``Push.unused``); else they are stepped with zeros.
    find_unused: bool = False


#: The spans :meth:`PSDataParallel.step` records each step, (name, category).
STEP_SPANS = (("backward", "compute"), ("send", "comm"), ("wait", "comm"),
              ("copy", "optimizer"), ("in flight", "inflight"))


class StepMarks:
    """Profiling timestamps of the current step: this process's ``time.time_ns()``,
    unaligned (:meth:`PSDataParallel.step` adds the recorder's offset when it records
    them): taken in backward's hooks, one per parameter, they are a C call each, not a
    Python one (benchmarks/profiler_overhead.py)."""

    __slots__ = ("first_push_ns", "backward_start_ns", "last_hook_ns", "send_ns")

    def __init__(self):
        self.first_push_ns = self.backward_start_ns = self.last_hook_ns = 0
        #: Time spent sending pushes from backward's hooks this step (it is
        #: communication, not compute: the report takes it out of backward).
        self.send_ns = 0


#: In ``PSDataParallel._handles``: a partition whose gradient backward finished, kept
#: for phase 3 (accumulation without no_sync(), a first step, a judged fp16 step).
_KEPT = object()


@dataclass(frozen=True)
class Start:
    """Where this worker starts: a fresh job, a resumed one, or a restarted worker."""

    clock: int = 0
    #: > 0 for a restarted worker, which joins the running job.
    incarnation: int = 0
    #: the servers restored a checkpoint: worker 0 does not seed them.
    restored: bool = False


class PSDataParallel(Rejoin, OverflowReport, DistributedModel):
    """Wraps ``module`` so that its parameters live on the parameter servers.

    ``load_state_dict`` is refused (the servers hold the parameters); clipping needs
    sync mode (see the module docstring).
    """

    def __init__(self, module: nn.Module, client: PSClient, shard_map: ShardMap, *,
                 is_first: bool, comm: PSComm = PSComm(), amp: Optional[Amp] = None,
                 hooks: Hooks = Hooks(), start: Start = Start(), tables=(), device=None):
        super().__init__()
        amp = amp or Amp()
        self.module = module
        self.client = client
        self.shard_map = shard_map
        self.policy = amp.policy
        self.scaler = amp.scaler
        self.two_phase = comm.two_phase
        self.log = hooks.log
        self.profiler = hooks.profiler
        #: Profiling: this step's timestamps (a plain object: nn.Module.__setattr__ costs
        #: microseconds a write, ~13 writes a step were most of the profiler's overhead).
        self._marks = StepMarks()
        self.clock = start.clock
        self.mode = comm.mode
        self.is_first = is_first
        self.checkpoint_every = comm.checkpoint_every
        self.checkpoint_wanted = hooks.checkpoint_wanted
        self.on_clock = hooks.on_clock
        self._ckpt_asked = False
        self._ckpt_flag = 0
        self._finite: Optional[bool] = None  # unscale_()'s answer this step
        self._wait_t0 = 0.0
        self._wait_start_ns = 0
        self._copy_s = 0.0
        self._verdicts: list[Verdict] = []
        #: Judged steps (loss scaling, sync, not held): this step's first overflow so far
        #: ("": none), the word once backward is done; the partitions pushed during
        #: backward (their word follows) and the servers a push carried the word to.
        self._overflow = ""
        self._word_due: set[int] = set()
        self._word_sent: set[int] = set()
        #: This step's pushes wait for phase 3: the first step (it finds out whether the
        #: script backwards more than once a step without no_sync()), and every step of a
        #: script that does (``_accumulates``); ``_backwards_again``: this step did.
        self._defer = True
        self._accumulates = False
        self._backwards_again = False
        self._counted: set[int] = set()  # deferred steps: parameters counted down
        #: False inside no_sync(): gradients accumulate locally, nothing is pushed.
        self._sync = True
        #: This step's pushes are held for a verdict (sync: first step, or clipping).
        self._hold = comm.mode == "sync"
        self._norm_type = 2.0
        self._clipped, self._coef = False, 1.0
        #: Servers that agree: the pull of the next clock, sent with the held pushes.
        self.agree = comm.agree
        self._pulls: Optional[list[Handle]] = None
        #: This step's table-row handles, once the rest was pushed (phase 3).
        self._rest: Optional[list] = None
        #: The flat gradient's version when backward last pushed (None: nothing pushed).
        self._sent_version: Optional[int] = None
        #: Worker 0: the optimizer's changed hyperparameters, sent with a step's pushes.
        self.hparams_source = lambda: None
        self._step_hparams: Optional[list] = None
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        # The gradients live where the servers on this host read them in place (lent
        # to them, not copied: tessera.transport.shm); step() waits until they let go.
        initial, self.flat, self.flat_grad = flatten_model(module, self.policy.param_dtype,
                                                           client.shared_zeros)
        # Buffers (BatchNorm's statistics) follow the parameters; the servers average them.
        buffers_initial, self.flat_buffers = flatten_buffers(module)
        self._buffers_at = self.flat.numel()
        initial = torch.cat([initial, buffers_initial])
        if initial.numel() != shard_map.total_elems:
            raise ValueError(f"model has {initial.numel()} trainable and buffer elements but the "
                             f"shard map covers {shard_map.total_elems}: workers built different "
                             f"models")
        self._buffer_parts = {p.id for p in shard_map.partitions if p.start >= self._buffers_at}
        self._params = [p for p in module.parameters() if p.requires_grad]
        #: The sum of the parameters' version counters. Tessera writes the servers' values
        #: through ``flat`` (each parameter is rebound to a slice of it with ``.data =``, so
        #: keeps a counter of its own), which moves none of them: a script's in-place change
        #: of a parameter (load_state_dict, an init or a clamp under no_grad) moves it, and
        #: would be overwritten unseen by the servers' next values.
        self._param_version = self._versions()
        #: Parameters frozen now: never on the servers, so never trainable later.
        self._frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
        offsets = shard_map.param_offsets()
        self._views = [(p, offsets[i], p.numel()) for i, p in enumerate(self._params)]
        self._names = names
        self._parts_of_param = shard_map.partitions_of_param()
        self._params_of_part: dict[int, list[int]] = {p.id: [] for p in shard_map.partitions}
        self._needed = {part.id: 0 for part in shard_map.partitions}
        for index, parts in enumerate(self._parts_of_param):
            for pid in parts:
                self._needed[pid] += 1
                self._params_of_part[pid].append(index)
        self._remaining = dict(self._needed)
        #: This step's partitions whose every gradient backward has made.
        self._finished_parts = 0
        #: The partitions whose gradients backward pushes (buffers leave at step()), and
        #: this step's count of them per server still to go (:meth:`_flush_if_last`).
        self._backward_parts = [pid for pid in self._needed if pid not in self._buffer_parts]
        self._left_of_server: Optional[dict[int, int]] = None
        #: find_unused: each partition's parameters, (index, lo, hi) relative to its start
        #: (built only with the flag: a loop over every parameter at start-up).
        self._find_unused = comm.find_unused
        self._ranges_of_part = {
            p.id: [(i, max(off, p.start) - p.start, min(off + n, p.stop) - p.start)
                   for i in self._params_of_part[p.id] if i < len(self._views)
                   for _, off, n in (self._views[i],)] for p in shard_map.partitions
        } if comm.find_unused else {}
        self._fired: dict[int, int] = {}  # param index -> order its gradient arrived in
        self._handles: dict[int, Handle] = {}
        self._wire = torch_dtype(client.wire_dtype)
        for i, p in enumerate(self._params):
            p.register_post_accumulate_grad_hook(self._make_hook(i))
        from tessera.parallel.embedding import _Attached
        self.tables = list(tables)
        attached = _Attached(client, lambda: self.clock, self.policy.param_dtype,
                             device or self.flat.device)
        for table in self.tables:
            table.attach(attached)
        # 0. Start from the servers' values: worker 0 seeds them (fp32), everyone pulls.
        #    Resumed jobs start from the checkpoint's values; a restarted worker joins.
        if is_first and not start.restored and not start.incarnation:
            client.init_params(initial)
        #: The last clock of the run, when known: a restarted worker never joins past it.
        self.max_clock: Optional[int] = None
        self._incarnation = start.incarnation
        if not start.incarnation:
            self._copy_in(client.pull(clock=start.clock))
        self._ckpt_flag = self._checkpoint_flag()

    def forward(self, *args, **kwargs):
        self.ensure_joined()
        # No context to enter and leave where nothing needs one (no autocast, no
        # profiling): each is a few Python calls a step (benchmarks/profiler_overhead.py).
        prof = self.profiler
        start = time.time_ns() if prof.enabled else 0
        try:
            if self.policy.autocast_dtype is None:
                return self.module(*args, **kwargs)
            with self.autocast():
                return self.module(*args, **kwargs)
        finally:
            if start:  # a forward without gradients is an evaluation, not the step's compute
                name, cat = EVAL_SPAN if not torch.is_grad_enabled() else ("forward", "compute")
                prof.add(name, cat, start + prof.offset_ns, time.time_ns() - start)

    def autocast(self):
        return self.policy.autocast(self.flat.device.type)

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the loss scale (1 unless the policy scales): backward this."""
        scaled = loss * self.scaler.scale if self.scaler.enabled else loss
        if self.profiler.enabled and scaled.requires_grad:
            # Backward follows at once (``scale_loss(loss).backward()``): it starts now. (A
            # tensor hook on the loss said the same a few microseconds later, at the cost
            # of an extra autograd node and a Python call every step: the profiler's
            # largest per-step cost, benchmarks/profiler_overhead.py.)
            self._marks.backward_start_ns = time.time_ns()
        return scaled

    # --------------------------------------------------------------- phase 2

    def _make_hook(self, index: int):
        p, off, n = self._views[index]

        def hook(param: torch.Tensor) -> None:
            view = self.flat_grad[off:off + n]
            if param.grad is not None and param.grad.data_ptr() != view.data_ptr():
                # Someone replaced .grad (zero_grad(set_to_none=True)): fold it back.
                view.copy_(param.grad.reshape(-1))
                param.grad = view.view_as(param)
            self._fired.setdefault(index, len(self._fired))
            if self.profiler.enabled:
                marks = self._marks
                marks.last_hook_ns = time.time_ns()
                if not marks.backward_start_ns:
                    marks.backward_start_ns = marks.last_hook_ns
            if not self._sync:
                return  # no_sync(): accumulate; the next synced backward pushes the sum
            if self._defer and not self.tables:
                if index in self._counted:
                    # A second backward without no_sync(): nothing has left yet, the pushes
                    # wait for phase 3 and take the sum (and so every later step's).
                    self._backwards_again = True
                    self._sent_version = self.flat_grad._version
                    return
                self._counted.add(index)
            for pid in self._parts_of_param[index]:
                if pid in self._handles:
                    raise UsageError(
                        f"worker {self.client.worker}: a second backward() before step() would "
                        f"push parameter '{self._names[index]}' twice: to accumulate gradients, "
                        f"backward every micro-batch of every step before step() (from the "
                        f"first step on: then all leave at step()), or run all but the last "
                        f"inside `with model.no_sync():`"
                        + (" (sharded tables push their rows every backward)" if self.tables
                           else ""))
                self._remaining[pid] -= 1
                if self._remaining[pid] == 0:
                    self._finished_parts += 1
                    self._push(pid)
            # Gradients left during backward: any in-place change of them from here to
            # phase 3 bumps the flat buffer's version counter (views share it).
            self._sent_version = self.flat_grad._version
        return hook

    def _push(self, pid: int) -> None:
        info = self.client.parts[pid]
        if pid in self._buffer_parts:  # values, not gradients: fp32, unscaled, never held
            at = self._buffers_at
            self._handles[pid] = self.client.push(
                pid, self.flat_buffers[info.start - at:info.stop - at], self.clock,
                checkpoint=self._ckpt_flag, dtype="float32")
            return
        if not self._handles:  # the step's first push
            self._step_hparams = self.hparams_source() if self.is_first else None
            if self.profiler.enabled:
                self._marks.first_push_ns = time.time_ns()
        if self._defer or (self.two_phase and not self._hold and self._keeps_judged(pid)):
            self._handles[pid] = _KEPT  # sent in phase 3 (_send_kept)
            return
        self._send_grad(pid)

    def _keeps_judged(self, pid: int) -> bool:
        """Whether a judged push of ``pid`` waits for the end of backward (and carries the
        word) rather than leaving pending: on a CPU worker whose server shares its memory
        (same host), where there is no transfer to hide behind backward and the push's
        CPU competes with it (leaving early ran 0.92x the samples/s in six 400-step MNIST
        pairs on 2 cores: docs/architecture.md, "Cluster-wide skipping")."""
        return self.flat_grad.device.type == "cpu" and \
            self.client.servers[self.client.owner[pid]].shares_memory

    def _wire_grad(self, pid: int) -> tuple[torch.Tensor, str]:
        """Partition ``pid``'s gradient as it goes on the wire, and under loss scaling the
        first parameter (in backward order) whose cast overflowed ("" for none)."""
        info = self.client.parts[pid]
        grad = self.flat_grad[info.start:info.stop]
        nonfinite = ""
        if self.scaler.enabled:
            grad = grad.to(self._wire)  # overflow happens here, at the cast
            if not all_finite(grad):
                nonfinite = self._first_nonfinite(pid, grad)
        return grad, nonfinite

    def _unused(self, pid: int) -> Optional[list[int]]:
        """With ``find_unused``: partition ``pid``'s element ranges of the parameters this
        step gave no gradient (their hooks never fired), flat ``lo, hi`` pairs; else None."""
        if not self._find_unused:
            return None
        fired = self._fired
        ranges = [x for i, lo, hi in self._ranges_of_part[pid] if i not in fired
                  for x in (lo, hi)]
        return ranges or None

    def _send_grad(self, pid: int) -> None:
        grad, nonfinite = self._wire_grad(pid)
        hold = self._hold
        judged = pending = False
        if self.two_phase and not hold:  # judged: the word on the whole gradient goes too
            judged = True
            self._note_overflow(nonfinite)
            # Backward is not done: the word follows. The last partition backward finishes
            # carries it, and so does each push of phase 3.
            pending = self._rest is None and \
                self._finished_parts < len(self._backward_parts)
            if pending:
                self._word_due.add(pid)
            else:
                nonfinite = self._overflow
                self._word_sent.add(self.client.owner[pid])
        sent_from = time.time_ns() if self.profiler.enabled else 0
        self._handles[pid] = self.client.push(
            pid, grad, self.clock, scale=self.scaler.scale, nonfinite=nonfinite,
            checkpoint=self._ckpt_flag, hold=hold, hparams=self._step_hparams,
            norm_type=self._norm_type if self._hold else 0.0, judged=judged, pending=pending,
            unused=self._unused(pid))
        if self.client.batch_bytes:
            self._flush_if_last(pid)
        if sent_from:
            self._marks.send_ns += time.time_ns() - sent_from

    def _flush_if_last(self, pid: int) -> None:
        """Batched pushes (``[ps] batch_kib``): when ``pid`` was its server's last partition
        of this step, the batch of small partitions waiting for that server leaves now,
        during backward, as an unbatched push would, not at the first wait in step(). (A
        half-width wire halves every partition, and a 414 KB fp32 partition then waited
        for step() in bf16: the round trip no longer overlapped the rest of backward.)"""
        owner = self.client.owner
        left = self._left_of_server
        if left is None:
            left = self._left_of_server = {}
            for p in self._backward_parts:
                left[owner[p]] = left.get(owner[p], 0) + 1
        server = owner.get(pid)
        n = left.get(server, 0) - 1  # (a partition moved to it by a failover: not counted)
        left[server] = n
        if n == 0:
            self.client.flush(server)

    # --------------------------------------------------------------- phase 3

    def unscale_(self) -> bool:
        """Push what backward did not, and with loss scaling take every reply: True
        when every worker's gradients were finite (the same answer everywhere).

        Without loss scaling there is nothing to check: it returns True at once and
        :meth:`step` waits for the new values.
        """
        if not self.scaler.enabled:
            return True
        if self._finite is None:
            self._finite = self._collect()
        return self._finite

    def _send_rest(self) -> list:
        """Phase 3 begins: push what backward did not (and the tables' rows); their handles."""
        if self._rest is not None:
            return self._rest
        thawed = next((n for n, p in self._frozen if p.requires_grad), None)
        if thawed is not None:
            raise UsageError(
                f"worker {self.client.worker}: parameter {thawed!r} was frozen "
                f"(requires_grad=False) at tessera.distribute and now requires grad, but the "
                f"servers hold only the parameters trainable then, so it would never train: "
                f"leave it trainable at tessera.distribute (with find_unused_parameters=True) "
                f"and freeze it just after; the servers leave it alone until you unfreeze it, "
                f"as torch does")
        if self._versions() != self._param_version:
            raise UsageError(
                f"worker {self.client.worker}: the model's parameters were changed in place "
                f"after tessera.distribute (module.load_state_dict, an init or a clamp under "
                f"torch.no_grad()?), but the servers hold the parameters and each step's values "
                f"overwrite the change: load "
                f"or initialise them before tessera.distribute (worker 0's values seed the "
                f"servers), resume with --resume, or use --mode allreduce")
        if self._sent_version is not None and self.flat_grad._version != self._sent_version:
            raise UsageError(
                f"worker {self.client.worker}: the gradients were changed after backward() "
                f"(torch.nn.utils.clip_grad_norm_ or another in-place change of .grad?), but "
                f"they left for the servers during backward, so the change would be lost: clip "
                f"with model.clip_grad_norm_(max_norm) (--mode sync), or change gradients in a "
                f"hook (param.register_hook) or in --mode allreduce")
        self._rest = push_tables(self.tables, self.clock,
                                 self.scaler.scale if self.scaler.enabled else 1.0)
        if self._next_lookups is not None:  # prefetch(): the next clock's rows, now
            send_named(self, self.clock + 1)
        unpushed = [pid for pid, left in self._remaining.items()
                    if left > 0 and pid not in self._handles]
        if unpushed and not self._find_unused:
            self._refuse_frozen_since()
        for pid in unpushed:
            self._push(pid)
        self._send_kept()
        if self._word_due:  # judged pushes left during backward: the word follows them
            owner = self.client.owner  # (to the servers no push carried it to)
            for server in sorted({owner[p] for p in self._word_due} - self._word_sent):
                self.client.word(server, self.clock, self._overflow)
        return self._rest

    def _refuse_frozen_since(self) -> None:
        """Some partitions' parameters had no gradient this step. Without
        ``find_unused_parameters`` they are pushed zeros (the README's documented cost of a
        branch not taken); but a parameter frozen since ``tessera.distribute``
        (``requires_grad_(False)`` mid-training) means to stay still, and a zero step would
        move it (weight decay, momentum): refused in one line, as DDP stops there too."""
        frozen = next((n for n, p in zip(self._names, self._params) if not p.requires_grad),
                      None)
        if frozen is not None:
            raise UsageError(
                f"worker {self.client.worker}: parameter {frozen!r} was trainable at "
                f"tessera.distribute and is frozen now (requires_grad=False), but without "
                f"find_unused_parameters the servers would step it with a zero gradient (weight "
                f"decay and momentum would still move it): pass find_unused_parameters=True to "
                f"tessera.distribute (DDP's flag), and the servers leave it alone as torch does")

    def _send_kept(self) -> None:
        """Phase 3: the pushes backward kept (:data:`_KEPT`), sent now.

        - Accumulation without ``no_sync()`` (and every first step, which finds out): the
          gradients summed over the step's backward calls, as they are now.
        - Loss scaling in sync mode, a deferred step not held (*judged*): the whole
          gradient is tested before any of it leaves, and each push carries this worker's
          word on it (``Push.judged``): the first parameter that overflowed, or "". (A step
          not deferred sends its judged pushes during backward, pending, and the word
          after them: :meth:`_send_grad`, :meth:`_send_rest`.) Every server gets every
          worker's word, so each applies or skips the clock at once, all alike, and the
          replies carry the values: one round trip, as fp32's, where a held clock takes
          verdicts, an exchange among the servers and a pull (docs/architecture.md,
          "Cluster-wide skipping")."""
        kept = [pid for pid, h in self._handles.items() if h is _KEPT]
        if not kept:
            return
        if self.profiler.enabled:
            self._marks.first_push_ns = time.time_ns()
        if not (self.two_phase and not self._hold):
            for pid in kept:
                self._send_grad(pid)
            return
        grads = []
        for pid in kept:  # the whole gradient tested before any of it leaves
            grad, nonfinite = self._wire_grad(pid)
            grads.append(grad)
            self._note_overflow(nonfinite)
        for pid, grad in zip(kept, grads):
            self._word_sent.add(self.client.owner[pid])
            self._handles[pid] = self.client.push(
                pid, grad, self.clock, scale=self.scaler.scale, nonfinite=self._overflow,
                checkpoint=self._ckpt_flag, judged=True, hparams=self._step_hparams,
                unused=self._unused(pid))

    def _note_overflow(self, nonfinite: str) -> None:
        """A judged step's word: the first parameter that overflowed, in backward order
        (as verdicts name it), over the partitions tested so far."""
        if nonfinite and (not self._overflow or self._backward_rank(nonfinite)
                          < self._backward_rank(self._overflow)):
            self._overflow = nonfinite

    def _pull_agreed(self, clip: float) -> None:
        """Servers that agree: send the pull of the next clock now, with what they need to
        decide this held clock (``clip``: the threshold, 0 for none), before any verdict."""
        if self.agree and self._pulls is None and self._hold:
            self._send_rest()
            held = sum(1 for pid in self._handles if pid not in self._buffer_parts)
            self._pulls = self.client.pull(clock=self.clock + 1, agree=held, clip=clip,
                                           norm_type=self._norm_type)

    def _collect(self) -> bool:
        """Phase 3: push the rest, take every reply; whether the gradients were finite."""
        row_handles = self._send_rest()
        self._wait_t0 = time.perf_counter()
        self._wait_start_ns = time.time_ns()  # unaligned, as the StepMarks
        # Each reply's values are copied into the model as soon as it is taken, and
        # its receive buffer dropped: holding a whole model of buffers until the end
        # of the step cost ~9,000 page faults per 100 MB (benchmarks/ps_roundtrip).
        for h in self._handles.values():
            reply = h.wait()
            if isinstance(reply, Verdict):
                self._verdicts.append(reply)
            else:
                self._copy_s += self._consume(h, reply)
        for h in row_handles:
            h.wait()
        if self._hold:
            return all(v.finite for v in self._verdicts)
        # sync: every reply says skipped or none does (a judged clock, or one a held push
        # shared); async: each push was applied or refused on its own
        return not any(h.skipped for h in self._handles.values())

    def _prefetch_clock(self) -> Optional[int]:
        """The clock a prefetch named now pulls for; None: send it with this step's
        pushes (a forward ran and the pushes have not left)."""
        if self._rest is not None:  # the rest was pushed already (unscale_(), a clip's pull)
            return self.clock + 1
        return None if any(t._pending for t in self.tables) else self.clock

    def step(self) -> bool:
        """Finish the step: push the rest (unless :meth:`unscale_` did), send the
        cluster's decision with the pull of the next clock (fp16, sync), take the
        new values, advance the clock and decide whether to ask for a checkpoint.

        Returns False when the step was skipped (gradients overflowed somewhere).
        """
        self._pull_agreed(0.0)  # (sent already where the script clipped)
        applied = self._collect() if self._finite is None else self._finite
        prof = self.profiler
        t0, wait_start, verdicts = self._wait_t0, self._wait_start_ns, self._verdicts
        if self._hold:  # the decision travels with the next clock's pull
            # (or the servers took it, and the pull left with the pushes: agree)
            pulls = self._pulls if self._pulls is not None else self.client.pull(
                clock=self.clock + 1, commit=applied, coef=self._coef)
            for h in pulls:
                self._copy_s += self._consume(h, h.wait())
            if not applied and self.two_phase:
                self._report_overflow([o for v in verdicts for o in v.overflows]
                                      + self.client.take_overflows(),
                                      [pid for v in verdicts if not v.finite
                                       for pid in v.partitions])
            elif not applied:
                self.log(f"worker {self.client.worker}: the averaged gradient of step "
                         f"{self.clock + 1} is not finite; the step was skipped on every worker")
        elif not applied and self.two_phase:  # judged: the replies named the overflows
            self._report_overflow(self.client.take_overflows(), [])
        elif not applied:  # a clock a restarted worker's held step shared, skipped
            self.client.take_overflows()
        copy_s = self._copy_s
        waited = time.perf_counter() - t0 - copy_s
        self.comm_wait_s += waited
        copy_start = time.time_ns()
        self.client.wait_lent()  # the servers have let go of the gradients lent to them
        with torch.no_grad():
            self.flat_grad.zero_()
        if prof.enabled:  # the step's spans, on the aligned clock (+ offset)
            backward, send, wait, copy, flight = prof.kinds(STEP_SPANS)
            marks, off, put = self._marks, prof.offset_ns, prof.put
            if marks.backward_start_ns:
                during = max(0, marks.last_hook_ns - marks.backward_start_ns)
                sent = min(marks.send_ns, during)  # pushes sent from backward's hooks
                put(backward, marks.backward_start_ns + off, during - sent)
                put(send, marks.backward_start_ns + off, sent)
            marks.backward_start_ns = marks.send_ns = 0
            put(wait, wait_start + off, int(waited * 1e9), {"clock": self.clock})
            # The copying done while waiting (copy_s, out of ``waited``) is put before the
            # rest: the span ends now, right after the wait's, not copy_s after the step.
            copied_ns = int(copy_s * 1e9)
            put(copy, copy_start - copied_ns + off, time.time_ns() - copy_start + copied_ns)
            # Communication in flight: first push sent .. last reply sent by a server.
            first = marks.first_push_ns + off
            end = max(self.client.last_reply_ns, wait_start + off)
            put(flight, first, max(0, end - first),
                {"clock": self.clock, "bytes": self._pushed_bytes()})
        self.scaler.update(found_inf=not applied)
        if not applied:
            self.skipped_steps += 1
        self._handles.clear()
        self._fired.clear()
        self._verdicts = []
        self._pulls, self._rest, self._sent_version = None, None, None
        self._overflow = ""
        self._word_due.clear()
        self._word_sent.clear()
        if self._backwards_again and not self._accumulates:
            self._accumulates = True
            self.log(f"worker {self.client.worker}: backward() ran more than once before "
                     f"optimizer.step() without no_sync(): the gradients accumulate here and "
                     f"leave at step() (run all but the last micro-batch's backward inside "
                     f"`with model.no_sync():` to send the last one's during backward)")
        self._defer, self._backwards_again = self._accumulates, False
        self._counted.clear()
        self._finite, self._copy_s = None, 0.0
        self._hold = self.mode == "sync" and self._clipped
        self._clipped, self._coef = False, 1.0
        self._remaining = dict(self._needed)
        self._finished_parts = 0
        self._left_of_server = None
        self.clock += 1
        self.on_clock(self.clock)
        self._ckpt_flag = self._checkpoint_flag()
        return applied

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002 - grads are views
        if self._handles:  # a backward pushed, and no step() took its replies
            self._skip_pushed_step()
        self.client.wait_lent()
        self.flat_grad.zero_()

    def _skip_pushed_step(self) -> None:
        """``zero_grad()`` between backward and ``step()``: a script skipping this step.

        The gradients left during backward, so the skip holds only where the servers skip
        too: a step already known not finite (``clip_grad_norm_``'s norm in sync mode, or
        fp16's verdicts), which every worker skips. That one is finished here (its
        replies taken, the clock advanced, nothing applied); any other is refused before
        a second backward would push on top of it."""
        if self._finite is False:
            self.step()
            return
        # (In a deferred step, a job's first or an accumulating script's, nothing has left
        # yet, but the servers' clock waits for this worker's gradients all the same.)
        where = ("are due at the servers, whose step waits for every worker's"
                 if all(h is _KEPT for h in self._handles.values())
                 else "left for the servers during backward, which apply them")
        raise UsageError(
            f"worker {self.client.worker}: optimizer.zero_grad() after backward() without "
            f"optimizer.step() would skip step {self.clock + 1}, but its gradients {where}: "
            f"skip before backward (a bad "
            f"loss: `if not torch.isfinite(loss): continue`), let the servers skip a gradient "
            f"that is not finite (model.clip_grad_norm_ in --mode sync, or --precision fp16: "
            f"then zero_grad() skips it), or use --mode allreduce")

    @contextlib.contextmanager
    def no_sync(self):
        """Backward inside accumulates gradients locally; nothing is pushed (DDP's name)."""
        if self.tables:
            raise self.refuse("no_sync()", "sharded tables push their rows' gradients every step")
        was, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = was

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip by the norm of the gradient the servers will apply (sync: the workers'
        average, as one process with batch W·b); returns that norm (FSDP's name)."""
        if self.mode != "sync":
            raise self.refuse("clip_grad_norm_", "each push is applied on arrival, so there is "
                              "no global gradient to clip; use --mode sync or allreduce")
        if self.tables:
            raise self.refuse("clip_grad_norm_", "the rows' gradients of sharded tables are "
                              "not part of the norm")
        norm_type = float(norm_type)
        if not self._hold or (self._handles and norm_type != self._norm_type):
            raise UsageError(
                f"worker {self.client.worker}: clip_grad_norm_(norm_type={norm_type:g}) at step "
                f"{self.clock + 1}, but this step's gradients left without a norm: the servers "
                f"keep a step's gradient for clipping when the step before clipped (and the "
                f"first step, for the 2-norm), so call it on every step with the same norm_type")
        max_norm = float(max_norm)
        if not max_norm > 0:
            raise UsageError(f"worker {self.client.worker}: clip_grad_norm_(max_norm={max_norm:g}) "
                             f"needs a max_norm > 0")
        self._norm_type = norm_type
        self._pull_agreed(max_norm if max_norm < float("inf") else 0.0)
        finite = self.unscale_() if self.scaler.enabled else self._collect()
        self._finite = finite
        # The servers' formula (tessera.ps.agreement.decide), on the same verdicts.
        _, self._coef, total = decide({v.partitions[0]: (v.finite, v.norm) for v in self._verdicts
                                       if v.partitions[0] not in self._buffer_parts},
                                      max_norm, norm_type)
        self._clipped = True
        return torch.tensor(total)

    def final_values(self) -> None:
        """async/ssp: other workers may have pushed since this one's last step: take the
        servers' current values (sync: the last step's values are the final ones)."""
        if self.mode != "sync":
            self._copy_in(self.client.pull(clock=0))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        raise self.refuse("load_state_dict()", "the servers hold the parameters; resume a "
                          "job from its checkpoint with --resume")

    def _pushed_bytes(self) -> int:
        """Bytes this step's pushes carried (profiling: the "in flight" span's)."""
        parts = self.client.parts
        return sum(parts[p].stop - parts[p].start for p in self._handles) * self._wire.itemsize

    def _consume(self, handle: Handle, values: dict) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            self._write(values)
        handle.release()
        return time.perf_counter() - t0

    def _copy_in(self, handles: list[Handle]) -> None:
        for h in handles:
            self._consume(h, h.wait())

    def _write(self, values: dict[int, torch.Tensor]) -> None:
        at = self._buffers_at
        for pid, tensor in values.items():
            info = self.client.parts[pid]
            if info.start >= at:
                self.flat_buffers[info.start - at:info.stop - at].copy_(tensor)
            else:
                self.flat[info.start:info.stop].copy_(tensor)

    def _versions(self) -> int:
        return sum(p._version for p in self._params)
