"""torch's ``DistributedSampler``, able to start part-way into an epoch.

:class:`ResumableSampler` is a subclass of ``torch.utils.data.DistributedSampler``
with the same indices in the same order for the same ``(seed, epoch,
num_replicas, rank)``; ``tessera.DistributedSampler`` (:mod:`tessera.api`) is this
class with ``num_replicas`` and ``rank`` taken from the job (torch asks
``torch.distributed``, which the parameter-server modes never initialise).

What it adds is a start part-way into an epoch. torch's sampler deals the epoch's
  permutation round-robin: rank ``r`` takes positions ``r, r + W, r + 2W, ...``.
  So after ``k`` optimizer steps of ``b`` samples per worker, the job has consumed
  exactly the first ``k * b * W`` positions of the permutation, whatever each
  worker's share. :meth:`ResumableSampler.seek` (called by Tessera after
  ``--resume`` or when a killed worker rejoins) continues from such a position:
  the rest of the epoch is dealt round-robin again over the current workers, so
  every sample of the epoch is still seen once, even with a different worker
  count. Epochs before the cursor's yield nothing, so a script's
  ``for epoch in range(epochs)`` loop (and a per-epoch lr scheduler in it) runs
  unchanged.

It also counts what it has handed out in the current epoch (:attr:`taken`), and
:meth:`ResumableSampler.skip_own` continues one worker's share after that many:
a killed worker's replacement picks up its predecessor's share where the last
applied step left it (``tessera.DistributedSampler`` keeps that count per step).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.utils.data


class ResumableSampler(torch.utils.data.DistributedSampler):
    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        #: The cursor: epoch ``_cursor_epoch`` starts ``_cursor_offset`` positions in.
        self._cursor_epoch, self._cursor_offset = 0, 0
        #: This worker's own share: epoch ``_own_epoch`` starts ``_own_skip`` indices in.
        self._own_epoch, self._own_skip = 0, 0
        #: Indices handed out so far in epoch ``self.epoch`` (by the last iterator).
        self.taken = 0
        #: A replacement worker's sampler was moved to its predecessor's position.
        self.resumed = False

    def skip_own(self, epoch: int, taken: int) -> None:
        """Continue this worker's share of epoch ``epoch`` after its first ``taken``
        indices (earlier epochs yield nothing)."""
        if taken < 0:
            raise ValueError(f"sampler position must be >= 0, got {taken}")
        self._own_epoch, self._own_skip = epoch, taken

    def seek(self, epoch: int, offset: int) -> None:
        """Continue from position ``offset`` of epoch ``epoch``'s permutation (the
        samples every worker together consumed before)."""
        if offset < 0:
            raise ValueError(f"sampler offset must be >= 0, got {offset}")
        self._cursor_epoch, self._cursor_offset = epoch, offset

    def _order(self) -> list[int]:
        """Epoch ``self.epoch``'s whole order, as torch builds it (before dealing)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=g).tolist()
        return list(range(n))

    def _start(self) -> int:
        """The first position of this epoch's order still to deal."""
        if self.epoch < self._cursor_epoch:
            return len(self.dataset)  # type: ignore[arg-type]
        if self.epoch == self._cursor_epoch:
            return min(self._cursor_offset, len(self.dataset))  # type: ignore[arg-type]
        return 0

    def _rest(self) -> list[int]:
        """What is left of the epoch, cut or padded (by wrapping) to a multiple of the
        workers, as torch does for a whole epoch."""
        rest = self._order()[self._start():]
        extra = len(rest) % self.num_replicas
        if extra and self.drop_last:
            rest = rest[:len(rest) - extra]
        elif extra and rest:
            pad = self.num_replicas - extra
            rest += (rest * math.ceil(pad / len(rest)))[:pad]
        return rest

    def _share(self) -> list[int]:
        if self._start() == 0:
            share = list(super().__iter__())  # torch's own order, bit for bit
        else:
            share = self._rest()[self.rank::self.num_replicas]
        if self.epoch < self._own_epoch:
            return []
        return share[self._own_skip:] if self.epoch == self._own_epoch else share

    def __iter__(self) -> Iterator[int]:
        share = self._share()
        self.taken = self.num_samples_before()
        for index in share:
            self.taken += 1
            yield index

    def num_samples_before(self) -> int:
        """Indices of this epoch this worker's share skips (a replacement's start)."""
        return self._own_skip if self.epoch == self._own_epoch else 0

    def __len__(self) -> int:
        return len(self._share())
