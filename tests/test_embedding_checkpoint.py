"""Tier 1: checkpoints of an embedding shard (EmbeddingShard.export_state/import_state).

The oracle is the shard itself: a shard rebuilt from its export, or a table
re-sharded onto a different number of servers, must answer every lookup and take
every later update bit for bit as the original shard(s) would have.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.config.schema import OptimizerConfig
from tessera.ps.embedding import EmbeddingShard, TableError, TableSpec
from tessera.ps.embedding_ids import owner_of

DIM = 6

CONFIGS = {
    "sgd": OptimizerConfig(name="sgd", lr=0.3, weight_decay=0.01),
    # initial_accumulator_value != 0: rows without state must start from it again.
    "adagrad": OptimizerConfig(name="adagrad", lr=0.2, lr_decay=0.05,
                               initial_accumulator_value=0.1, eps=1e-10),
    "adam": OptimizerConfig(name="adam", lr=0.05, betas=(0.8, 0.95), eps=1e-6),
}


def spec(cfg: OptimizerConfig, admit_after: int, **kwargs) -> TableSpec:
    return TableSpec(name="items", dim=DIM, init_scale=0.1, seed=3, admit_after=admit_after,
                     evict_after=kwargs.pop("evict_after", 4), optimizer=cfg, **kwargs)


def id_pool(seed: int = 0) -> np.ndarray:
    """Small ids and huge hashed ids, so rows spread over every server."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.arange(60), rng.integers(0, 2**62, size=40)]).astype(np.int64)


def play(shards: list[EmbeddingShard], clocks: range, seed: int) -> list[torch.Tensor]:
    """A sync training stream over the shards of one table (``owner_of`` placement):
    per clock a lookup of random ids (repeats included), then one apply on every
    shard with the gradients of a random subset of them. Returns every lookup's
    answer, assembled in request order. The stream depends on ``seed`` only, not on
    the number of shards."""
    rng = np.random.default_rng(seed)
    pool = id_pool()
    n = len(shards)
    answers = []
    for clock in clocks:
        ids = rng.choice(pool, size=rng.integers(5, 40))
        owners = owner_of(ids, n)
        out = torch.empty((len(ids), DIM), dtype=torch.float32)
        for rank, shard in enumerate(shards):
            at = np.flatnonzero(owners == rank)
            out[torch.from_numpy(at)] = shard.lookup(ids[at], clock)
        answers.append(out)
        unique = np.unique(ids)
        pushed = np.sort(rng.choice(unique, size=rng.integers(0, len(unique) + 1),
                                    replace=False))
        grads = torch.from_numpy(rng.standard_normal((len(pushed), DIM)).astype(np.float32))
        owners = owner_of(pushed, n)
        for rank, shard in enumerate(shards):
            mine = owners == rank
            shard.apply(pushed[mine], grads[torch.from_numpy(mine)], clock)
    everything = np.concatenate([id_pool(), [10**15, 2**63 - 1]]).astype(np.int64)
    owners = owner_of(everything, n)
    final = torch.empty((len(everything), DIM), dtype=torch.float32)
    for rank, shard in enumerate(shards):
        at = np.flatnonzero(owners == rank)
        final[torch.from_numpy(at)] = shard.lookup(everything[at], clocks.stop)
    answers.append(final)
    return answers


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare floats bit for bit (-0.0 != 0.0)."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def assert_identical(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a), bits(b)), what


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert_identical(value, b[key], key)


def concat_sorted(states: list[dict]) -> dict:
    """The exports of several shards as one, rows (and pending ids) by increasing id."""
    out = {}
    row_keys = [k for k in states[0] if k not in ("steps",) and not k.startswith("pending_")]
    order = torch.argsort(torch.cat([s["ids"] for s in states]))
    for key in row_keys:
        out[key] = torch.cat([s[key] for s in states])[order]
    if "pending_ids" in states[0]:
        order = torch.argsort(torch.cat([s["pending_ids"] for s in states]))
        for key in ("pending_ids", "pending_count", "pending_last"):
            out[key] = torch.cat([s[key] for s in states])[order]
    steps = {int(s["steps"]) for s in states}
    assert len(steps) == 1
    out["steps"] = states[0]["steps"]
    return out


# admit_after = 3: pending counts other than 1 must survive too.
CASES = [(name, admit) for name in CONFIGS for admit in (1, 2, 3)]
CASE_IDS = [f"{name}-admit{admit}" for name, admit in CASES]


# ---- 1. the export ------------------------------------------------------------------

