"""Tier 1: one server's shard of a sharded embedding table (tessera.ps.embedding).

The oracles: a pure-Python SplitMix64 (Python integers, masked to 64 bits) for the
vectorised hashes, and torch.optim on the whole table in one process for the
sparse update rules -- SGD and Adagrad on a dense parameter whose gradient is the
sparse rows scattered into zeros, SparseAdam on a parameter with a sparse
gradient, as nn.Embedding(sparse=True) produces.

Every test runs twice: on the compiled row kernels (tessera.ps.kernels, numba) and on
the numpy and torch path a process without numba takes.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from tessera.config.schema import OptimizerConfig
from tessera.ps import kernels
from tessera.ps.embedding import EmbeddingShard, TableError, TableSpec
from tessera.ps.embedding_ids import initial_rows, owner_of

NUMBA = kernels.ENABLED  # as imported: numba is installed and not switched off


@pytest.fixture(autouse=True, params=["numba", "numpy"])
def row_kernels(request, monkeypatch):
    if request.param == "numba" and not NUMBA:
        pytest.skip("numba is not importable here")
    monkeypatch.setattr(kernels, "ENABLED", request.param == "numba")
    return request.param

M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """Reference SplitMix64 output for state x (Steele, Lea & Flood 2014)."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def reference_row(seed: int, row_id: int, dim: int, scale: float) -> np.ndarray:
    key = splitmix64(splitmix64(seed & M64) ^ (row_id & M64))
    out = []
    for c in range(dim):
        k = splitmix64((key + c * 0x9E3779B97F4A7C15) & M64) >> 40
        out.append(np.float32((2 * k + 1 - (1 << 24)) / (1 << 24)) * np.float32(scale))
    return np.array(out, dtype=np.float32)


# ---- 1. placement -------------------------------------------------------------------

def test_owner_of_spreads_consecutive_ids_evenly_and_deterministically():
    ids = np.arange(100_000, dtype=np.int64)
    owners = owner_of(ids, 4)
    assert owners.dtype == np.int64
    counts = np.bincount(owners, minlength=4)
    assert counts.sum() == 100_000 and len(counts) == 4
    assert np.all(np.abs(counts - 25_000) <= 0.05 * 25_000), counts
    np.testing.assert_array_equal(owner_of(ids[::-1].copy(), 4), owners[::-1])
    # The same owners any process computes: the pure-Python hash, incl. huge ids.
    probe = np.array([0, 1, 2, 99_999, 10**12, 2**62 + 7, 2**63 - 1], dtype=np.int64)
    expected = [splitmix64(int(i)) % 5 for i in probe]
    np.testing.assert_array_equal(owner_of(probe, 5), expected)
    with pytest.raises(ValueError, match="num_servers"):
        owner_of(ids, 0)


# ---- 2. initial rows ------------------------------------------------------------------

def test_initial_rows_depend_on_seed_and_id_only():
    ids = np.array([5, 0, 10**12, 17, 2**62 + 3, 42], dtype=np.int64)
    rows = initial_rows(ids, 16, seed=7, scale=0.05)
    assert rows.dtype == torch.float32 and rows.shape == (6, 16)
    for i, row_id in enumerate(ids.tolist()):
        assert_close(rows[i], torch.from_numpy(reference_row(7, row_id, 16, 0.05)),
                     rtol=0, atol=0)
    # Independent of batch composition and order.
    perm = np.array([3, 1, 5, 0, 4, 2])
    assert_close(initial_rows(ids[perm], 16, 7, 0.05), rows[perm], rtol=0, atol=0)
    assert_close(initial_rows(ids[2:3], 16, 7, 0.05), rows[2:3], rtol=0, atol=0)
    # A different seed gives different rows.
    other = initial_rows(ids, 16, seed=8, scale=0.05)
    assert (other != rows).float().mean() > 0.99
    # Uniform in (-scale, scale): bounds, mean 0, std scale / sqrt(3).
    big = initial_rows(np.arange(20_000, dtype=np.int64), 32, seed=0, scale=0.05)
    assert big.abs().max() <= torch.tensor(0.05, dtype=torch.float32)
    assert abs(big.mean().item()) < 0.05 * 0.01
    assert abs(big.std().item() / (0.05 / 3 ** 0.5) - 1) < 0.01
    assert_close(initial_rows(ids, 4, 0, 0.0), torch.zeros(6, 4))


# ---- 3. sparse optimizers against torch.optim on the whole table ----------------------

NUM_ROWS, DIM, SEED, SCALE = 50, 8, 3, 0.1


