"""Deterministic sharding of a dataset over workers (DistributedSampler-style).

For epoch ``e`` every worker draws the same permutation of the training set
from a generator seeded by ``(seed, e)``. The permutation is cut into global
batches of ``num_workers * batch_size`` samples (the last incomplete one is
dropped), and worker ``r`` takes slice ``[r * batch_size, (r + 1) * batch_size)``
of each. So the union of the workers' batches at step ``t`` is exactly global
batch ``t`` of one process with batch ``num_workers * batch_size``: this is what
makes synchronous training equal to large-batch training on one process, and
what lets a job change its worker count at an epoch boundary and still see
every sample once.
"""

from __future__ import annotations

import numpy as np


class ShardSampler:
    def __init__(self, num_samples: int, *, batch_size: int, num_workers: int, rank: int,
                 seed: int):
        if not 0 <= rank < num_workers:
            raise ValueError(f"rank {rank} is outside 0..{num_workers - 1}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.rank = rank
        self.seed = seed
        self.global_batch = batch_size * num_workers
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"a global batch of {self.global_batch} samples ({num_workers} workers "
                             f"x batch_size {batch_size}) is larger than the {num_samples} "
                             f"training samples; lower data.batch_size or the worker count")
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm = rng.permutation(self.num_samples)
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        """This worker's sample indices for global step ``step`` (epochs roll over)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        start = i * self.global_batch + self.rank * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size]
