"""Compiled row kernels for an embedding shard's hot loops (numba), with numpy beside them.

An embedding shard's request path does three things per row: find the row's slot in
the id index, make the initial value of a row first seen, and apply the sparse
optimizer to a row updated. Written with numpy and torch, each is several passes over
temporaries the size of the batch (the index probes a whole batch per round; an
Adagrad step gathers, computes in five kernels and scatters back). Here each is one
loop over the rows, compiled by numba (a wheel: ``make setup`` needs no compiler),
reading each row once where it lies:

* :func:`find_slots` probes the open-addressing table of
  :class:`tessera.ps.embedding_index.IdIndex` id by id (linear probing, as the numpy
  rounds do; the answers are the same, the table layout is the index's own);
* :func:`place_ids` puts new ids into free buckets the same way;
* :func:`fill_initial` computes :func:`tessera.ps.embedding_ids.initial_rows`'s
  SplitMix64 values, bit for bit (integer arithmetic, then three exact or
  once-rounded fp32 operations in the same order);
* :func:`sgd_rows`, :func:`adagrad_rows` and :func:`adam_rows` apply the optimizer
  in place, with torch's per-element operations in torch's order, each rounded to
  fp32 once; a multiply and an add are fused only where torch's vector kernels fuse
  them (SGD's ``p + (-lr) * g``, Adagrad's ``sum + g * g``), and nothing else is
  reassociated. SGD equals the torch path bit for bit; Adagrad and Adam agree with it
  to fp32 rounding (their square root is correctly rounded, torch's vectorised one is
  not always). tests/test_row_kernels.py compares the paths, and
  tests/test_embedding_table.py both with ``torch.optim``.

Others serve dense partitions on a half-width wire (:data:`SGD_HALF`, :data:`SCALE_HALF`,
:data:`ADD_HALF`): plain SGD that writes the bf16 or fp16 reply as it steps, and a sync
clock's sum of half-width pushes, each one pass where torch takes two or three (a
half-width wire's casts cost more than its saved bytes otherwise:
benchmarks/precision.py). A server of a bf16 or fp16 job compiles them at start-up
(:func:`warm_dense`, about 1 s of CPU): compiled at the first clock instead, they
stalled every worker's first step.

numba compiles each kernel at its first call in a process (0.1-0.3 s of CPU each; a
server with a table uses four or five of them). Its on-disk cache is not used: numba
writes and reads that cache with pickle, and nothing in Tessera unpickles.
Without numba (not installed, or ``TESSERA_KERNELS=numpy``) ``ENABLED`` is False and
the callers use their numpy and torch code.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from tessera.config import env as envvars

ENABLED = False
if os.environ.get(envvars.KERNELS, "numba") != "numpy":
    try:
        import numba
        ENABLED = True
    except Exception:  # not installed, or built for another numpy: the numpy path serves
        numba = None

#: The id index's hash multiplier (2^64 / golden ratio, odd: consecutive ids land far
#: apart; also SplitMix64's increment) and SplitMix64's two multipliers (Steele, Lea &
#: Flood 2014). :mod:`tessera.ps.embedding_index` and :mod:`tessera.ps.embedding_ids`
#: take them from here, so both paths hash alike.
HASH_MUL = 0x9E3779B97F4A7C15
MUL1, MUL2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _jit(fn=None, *, contract: bool = False):
    """numba.njit (no disk cache); no fast-math, except, with ``contract``, fusing a
    multiply and an add into one fused multiply-add (rounded once) where torch's kernels
    do."""
    if fn is None:
        return lambda f: _jit(f, contract=contract)
    if not ENABLED:
        return fn
    return numba.njit(cache=False, nogil=True, boundscheck=False, error_model="numpy",
                      fastmath={"contract"} if contract else False)(fn)


#: Rows ahead of the one a row kernel works on whose lines it asks the CPU for (a
#: prefetch). A table far larger than the caches answers each row from memory: a
#: loop that only touches a row when it reaches it waits that row's latency, row after
#: row; asked 8 rows ahead, the loads overlap (an Adagrad step on 4,100 random rows of
#: a 1.5M-row table: 655 µs plain, 540 asking ahead, ``sparse_embedding.py``'s
#: ``sparse_kernels`` lines on the 2-core test VM).
AHEAD = 8
#: Bytes per cache line (x86-64 and most ARM cores).
LINE = 64


@_jit
def _home(key, bits):
    """The bucket an id's probe starts at: the top ``bits`` bits of its Fibonacci hash."""
    return np.int64((np.uint64(key) * np.uint64(HASH_MUL)) >> np.uint64(64 - bits))