def drive(shard: EmbeddingShard, torch_step, param: torch.Tensor, id_sets, rng) -> None:
    """Apply the same random sparse gradients to the shard and to ``param``."""
    for clock, ids in enumerate(id_sets):
        grads = torch.from_numpy(rng.standard_normal((len(ids), DIM)).astype(np.float32))
        shard.apply(ids, grads, clock)
        torch_step(ids, grads)
        probe = np.concatenate([ids[:3], ids[:2], [0]]).astype(np.int64)
        assert_close(shard.lookup(probe, clock), param.detach()[torch.from_numpy(probe)])
    assert shard.num_rows < NUM_ROWS  # some rows were never touched...
    assert_close(shard.lookup(np.arange(NUM_ROWS, dtype=np.int64), len(id_sets)),
                 param.detach())       # ...and still hold their initial values.
    assert_close(shard.state_tensors()["ids"], torch.arange(NUM_ROWS))


def random_id_sets(rng, num_steps=6, empty_at=3):
    sets = [np.sort(rng.choice(NUM_ROWS, size=rng.integers(1, 20), replace=False))
            .astype(np.int64) for _ in range(num_steps)]
    sets[empty_at] = np.empty(0, dtype=np.int64)  # a clock with no pushes still counts
    return sets


def dense_reference(optimizer_cls, **kwargs):
    initial = initial_rows(np.arange(NUM_ROWS, dtype=np.int64), DIM, SEED, SCALE)
    param = torch.nn.Parameter(initial.clone())
    opt = optimizer_cls([param], foreach=False, **kwargs)

    def step(ids, grads):
        dense = torch.zeros(NUM_ROWS, DIM)
        dense[torch.from_numpy(ids)] = grads
        param.grad = dense
        opt.step()

    return param, step, opt


def table(**kwargs) -> TableSpec:
    return TableSpec(name="items", dim=DIM, num_embeddings=NUM_ROWS, init_scale=SCALE,
                     seed=SEED, **kwargs)


@pytest.mark.parametrize("cfg", [
    OptimizerConfig(name="sgd", lr=0.3),
    OptimizerConfig(name="adagrad", lr=0.2, lr_decay=0.05, initial_accumulator_value=0.1,
                    eps=1e-10),
], ids=["sgd", "adagrad"])
def test_sgd_and_adagrad_match_torch_on_dense_table(cfg):
    rng = np.random.default_rng(0)
    cls = torch.optim.SGD if cfg.name == "sgd" else torch.optim.Adagrad
    param, step, opt = dense_reference(cls, **cfg.torch_kwargs())
    shard = EmbeddingShard(table(), cfg)
    drive(shard, step, param, random_id_sets(rng), rng)
    assert shard.steps == 6
    if cfg.name == "adagrad":
        assert_close(shard.state_tensors()["sum"], opt.state[param]["sum"])


@pytest.mark.parametrize("cfg", [
    OptimizerConfig(name="sgd", lr=0.3, weight_decay=0.1),
    OptimizerConfig(name="adagrad", lr=0.2, lr_decay=0.05, weight_decay=0.1),
], ids=["sgd", "adagrad"])
def test_weight_decay_matches_torch_when_every_row_is_updated(cfg):
    # Dense weight decay moves rows without gradient too; a sparse rule only the
    # rows it updates. The two agree when every step updates every row.
    rng = np.random.default_rng(1)
    cls = torch.optim.SGD if cfg.name == "sgd" else torch.optim.Adagrad
    param, step, _ = dense_reference(cls, **cfg.torch_kwargs())
    shard = EmbeddingShard(table(), cfg)
    id_sets = [rng.permutation(NUM_ROWS).astype(np.int64) for _ in range(4)]
    for clock, ids in enumerate(id_sets):
        grads = torch.from_numpy(rng.standard_normal((NUM_ROWS, DIM)).astype(np.float32))
        shard.apply(ids, grads, clock)
        step(ids, grads)
    assert_close(shard.lookup(np.arange(NUM_ROWS, dtype=np.int64), 4), param.detach())


