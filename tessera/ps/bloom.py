"""A counting Bloom filter: admission of new embedding rows in fixed memory.

A shard under a byte cap (``TableSpec.memory_bytes``) stores an id only once it has
been looked up ``admit_after`` times. Counting those lookups exactly needs one entry
per id ever seen: over a stream of 10^8 mostly one-off ids, more memory than the
rows. DeepRec's ``CounterFilter``/``CBFFilter`` and Monolith's frequency filter use
a counting Bloom filter instead (Fan et al., "Summary Cache", 2000): a fixed array
of small counters, ``k`` hash positions per id; a lookup adds one at each of the id's
positions and its count is estimated as the smallest of them. Collisions between
ids can only admit an id early; within one batch, ids sharing a counter raise it
once (an id may then wait one more lookup). Its memory is the counter array,
fixed at construction whatever the stream.

So that old one-off ids do not saturate the counters over an endless stream, every
counter is halved once the filter has taken ``size / (2 * hashes)`` ids (the "reset"
of TinyLFU, Einziger et al., 2017): at most half an increment per counter between
halvings, so a one-off id finds all its ``k`` counters raised by others (and is
admitted at ``admit_after = 2``) with probability about ``(1 - e^-0.5)^k``, 6% at
k = 3; an id looked up often keeps being admitted.
"""

from __future__ import annotations

import numpy as np

#: Odd 64-bit multipliers, one per hash function (multiply-shift hashing).
_MULS = tuple(np.uint64(m) for m in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F,
                                     0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                                     0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53))
#: Counters saturate here (uint8; admission thresholds are far lower).
_MAX = 127


class CountingBloom:
    """``size`` uint8 counters, ``hashes`` positions per id (at most 6).

    :meth:`add` counts one sighting of each (unique) id and returns the estimates
    after it; ``counters``, ``added`` are the whole state (checkpoints)."""

    def __init__(self, size: int, hashes: int = 3):
        if size < 1 or not 1 <= hashes <= len(_MULS):
            raise ValueError(f"a counting Bloom filter needs size >= 1 and 1..{len(_MULS)} "
                             f"hashes, got size {size}, hashes {hashes}")
        self.size, self.hashes = size, hashes
        self.counters = np.zeros(size, dtype=np.uint8)
        #: Ids added since the last halving.
        self.added = 0

    @property
    def nbytes(self) -> int:
        return self.counters.nbytes

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """``[hashes, len(ids)]`` counter positions."""
        keys = np.asarray(ids, dtype=np.int64).view(np.uint64)
        out = np.empty((self.hashes, len(keys)), dtype=np.int64)
        with np.errstate(over="ignore"):
            for j in range(self.hashes):
                h = keys * _MULS[j]
                h ^= h >> np.uint64(29)
                # high 32 bits times size, >> 32: a position in [0, size) without modulo bias
                out[j] = ((h >> np.uint64(32)) * np.uint64(self.size) >> np.uint64(32)).view(
                    np.int64)
        return out

    def estimate(self, ids: np.ndarray) -> np.ndarray:
        """Sightings of each id so far (an upper bound), int64."""
        if len(ids) == 0:
            return np.zeros(0, dtype=np.int64)
        return self.counters[self._positions(ids)].min(axis=0).astype(np.int64)

    def add(self, ids: np.ndarray) -> np.ndarray:
        """Count one sighting of each of ``ids`` (unique); their estimates after it."""
        if len(ids) == 0:
            return np.zeros(0, dtype=np.int64)
        pos = self._positions(ids)
        flat = pos.reshape(-1)
        # One increment per position (a fancy-index add: two ids of one batch that share
        # a counter raise it once; a sort to count them would cost more than the rest of
        # a lookup). Saturating counters stop at _MAX.
        flat = flat[self.counters[flat] < _MAX]
        self.counters[flat] += 1
        est = self.counters[pos].min(axis=0).astype(np.int64)
        self.added += len(ids)
        if self.added * 2 * self.hashes >= self.size:
            self.counters >>= 1
            self.added = 0
        return est

    def merge(self, counters: np.ndarray, added: int) -> None:
        """Take another filter's counts (a restored checkpoint): counter-wise maximum."""
        np.maximum(self.counters, counters, out=self.counters)
        self.added = max(self.added, int(added))
