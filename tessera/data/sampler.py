"""Deterministic sharding of a dataset over workers (DistributedSampler-style).

For epoch ``e`` every worker draws the same permutation of the training set
from a generator seeded by ``(seed, e)``. The permutation is cut into global
batches of ``num_workers * batch_size`` samples (the last incomplete one is
dropped), and worker ``r`` takes slice ``[r * batch_size, (r + 1) * batch_size)``
of each. So the union of the workers' batches at step ``t`` is exactly global
batch ``t`` of one process with batch ``num_workers * batch_size``: this is what
makes synchronous training equal to large-batch training on one process, and
what lets a job change its worker count and still see every sample once.

Balance (``[train] balance = "speed"``, :func:`speed_shares`): the global batch of a
step may be split unevenly, worker ``r`` taking ``shares[r]`` samples starting at
``sum(shares[:r])``. The union is still exactly global batch ``t``, so the cursor,
resuming and every-sample-once are unchanged; only who computes which sample moves.

A job resumed from a checkpoint starts from a *cursor*: the clock it resumes at,
the epoch, and the offset into that epoch's permutation (samples already taken by
all workers together). :meth:`ShardSampler.seek` continues from there with any
worker count: the rest of the epoch is cut into the new global batches, so each
sample of the epoch is still seen exactly once.
"""

from __future__ import annotations

import numbers

import numpy as np

from tessera.errors import UsageError


class ShardSampler:
    def __init__(self, num_samples: int, *, batch_size: int, num_workers: int, rank: int,
                 seed: int):
        if not 0 <= rank < num_workers:
            raise ValueError(f"rank {rank} is outside 0..{num_workers - 1}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
                or batch_size < 1:
            raise UsageError(f"batch_size must be a whole number of samples, at least 1; "
                             f"got {batch_size!r}")
        batch_size = int(batch_size)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.rank = rank
        self.seed = seed
        self.global_batch = batch_size * num_workers
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise UsageError(f"a global batch of {self.global_batch} samples ({num_workers} workers "
                             f"x batch_size {batch_size}) is larger than the {num_samples} "
                             f"training samples; lower the batch size (data.batch_size, or "
                             f"tessera.shard's batch_size) or the worker count")
        self._epoch = -1
        self._perm: np.ndarray | None = None
        #: Balance: every worker's samples of the next step (None: batch_size each).
        self.shares: list[int] | None = None
        # The cursor: at clock ``_clock0`` the next sample is ``_offset0`` into epoch ``_epoch0``.
        self._clock0, self._epoch0, self._offset0 = 0, 0, 0

    def seek(self, clock: int, epoch: int, offset: int) -> None:
        """Continue from a checkpoint's cursor: global step ``clock`` starts ``offset``
        samples into epoch ``epoch``."""
        if not 0 <= offset <= self.num_samples:
            raise UsageError(f"--resume: the checkpoint's data position ({offset} samples into "
                             f"epoch {epoch}) is outside this dataset of {self.num_samples} "
                             f"samples: it was saved from other data; resume with the same "
                             f"dataset, or start a new run")
        self._clock0, self._epoch0, self._offset0 = clock, epoch, offset

    def _locate(self, step: int) -> tuple[int, int]:
        """(epoch, offset of the global batch) of global step ``step``."""
        k = step - self._clock0
        if k < 0:
            raise ValueError(f"step {step} is before the resumed clock {self._clock0}")
        first = (self.num_samples - self._offset0) // self.global_batch
        if k < first:
            return self._epoch0, self._offset0 + k * self.global_batch
        epoch, i = divmod(k - first, self.steps_per_epoch)
        return self._epoch0 + 1 + epoch, i * self.global_batch

    def steps_until_epoch(self, epochs: int) -> int:
        """The global step at which ``epochs`` whole epochs are done."""
        first = (self.num_samples - self._offset0) // self.global_batch
        if self._epoch0 >= epochs:
            return self._clock0
        return self._clock0 + first + (epochs - self._epoch0 - 1) * self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm = rng.permutation(self.num_samples)
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        """This worker's sample indices for global step ``step`` (epochs roll over)."""
        epoch, offset = self._locate(step)
        if self.shares is None:
            start = offset + self.rank * self.batch_size
            return self.permutation(epoch)[start:start + self.batch_size]
        start = offset + sum(self.shares[:self.rank])
        return self.permutation(epoch)[start:start + self.shares[self.rank]]


#: Balance: the even split is kept while the slowest worker's part of a step takes less
#: than this much over the workers' mean (noise on a shared machine must not move it: an
#: even split never moved is bit-identical to sync) ...
BALANCE_BAND = 0.15
#: ... and an uneven split, once moved, while within this (closer to equal times).
TUNE_BAND = 0.05


def speed_shares(reports, global_batch: int, *, min_share: int = 1,
                 band: float | None = None) -> list[int] | None:
    """The next split of a global batch of ``global_batch`` samples (None: even), from
    every worker's ``[rate, weight]`` report: ``rate`` its samples/s measured at its
    current share, ``weight`` that share over the even share.

    The current split is kept while the workers' times for their parts (share / rate)
    are within ``band`` of their mean (default: ``BALANCE_BAND`` for the even split,
    ``TUNE_BAND`` for an uneven one); otherwise shares become proportional to the
    rates, each at least ``min_share`` (largest remainders, ties to the lower rank). A
    fixed per-step cost makes that undershoot, never overshoot, so repeated updates
    converge towards equal times. A pure function of its inputs: every worker computes
    the same split from the same reports, and a worker that just joined knows the
    current split from the weights. None while any report is missing."""
    w = len(reports)
    if w < 2 or global_batch % w:
        return None
    even = global_batch // w
    if not all(len(r) == 2 and 0.0 < r[0] < float("inf") and 0.0 < r[1] <= w
               for r in reports):
        return None
    current = [round(weight * even) for _, weight in reports]
    if sum(current) != global_batch:
        return None
    rates = [float(r[0]) for r in reports]
    times = [n / r for n, r in zip(current, rates)]
    if band is None:
        band = BALANCE_BAND if current == [even] * w else TUNE_BAND
    if max(times) <= (1.0 + band) * (sum(times) / w):
        return None if current == [even] * w else current
    total = sum(rates)
    min_share = max(1, min(min_share, even))
    want = [global_batch * r / total for r in rates]
    shares = [max(min_share, int(q)) for q in want]
    while sum(shares) < global_batch:
        i = max(range(w), key=lambda k: (want[k] - shares[k], -k))
        shares[i] += 1
    while sum(shares) > global_batch:
        i = max((k for k in range(w) if shares[k] > min_share),
                key=lambda k: (shares[k] - want[k], -k))
        shares[i] -= 1
    return None if shares == [even] * w else shares


def advance_cursor(epoch: int, offset: int, steps: int, global_batch: int,
                   num_samples: int) -> tuple[int, int]:
    """The cursor ``steps`` global batches after ``(epoch, offset)`` (what
    :class:`ShardSampler` does; ``num_samples`` 0 means an endless stream)."""
    if num_samples <= 0:
        return epoch, offset + steps * global_batch
    first = (num_samples - offset) // global_batch
    if steps < first:
        return epoch, offset + steps * global_batch
    per_epoch = num_samples // global_batch
    more, i = divmod(steps - first, per_epoch)
    return epoch + 1 + more, i * global_batch