def test_adam_matches_torch_sparse_adam():
    rng = np.random.default_rng(2)
    cfg = OptimizerConfig(name="adam", lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    weight = torch.nn.Parameter(
        initial_rows(np.arange(NUM_ROWS, dtype=np.int64), DIM, SEED, SCALE).clone())
    opt = torch.optim.SparseAdam([weight], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    def step(ids, grads):
        index = torch.from_numpy(ids).reshape(1, -1)
        weight.grad = torch.sparse_coo_tensor(index, grads, (NUM_ROWS, DIM),
                                              check_invariants=True)
        opt.step()

    shard = EmbeddingShard(table(), cfg)
    drive(shard, step, weight, random_id_sets(rng), rng)
    state, torch_state = shard.state_tensors(), opt.state[weight]
    assert shard.steps == torch_state["step"] == 6
    assert_close(state["exp_avg"], torch_state["exp_avg"])
    assert_close(state["exp_avg_sq"], torch_state["exp_avg_sq"])


def test_unsupported_optimizers_are_refused_by_name():
    spec = table()
    with pytest.raises(ValueError, match="optimizer.name 'adamw'.*'sgd', 'adagrad' or 'adam'"):
        EmbeddingShard(spec, OptimizerConfig(name="adamw"))
    with pytest.raises(ValueError, match="optimizer.momentum = 0.9"):
        EmbeddingShard(spec, OptimizerConfig(name="sgd", momentum=0.9))
    with pytest.raises(ValueError, match="weight_decay = 0.01"):
        EmbeddingShard(spec, OptimizerConfig(name="adam", weight_decay=0.01))


# ---- 4. lazy memory -------------------------------------------------------------------

def test_unbounded_table_stores_only_touched_rows():
    rng = np.random.default_rng(3)
    ids = np.unique(rng.integers(0, 10**12, size=1100))[:1000]
    ids = rng.permutation(ids).astype(np.int64)
    dim = 16
    shard = EmbeddingShard(TableSpec(name="users", dim=dim), OptimizerConfig(name="adam"))
    assert shard.num_rows == 0 and shard.nbytes == 0
    assert_close(shard.lookup(ids, 0), initial_rows(ids, dim, 0, 0.01))
    shard.apply(ids, torch.ones(1000, dim), 0)
    assert shard.num_rows == 1000
    assert shard.nbytes == 1000 * dim * 4 * (1 + 2)  # values, exp_avg, exp_avg_sq
    assert_close(shard.state_tensors()["ids"], torch.from_numpy(np.sort(ids)))
    # Looked up but never updated: values only, no optimizer state yet.
    more = np.arange(2**62, 2**62 + 500, dtype=np.int64)
    shard.lookup(more, 1)
    assert shard.num_rows == 1500
    assert shard.nbytes == 1000 * dim * 4 * 3 + 500 * dim * 4


# ---- 5. admission ---------------------------------------------------------------------

def test_rows_are_admitted_after_three_lookups():
    lr = 0.5
    spec = TableSpec(name="ads", dim=4, admit_after=3, init_scale=0.2, seed=11)
    shard = EmbeddingShard(spec, OptimizerConfig(name="sgd", lr=lr))
    ids = np.array([7], dtype=np.int64)
    initial = initial_rows(ids, 4, 11, 0.2)
    grad = torch.full((1, 4), 1.0)
    for clock in range(2):
        assert_close(shard.lookup(ids, clock), initial)
        assert shard.num_rows == 0
        shard.apply(ids, grad, clock)          # dropped: not admitted
        assert shard.num_rows == 0
    # Repeats within one lookup count once.
    assert_close(shard.lookup(np.array([8, 8, 8], dtype=np.int64), 2)[2],
                 initial_rows(np.array([8]), 4, 11, 0.2)[0])
    assert shard.num_rows == 0
    assert_close(shard.lookup(ids, 2), initial)  # third lookup: stored now
    assert shard.num_rows == 1
    shard.apply(ids, grad, 2)
    assert_close(shard.lookup(ids, 3), initial - lr * grad)
    assert_close(shard.state_tensors()["ids"], torch.tensor([7]))


# ---- 6. eviction ----------------------------------------------------------------------

def test_rows_untouched_for_evict_after_clocks_are_dropped():
    lr = 0.5
    spec = TableSpec(name="clicks", dim=4, evict_after=2, seed=5)
    shard = EmbeddingShard(spec, OptimizerConfig(name="adagrad", lr=lr))
    a = np.array([1, 2, 3], dtype=np.int64)
    b = np.array([4, 5], dtype=np.int64)
    shard.lookup(a, 0)
    shard.apply(a, torch.ones(3, 4), 0)
    shard.lookup(b, 1)
    shard.apply(b, torch.ones(2, 4), 1)
    assert shard.num_rows == 5                   # a untouched for 1 clock: kept
    shard.apply(b[:1], torch.ones(1, 4), 2)      # a untouched for 2 clocks: dropped
    assert_close(shard.state_tensors()["ids"], torch.tensor([4, 5]))
    assert shard.evict(3) == 1                   # 5 last touched at clock 1
    assert_close(shard.state_tensors()["ids"], torch.tensor([4]))
    assert shard.nbytes == 4 * 4 * 2             # state freed with the rows
    # An evicted row comes back as its initial value, with fresh optimizer state.
    assert_close(shard.lookup(a, 3), initial_rows(a, 4, 5, 0.01))
    assert_close(shard.state_tensors()["sum"][:3], torch.zeros(3, 4))


def test_max_rows_keeps_the_most_recently_touched():
    lr = 0.1
    spec = TableSpec(name="queries", dim=3, max_rows=10, seed=2)
    shard = EmbeddingShard(spec, OptimizerConfig(name="sgd", lr=lr))

    def touch(i: int, clock: int) -> None:
        ids = np.array([i], dtype=np.int64)
        shard.lookup(ids, clock)
        shard.apply(ids, torch.full((1, 3), float(i + 1)), clock)
        assert shard.num_rows <= 10

    def expected(i: int) -> torch.Tensor:  # one sgd step from the initial row
        return initial_rows(np.array([i]), 3, 2, 0.01)[0] - lr * float(i + 1)

    for clock in range(20):  # id i at clock i
        touch(clock, clock)
    state = shard.state_tensors()
    assert_close(state["ids"], torch.arange(10, 20))
    assert_close(state["last_clock"], torch.arange(10, 20))
    # Id 3 was dropped: it comes back from its initial value, into a reused slot,
    # and pushes out the least recently touched row (10).
    touch(3, 20)
    state = shard.state_tensors()
    assert_close(state["ids"], torch.tensor([3, *range(11, 20)]))
    assert_close(state["values"], torch.stack([expected(i) for i in [3, *range(11, 20)]]))
    assert_close(shard.lookup(np.array([0, 10], dtype=np.int64), 21),
                 initial_rows(np.array([0, 10]), 3, 2, 0.01))


# ---- 7. bad input -----------------------------------------------------------------------

@pytest.mark.parametrize("ids, grads, match", [
    (np.array([1, -3]), None, r"id -3 \(position 1\) is outside \[0, 50\)"),
    (np.array([1, 50]), None, r"id 50 \(position 1\) is outside \[0, 50\)"),
    (np.array([1.0, 2.0]), None, "must be int64, got dtype float64"),
    (np.array([[1, 2]]), None, r"must be 1-D, got shape \(1, 2\)"),
    (np.array([1, 2]), torch.zeros(2, DIM + 1), r"shape .* = \(2, 8\), got \(2, 9\)"),
    (np.array([1, 2]), torch.tensor([[0.0] * DIM, [float("nan")] * DIM]),
     "gradient of id 2 is not finite"),
    (np.array([1, 1]), torch.zeros(2, DIM), "unique ids"),
], ids=["negative", "too-large", "float", "2-D", "grad-shape", "nan-grad", "repeated"])
def test_bad_requests_name_the_table_and_change_nothing(ids, grads, match):
    shard = EmbeddingShard(table(admit_after=2), OptimizerConfig(name="adam"))
    warm = np.array([1, 2, 3], dtype=np.int64)
    for clock in range(2):
        shard.lookup(warm, clock)
        shard.apply(warm, torch.ones(3, DIM), clock)
    shard.lookup(np.array([9], dtype=np.int64), 2)  # pending admission
    before, steps = shard.state_tensors(), shard.steps
    with pytest.raises(TableError, match="table 'items'") as err:
        if grads is None:
            shard.lookup(ids, 3)
        else:
            shard.apply(ids, grads, 3)
    assert err.match(match)
    if grads is None:
        with pytest.raises(TableError, match=match):
            shard.apply(ids, torch.zeros(len(ids), DIM), 3)
    after = shard.state_tensors()
    assert after.keys() == before.keys() and shard.steps == steps == 2
    for key in before:
        assert_close(after[key], before[key], rtol=0, atol=0)
    # 9 was seen once before the failed requests: still one lookup short.
    shard.lookup(np.array([9], dtype=np.int64), 3)
    assert shard.num_rows == 4


def test_table_spec_names_the_bad_field():
    for field, value in [("dim", 0), ("num_embeddings", 0), ("init_scale", -1.0),
                         ("admit_after", 0), ("evict_after", -1), ("max_rows", -1)]:
        kwargs = dict(name="t", dim=4)
        kwargs[field] = value
        with pytest.raises(ValueError, match=f"table 't': {field} must be"):
            TableSpec(**kwargs)


# ---- 8. vectorised index and cheap update checks ---------------------------------------

def test_initial_rows_across_blocks_match_the_reference():
    # More rows than one block of the blocked computation, with an odd dim.
    ids = np.random.default_rng(4).integers(0, 2**63 - 1, size=3000, dtype=np.int64)
    rows = initial_rows(ids, 37, seed=11, scale=0.3)
    for i in (0, 1, 884, 885, 886, 1769, 1770, 2999):  # blocks of 885 rows
        assert_close(rows[i], torch.from_numpy(reference_row(11, int(ids[i]), 37, 0.3)),
                     rtol=0, atol=0)


def test_id_index_matches_a_dict_through_inserts_and_evictions():
    from tessera.ps.embedding_index import IdIndex
    rng = np.random.default_rng(5)
    index, ref = IdIndex(), {}
    for clock in range(40):
        ids = np.unique(rng.integers(0, 500, size=rng.integers(0, 60)))
        slots = index.find(ids)
        np.testing.assert_array_equal(slots, [ref.get(i, -1) for i in ids.tolist()])
        new = ids[slots < 0]
        rng.shuffle(new)  # insert takes any order
        for i, s in zip(new.tolist(), index.insert(new, clock).tolist()):
            ref[i] = s
        gone = index.expired(clock, evict_after=3, max_rows=120)
        for i in index.ids[gone].tolist():
            del ref[i]
        index.remove(gone)
        assert len(index) == len(ref)
        live = index.live()
        np.testing.assert_array_equal(index.ids[live], sorted(ref))
        np.testing.assert_array_equal(live, [ref[i] for i in sorted(ref)])
        probe = rng.integers(-5, 600, size=50)  # unsorted, repeats, absent ids
        np.testing.assert_array_equal(index.find(probe),
                                      [ref.get(i, -1) for i in probe.tolist()])


def test_id_index_grows_its_buckets_in_place_and_finds_every_id():
    """Past 8 MiB of buckets the index's table lives in a reserved mapping that a
    rebuild into twice the buckets extends in place (the pages held are rewritten, only
    the new half is faulted in): the same mapping before and after, and every id
    found at its slot through the growths, removals and reinsertions."""
    from tessera.ps.embedding_index import IdIndex
    rng = np.random.default_rng(3)
    ids = rng.permutation(np.unique(rng.integers(0, 1 << 50, 400_000)))[:300_000]
    index, areas, slot_of = IdIndex(), set(), {}
    for start in range(0, len(ids), 6_000):
        batch = ids[start:start + 6_000]
        before = len(index._table)
        for i, s in zip(batch.tolist(), index.insert(batch, start).tolist()):
            slot_of[i] = s
        if len(index._table) != before and hasattr(index._store, "_tessera_area"):
            areas.add(id(index._store._tessera_area))
    assert len(index._table) >= 4 * 250_000 and len(areas) == 1  # grew in place, twice+
    assert index._table.ctypes.data == index._store.data_ptr()
    np.testing.assert_array_equal(index.find(ids), [slot_of[i] for i in ids.tolist()])
    gone = index.find(ids[::3])
    index.remove(gone)
    probe = np.concatenate([ids, rng.integers(0, 1 << 50, 1000)])
    want = np.array([-1 if k % 3 == 0 else slot_of[i] for k, i in enumerate(ids.tolist())]
                    + [slot_of.get(i, -1) for i in probe[len(ids):].tolist()])
    np.testing.assert_array_equal(index.find(probe), want)
    again = index.insert(ids[::3], 99)  # the freed slots, back in
    np.testing.assert_array_equal(np.sort(again), np.sort(gone))
    np.testing.assert_array_equal(index.find(ids[::3]), again)


def test_prefault_makes_fresh_pages_present_and_changes_no_value():
    """:func:`prefault` faults a fresh range's pages in with one system call, so the
    loop that then writes the rows takes (almost) no page faults, where the same
    writes into a range not prefaulted take one per page; the values, including the
    rows before the range that share its first page, are unchanged."""
    import resource

    from tessera.ps.embedding_index import prefault, zero_rows
    rows, dim = 40_000, 64  # 10 MiB: a lazily zeroed mapping
    pages = rows * dim * 4 // 4096

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    t = zero_rows(rows, (dim,), torch.float32)
    t[:3] = 7.0  # rows sharing the range's first page
    if not prefault(t[3:]):
        pytest.skip("no MADV_POPULATE_WRITE here (Linux < 5.14)")
    assert torch.all(t[:3] == 7.0) and torch.all(t[3:] == 0)
    before = faults()
    t[3:] = 1.0
    prefaulted = faults() - before
    control = zero_rows(rows, (dim,), torch.float32)
    before = faults()
    control[3:] = 1.0
    cold = faults() - before
    # One fault a page (4 KiB pages), or one per 2 MiB where transparent huge pages are
    # always on; either way the prefaulted writes take a twentieth of the control's at most.
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            huge = "[always]" in f.read()
    except OSError:
        huge = False
    expected = rows * dim * 4 // (2 << 20) if huge else pages
    assert cold > expected // 2 and 20 * prefaulted <= cold, (prefaulted, cold, expected)


def _resident(t: torch.Tensor, first_row: int, rows: int) -> float:
    """The share of the pages under rows ``first_row .. first_row + rows`` of ``t``'s
    mapping that are in memory (``mincore``: the kernel's own count)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    row_bytes = t.shape[1] * t.element_size()
    start = t.data_ptr() + first_row * row_bytes
    first = start - start % mmap.PAGESIZE
    n = start + rows * row_bytes - first
    pages = -(-n // mmap.PAGESIZE)
    vec = ctypes.create_string_buffer(pages)
    assert libc.mincore(first, n, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw) / pages


def _until_resident(t: torch.Tensor, first_row: int, rows: int, timeout: float = 10.0
                    ) -> float:
    import time
    deadline = time.monotonic() + timeout
    while (share := _resident(t, first_row, rows)) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return share


def test_fault_ahead_makes_the_next_rows_present_on_another_thread_and_no_more():
    """:func:`fault_ahead` has a background thread fault in the pages of the rows asked
    for: they become resident without the calling thread touching them, its writes into
    them then take (almost) no page faults of its own, the rows stay zero, and the pages
    past the bound (``_AHEAD_BYTES``) are not taken."""
    import resource

    from tessera.ps import embedding_index
    from tessera.ps.embedding_index import fault_ahead, prefault, zero_rows
    rows, dim = 40_000, 64  # 10 MiB
    t = zero_rows(rows, (dim,), torch.float32, growable=True)
    if not prefault(t[:1]):
        pytest.skip("no MADV_POPULATE_WRITE here (Linux < 5.14)")
    assert _resident(t, 100, rows - 100) < 0.05
    fault_ahead(t, 100, rows - 100)
    assert _until_resident(t, 100, rows - 100) == 1.0
    assert torch.all(t == 0)

    def faults() -> int:  # this thread's own
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt

    before = faults()
    t[100:] = 1.0
    ahead = faults() - before
    control = zero_rows(rows, (dim,), torch.float32, growable=True)
    before = faults()
    control[100:] = 1.0
    cold = faults() - before
    assert 20 * ahead <= cold, (ahead, cold)

    # Asked for far more than the bound: the bound is taken, the rest is not.
    big = zero_rows(rows, (dim,), torch.float32, growable=True)
    bound = embedding_index._AHEAD_BYTES // (dim * 4)
    fault_ahead(big, 0, 4 * bound)
    assert _until_resident(big, 0, bound) == 1.0
    assert _resident(big, bound + 256, bound) < 0.05


def test_the_fault_ahead_thread_ends_when_idle_or_stopped_and_starts_again(monkeypatch):
    """The fault-ahead thread is per process, not per job: it ends after
    ``_AHEAD_LINGER_S`` without work (shortened here from 2 s), :func:`stop_fault_ahead`
    ends it at once (an in-process job ends its threads), and the next request starts
    one that works."""
    import time

    from tessera.ps import embedding_index
    from tessera.ps.embedding_index import fault_ahead, prefault, stop_fault_ahead, zero_rows

    def alive() -> bool:
        return any(t.name == "tessera-fault-ahead" for t in threading.enumerate())

    rows, dim = 40_000, 64  # 10 MiB: mapped (_MAPPED_BYTES)
    t = zero_rows(rows, (dim,), torch.float32, growable=True)
    if not prefault(t[:1]):
        pytest.skip("no MADV_POPULATE_WRITE here (Linux < 5.14)")
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    fault_ahead(t, 0, rows // 2)
    assert _until_resident(t, 0, rows // 2) == 1.0 and alive()
    # It runs at the lowest priority, and only it: the calling thread keeps its own.
    if sys.platform.startswith("linux"):
        thread = next(th for th in threading.enumerate() if th.name == "tessera-fault-ahead")
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == embedding_index._AHEAD_NICE
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
    started = time.monotonic()
    stop_fault_ahead(timeout=5.0)
    assert not alive() and time.monotonic() - started < 1.0
    monkeypatch.setattr(embedding_index, "_AHEAD_LINGER_S", 0.3)  # (read at each wait)
    fault_ahead(t, rows // 2, rows // 2)  # starts again
    assert _until_resident(t, rows // 2, rows // 2) == 1.0
    deadline = time.monotonic() + embedding_index._AHEAD_LINGER_S + 5.0
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive()


def test_a_growing_shard_has_its_next_rows_and_state_faulted_in_ahead():
    """A shard without a byte cap that created n rows at a request has the pages of the
    next 2n rows of its values and optimizer state faulted in ahead; a capped shard,
    whose storage the cap holds, has none faulted past its rows."""
    from tessera.ps.embedding_index import prefault, zero_rows
    if not prefault(zero_rows(1, (1,), torch.float32)):
        pytest.skip("no MADV_POPULATE_WRITE here (Linux < 5.14)")
    n, dim = 40_000, 64  # 10 MiB of values: mapped storage
    spec = TableSpec(name="items", dim=dim, num_embeddings=1 << 40, seed=SEED)
    shard = EmbeddingShard(spec, OptimizerConfig(name="adagrad", lr=0.1))
    ids = np.arange(n, dtype=np.int64) * 7 + 1
    shard.apply(ids, torch.ones(n, dim), 0)
    assert _until_resident(shard._values, n, 2 * n - 512) == 1.0
    assert _until_resident(shard._state["sum"], n, 2 * n - 512) == 1.0
    assert shard.lookup(ids[:5], 1).ne(0).any()  # the rows created are the table's

    capped = EmbeddingShard(TableSpec(name="items", dim=dim, num_embeddings=1 << 40,
                                      seed=SEED, memory_bytes=256 << 20),
                            OptimizerConfig(name="adagrad", lr=0.1))
    capped.apply(ids, torch.ones(n, dim), 0)
    end = capped._rows.slots.end
    import time
    time.sleep(0.3)
    assert _resident(capped._values, end + 512, n) < 0.05


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_every_non_finite_gradient_is_refused(bad):
    shard = EmbeddingShard(table(), OptimizerConfig(name="adagrad", lr=0.1))
    grads = torch.zeros(3, DIM)
    grads[2, 5] = bad
    with pytest.raises(TableError, match="id 9 is not finite"):
        shard.apply(np.array([1, 4, 9]), grads, 0)
    assert shard.num_rows == 0 and shard.steps == 0


def test_unsorted_repeated_ids_are_refused():
    shard = EmbeddingShard(table(), OptimizerConfig(name="sgd", lr=0.1))
    with pytest.raises(TableError, match="unique ids"):
        shard.apply(np.array([7, 3, 7]), torch.zeros(3, DIM), 0)
    shard.apply(np.array([7, 3, 5]), torch.ones(3, DIM), 0)  # unsorted unique: fine
    assert_close(shard.lookup(np.array([3, 5, 7, 3]), 0),
                 initial_rows(np.array([3, 5, 7, 3]), DIM, SEED, SCALE) - 0.1)


@pytest.mark.parametrize("reserve", [True, False], ids=["in-place", "refused"])
@pytest.mark.parametrize("accumulator", [0.0, 0.1])
def test_big_shards_on_mapped_storage_equal_small_storage(accumulator, reserve, monkeypatch):
    """Past 8 MiB a shard's rows and optimizer state live in lazily zeroed memory maps
    that grow in place within a reserved range of address space (or, where the kernel
    refuses the reservation, into a copy 8x larger); state rows never used are not
    filled (they are zero already), reused ones are. Growing to 40k rows (10 MiB of
    values), evicting half, and updating 25k new ids (reusing the freed slots, then
    growing the mapped storage) give bit for bit what the same shard on plain storage
    (doubling, every new state row filled) gives."""
    import tessera.ps.embedding_index as index
    dim, n = 64, 40_000
    assert n * dim * 4 > index._MAPPED_BYTES
    opt = OptimizerConfig(name="adagrad", lr=0.1, initial_accumulator_value=accumulator)
    spec = TableSpec(name="big", dim=dim, num_embeddings=None, seed=3, init_scale=0.05,
                     evict_after=2, optimizer=opt)
    ids = np.arange(n, dtype=np.int64) * 7919
    fresh = np.arange(n // 2 + 5000, dtype=np.int64) * 7919 + 1

    if not reserve:
        monkeypatch.setattr(index, "_RESERVE_BYTES", 0)

    def run(mapped_bytes: int):
        monkeypatch.setattr(index, "_MAPPED_BYTES", mapped_bytes)
        gen = torch.Generator().manual_seed(0)
        shard = EmbeddingShard(spec, opt)
        shard.apply(ids[: n // 2], torch.randn(n // 2, dim, generator=gen), 0)
        shard.apply(ids, torch.randn(n, dim, generator=gen), 1)
        shard.apply(ids[: n // 2], torch.randn(n // 2, dim, generator=gen), 2)
        assert shard.evict(3) == n // 2  # the second half expires
        where = shard._values.data_ptr()
        g = torch.randn(len(fresh), dim, generator=gen)
        shard.apply(fresh, g.clone(), 3)
        return shard, g, where == shard._values.data_ptr()

    mapped, g, stayed = run(index._MAPPED_BYTES)
    if reserve:  # mapped once past 8 MiB, then grown in place (doubling: no copy)
        assert mapped._values.shape[0] == 2 * n and stayed
    else:  # mapped once past 8 MiB, then copied into a mapping 8x larger
        assert mapped._values.shape[0] == 8 * n and not stayed
    plain, _, _ = run(1 << 62)
    assert plain._values.shape[0] == 2 * n
    a, b = mapped.export_state(), plain.export_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(a["ids"]) == n // 2 + len(fresh)
    # The new ids' state started from the accumulator, whether their state rows were
    # reused (20k of them: they held evicted rows' sums) or never used.
    at = np.searchsorted(a["ids"].numpy(), fresh)
    expected = torch.full((len(fresh), dim), accumulator).addcmul_(g, g, value=1)
    assert torch.equal(a["state.sum"][torch.from_numpy(at)], expected)



@pytest.mark.parametrize("kind", ["stored", "admit", "capped"])
def test_a_lookup_written_into_a_given_tensor_equals_a_fresh_answer(kind):
    """``lookup(out=...)`` (a server gathers a pull's rows where the client reads them)
    answers what a plain lookup answers: stored rows, rows not admitted yet (answered
    with their initial value), repeated and unsorted ids, a capped table."""
    extra = {"stored": {}, "admit": {"admit_after": 2},
             "capped": {"memory_bytes": 64 << 10, "num_embeddings": 1 << 40}}[kind]
    spec = TableSpec(**{**dict(name="items", dim=DIM, num_embeddings=NUM_ROWS,
                               init_scale=SCALE, seed=SEED), **extra})
    opt = OptimizerConfig(name="adagrad", lr=0.1)
    a, b = EmbeddingShard(spec, opt), EmbeddingShard(spec, opt)
    rng = np.random.default_rng(3)
    for clock in range(6):
        ids = rng.integers(0, NUM_ROWS, size=40)  # repeats, unsorted
        if clock % 2:
            ids = np.unique(ids)
        out = torch.full((len(ids), DIM), float("nan"))
        got = a.lookup(ids, clock, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(out, b.lookup(ids, clock)), (kind, clock)
        push = np.unique(ids)
        g = torch.from_numpy(rng.standard_normal((len(push), DIM), dtype=np.float32))
        a.apply(push, g, clock)
        b.apply(push, g, clock)


def test_a_push_after_a_lookup_of_its_rows_steps_the_rows_a_probe_finds():
    """The push that follows a lookup of the same rows takes that lookup's slots after
    checking that each still holds its id (:meth:`EmbeddingShard._slots_of`). Through
    evictions and freed slots taken by other ids in between, it steps exactly the rows
    a probe of the index finds (a twin that always probes), bit for bit."""
    spec = TableSpec(name="items", dim=DIM, num_embeddings=None, init_scale=SCALE, seed=SEED,
                     evict_after=2)
    opt = OptimizerConfig(name="adagrad", lr=0.1)
    cached, probed = EmbeddingShard(spec, opt), EmbeddingShard(spec, opt)
    rng = np.random.default_rng(8)
    taken = held = 0
    for clock in range(40):
        ids = np.unique(rng.integers(0, 200, size=50))
        for shard in (cached, probed):
            shard.lookup(ids, clock)
        looked_up = cached._looked_up
        assert looked_up is not None
        if clock % 3 == 1:  # the lookup's rows dropped and their slots given to others
            other = np.unique(rng.integers(200, 400, size=60))
            for shard in (cached, probed):
                shard.evict(clock + 3)
                shard.apply(other, torch.ones(len(other), DIM), clock)
            cached._looked_up = looked_up  # as if the push had come right after the lookup
            taken += bool(np.any((cached._rows.ids[looked_up] != ids)
                                 & (cached._rows.ids[looked_up] >= 0)))
        else:
            held += bool(np.array_equal(cached._rows.ids[looked_up], ids))
        probed._looked_up = None
        g = torch.from_numpy(rng.standard_normal((len(ids), DIM), dtype=np.float32))
        cached.apply(ids, g, clock)
        probed.apply(ids, g, clock)
        a, b = cached.export_state(), probed.export_state()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), clock
    assert taken and held  # both ways through the check were taken