@_jit
def _bucket_of(table, key, bits):
    """The bucket of ``table`` (int64 ``[buckets, 2]``: key, slot; key -1 empty, -2
    removed) holding id ``key`` (>= 0), -1 where absent: linear probing from its home."""
    mask = table.shape[0] - 1
    pos = _home(key, bits)
    while table[pos, 0] != key:
        if table[pos, 0] == -1:
            return -1
        pos = (pos + 1) & mask
    return pos


@_jit
def find_buckets(table, ids, bits, out):
    """``out[i]``: the bucket holding ``ids[i]`` (:func:`_bucket_of`), -1 where absent."""
    n = ids.shape[0]
    for i in range(n):
        if i + AHEAD < n:  # a table larger than the caches: its home bucket, early
            _prefetch(table, _home(ids[i + AHEAD], bits), 0, 0)
        out[i] = _bucket_of(table, ids[i], bits)


@_jit
def find_slots(table, ids, bits, out):
    """``out[i]``: the slot of ``ids[i]``, -1 where absent."""
    n = ids.shape[0]
    for i in range(n):
        if i + AHEAD < n:  # a table larger than the caches: its home bucket, early
            _prefetch(table, _home(ids[i + AHEAD], bits), 0, 0)
        b = _bucket_of(table, ids[i], bits)
        out[i] = table[b, 1] if b >= 0 else -1


@_jit
def place_ids(table, ids, slots, bits):
    """Put absent, unique ``ids`` (at ``slots``) into the first free bucket of their
    probe sequence (empty or removed); returns how many were empty before."""
    mask = table.shape[0] - 1
    fresh = 0
    for i in range(ids.shape[0]):
        pos = _home(ids[i], bits)
        while table[pos, 0] >= 0:
            pos = (pos + 1) & mask
        if table[pos, 0] == -1:
            fresh += 1
        table[pos, 0] = ids[i]
        table[pos, 1] = slots[i]
    return fresh


