"""Hybrid parallelism: dense parameters by all-reduce, embedding tables on the servers.

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
   values, same averaged gradients), and the row pushes are waited for.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from tessera.amp.policy import PrecisionPolicy, make_policy
from tessera.amp.scaler import LossScaler
from tessera.config.schema import OptimizerConfig
from tessera.profiler.recorder import OFF, SpanRecorder
from tessera.ps.client import PSClient
from tessera.ps.optim import _OPTIMIZERS


class HybridParallel(nn.Module):
    def __init__(self, module: nn.Module, client: PSClient, *, optimizer: OptimizerConfig,
                 tables, policy: Optional[PrecisionPolicy] = None,
                 profiler: SpanRecorder = OFF, device=None):
        super().__init__()
        from torch.nn.parallel import DistributedDataParallel as DDP

        from tessera.parallel.embedding import _Attached
        self.policy = policy or make_policy("fp32", "cpu")
        params = [p for p in module.parameters() if p.requires_grad]
        self.dense = DDP(module) if params else module
        self.module = module
        self.client = client
        self.profiler = profiler
        self.optimizer = (_OPTIMIZERS[optimizer.name](params, **optimizer.torch_kwargs())
                          if params else None)
        self.scaler = LossScaler(enabled=False)
        self.tables = list(tables)
        self.clock = 0
        self.comm_wait_s = 0.0
        self.skipped_steps = 0
        self.overflows: list[dict] = []
        attached = _Attached(client, lambda: self.clock, torch.float32,
                             device or torch.device("cpu"))
        for table in self.tables:
            table.attach(attached)

    @property
    def loss_scale(self) -> float:
        return 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def forward(self, *args, **kwargs):
        with self.profiler.span("forward", "compute"), self.policy.autocast(
                next(iter(self.module.parameters()), torch.zeros(())).device.type):
            # Evaluation (one worker, no gradients) must not enter DDP's collectives.
            train = self.module.training and torch.is_grad_enabled()
            return (self.dense if train else self.module)(*args, **kwargs)

    def dense_state(self) -> torch.Tensor:
        """The dense replica, flattened (tests compare it across workers)."""
        params = [p.detach().reshape(-1).float() for p in self.module.parameters()]
        return torch.cat(params) if params else torch.zeros(0)

    def step(self) -> bool:
        prof = self.profiler
        t0 = time.perf_counter()
        start = prof.now()
        handles = [h for t in self.tables for h in t.push(self.clock)]
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=False)
        wait_start = time.perf_counter()
        for h in handles:
            h.wait()
        self.comm_wait_s += time.perf_counter() - wait_start
        prof.add("step", "comm", start, int((time.perf_counter() - t0) * 1e9), clock=self.clock)
        self.clock += 1
        return True

    def zero_grad(self, set_to_none: bool = False) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=set_to_none)
