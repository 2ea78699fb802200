"""A dense partition on its server: fp32 master, update rule, and the held sum of a clock.

The flat parameter vector is cut into partitions (:mod:`tessera.ps.sharding`); a
server holds some of them. Each partition is a :class:`~tessera.ps.consistency.Clocked`
unit with its own clock, so a slow partition never holds up another one's update
(ps-lite and MXNet's kvstore key their consistency per key the same way).

In sync mode the pushes of one clock are summed into ``accum`` as they arrive, in
fp32 whatever the wire dtype (summing fp16 frames in fp16 would lose the small
gradients that loss scaling exists to keep), and unscaled by each push's loss scale
on the way in. The clock's mean is ``accum / pushes``, taken once the clock is
complete. Under loss scaling the sum is held until the cluster's decision: the
partition remembers its verdict and who is waiting for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from tessera.ps.consistency import Clocked, Waiter
from tessera.ps.optim import UpdateRule
from tessera.transport import wire


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

    @property
    def ready(self) -> bool:
        return self.rule is not None

    def named(self) -> tuple[str, str]:
        return "", f"partition {self.info.id}"

    @property
    def numel(self) -> int:
        return self.info.stop - self.info.start

    def add(self, grad: torch.Tensor, unscale: float, worker: int, nonfinite: str) -> None:
        """Sync: fold one worker's push into the clock's sum."""
        if self.accum is None:
            self.accum = grad.to(torch.float32, copy=True)
            if unscale != 1.0:
                self.accum.mul_(unscale)
        else:
            self.accum.add_(grad.to(torch.float32), alpha=unscale)
        self.pushed_by.add(worker)
        if nonfinite:
            self.overflows.append(wire.Overflow(worker=worker, param=nonfinite))

    def take_mean(self) -> tuple[torch.Tensor, int]:
        """Sync: the clock's mean gradient (in place) and its number of pushes; the
        partition is then ready for the next clock's pushes."""
        n = max(1, len(self.pushed_by))
        grad = self.accum.div_(n) if n > 1 else self.accum
        self.accum, self.verdict = None, None
        self.held, self.norm_type = False, 0.0
        self.pushed_by.clear()
        self.overflows = []
        return grad, n


@dataclass(eq=False)
class Reply(Waiter):
    """A request answered with Params once its partitions are at ``clock``."""

    peer: bytes = b""
    req: int = 0
    dtype: str = "float32"
    #: ssp: the clock the worker will compute once answered (for the staleness record).
    run_clock: int = -1