@_jit
def _mix(z):
    """SplitMix64's two multiply rounds on state ``z`` (uint64, its ``+ gamma`` already
    added), without the final ``z ^ (z >> 31)``."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MUL1)
    return (z ^ (z >> np.uint64(27))) * np.uint64(MUL2)


@_jit
def fill_initial(ids, seed_key, columns, step, offset, scale, out):
    """``out[r, c]``: the initial value of column ``c`` of row ``ids[r]`` (int64 ids, any
    sign: their two's-complement bits), whose key is ``splitmix64(ids[r] xor seed_key)`` (see
    :func:`tessera.ps.embedding_ids.initial_rows`)."""
    gamma, s31, s40 = np.uint64(HASH_MUL), np.uint64(31), np.uint64(40)
    for r in range(ids.shape[0]):
        key = _mix((np.uint64(ids[r]) ^ seed_key) + gamma)
        key = key ^ (key >> s31)
        for c in range(columns.shape[0]):
            h = _mix(key + columns[c])
            unit = np.float32(np.int64(h >> s40)) * step
            unit = unit + offset
            out[r, c] = unit * scale


@_jit
def _fetch(rows, s, write):
    """Prefetch every line of row ``s`` of ``rows`` (C-contiguous), to read it or, with
    ``write`` 1, to write it (a literal 0 or 1, as :func:`_prefetch` needs)."""
    for k in range(0, rows.strides[0], LINE):
        _prefetch(rows, s, k, write)


@_jit
def gather(src, slots, out):
    """``out[r] = src[slots[r]]``, row by row (repeats allowed), each row asked for
    :data:`AHEAD` rows before it is copied: byte copies, the values unchanged."""
    n = slots.shape[0]
    for r in range(n):
        if r + AHEAD < n:
            _fetch(src, slots[r + AHEAD], 0)
        s = slots[r]
        for c in range(src.shape[1]):
            out[r, c] = src[s, c]


@_jit(contract=True)
def sgd_rows(values, slots, grad, neg_lr, weight_decay):
    """torch.optim.SGD (no momentum) on rows ``slots`` of ``values``: ``g + wd * p``
    when ``weight_decay``, then ``p + (-lr) * g``."""
    n = slots.shape[0]
    for r in range(n):
        if r + AHEAD < n:
            _fetch(values, slots[r + AHEAD], 1)
        s = slots[r]
        for c in range(values.shape[1]):
            p = values[s, c]
            g = grad[r, c]
            if weight_decay != 0:
                g = g + weight_decay * p
            values[s, c] = p + neg_lr * g


@_jit(contract=True)
def adagrad_rows(values, slots, sums, state_slots, grad, neg_clr, eps, weight_decay):
    """torch.optim.Adagrad (``_single_tensor_adagrad``) on rows ``slots``:
    ``sum + g * g``, ``std = sqrt(sum) + eps``, ``p + ((-clr) * g) / std``."""
    n = slots.shape[0]
    for r in range(n):
        if r + AHEAD < n:
            _fetch(values, slots[r + AHEAD], 1)
            _fetch(sums, state_slots[r + AHEAD], 1)
        s, t = slots[r], state_slots[r]
        for c in range(values.shape[1]):
            p = values[s, c]
            g = grad[r, c]
            if weight_decay != 0:
                g = g + weight_decay * p
            acc = sums[t, c] + g * g
            sums[t, c] = acc
            std = np.float32(np.sqrt(acc)) + eps
            values[s, c] = p + neg_clr * g / std


@_jit
def adam_rows(values, slots, exp_avg, exp_avg_sq, state_slots, grad, one_minus_b1,
              one_minus_b2, eps, neg_step_size):
    """Lazy Adam, torch's ``_functional.sparse_adam`` on rows ``slots``, operation by
    operation: ``u = (g - m) * (1 - b1)``, ``m + u``; ``w = (g^2 - v) * (1 - b2)``,
    ``v + w``; ``p + (-step_size) * ((u + m) / (sqrt(w + v) + eps))``."""
    n = slots.shape[0]
    for r in range(n):
        if r + AHEAD < n:
            _fetch(values, slots[r + AHEAD], 1)
            _fetch(exp_avg, state_slots[r + AHEAD], 1)
            _fetch(exp_avg_sq, state_slots[r + AHEAD], 1)
        s, t = slots[r], state_slots[r]
        for c in range(values.shape[1]):
            g = grad[r, c]
            m = exp_avg[t, c]
            v = exp_avg_sq[t, c]
            u = (g - m) * one_minus_b1
            w = (g * g - v) * one_minus_b2
            exp_avg[t, c] = m + u
            exp_avg_sq[t, c] = v + w
            denom = np.float32(np.sqrt(w + v)) + eps
            values[s, c] = values[s, c] + neg_step_size * ((u + m) / denom)


if ENABLED:
    from llvmlite import binding as _binding
    from llvmlite import ir as _ir
    from numba.extending import intrinsic as _intrinsic

    @_intrinsic
    def _as_f32(typingctx, bits):
        """The fp32 whose bits are the uint32 ``bits`` (an LLVM bitcast: no operation)."""
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], _ir.FloatType())
        return numba.types.float32(numba.types.uint32), codegen

    @_intrinsic
    def _as_u32(typingctx, value):
        """The bits of the fp32 ``value`` as a uint32."""
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], _ir.IntType(32))
        return numba.types.uint32(numba.types.float32), codegen

    @_intrinsic
    def _f16_to_f32(typingctx, bits):
        """The fp16 whose bits are the uint16 ``bits``, widened to fp32 (exact; LLVM's
        ``fpext``, the CPU's own conversion where it has one, as torch's)."""
        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], _ir.HalfType()), _ir.FloatType())
        return numba.types.float32(numba.types.uint16), codegen

    @_intrinsic
    def _f32_to_f16(typingctx, value):
        """The bits of fp32 ``value`` rounded to fp16, to nearest even (``fptrunc``)."""
        def codegen(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[0], _ir.HalfType()), _ir.IntType(16))
        return numba.types.uint16(numba.types.float32), codegen

    # (LLVM 15 on names its pointer argument "p0"; numba >= 0.59 may bring an older one)
    _PREFETCH = ("llvm.prefetch.p0" if tuple(_binding.llvm_version_info) >= (15,)
                 else "llvm.prefetch.p0i8")

    @_intrinsic
    def _prefetch(typingctx, rows, row, offset, write):
        """Ask the CPU to start loading byte ``offset`` of row ``row`` of the C-contiguous
        array ``rows`` into its caches (LLVM's ``prefetch``: a hint that changes no value;
        ``write``, a literal 0 or 1: the line will be written)."""
        if not isinstance(write, numba.types.IntegerLiteral):
            raise numba.core.errors.TypingError("_prefetch: write must be a literal 0 or 1")
        rw = write.literal_value

        def codegen(context, builder, sig, args):
            from numba.core import cgutils
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            stride = cgutils.unpack_tuple(builder, ary.strides)[0]
            byte = _ir.IntType(8).as_pointer()
            at = builder.add(builder.mul(args[1], stride), args[2])
            ptr = builder.gep(builder.bitcast(ary.data, byte), [at])
            i32 = _ir.IntType(32)
            fn = cgutils.get_or_insert_function(
                builder.module, _ir.FunctionType(_ir.VoidType(), [byte, i32, i32, i32]),
                _PREFETCH)
            # (address, read 0 / write 1, locality 3: keep in all cache levels, data)
            builder.call(fn, [ptr, _ir.Constant(i32, rw), _ir.Constant(i32, 3),
                              _ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return numba.types.void(rows, row, offset, write), codegen
else:
    _as_f32 = _as_u32 = _f16_to_f32 = _f32_to_f16 = _prefetch = None


@_jit
def _bf16_to_f32(bits):
    """The bf16 whose bits are the uint16 ``bits``, widened to fp32 (exact)."""
    return _as_f32(np.uint32(bits) << np.uint32(16))


@_jit
def _f32_to_bf16(value):
    """The bits of fp32 ``value`` rounded to bf16, to nearest even; NaN as 0xFFFF, as
    torch's vector cast writes it."""
    u = _as_u32(value)
    rounded = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                        >> np.uint32(16))
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.uint16(0xFFFF) if nan else rounded


