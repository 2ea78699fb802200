"""Persistent stragglers: each worker's share of a sync step's global batch set by its speed.

Why this remedy and not backup workers (Chen et al. 2016, "Revisiting distributed
synchronous SGD": a clock completes with the first W - b pushes and the late ones are
dropped): with 2 workers, W - b = 1 is one worker, so dropping the straggler's push
halves the global batch and changes the math of every step; and a *persistent*
straggler's push would be dropped at every clock, so its samples would never count.
Moving samples instead keeps sync exact at any W: the global batch of step t is the
same set of samples as without balance (:class:`tessera.data.sampler.ShardSampler`
cuts it at other points), and each push counts ``weight = n_w * W / N`` times in the
servers' mean (:meth:`tessera.ps.consistency.Sync.report`), so the servers apply
``sum_w n_w g_w / N``: the mean gradient over every sample of the step, as one process
with batch N computes it (up to float rounding).

How the workers agree on a split without a barrier: the split changes only every
``PERIOD`` clocks. Every push carries its sender's speed (samples per second of its
data, forward and backward: the median over the period's steps so far, all at one
share) and its weight; a server echoes every worker's ``[speed, weight]`` of clock t in
each reply at clock t + 1, the same vector for every worker, and at a period's end each
worker derives the next split from it with the same pure function
(:func:`tessera.data.sampler.speed_shares`): kept while the workers' times are within
``BALANCE_BAND`` (15%) of their mean while the split is even, ``TUNE_BAND`` (5%) once
it has moved, else proportional to speed. A restarted worker learns
the current split from the weights in its join reply. While the split stays even, every
push has weight 1.0 and the old slice: the run is bit-identical to plain sync.
"""

from __future__ import annotations

import statistics
import time

from tessera.data.sampler import ShardSampler, speed_shares

#: The split may change every this many clocks (speeds are medians over a period).
PERIOD = 8


class SpeedBalance:
    """One worker's side: ``begin()`` before a step's data, ``computed()`` after its
    backward, ``after_step(clock)`` once the step's replies are in."""

    def __init__(self, client, sampler: ShardSampler):
        self.client, self.sampler = client, sampler
        self.rank, self.workers = sampler.rank, sampler.num_workers
        self.global_batch = sampler.global_batch
        #: No worker gets fewer than an eighth of the even share (a gradient of few
        #: samples is noisy, and a worker with none would push 0/0).
        self.min_share = max(1, sampler.batch_size // 8)
        self.rate = 0.0  # this worker's samples/s at its current share (0: not measured)
        self._times: list[float] = []  # this period's step times (seconds)
        self.steps = self.samples = self.uneven_steps = self.moves = 0
        self.smallest = self.largest = sampler.batch_size
        self._n, self._t0 = sampler.batch_size, 0.0

    def begin(self) -> None:
        """A step starts: tag its pushes with this worker's share and speed."""
        shares = self.sampler.shares
        self._n = shares[self.rank] if shares else self.sampler.batch_size
        self.client.weight = self._n * self.workers / self.global_batch
        self.client.rate = self.rate
        self._t0 = time.perf_counter()

    def computed(self) -> None:
        """Forward and backward are done (the pushes are out): measure the speed."""
        elapsed = time.perf_counter() - self._t0
        if self.steps >= PERIOD and elapsed > 0:  # the first period is warm-up
            self._times.append(elapsed)
            self.rate = self._n / statistics.median(self._times)
        self.steps += 1
        self.samples += self._n
        self.uneven_steps += self.sampler.shares is not None
        self.smallest, self.largest = min(self.smallest, self._n), max(self.largest, self._n)

    def after_step(self, clock: int, joined: bool = False) -> None:
        """The replies at ``clock`` carried every worker's speed and weight: at a
        period's end (or on joining) the next split."""
        if clock % PERIOD and not joined:
            return
        reports = self.client.rates.get(clock)
        if reports is None or len(reports) != self.workers:
            shares = None
        else:  # joined mid-period: the split the others run now (the weights say it)
            keep = joined and clock % PERIOD
            shares = speed_shares(reports, self.global_batch, min_share=self.min_share,
                                  **({"band": float("inf")} if keep else {}))
        self.moves += shares != self.sampler.shares
        self.sampler.shares = shares
        self._times.clear()  # a new period: speeds at the (possibly new) share

    def stats(self) -> dict:
        """This worker's totals (for its summary)."""
        return {"balance_samples": self.samples, "balance_uneven_steps": self.uneven_steps,
                "balance_moves": self.moves, "balance_min_share": self.smallest,
                "balance_max_share": self.largest, "balance_rate": round(self.rate, 1)}
