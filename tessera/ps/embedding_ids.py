"""Embedding row ids: which server owns an id, and the value a row starts from.

Recommendation models keep one row per user, item or feature value; the ids come
from an open, hashed space (any int64), so nobody keeps a map from ids to servers
or allocates rows up front. Two pure functions of the id replace both:

1. **Placement by hash** (:func:`owner_of`). Row ``id`` lives on server
   ``owner_of(id)``: a 64-bit mixing hash of the id modulo the number of servers.
   Consecutive ids (a new user block, a vocabulary) spread evenly, and every
   process computes the same owner without a map (PERSIA, Lian et al., KDD 2022;
   Monolith, Liu et al., 2022 place rows on parameter servers the same way).
2. **Initial rows** (:func:`initial_rows`). A row's first value is a pure function
   of ``(seed, id)`` -- counter-based random numbers in the sense of Salmon et al.,
   "Parallel Random Numbers: As Easy as 1, 2, 3" (SC 2011), here SplitMix64
   (Steele, Lea & Flood, "Fast Splittable Pseudorandom Number Generators",
   OOPSLA 2014) -- so a row created on any server, at any time, after any
   eviction, equals the row a single-process reference holds.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from tessera.ps import kernels

_MASK64 = (1 << 64) - 1
#: SplitMix64's increment, 2^64 / golden ratio (Steele, Lea & Flood 2014).
_GAMMA = np.uint64(kernels.HASH_MUL)
_MUL1, _MUL2 = np.uint64(kernels.MUL1), np.uint64(kernels.MUL2)


_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 output for state ``x`` (a uint64 array of at least one dimension, wraps
    mod 2^64), in place. numpy wraps integer *array* arithmetic silently (only scalar
    arithmetic warns on overflow), so no ``np.errstate`` is needed: entering one cost
    ~10 µs, a fifth of a one-row lookup's Python (benchmarks/HISTORY.md, session 49)."""
    x += _GAMMA
    x ^= x >> _S30
    x *= _MUL1
    x ^= x >> _S27
    x *= _MUL2
    x ^= x >> _S31
    return x


def _as_uint64(ids: np.ndarray) -> np.ndarray:
    """A fresh uint64 copy holding the two's-complement bits of int64 ``ids``."""
    return np.array(ids, dtype=np.int64, copy=True).reshape(-1).view(np.uint64)


def owner_of(ids: np.ndarray, num_servers: int) -> np.ndarray:
    """The server (``0 .. num_servers - 1``, int64) that stores each id's row.

    ``splitmix64(id) mod num_servers``: the same in every process and run.
    """
    if num_servers < 1:
        raise ValueError(f"num_servers must be >= 1, got {num_servers}")
    if num_servers == 1:  # every id is server 0's: no hash to compute
        return np.zeros(np.size(ids), np.int64)
    h = _splitmix64(_as_uint64(ids))
    return (h % np.uint64(num_servers)).astype(np.int64)


#: Rows of :func:`initial_rows` computed per block: the uint64 temporaries of one
#: block (``_INIT_BLOCK_ELEMENTS`` x 8 bytes each) stay in the CPU cache.
_INIT_BLOCK_ELEMENTS = 1 << 15


@functools.lru_cache(maxsize=64)
def _keys(seed: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A table's constants for :func:`initial_rows`, computed once per (seed, dim):
    ``splitmix64(seed)`` and each column's state offset ``c * gamma`` (c = 1 .. dim:
    SplitMix64's own ``+ gamma`` folded in). Read-only, as they are shared."""
    seed_key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    columns = np.arange(1, dim + 1, dtype=np.uint64) * _GAMMA
    seed_key.flags.writeable = columns.flags.writeable = False
    return seed_key, columns


def initial_rows(ids: np.ndarray, dim: int, seed: int, scale: float,
                 out: np.ndarray | None = None) -> torch.Tensor:
    """The initial values of rows ``ids``: fp32 ``[len(ids), dim]``, uniform in
    ``(-scale, scale)``; written into ``out`` (fp32 ``[len(ids), dim]``) when given.

    Column ``c`` of row ``id`` is the ``c``-th output of a SplitMix64 generator
    seeded with ``splitmix64(splitmix64(seed) xor id)``; its top 24 bits ``k`` give
    ``(2k + 1 - 2^24) / 2^24`` (exact in fp32, symmetric around 0), times ``scale``
    in fp32. A row depends on ``(seed, id)`` only, not on the batch it comes in.

    Computed in blocks of rows into preallocated buffers (no full-size uint64
    temporaries), with two exact shortcuts: SplitMix64's ``+ gamma`` is folded into
    the column offsets (addition mod 2^64 is associative), and its last
    ``z ^= z >> 31`` is skipped because it does not change the top 24 bits.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    seed_key, columns = _keys(seed, dim)
    n = len(ids)
    if out is None:
        out = np.empty((n, dim), dtype=np.float32)
    elif out.shape != (n, dim) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {(n, dim)}, got {out.dtype} {out.shape}")
    # (2k + 1 - 2^24) / 2^24 == k * 2^-23 + (2^-24 - 1): every term and the sum are
    # exact in fp32 (k < 2^24), so this equals the integer formula bit for bit.
    step, offset, fscale = np.float32(2.0 ** -23), np.float32(2.0 ** -24 - 1), np.float32(scale)
    if kernels.ENABLED and n:  # the row keys computed in the loop, no temporaries
        kernels.fill_initial(np.ascontiguousarray(ids, np.int64).reshape(-1), seed_key[0],
                             columns, step, offset, fscale, out)
        return torch.from_numpy(out)
    row_key = _splitmix64(_as_uint64(ids) ^ seed_key)
    block = max(1, _INIT_BLOCK_ELEMENTS // dim)
    h_buf = np.empty((min(block, n), dim), dtype=np.uint64)
    t_buf = np.empty_like(h_buf)
    for start in range(0, n, block):
        stop = min(start + block, n)
        h, t = h_buf[:stop - start], t_buf[:stop - start]
        np.add(row_key[start:stop, None], columns[None, :], out=h)
        np.right_shift(h, np.uint64(30), out=t)
        h ^= t
        h *= _MUL1
        np.right_shift(h, np.uint64(27), out=t)
        h ^= t
        h *= _MUL2
        h >>= np.uint64(40)  # top 24 bits; the skipped ``h ^= h >> 31`` keeps them
        unit = out[start:stop]
        np.copyto(unit, h.view(np.int64), casting="unsafe")
        unit *= step
        unit += offset
        unit *= fscale
    return torch.from_numpy(out)


class TableError(ValueError):
    """A bad lookup or update request; the message names the table and the fault."""