@pytest.mark.parametrize("name, admit_after", CASES, ids=CASE_IDS)
def test_export_names_dtypes_and_order(name, admit_after):
    cfg = CONFIGS[name]
    shard = EmbeddingShard(spec(cfg, admit_after), cfg)
    play([shard], range(8), seed=1)
    state = shard.export_state()
    n = shard.num_rows
    expected = {"ids", "values", "last", "steps"}
    expected |= {f"state.{s}" for s in {"sgd": [], "adagrad": ["sum"],
                                         "adam": ["exp_avg", "exp_avg_sq"]}[name]}
    if name != "sgd":
        expected.add("has_state")
    if admit_after > 1:
        expected |= {"pending_ids", "pending_count", "pending_last"}
    assert set(state) == expected
    for key, t in state.items():
        assert isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_contiguous()
    assert state["ids"].dtype == torch.int64 and state["ids"].shape == (n,)
    assert bool((state["ids"][1:] > state["ids"][:-1]).all())
    assert state["values"].dtype == torch.float32 and state["values"].shape == (n, DIM)
    assert state["last"].dtype == torch.int64 and state["last"].shape == (n,)
    assert state["steps"].dtype == torch.int64 and state["steps"].shape == ()
    assert int(state["steps"]) == shard.steps == 8
    if name != "sgd":
        has = state["has_state"]
        assert has.dtype == torch.bool and has.shape == (n,)
        assert has.any() and (~has).any()  # both kinds of row are exercised
        for key in expected:
            if key.startswith("state."):
                assert state[key].dtype == torch.float32 and state[key].shape == (n, DIM)
    if admit_after > 1:
        p = state["pending_ids"]
        assert len(p) > 0 and bool((p[1:] > p[:-1]).all())
        assert state["pending_count"].dtype == state["pending_last"].dtype == torch.int64
        assert bool((state["pending_count"] >= 1).all())
        assert not np.isin(p.numpy(), state["ids"].numpy()).any()
    # Agrees with state_tensors() on the shared fields.
    legacy = shard.state_tensors()
    assert_identical(state["ids"], legacy["ids"])
    assert_identical(state["values"], legacy["values"])
    assert_identical(state["last"], legacy["last_clock"])
    # Copies: changing the export leaves the shard alone, and vice versa.
    before = {k: v.clone() for k, v in state.items()}
    for t in state.values():
        if t.dtype == torch.float32:
            t.add_(1.0)
    assert_same_state(shard.export_state(), before)
    state = shard.export_state()
    play([shard], range(8, 10), seed=2)
    assert_same_state(state, before)


# ---- 2. round trip ------------------------------------------------------------------