@_jit
def _same(value):
    """An fp32 gradient as it is (the widening of :func:`_sgd_half` for fp32)."""
    return value


#: Widening and rounding by wire dtype (the uint16 bits of bf16 and fp16).
_WIDEN = {"float32": _same, "bfloat16": _bf16_to_f32, "float16": _f16_to_f32}
_NARROW = {"bfloat16": _f32_to_bf16, "float16": _f32_to_f16}


def _sgd_half(widen, narrow):
    @_jit(contract=True)
    def kernel(master, grad, scale, neg_lr, reply):
        one = np.float32(1)
        for i in range(master.shape[0]):
            g = widen(grad[i])
            if scale != one:
                g = g * scale
            p = master[i] + neg_lr * g
            master[i] = p
            reply[i] = narrow(p)
    return kernel


def _scale_half(widen):
    @_jit
    def kernel(out, grad, alpha):
        one = np.float32(1)
        for i in range(out.shape[0]):
            g = widen(grad[i])
            out[i] = g if alpha == one else g * alpha
    return kernel


def _add_half(widen):
    @_jit(contract=True)
    def kernel(acc, grad, alpha):
        for i in range(acc.shape[0]):
            acc[i] = acc[i] + alpha * widen(grad[i])
    return kernel


#: Plain SGD on a dense partition that also writes the half-width reply, by (gradient
#: dtype, reply dtype): a bf16/fp16 gradient as it came (async, or sync with one
#: worker) or a sync clock's fp32 mean. For each element the gradient widened to fp32
#: (exact), times ``scale`` unless 1, then ``p + (-lr) * g`` (one fused multiply-add,
#: as torch's vector ``add_`` does), and the new value rounded to the reply's dtype to
#: nearest even. Half-width arrays are the uint16 bits. One pass where torch takes
#: three (cast, ``add_``, cast back), bit for bit the same (tests/test_dense_path.py).
SGD_HALF = {(g, r): _sgd_half(_WIDEN[g], _NARROW[r]) for g in _WIDEN for r in _NARROW
            if g in ("float32", r)}
#: A sync clock's sum of half-width pushes in fp32, by wire dtype: the first push
#: ``out = widen(g) * alpha`` (torch: a cast, then ``mul_`` unless alpha is 1), each
#: later one ``acc + alpha * widen(g)`` (torch's mixed-dtype ``add_``, fused as its
#: kernel fuses it). The same bits as those, in one pass each without a cast copy.
SCALE_HALF = {d: _scale_half(_WIDEN[d]) for d in _NARROW}
ADD_HALF = {d: _add_half(_WIDEN[d]) for d in _NARROW}


# -- a worker's lookups: the batch's distinct ids, and a bag's row gradients --------

#: A worker takes these kernels for lookups of at least this many ids. Their first
#: compile costs about 1.3 s of CPU, once per process (once per fork server where the
#: built-in task's lookups are this large: :func:`warm_worker`); at 8,192 Zipf ids they
#: save 0.35 ms a step, so a job pays it back in about 4,000 steps, and smaller lookups
#: later.
WORKER_MIN_IDS = 4096
_DIGIT_BITS = 11


