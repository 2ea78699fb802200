"""The compiled row kernels of an embedding shard (tessera.ps.kernels) against the numpy
and torch path a process without numba takes: the same workload on a shard per path.

(tests/test_embedding_table.py runs all its oracles, torch.optim and a pure-Python
SplitMix64, on both paths as well.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from tessera.config.schema import OptimizerConfig
from tessera.ps import kernels
from tessera.ps.embedding import EmbeddingShard, TableSpec

pytestmark = pytest.mark.skipif(not kernels.ENABLED, reason="numba is not importable here")


def _drive_both(spec: TableSpec, cfg: OptimizerConfig, steps: int = 12):
    """The same lookups and updates (Zipf-like ids, new ones every step, under a byte cap
    evictions too) on a shard per path; returns both shards."""
    shards = {}
    for path in ("numba", "numpy"):
        kernels.ENABLED = path == "numba"
        rng = np.random.default_rng(7)
        shard = EmbeddingShard(spec, cfg)
        for clock in range(steps):
            ids = np.unique(rng.zipf(1.2, size=3000) * 7919 % 50_000).astype(np.int64)
            shard.lookup(ids, clock)
            shard.apply(ids, torch.from_numpy(
                rng.standard_normal((len(ids), spec.dim)).astype(np.float32)), clock)
        shards[path] = shard
    return shards["numba"], shards["numpy"]


@pytest.mark.parametrize("capped", [False, True], ids=["unbounded", "capped"])
@pytest.mark.parametrize("cfg", [
    OptimizerConfig(name="sgd", lr=0.1, weight_decay=0.01),
    OptimizerConfig(name="adagrad", lr=0.1, lr_decay=0.01, weight_decay=0.01, eps=1e-6),
    OptimizerConfig(name="adam", lr=0.01, betas=(0.8, 0.95), eps=1e-6),
], ids=["sgd", "adagrad", "adam"])
def test_row_kernels_compute_what_the_numpy_path_does(cfg, capped, monkeypatch):
    """Same rows in the same slots, same evictions; SGD bit for bit (its multiply-add is
    fused where torch fuses it); Adagrad and Adam to fp32 rounding: the kernels' square
    root is correctly rounded, torch's vectorised one is not always."""
    monkeypatch.setattr(kernels, "ENABLED", kernels.ENABLED)  # restored afterwards
    spec = TableSpec(name="t", dim=24, num_embeddings=None, seed=3, init_scale=0.1,
                     memory_bytes=(1 << 20) if capped else 0)
    fast, slow = _drive_both(spec, cfg)
    assert fast.num_rows == slow.num_rows and fast.evictions == slow.evictions
    assert (fast.evictions > 0) == capped
    a, b = fast.state_tensors(), slow.state_tensors()
    assert a.keys() == b.keys()
    assert torch.equal(a["ids"], b["ids"])
    for key in a:
        if cfg.name == "sgd" or a[key].dtype != torch.float32:
            assert torch.equal(a[key], b[key]), key
        else:
            assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_process_told_to_use_numpy_does_not_import_numba():
    code = ("import sys; from tessera.ps import kernels; "
            "print(kernels.ENABLED, 'numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TESSERA_KERNELS": "numpy"},
                         timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


# -- a worker's lookups ------------------------------------------------------------