@pytest.mark.parametrize("name, admit_after", CASES, ids=CASE_IDS)
def test_round_trip_is_bit_identical(name, admit_after):
    cfg = CONFIGS[name]
    original = EmbeddingShard(spec(cfg, admit_after), cfg)
    play([original], range(10), seed=3)
    state = original.export_state()
    restored = EmbeddingShard(spec(cfg, admit_after), cfg)
    assert restored.import_state(state) == original.num_rows
    assert restored.num_rows == original.num_rows
    assert restored.nbytes == original.nbytes
    assert restored.steps == original.steps
    assert_same_state(restored.export_state(), state)
    # The same later stream (lookups that admit pending ids, updates, evictions)
    # gets the same answers bit for bit, and leaves the same state.
    for a, b in zip(play([original], range(10, 18), seed=4),
                    play([restored], range(10, 18), seed=4)):
        assert_identical(a, b)
    assert_same_state(restored.export_state(), original.export_state())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_through_safetensors_with_max_rows(name, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    cfg = CONFIGS[name]
    make = lambda: EmbeddingShard(spec(cfg, 2, evict_after=0, max_rows=25), cfg)
    original = make()
    play([original], range(9), seed=5)
    path = tmp_path / "shard.safetensors"
    safetensors.save_file(original.export_state(), str(path))
    loaded = safetensors.load_file(str(path))
    if "has_state" in loaded:  # stored as uint8 by some writers: accepted too
        loaded["has_state"] = loaded["has_state"].to(torch.uint8)
    restored = make()
    restored.import_state(loaded)
    # max_rows drops the least recently touched rows: the clocks came back.
    for a, b in zip(play([original], range(9, 15), seed=6),
                    play([restored], range(9, 15), seed=6)):
        assert_identical(a, b)
    assert_same_state(restored.export_state(), original.export_state())


# ---- 3. re-sharding -------------------------------------------------------------------

@pytest.mark.parametrize("name, admit_after", CASES, ids=CASE_IDS)
def test_two_shards_reshard_onto_three(name, admit_after):
    cfg = CONFIGS[name]
    old = [EmbeddingShard(spec(cfg, admit_after), cfg) for _ in range(2)]
    play(old, range(10), seed=7)
    exports = [s.export_state() for s in old]
    assert all(len(e["ids"]) > 0 for e in exports)
    new = [EmbeddingShard(spec(cfg, admit_after), cfg) for _ in range(3)]
    for rank, shard in enumerate(new):
        loaded = 0
        for e in exports:
            keep = owner_of(e["ids"].numpy(), 3) == rank
            kwargs = {}
            if "pending_ids" in e:
                kwargs["keep_pending"] = torch.from_numpy(
                    owner_of(e["pending_ids"].numpy(), 3) == rank)
            loaded += shard.import_state(e, keep, **kwargs)
        assert loaded == shard.num_rows
    new_exports = [s.export_state() for s in new]
    # Every id on exactly one new shard, its owner; rows, clocks, state identical.
    for rank, e in enumerate(new_exports):
        assert bool((owner_of(e["ids"].numpy(), 3) == rank).all())
        if "pending_ids" in e:
            assert bool((owner_of(e["pending_ids"].numpy(), 3) == rank).all())
    all_ids = torch.cat([e["ids"] for e in new_exports])
    assert len(torch.unique(all_ids)) == len(all_ids)
    assert_same_state(concat_sorted(new_exports), concat_sorted(exports))
    assert sum(s.nbytes for s in new) == sum(s.nbytes for s in old)
    # Training goes on as if the table had never moved.
    for a, b in zip(play(old, range(10, 18), seed=8), play(new, range(10, 18), seed=8)):
        assert_identical(a, b)
    assert_same_state(concat_sorted([s.export_state() for s in new]),
                      concat_sorted([s.export_state() for s in old]))


# ---- 4. refusals ----------------------------------------------------------------------

def trained(cfg: OptimizerConfig, admit_after: int = 2, stream: int = 9) -> EmbeddingShard:
    shard = EmbeddingShard(spec(cfg, admit_after), cfg)
    play([shard], range(6), seed=stream)
    return shard


def refused(shard: EmbeddingShard, state: dict, match: str, *args, **kwargs) -> None:
    before, steps = shard.export_state(), shard.steps
    with pytest.raises(TableError, match="table 'items'") as err:
        shard.import_state(state, *args, **kwargs)
    assert err.match(match), str(err.value)
    assert shard.steps == steps
    assert_same_state(shard.export_state(), before)  # nothing changed


def test_mismatched_dim_dtype_optimizer_and_keys_are_refused():
    cfg = CONFIGS["adam"]
    state = trained(cfg).export_state()
    target = trained(cfg, stream=4)  # a non-empty shard: must stay as it was
    wide = TableSpec(name="items", dim=DIM + 1, optimizer=cfg)
    refused(EmbeddingShard(wide, cfg), state, r"'values' must have shape .*dim 7")
    refused(target, {**state, "values": state["values"].double()},
            "'values' must have dtype torch.float32, got torch.float64")
    refused(target, {**state, "ids": state["ids"].int()}, "'ids' must have dtype torch.int64")
    refused(target, {**state, "steps": state["steps"].reshape(1)}, "'steps' must have shape")
    refused(EmbeddingShard(spec(CONFIGS["adagrad"], 2), CONFIGS["adagrad"]), state,
            r"optimizer state \['exp_avg', 'exp_avg_sq'\] .* 'adagrad' keeps \['sum'\]")
    refused(target, {k: v for k, v in state.items() if k != "last"}, "missing tensor 'last'")
    refused(target, {**state, "has_state": state["has_state"].float()}, "'has_state'")
    sgd_state = trained(CONFIGS["sgd"]).export_state()
    refused(target, sgd_state, r"optimizer state \[\] .* 'adam' keeps")


def test_bad_masks_duplicates_and_step_mismatch_are_refused():
    cfg = CONFIGS["adagrad"]
    source = trained(cfg)
    state = source.export_state()
    n = len(state["ids"])
    fresh = EmbeddingShard(spec(cfg, 2), cfg)
    refused(fresh, state, rf"keep must be a bool mask of shape \({n},\)",
            np.ones(n - 1, dtype=bool))
    refused(fresh, state, "keep must be a bool mask", np.ones(n, dtype=np.int64))
    refused(fresh, state, "pass keep_pending too", np.ones(n, dtype=bool))
    # Loading the same rows twice.
    assert fresh.import_state(state) == n
    refused(fresh, state, "is already in this shard")
    dup = {**state, "ids": state["ids"].clone()}
    dup["ids"][1] = dup["ids"][0]
    refused(EmbeddingShard(spec(cfg, 2), cfg), dup, "appears more than once")
    # Shards of one table all count the same steps.
    play([source], range(6, 7), seed=10)
    later = source.export_state()
    other = EmbeddingShard(spec(cfg, 2), cfg)
    other.import_state(state, torch.zeros(n, dtype=torch.bool),
                       keep_pending=torch.zeros(len(state["pending_ids"]), dtype=torch.bool))
    assert other.num_rows == 0 and other.steps == 6  # steps adopted, nothing else
    refused(other, later, "step count 7 differs from this shard's 6")
    # Ids outside a bounded table.
    small = TableSpec(name="items", dim=DIM, num_embeddings=30, admit_after=2, optimizer=cfg)
    refused(EmbeddingShard(small, cfg), state, r"outside \[0, 30\)")


def test_admission_counts_are_dropped_by_a_table_without_admission():
    cfg = CONFIGS["sgd"]
    state = trained(cfg, admit_after=3).export_state()
    assert len(state["pending_ids"]) > 0
    shard = EmbeddingShard(spec(cfg, 1), cfg)
    assert shard.import_state(state) == len(state["ids"])
    assert "pending_ids" not in shard.export_state()
    assert_identical(shard.export_state()["values"], state["values"])
