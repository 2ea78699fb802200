"""A dense partition on its server: fp32 master, update rule, and the held sum of a clock.

The flat parameter vector is cut into partitions (:mod:`tessera.ps.sharding`); a
server holds some of them. Each partition is a :class:`~tessera.ps.consistency.Clocked`
unit with its own clock, so a slow partition never holds up another one's update
(ps-lite and MXNet's kvstore key their consistency per key the same way).

In sync mode the pushes of one clock are summed into ``accum`` as they arrive, in
fp32 whatever the wire dtype (summing fp16 frames in fp16 would lose the small
gradients that loss scaling exists to keep), and unscaled by each push's loss scale
on the way in. A clock that is applied at once is summed already divided by the
workers: each push goes in as ``grad * (unscale / W)`` (``torch.mul(..., out=)``
into one fp32 buffer per partition, reused every clock, then ``add_(grad,
alpha=unscale / W)``, which reads a bf16/fp16 frame without a cast copy), so the
complete clock *is* the mean and no pass divides it. With one worker, an fp32 wire
and no loss scale the received frame itself is the mean: no pass at all. Under loss
scaling (or clipping) the clock is held for the cluster's decision, the verdict needs
the plain sum, and its mean is ``accum / pushes`` as before; the partition remembers
its verdict and who is waiting for it.

Replies in the wire dtype of a half-width wire, and every reply of async/ssp mode,
need a copy of the master that ZeroMQ sends from later: :class:`ReplyBuffers` keeps
a few per partition and reuses one once its ``zmq.MessageTracker`` says ZeroMQ is
done with it; a buffer holding the current values (same rule, same step count) is
sent again as it is. Sync replies (one phase) need none of that: the master changes
only once every worker has received its reply (server.py, ``_frame``), so the fp32
reply is the master itself and a half-width one is one buffer cast once a clock
(:meth:`ReplyBuffers.master`, :meth:`ReplyBuffers.settled`), each sent as one frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import zmq

from tessera.ps import kernels
from tessera.ps.consistency import Clocked, Waiter
from tessera.ps.optim import UpdateRule
from tessera.transport import wire
from tessera.transport.frames import tensor_to_frame, torch_dtype

#: Reply buffers kept per partition and wire dtype; past that, a reply gets a fresh copy.
REPLY_BUFFERS = 4
#: Below this many bytes pyzmq copies a frame when it is made (``zmq.COPY_THRESHOLD``),
#: so ZeroMQ never reads the buffer later: no tracker is needed to reuse it.
_COPIED_BELOW = zmq.COPY_THRESHOLD


class ReplyBuffers:
    """Reused send buffers of one partition's replies (see the module docstring)."""

    __slots__ = ("_all", "_view", "_master", "_settled")

    def __init__(self) -> None:
        #: [tensor, rule, steps, trackers] per buffer.
        self._all: list[list] = []
        #: (master, master as numpy) of the small fp32 replies: the view made once.
        self._view: Optional[tuple] = None
        #: (master, what its replies send): sync's replies that are the master.
        self._master: Optional[tuple] = None
        #: Sync's half-width replies: {dtype: [tensor, rule, steps, zmq.Frame]}, one
        #: buffer per wire dtype, sent as one frame made once (:meth:`settled`).
        self._settled: dict = {}

    def master(self, master: torch.Tensor):
        """``master`` (fp32, updated in place) as a frame ZeroMQ sends without a copy,
        made once and sent again for every reply: pyzmq sends a ``zmq.Frame`` by sharing
        its message (a reference count), where a buffer sent as it is becomes a new
        zero-copy frame each time, with an entry in pyzmq's garbage collector and a wake
        of its thread once ZeroMQ is done (benchmarks/HISTORY.md, "The update's own
        cost"). The caller's argument why ZeroMQ has sent the bytes before the master
        changes is unchanged (server.py, ``_frame``). Below pyzmq's copy size: the view,
        made once too, which ZeroMQ copies as it is sent (the values of that moment)."""
        cached = self._master
        if cached is None or cached[0] is not master:
            view = tensor_to_frame(master)
            cached = self._master = (master, view if len(view) < _COPIED_BELOW
                                     else zmq.Frame(view, copy=False))
        return cached[1]

    def settled(self, rule, dtype: str):
        """Sync's reply in a half-width ``dtype``: one buffer per dtype holding
        ``rule.master`` cast at its current step, sent as one ``zmq.Frame`` made once
        over it (as :meth:`master`: no collector entry, no wake of pyzmq's collector
        thread per reply; with trackers that was one per reply, W per clock). The buffer
        is written in place when the master has changed, which the caller's argument
        allows: a sync master changes only once every worker has received its previous
        reply (server.py, ``_frame``), so ZeroMQ is done with the bytes. Below pyzmq's
        copy size: :meth:`frame`'s copy."""
        master, kind = rule.master, torch_dtype(dtype)
        if master.numel() * kind.itemsize < _COPIED_BELOW:
            return self.frame(rule, dtype)
        entry = self._settled_entry(rule, kind)
        if entry[1] is not rule or entry[2] != rule.steps:
            entry[1] = None
            entry[0].copy_(master)
            entry[1], entry[2] = rule, rule.steps
        return entry[3]

    def _settled_entry(self, rule, kind: torch.dtype) -> list:
        """:meth:`settled`'s ``[tensor, rule, steps, zmq.Frame]`` for ``kind``. A new rule
        (a restore, a partition moved in) gets a new buffer: the clock argument is about
        one rule's steps, and the old frame may still be in flight."""
        entry = self._settled.get(kind)
        if entry is None or entry[0].numel() != rule.master.numel() or (
                entry[1] is not None and entry[1] is not rule):
            buf = torch.empty(rule.master.numel(), dtype=kind)
            entry = self._settled[kind] = [buf, None, 0, zmq.Frame(tensor_to_frame(buf),
                                                                   copy=False)]
        return entry

    def frame(self, rule, dtype: str):
        """A frame holding ``rule.master`` in ``dtype``: a reused buffer, never one that
        ZeroMQ may still be reading (its trackers are all done)."""
        master, kind = rule.master, torch_dtype(dtype)
        if master.numel() * kind.itemsize < _COPIED_BELOW:
            # pyzmq copies a small frame when it is made: no buffer to keep or track.
            if kind == torch.float32:  # a 1-d contiguous fp32 view: its bytes
                view = self._view
                if view is None or view[0] is not master:
                    view = self._view = (master, master.numpy())
                return zmq.Frame(view[1])
            return zmq.Frame(tensor_to_frame(master.to(kind)))
        entry = None
        for e in self._all:
            if e[1] is rule and e[2] == rule.steps and e[0].dtype == kind:  # these values
                entry = e
                break
        if entry is None:
            entry = self._free(master.numel(), kind)
            if entry is None:  # all in flight: a one-off copy
                return tensor_to_frame(master.to(kind, copy=True))
            entry[0].copy_(master)
            entry[1], entry[2] = rule, rule.steps
        view = tensor_to_frame(entry[0])
        frame = zmq.Frame(view, track=True, copy=False)
        entry[3].append(frame.tracker)
        return frame

    def _free(self, numel: int, kind: torch.dtype) -> Optional[list]:
        """A buffer of ``kind`` that ZeroMQ is done with (made if fewer than
        :data:`REPLY_BUFFERS` exist), or None when every one is in flight."""
        for e in self._all:
            e[3] = [t for t in e[3] if not t.done]
            if not e[3] and e[0].dtype == kind:
                return e
        if len(self._all) >= REPLY_BUFFERS:
            return None
        entry = [torch.empty(numel, dtype=kind), None, 0, []]
        self._all.append(entry)
        return entry

    def update_into(self, rule, kind: torch.dtype, step, settled: bool = False) -> bool:
        """Run ``step(buffer)``, an update of ``rule.master`` that writes the new values
        in ``kind`` into ``buffer`` as it makes them (a fused kernel); the buffer then
        answers :meth:`frame` (``settled``: :meth:`settled`, sync's one buffer) for these
        values without a cast. False, with nothing run, when no buffer is free or the
        partition is below the size ZeroMQ copies."""
        master = rule.master
        if master.numel() * kind.itemsize < _COPIED_BELOW:
            return False
        entry = self._settled_entry(rule, kind) if settled else self._free(master.numel(), kind)
        if entry is None:
            return False
        entry[1] = None  # not the old values any more, whatever happens in step
        step(entry[0])
        entry[1], entry[2] = rule, rule.steps
        return True