@_jit
def _first_seen(ids, keys, slots, bits, inverse, firsts):
    """Number each distinct id of ``ids`` (>= 0) in order of first appearance, through
    an open-addressing table (``keys`` all -1, ``2 ** bits`` of them, above twice the
    ids; probed from :func:`_home` as the id index is): ``firsts[k]`` is the k-th
    distinct id and ``inverse[i]`` the number of ``ids[i]``. Returns how many are
    distinct."""
    mask = keys.shape[0] - 1
    m = 0
    for i in range(ids.shape[0]):
        key = ids[i]
        j = _home(key, bits)
        while True:
            held = keys[j]
            if held == key:
                inverse[i] = slots[j]
                break
            if held == -1:
                keys[j] = key
                slots[j] = m
                firsts[m] = key
                inverse[i] = m
                m += 1
                break
            j = (j + 1) & mask
    return m


@_jit
def _sort_distinct(firsts, m, order, spare, counts, inverse, out):
    """``out`` = the ``m`` distinct ids of ``firsts`` increasing (an LSD radix sort,
    11 bits a pass, as many passes as the largest id needs), and ``inverse`` renumbered
    from order of appearance to that order."""
    top = 0
    for k in range(m):
        order[k] = k
        if firsts[k] > top:
            top = firsts[k]
    radix = counts.shape[0]
    shift = 0
    while True:
        counts[:] = 0
        for k in range(m):
            counts[(firsts[order[k]] >> shift) & (radix - 1)] += 1
        total = 0
        for d in range(radix):
            c = counts[d]
            counts[d] = total
            total += c
        for k in range(m):
            at = order[k]
            d = (firsts[at] >> shift) & (radix - 1)
            spare[counts[d]] = at
            counts[d] += 1
        order, spare = spare, order
        shift += _DIGIT_BITS
        if shift >= 63 or (top >> shift) == 0:
            break
    for r in range(m):  # spare: the rank of each number
        spare[order[r]] = r
        out[r] = firsts[order[r]]
    for i in range(inverse.shape[0]):
        inverse[i] = spare[inverse[i]]