@pytest.mark.parametrize("ids", [
    np.random.default_rng(1).zipf(1.1, 8192) * 2654435761 % 10**7,  # table_cache's batch
    np.random.default_rng(2).integers(0, 2**62, 10_000),  # wide ids: six radix passes
    np.random.default_rng(3).integers(0, 50, 3000),  # few distinct ids, many repeats
    np.zeros(2048, dtype=np.int64),  # one distinct id
    np.arange(4096)[::-1].copy(),  # every id distinct, decreasing
    np.random.default_rng(4).integers(0, 10**8, 40_000),  # many, mostly distinct
    np.array([7]),
], ids=["zipf", "wide", "repeats", "one", "distinct", "many", "single"])
def test_unique_inverse_is_torch_unique(ids):
    ids = ids.astype(np.int64)
    uniq, inverse = kernels.unique_inverse(ids)
    want, want_inverse = torch.unique(torch.from_numpy(ids), return_inverse=True)
    assert np.array_equal(uniq, want.numpy())
    assert np.array_equal(inverse, want_inverse.numpy())


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("shape", ["2d", "offsets"])
def test_a_bags_row_gradients_are_the_same_bits_with_the_kernel(mode, shape, monkeypatch):
    """_BagOfRows.backward through bag_sum_backward (a batch over WORKER_MIN_IDS) and
    through index_add_ (the threshold raised): the same bits, in both bag layouts."""
    from tessera.parallel.embedding import _BagOfRows
    rng = np.random.default_rng(5)
    rows = torch.from_numpy(rng.standard_normal((900, 16)).astype(np.float32))
    if shape == "2d":
        inverse = torch.from_numpy(rng.integers(0, 900, (512, 8)))
        offsets = None
    else:  # bags of 0 to 15 ids
        lengths = rng.integers(0, 16, 800)
        inverse = torch.from_numpy(rng.integers(0, 900, int(lengths.sum())))
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    assert inverse.numel() >= kernels.WORKER_MIN_IDS
    upstream = torch.from_numpy(rng.standard_normal(
        (inverse.shape[0] if offsets is None else len(offsets), 16)).astype(np.float32))
    calls = []
    kernel = kernels.bag_sum_backward
    monkeypatch.setattr(kernels, "bag_sum_backward", lambda *a: (calls.append(1), kernel(*a)))
    grads = []
    for floor in (kernels.WORKER_MIN_IDS, 10**9):
        monkeypatch.setattr(kernels, "WORKER_MIN_IDS", floor)
        leaf = rows.clone().requires_grad_()
        _BagOfRows.apply(inverse, leaf, offsets, mode).backward(upstream)
        grads.append(leaf.grad)
    assert calls == [1]  # the first through the kernel, the second not
    assert torch.equal(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_gathered_rows_are_the_rows_asked_for_with_repeats(monkeypatch):
    """The compiled gather (which asks for rows ahead of copying them) answers what
    numpy's take does: every row, repeats and the last rows included, byte for byte."""
    from tessera.ps.embedding_index import gather_rows
    monkeypatch.setattr(kernels, "ENABLED", kernels.ENABLED)
    rng = np.random.default_rng(5)
    src = torch.from_numpy(rng.standard_normal((5000, 24)).astype(np.float32))
    for n in (0, 1, kernels.AHEAD, kernels.AHEAD + 1, 3000):
        slots = rng.integers(0, len(src), n).astype(np.int64)
        if n > 2:
            slots[-1] = slots[0]  # a repeat, at the end (no row fetched ahead of it)
        kernels.ENABLED = True
        fast = gather_rows(src, slots)
        kernels.ENABLED = False
        slow = gather_rows(src, slots)
        assert fast.shape == (n, 24) and fast.dtype == torch.float32
        assert torch.equal(fast, slow) and torch.equal(fast, src[torch.from_numpy(slots)])


_READY = """
import gc, sys
from tessera.cluster.role import ready_to_serve
from tessera.ps import kernels
from tessera.ps.embedding import TableSpec
from tessera.config.schema import OptimizerConfig
names = [n for n in sys.argv[1].split(",") if n]
tables = [TableSpec(name=f"t{i}", dim=8, num_embeddings=None,
                    optimizer=OptimizerConfig(name=n, lr=0.1)) for i, n in enumerate(names)]
compiled = ready_to_serve(tables, own_process=sys.argv[2] == "own")
have = sorted(k for k in ("find_slots", "find_buckets", "place_ids", "fill_initial", "gather",
                          "sgd_rows", "adagrad_rows", "adam_rows") if getattr(kernels, k).signatures)
assert compiled == have, (compiled, have)  # a fresh process: it compiled every one it has
import torch
# A server's first partition: its optimizer, whose first call imports torch._dynamo
# (torch's _disable_dynamo wrapper), about 800 modules: none of it left for the
# collector to walk again in a process of its own.
torch.optim.SGD([torch.zeros(4, requires_grad=True)], lr=0.1)
print(have, gc.get_freeze_count() > 1000, len(gc.get_objects()) < 20_000)
"""

_SERVES_WARM = """
import numpy as np, torch
from tessera.config.schema import OptimizerConfig
from tessera.ps import kernels
from tessera.ps.embedding import EmbeddingShard, TableSpec
kernels.warm()
row_kernels = ("find_slots", "find_buckets", "place_ids", "fill_initial", "gather",
               "sgd_rows", "adagrad_rows", "adam_rows")
before = {k: len(getattr(kernels, k).signatures) for k in row_kernels}
for name in ("sgd", "adagrad", "adam"):
    for spec in (TableSpec(name="t", dim=16, num_embeddings=None,
                           optimizer=OptimizerConfig(name=name, lr=0.1), seed=3),
                 TableSpec(name="c", dim=16, num_embeddings=None, memory_bytes=1 << 20,
                           optimizer=OptimizerConfig(name=name, lr=0.1))):
        shard = EmbeddingShard(spec, spec.optimizer)
        for clock in range(3):  # new rows (their initial values), then known ones
            ids = np.arange(clock * 50, clock * 50 + 200, dtype=np.int64)
            shard.lookup(ids, clock)
            shard.apply(ids, torch.full((len(ids), 16), 0.01), clock)
print(sorted(k for k in row_kernels if len(getattr(kernels, k).signatures) > before[k]))
"""


def test_warmed_kernels_serve_every_sparse_request_without_compiling_again():
    """kernels.warm() compiles each row kernel for the argument types a shard passes it:
    lookups that create rows (their initial values), lookups of known rows and every
    optimizer's updates, with and without a byte cap, compile no further signature (one
    that did would compile in the serve loop, a pause of tenths of a second at a table's
    first request). A fresh process: compiled kernels are per process."""
    out = subprocess.run([sys.executable, "-c", _SERVES_WARM], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


_AHEAD = """
import json, os, sys
from tessera.config import config_to_dict
from tessera.config.schema import JobConfig, DataConfig, ModelConfig
from tessera.ps import kernels
from tessera.train import standby
run_dir, dataset, optimizer, precision = sys.argv[1:5]
cfg = JobConfig(data=DataConfig(dataset=dataset, batch_size=256, num_fields=26),
                model=ModelConfig(embedding_optimizer=optimizer), precision=precision)
with open(os.path.join(run_dir, "config.json"), "w") as f:
    json.dump(config_to_dict(cfg), f)
os.environ["TESSERA_RUN_DIR"] = run_dir
print(json.dumps([standby.compile_ahead("server"), standby.compile_ahead("worker")]))
pid = os.fork()
if pid == 0:  # a server forked afterwards: the kernels it finds compiled
    rows = [k for k in ("find_slots", "find_buckets", "place_ids", "fill_initial", "gather",
                        "sgd_rows", "adagrad_rows", "adam_rows") if getattr(kernels, k).signatures]
    dense = [f"{name}[{key}]" for name, table in (("SGD_HALF", kernels.SGD_HALF),
                                                  ("SCALE_HALF", kernels.SCALE_HALF),
                                                  ("ADD_HALF", kernels.ADD_HALF))
             for key, k in table.items() if k.signatures]
    worker = ["unique_inverse"] if kernels._first_seen.signatures else []
    print(json.dumps(sorted(rows) + sorted(dense) + worker))
    sys.stdout.flush()
    os._exit(0)
os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("optimizers, process, compiled, frozen", [
    ("sgd,adam,sgd", "own", ["adam_rows", "sgd_rows"], True),
    ("adagrad", "threads", ["adagrad_rows"], False),
    ("", "own", [], True),
])
def test_a_table_server_compiles_its_kernels_and_freezes_its_start_up_before_serving(
        optimizers, process, compiled, frozen):
    """role.ready_to_serve, between a server's start-up and its first request: the row
    kernels its tables use (the index's, the initial rows', the gather, and the steps of
    the tables' optimizers, no others) are compiled, so the first pull and push do not
    wait for numba; in a process of its own, start-up's objects are frozen out of the
    garbage collector, the modules torch imports at a process's first optimizer among
    them (so that the collector's full passes do not walk 120k objects again, 35-40 ms
    each), and in the in-process cluster (threads of the user's process) nothing is
    frozen. Each case in a fresh process: compiled kernels are per process."""
    out = subprocess.run([sys.executable, "-c", _READY, optimizers, process],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    common = ["fill_initial", "find_buckets", "find_slots", "gather", "place_ids"] \
        if optimizers else []
    assert out.stdout.strip() == f"{sorted(common + compiled)!r} {frozen} {frozen}"


@pytest.mark.parametrize("dataset, optimizer, precision, ahead, worker", [
    ("movielens", "adagrad", "fp32", "tables: adagrad", ""),
    ("clicks", "adam", "bf16", "tables: adam; dense: bf16 wire", "unique ids"),
    ("digits", "sgd", "fp32", "", ""),
])
def test_a_fork_server_compiles_its_processes_kernels_once_for_every_fork(
        tmp_path, dataset, optimizer, precision, ahead, worker):
    """standby.compile_ahead, which a fork server runs at its first server's and first
    worker's order (and a standby at its start): for a built-in task with tables
    (MovieLens, clicks) the row kernels of the job's embedding optimizer (and no other),
    on a half-width wire the dense kernels of a sync job's servers
    (role.warm_dense_kernels), and where a worker looks up WORKER_MIN_IDS ids or more a
    step (clicks: 256 x 26 ids; MovieLens: 256) the worker's unique_inverse, are compiled
    in the fork server, and a process forked from it finds them compiled; an fp32 task
    without tables compiles nothing (its servers compile what their own tables need,
    ready_to_serve). Each case in a fresh process (compiled code is per process)."""
    out = subprocess.run([sys.executable, "-c", _AHEAD, str(tmp_path), dataset, optimizer,
                          precision], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ahead_line, fork_line = out.stdout.strip().splitlines()
    assert json.loads(ahead_line) == [ahead, worker]
    rows = ["fill_initial", "find_buckets", "find_slots", "gather", "place_ids",
            f"{optimizer}_rows"] if "tables" in ahead else []
    # sync (the default mode), 2 workers: the clock's sums, and plain SGD's fused step
    # from their fp32 mean into the bf16 reply
    dense = ["ADD_HALF[bfloat16]", "SCALE_HALF[bfloat16]", "SGD_HALF[('float32', 'bfloat16')]"] \
        if "dense" in ahead else []
    assert json.loads(fork_line) == sorted(rows) + sorted(dense) + (
        ["unique_inverse"] if worker else [])


_STANDBY = """
import io, json, os, sys
from tessera.config import config_to_dict
from tessera.config.schema import JobConfig, DataConfig
from tessera.ps import kernels
from tessera.train import standby
run_dir = sys.argv[1]
with open(os.path.join(run_dir, "config.json"), "w") as f:
    json.dump(config_to_dict(JobConfig(data=DataConfig(dataset="movielens"))), f)
os.environ["TESSERA_RUN_DIR"] = run_dir
names = ("find_slots", "place_ids", "fill_initial", "gather", "adagrad_rows")
for role in ("coordinator", "server"):  # end of input: each standby ends at once
    assert standby.main(stdin=io.StringIO(""), role=role) == 0
    print(role, sorted(k for k in names if getattr(kernels, k).signatures), flush=True)
"""


def test_a_standby_server_compiles_its_tables_kernels_while_it_waits(tmp_path):
    """Without a fork server (TESSERA_FORKSERVER=0), a re-formed allreduce/hybrid group's
    processes are standbys started ahead (tessera/train/standby.py ROLE): a server's
    compiles the MovieLens task's row kernels while it waits, so the server it becomes
    has none left to compile; a coordinator's compiles nothing."""
    out = subprocess.run([sys.executable, "-c", _STANDBY, str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if not line.startswith("standby ready")]
    assert lines == ["coordinator []",
                     "server ['adagrad_rows', 'fill_initial', 'find_slots', 'gather', "
                     "'place_ids']"], out.stdout
