"""All-reduce data parallelism, alone (``--mode allreduce``) or with embedding tables on
the parameter servers (``--mode hybrid``).

This is the PERSIA design (Lian et al., "PERSIA: An Open, Hybrid System Scaling
Deep Learning-based Recommenders up to 100 Trillion Parameters", KDD 2022): the
dense part of a recommender is small and touched by every sample, so workers
keep a replica each and average its gradients with an all-reduce
(``DistributedDataParallel`` over Gloo on CPU, NCCL on GPU), in lock-step; the
embedding tables are huge and sparse, so they stay sharded on the parameter
servers, updated asynchronously or within a staleness bound.

Phases of one step:

1. Forward: tables pull the batch's rows (within the staleness bound), the
   dense part runs locally.
2. Backward: DDP all-reduces dense gradient buckets while backward runs; the
   rows' gradients land on the pulled rows.
3. ``step()``: row gradients are pushed to the servers (async/ssp), the local
   optimizer steps the dense replica (identical on every worker: same initial
   values, same averaged gradients), and the row pushes are waited for. Async
   tables (``staleness = 0``): the pushes of step t are waited for at the end of
   step t + 1, so the servers apply them while this worker computes (their answer
   is only an Ack). Nothing a later request reads changes: a server takes the
   requests of one worker in the order they were sent (one ZeroMQ connection each,
   and a failover re-sends whatever is outstanding in that order), so a pull or a
   dump sent after a push is answered after it is applied. A checkpoint and
   :meth:`HybridParallel.wait_pushes` (``tessera.finish``) wait for them first.
   Ssp tables wait at once: there the Ack is what holds a worker within the bound.
   So do tables with ``--replication 2``: after a failover an outstanding push that
   the backup refused (not promoted yet) is sent again only when it is waited for, a
   step later, and the next step's push, sent straight to the new owner, can get there
   first; the owner's exactly-once check, the last sequence number applied per worker,
   then answers the older one as a duplicate without applying it
   (tests/test_table_faults.py lost two acknowledged pushes so, two runs in three).

Precision: bf16/fp16 policies all-reduce in half width, on Gloo too
(:mod:`tessera.parallel.halfwidth`). Under fp16 loss scaling the gradients are unscaled after
the all-reduce and a found-inf flag is all-reduced (MAX), so every worker skips
the same steps and its scaler moves the same way.
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional, Union

import torch
from torch import nn

from tessera.amp.finite import all_finite
from tessera.config.schema import OptimizerConfig
from tessera.errors import UsageError
from tessera.parallel.dense_checkpoint import DenseCheckpoints, dense_state, load_dense, read_dense
from tessera.parallel.embedding import push_tables
from tessera.parallel.prefetch import send_named
from tessera.parallel.protocol import Amp, DistributedModel, Hooks
from tessera.profiler.recorder import EVAL_SPAN
from tessera.ps.client import PSClient
from tessera.ps.optim import torch_optimizer


class HybridParallel(DistributedModel):
    """A dense replica averaged by DDP, tables (if any) on the parameter servers.

    ``no_sync`` and ``clip_grad_norm_`` are DDP's and torch's own in allreduce
    mode; with tables (hybrid mode) they are refused, since rows' gradients are
    pushed every step and are not part of the local norm.
    """

    def __init__(self, module: nn.Module, client: Optional[PSClient], *,
                 optimizer: Union[OptimizerConfig, torch.optim.Optimizer], tables, amp: Optional[Amp] = None,
                 hooks: Hooks = Hooks(), device=None,
                 checkpoints: Optional[DenseCheckpoints] = None, push_ahead: bool = False,
                 find_unused_parameters: bool = False):
        super().__init__()
        from torch.nn.parallel import DistributedDataParallel as DDP

        from tessera.parallel.embedding import _Attached
        amp = amp or Amp()
        self.policy = amp.policy
        self._device_type = next((p.device.type for p in module.parameters()), "cpu")
        params = [p for p in module.parameters() if p.requires_grad]
        import torch.distributed as dist
        world = dist.get_world_size() if dist.is_initialized() else 1
        self._rank = dist.get_rank() if dist.is_initialized() else 0
        # One worker: DDP's all-reduce of a group of one is the identity (x / 1), so the
        # replica trains bit for bit the same without its hooks (about 1 ms of CPU a step
        # on a small MLP). A half-width wire still goes through DDP: its hook rounds.
        half = self.policy.wire_dtype != "float32"
        self.dense = (DDP(module, find_unused_parameters=find_unused_parameters)
                      if params and (world > 1 or half) else module)
        #: DDP waits for every parameter's gradient unless told some may have none.
        self._needs_all_grads = self.dense is not module and not find_unused_parameters
        #: With it, a step leaves a parameter no forward used alone, as torch does: its
        #: gradient is None after each step (DDP keeps a globally unused one None).
        self._grads_to_none = find_unused_parameters
        if params and half:
            from tessera.parallel.halfwidth import half_width_hook
            self.dense.register_comm_hook(None, half_width_hook(self.policy.wire_dtype))
        itemsize = 4 if self.policy.wire_dtype == "float32" else 2
        # Ring all-reduce: each worker sends (and receives) 2(W-1)/W of the gradient bytes.
        self._allreduce_step_bytes = int(sum(p.numel() for p in params) * itemsize
                                         * 2 * (world - 1) / max(world, 1))
        self.allreduce_bytes = 0
        self._params = params
        self._names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.log = hooks.log
        self.module = module
        self.client = client
        self.profiler = hooks.profiler
        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer  # the script's own, on the replica's parameters
        else:
            self.optimizer = (torch_optimizer(optimizer, params)
                              if params else None)
        self.scaler = amp.scaler
        self.tables = list(tables)
        self.mode = "hybrid" if self.tables else "allreduce"
        self.clock = 0
        self.checkpoints = checkpoints or DenseCheckpoints()
        #: Told the new clock after each step (tessera.api saves sampler positions there).
        self.on_clock = lambda clock: None
        self._asked = False  # the launcher's request was seen (answered once)
        self._finite: Optional[bool] = None  # unscale_()'s answer this step
        #: Async tables: wait for a step's row pushes at the end of the next one.
        self.push_ahead = push_ahead
        self._inflight: list = []  # the handles of the row pushes not waited for yet
        attached = _Attached(client, lambda: self.clock, torch.float32,
                             device or torch.device("cpu"))
        for table in self.tables:
            table.attach(attached)

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scaler.scale if self.scaler.enabled else loss

    def forward(self, *args, **kwargs):
        grads = torch.is_grad_enabled()
        with self.profiler.span(*(("forward", "compute") if grads else EVAL_SPAN)), \
                self.policy.autocast(self._device_type):
            # Evaluation (one worker, no gradients) must not enter DDP's collectives.
            train = self.module.training and grads
            if not (train and self._needs_all_grads):
                return (self.dense if train else self.module)(*args, **kwargs)
            try:
                return self.dense(*args, **kwargs)
            except RuntimeError as exc:  # a step whose unused gradients were zeros, not None
                if "Expected to have finished reduction" not in str(exc):
                    raise
                raise self._unused_error("some parameters", self.clock) from None

    def dense_state(self) -> torch.Tensor:
        """The dense replica, flattened (tests compare it across workers)."""
        params = [p.detach().reshape(-1).float() for p in self.module.parameters()]
        return torch.cat(params) if params else torch.zeros(0)

    def no_sync(self) -> contextlib.AbstractContextManager:
        if self.tables:
            raise self.refuse("no_sync()", "sharded tables push their rows' gradients every step")
        return self.dense.no_sync() if self.dense is not self.module else contextlib.nullcontext()

    def unscale_(self) -> bool:
        """Unscale the averaged gradients (fp16); True when finite on every worker."""
        if self._finite is None:
            self._finite = (self._unscale_and_agree()
                            if self.optimizer is not None and self.scaler.enabled else True)
        return self._finite

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        if self.tables:
            raise self.refuse("clip_grad_norm_", "the rows' gradients of sharded tables are "
                              "not part of the local norm")
        self.unscale_()
        return torch.nn.utils.clip_grad_norm_(self._params, max_norm, norm_type=norm_type)

    def _prefetch_clock(self) -> Optional[int]:
        """The clock a prefetch named now pulls for; None: send it with this step's
        pushes (a forward ran and they have not left)."""
        return None if any(t._pending for t in self.tables) else self.clock

    def _unused_error(self, names: str, step: int) -> UsageError:
        return UsageError(
            f"worker {self._rank}: {names} received no gradient in step {step} (a "
            f"branch not taken, a head not called?), and DDP (--mode {self.mode}) cannot "
            f"average such a step: pass tessera.distribute(model, optimizer, "
            f"find_unused_parameters=True), DDP's flag, or freeze them (requires_grad=False "
            f"before tessera.distribute)")

    def _check_all_grads(self) -> None:
        """Before the step changes anything: DDP without ``find_unused_parameters`` left
        some parameters' gradients unaveraged (their buckets never completed)."""
        missing = [n for n, p in zip(self._names, self._params) if p.grad is None]
        if missing and len(missing) < len(self._params):  # (none at all: no backward ran)
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise self._unused_error(f"parameters {', '.join(missing[:3])}{more}",
                                     self.clock + 1)

    def step(self) -> bool:
        if self._needs_all_grads:
            self._check_all_grads()
        prof = self.profiler
        t0 = time.perf_counter()
        start = prof.now()
        handles = push_tables(self.tables, self.clock)
        if self._next_lookups is not None:  # prefetch(): the next clock's rows, now
            send_named(self, self.clock + 1)
        applied = True
        if self.optimizer is not None:
            applied = self.unscale_()
            if applied:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=self._grads_to_none)
            self.allreduce_bytes += self._allreduce_step_bytes
        self.scaler.update(found_inf=not applied)
        self._finite = None
        if not applied:
            self.skipped_steps += 1
        if self.push_ahead:  # this step's pushes are applied while the next one computes
            handles, self._inflight = self._inflight, handles
        self._wait(handles)
        prof.add("step", "comm", start, int((time.perf_counter() - t0) * 1e9), clock=self.clock)
        self.clock += 1
        self.on_clock(self.clock)
        self._maybe_checkpoint()
        return applied

    def _wait(self, handles: list) -> None:
        wait_start = time.perf_counter()
        for h in handles:
            h.wait()
        self.comm_wait_s += time.perf_counter() - wait_start

    @property
    def pushes_in_flight(self) -> int:
        """At most how many row pushes of an earlier step are still unanswered (a
        worker killed now may leave them applied without their Ack counted)."""
        return len(self.tables) * self.client.num_shards if self._inflight else 0

    def wait_pushes(self) -> None:
        """Wait for the row pushes still unanswered (``push_ahead``): their errors
        surface here, and the Acks are counted."""
        handles, self._inflight = self._inflight, []
        self._wait(handles)

    # ------------------------------------------------------------ checkpoints

    def _maybe_checkpoint(self) -> None:
        """Worker 0 saves the replica every ``--checkpoint-every`` steps (the replicas are
        identical, so one copy is the job's) and, in allreduce mode, when the launcher
        asks for one.

        With tables (hybrid) the servers copy the tables at the same clock: every worker
        waits at a barrier (so every row push of the clocks before is applied), worker 0
        asks each server for its snapshot, and a second barrier keeps the next clock's
        pushes out until the copies are taken."""
        ck = self.checkpoints
        due = bool(ck.every and self.clock % ck.every == 0)
        if ck.save is not None and not self.tables:
            asked = ck.wanted()
            due = due or (asked and not self._asked)
            self._asked = asked
        if not due:
            return
        with self.profiler.span("checkpoint", "checkpoint"):
            if self.tables:
                import torch.distributed as dist
                self.wait_pushes()  # every row push of the clocks before: applied
                dist.barrier()
                if ck.save is not None:
                    self.client.snapshot_tables(self.clock)
                dist.barrier()
            if ck.save is not None:
                tensors, meta = dense_state(self.module, self.optimizer, self.scaler, self.clock)
                ck.save(self.clock, tensors, meta)

    def restore(self, url: str, clock: int, manifest: dict) -> None:
        """Load the dense replica of the checkpoint at ``clock`` (every worker loads worker
        0's file); training continues from that clock."""
        tensors, meta, where = read_dense(url, clock, manifest)
        self.clock = load_dense(tensors, meta, self.module, self.optimizer, self.scaler, where)

    def start_step(self, max_clock: Optional[int] = None) -> int:
        return self.clock

    def _unscale_and_agree(self) -> bool:
        """Unscale the averaged gradients; all workers agree whether any overflowed."""
        import torch.distributed as dist
        bad = ""
        for name, p in zip(reversed(self._names), reversed(self._params)):  # backward order
            if p.grad is None:
                continue
            p.grad.div_(self.scaler.scale)
            if not bad and not all_finite(p.grad):
                bad = name
        flag = torch.tensor([1.0 if bad else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            old = self.scaler.scale
            where = f"in parameter '{bad}'" if bad else "on another worker"
            self.overflows.append({"step": self.clock + 1, "where": where, "scale": old})
            self.log(f"fp16 gradient overflow at step {self.clock + 1} {where} (after the "
                     f"all-reduce); step skipped on every worker; loss scale {old:g} -> "
                     f"{old * self.scaler.backoff_factor:g}")
            return False
        return True

    def zero_grad(self, set_to_none: bool = False) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=set_to_none)