def unique_inverse(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``torch.unique(ids, sorted=True, return_inverse=True)`` of int64 ids >= 0, as
    numpy arrays: one hashing pass over the ids and a radix sort of the distinct ones
    (torch sorts all of them: 0.24 ms against 0.07 ms for a batch of 8,192 Zipf ids, 3,400
    distinct; benchmarks/table_cache.py). Where nearly every id is distinct the sorts do
    the same work and torch's is the faster (53k distinct ids: 1.2 against 0.8 ms)."""
    n = len(ids)
    bits = max(4, (2 * n - 1).bit_length())
    keys = np.full(1 << bits, -1, dtype=np.int64)
    inverse, firsts = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    m = _first_seen(ids, keys, np.empty(1 << bits, dtype=np.int64), bits, inverse, firsts)
    out = np.empty(m, dtype=np.int64)
    _sort_distinct(firsts, m, np.empty(m, dtype=np.int64), np.empty(m, dtype=np.int64),
                   np.empty(1 << _DIGIT_BITS, dtype=np.int64), inverse, out)
    return out, inverse


@_jit
def bag_sum_backward(inverse, starts, grad, out):
    """``out[inverse[i]] += grad[b]`` for each position ``i`` of each bag ``b`` (bag b
    runs from ``starts[b]`` to the next start, the last to the end), positions in order:
    ``index_add_(0, inverse, grad[bag of each position])`` bit for bit, without the
    gathered copy of ``grad``. ``out`` starts zeroed."""
    n, bags, dim = inverse.shape[0], starts.shape[0], grad.shape[1]
    for b in range(bags):
        end = starts[b + 1] if b + 1 < bags else n
        for i in range(starts[b], end):
            row = inverse[i]
            for c in range(dim):
                out[row, c] += grad[b, c]


def warm_worker() -> bool:
    """Compile now the kernel a worker uses on lookups of ``WORKER_MIN_IDS`` ids or more
    (:func:`unique_inverse`, about 1.3 s of CPU): a fork server does it once for the
    workers it forks where the built-in task's batches are that large
    (:func:`tessera.train.standby.compile_ahead`). True where this call compiled it."""
    if not ENABLED:
        return False
    before = len(_first_seen.signatures) + len(_sort_distinct.signatures)
    unique_inverse(np.array([2, 1, 2], dtype=np.int64))
    return len(_first_seen.signatures) + len(_sort_distinct.signatures) > before


def warm_dense(wire_dtype: str, *, sync: bool, sums: bool, steps: bool) -> None:
    """Compile now, at start-up, the dense kernels a server will use on a ``wire_dtype``
    wire (bf16 or fp16), rather than at the first clock, where their compiling (about
    0.3-1 s) would stall every worker (a server's role calls it before it serves).
    ``sums``: sync clocks are summed (more than one worker, or loss scaling); ``steps``:
    plain SGD steps with the reply written as it goes (not under loss scaling). The
    async step is compiled for both kinds of gradient array: a frame's read-only bits
    (TCP) and a writable one (shared memory)."""
    if not ENABLED or wire_dtype not in _NARROW:
        return
    f32, one = np.float32, np.float32(1)
    wide, bits, reply = np.zeros(4, f32), np.zeros(4, np.uint16), np.zeros(4, np.uint16)
    if sums:  # a sync frame is summed as a tensor's (writable) memory
        SCALE_HALF[wire_dtype](wide, bits, one)
        ADD_HALF[wire_dtype](wide, bits, one)
    if not steps:
        return
    if sums:
        SGD_HALF["float32", wire_dtype](np.zeros(4, f32), wide, one, one, reply)
        return
    SGD_HALF[wire_dtype, wire_dtype](np.zeros(4, f32), bits, one, one, reply)
    if not sync:
        frozen = bits.copy()
        frozen.flags.writeable = False
        SGD_HALF[wire_dtype, wire_dtype](np.zeros(4, f32), frozen, one, one, reply)


def array_of(tensor):
    """A CPU tensor's memory as the numpy array these kernels take: fp32 as it is,
    bf16 and fp16 as their uint16 bits (numpy has no bf16)."""
    if tensor.element_size() == 2:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def warm(optimizers=None) -> list[str]:
    """Compile the row kernels now, on tiny inputs: the id index's, the initial rows',
    the gather's, and the steps of the sparse ``optimizers`` named (``"sgd"``,
    ``"adagrad"``, ``"adam"``; None: all three). A table server calls it before it
    serves (:func:`tessera.cluster.role.ready_to_serve`); so does a process that
    measures its memory before its table exists (``table_memory``'s tests and
    benchmark), and a fork server for the servers it will fork
    (:func:`tessera.train.standby.compile_ahead`). Returns the kernels this call
    compiled (those already compiled in this process, or inherited from the process it
    was forked from, are not)."""
    if not ENABLED:
        return []
    names = {"sgd", "adagrad", "adam"} if optimizers is None else set(optimizers)
    kernels = {"place_ids": place_ids, "find_slots": find_slots, "find_buckets": find_buckets,
               "fill_initial": fill_initial, "gather": gather, "sgd_rows": sgd_rows,
               "adagrad_rows": adagrad_rows, "adam_rows": adam_rows}
    before = {name: len(k.signatures) for name, k in kernels.items()}
    f32, i64 = np.float32, np.int64
    table = np.full((8, 2), -1, dtype=i64)
    ids, slots = np.array([3], i64), np.zeros(1, i64)
    place_ids(table, ids, slots, 3)
    find_slots(table, ids, 3, slots)
    find_buckets(table, ids, 3, slots)
    rows, grad = np.zeros((1, 4), f32), np.zeros((1, 4), f32)
    # fill_initial with the argument types initial_rows passes it (the column offsets it
    # caches are read-only, and numba compiles a read-only array apart; held by
    # tests/test_row_kernels.py, which drives a shard after warm() and compiles nothing)
    columns = np.zeros(4, np.uint64)
    columns.flags.writeable = False
    fill_initial(np.zeros(1, i64), np.uint64(0), columns, f32(1), f32(0), f32(1), rows)
    at, one = np.zeros(1, i64), f32(1)
    gather(rows, at, grad)
    if "sgd" in names:
        sgd_rows(rows, at, grad, one, one)
    if "adagrad" in names:
        adagrad_rows(rows, at, rows.copy(), at, grad, one, one, one)
    if "adam" in names:
        adam_rows(rows, at, rows.copy(), rows.copy(), at, grad, one, one, one, one)
    return sorted(name for name, k in kernels.items() if len(k.signatures) > before[name])