@dataclass(eq=False, kw_only=True)
class PartitionState(Clocked):
    info: wire.PartitionInfo
    rule: Optional[UpdateRule] = None
    #: sync: the sum of the current clock's pushes (fp32, unscaled).
    accum: Optional[torch.Tensor] = None
    overflows: list[wire.Overflow] = field(default_factory=list)
    #: Aligned arrival time of each worker's push for the current clock (profiling).
    arrivals: dict[int, int] = field(default_factory=dict)
    #: Two-phase: the pushes answered with the verdict on clock ``clock``'s sum.
    verdict_waiters: list[tuple[bytes, int]] = field(default_factory=list)
    #: Last push sequence number applied, per worker (a retried push is not applied again).
    last_seq: dict[int, int] = field(default_factory=dict)
    #: Worker pushes folded into applied updates (the "nothing lost" counter).
    applied_pushes: int = 0
    #: The current clock is held for a verdict (loss scaling, or a worker clipping).
    held: bool = False
    #: > 0: the verdict carries this norm of the mean gradient (clipping).
    norm_type: float = 0.0
    #: Hyperparameters worker 0 sent for the next update (None: unchanged).
    hparams: Optional[list] = None
    #: What ``accum`` was divided by on the way in: the workers (a clock applied at
    #: once) or 1 (a held clock: the verdict needs the sum).
    divided_by: int = 1
    #: The fp32 buffer ``accum`` lives in, reused every clock (and async's scaled grad).
    scratch: Optional[torch.Tensor] = None
    #: ``scratch`` as a numpy array (the same memory), made once: async's small fp32
    #: pushes are scaled into it by numpy (server.py, ``_scaled32``) where the scale
    #: cannot go into plain SGD's learning rate (``_folds``).
    scratch_np: Optional[np.ndarray] = None
    replies: ReplyBuffers = field(default_factory=ReplyBuffers)
    #: sync: the wire dtype of the current clock's pushes (its replies go out in it).
    wire_dtype: str = "float32"
    #: Sync, judged pushes (``Push.judged``): the clock the partition reached by skipping
    #: a clock some worker's gradient overflowed in (-1: none), and who overflowed where;
    #: the replies at that clock say so.
    skipped_clock: int = -1
    skip_overflows: list[wire.Overflow] = field(default_factory=list)
    #: Sync: the element ranges every push of the current clock named unused
    #: (``Push.unused``; flat ``lo, hi`` pairs), which its update leaves alone.
    unused: list[int] = field(default_factory=list)
    #: Sync, judged pushes that left during backward (``Push.pending``): the workers
    #: whose push of the current clock is summed here but whose word on their whole
    #: gradient has not come (a ``Word``, or a judged push that is not pending); the
    #: clock completes once it is empty.
    awaiting: set[int] = field(default_factory=set)

    @property
    def ready(self) -> bool:
        return self.rule is not None

    def named(self) -> tuple[str, str]:
        return "", f"partition {self.info.id}"

    @property
    def numel(self) -> int:
        return self.info.stop - self.info.start

    def buffer(self) -> torch.Tensor:
        """The partition's fp32 scratch buffer (allocated once)."""
        if self.scratch is None:
            self.scratch = torch.empty(self.numel, dtype=torch.float32)
        return self.scratch

    def buffer_np(self) -> np.ndarray:
        """:meth:`buffer` as a numpy array over the same memory."""
        if self.scratch_np is None:
            self.scratch_np = self.buffer().numpy()
        return self.scratch_np

    def add(self, grad: torch.Tensor, unscale: float, worker: int, nonfinite: str,
            workers: int = 1, direct: bool = False, wire_dtype: str = "float32",
            unused: Optional[list[int]] = None) -> None:
        """Sync: fold one worker's push into the clock's sum, divided by ``workers``
        (the clock's mean comes out directly) or not (``workers=1``: a held clock).
        ``direct``: the job has one worker and the clock is applied at once, so an
        unscaled frame may be the mean itself (it is only read; a half-width one is cast
        when applied, unless the rule takes it as it is). ``wire_dtype``: the push's, in
        which the clock's replies go out. A clock's sum is divided as its first push chose,
        so that a held push and one that is not may share a clock (a restarted worker's
        first step is held, the others' are not where the script does not clip)."""
        if self.accum is not None:
            workers = self.divided_by
            if self.unused:  # left alone only where no worker used it
                self.unused = intersect(self.unused, unused or [])
        else:
            self.unused = list(unused or [])
        alpha = unscale / workers if workers > 1 else unscale
        self.wire_dtype = wire_dtype
        if self.accum is None:
            self.divided_by = workers
            if direct and alpha == 1.0:
                self.accum = grad  # one worker: the frame is the mean (read, never written)
            elif grad.dtype == torch.float32:
                self.accum = torch.mul(grad, alpha, out=self.buffer())
            elif kernels.ENABLED:  # a half-width frame, widened and scaled in one pass
                self.accum = self.buffer()
                kernels.SCALE_HALF[wire_dtype](
                    self.buffer_np(), kernels.array_of(grad), np.float32(alpha))
            else:  # a half-width frame: cast into the buffer, then scale in fp32
                self.accum = self.buffer().copy_(grad)
                if alpha != 1.0:
                    self.accum.mul_(alpha)
        elif grad.dtype != torch.float32 and kernels.ENABLED and self.accum is self.scratch:
            kernels.ADD_HALF[wire_dtype](
                self.buffer_np(), kernels.array_of(grad), np.float32(alpha))
        else:
            self.accum.add_(grad, alpha=alpha)  # reads bf16/fp16 as fp32, no copy
        self.pushed_by.add(worker)
        if nonfinite:
            self.overflows.append(wire.Overflow(worker=worker, param=nonfinite))

    def take_mean(self) -> tuple[torch.Tensor, int, list[int]]:
        """Sync: the clock's mean gradient (in place), its number of pushes and the ranges
        no push used (:attr:`unused`); the partition is then ready for the next clock's
        pushes. The mean aliases the partition's buffer (or the received frame): apply it
        before the next clock."""
        n = max(1, len(self.pushed_by))
        unused, self.unused = self.unused, []
        grad = self.accum
        if self.divided_by != n:  # a held clock (the sum), or a clock short of workers
            grad = grad.div_(n) if self.divided_by == 1 else grad.mul_(self.divided_by / n)
        self.accum, self.verdict = None, None
        self.held, self.norm_type = False, 0.0
        self.pushed_by.clear()
        self.overflows = []
        return grad, n, unused


def intersect(a: list[int], b: list[int]) -> list[int]:
    """The intersection of two sorted lists of disjoint ranges (flat ``lo, hi`` pairs)."""
    out: list[int] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i], b[j]), min(a[i + 1], b[j + 1])
        if lo < hi:
            out += (lo, hi)
        if a[i + 1] < b[j + 1]:
            i += 2
        else:
            j += 2
    return out


@dataclass(eq=False)
class Reply(Waiter):
    """A request answered with Params once its partitions are at ``clock``."""

    peer: bytes = b""
    req: int = 0
    dtype: str = "float32"
    #: ssp: the clock the worker will compute once answered (for the staleness record).
    run_clock: int = -1
