"""train.balance = "speed": a persistent straggler gets a smaller share of each sync step,
and the step stays the mean over the whole global batch (real clusters: tests/scripts/balance.py)."""

from __future__ import annotations

import json

import pytest

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tessera.config.schema import DataConfig, OptimizerConfig
from tessera.data.datasets import load_dataset
from tessera.data.sampler import ShardSampler, speed_shares
from tessera.ps.client import ServerError
from tests.harness import ROOT, run_cli
from tests.test_server_inproc import InprocCluster, flat_of, start

SCRIPT = ROOT / "tests" / "scripts" / "balance.py"
STEPS = 40


def test_split_is_proportional_to_speed_and_kept_when_times_are_even():
    assert speed_shares([[300.0, 1.0], [100.0, 1.0]], 64) == [48, 16]
    assert speed_shares([[300.0, 1.0], [100.0, 1.0], [100.0, 1.0], [100.0, 1.0]], 128) \
        == [64, 22, 21, 21]
    # Equal speeds, or within the band: the even split (None), nothing moves.
    assert speed_shares([[100.0, 1.0], [90.0, 1.0]], 64) is None
    # A split whose parts now take equal times is kept (weights 1.5 / 0.5 = 48 / 16).
    assert speed_shares([[300.0, 1.5], [100.0, 0.5]], 64) == [48, 16]
    # Never below the minimum share; unknown speeds: even.
    assert speed_shares([[1e6, 1.0], [1.0, 1.0]], 64, min_share=4) == [60, 4]
    assert speed_shares([[0.0, 0.0], [100.0, 1.0]], 64) is None


def test_uneven_split_covers_the_same_global_batch():
    even = [ShardSampler(100, batch_size=8, num_workers=2, rank=r, seed=3) for r in (0, 1)]
    split = [ShardSampler(100, batch_size=8, num_workers=2, rank=r, seed=3) for r in (0, 1)]
    for s in split:
        s.shares = [11, 5]
    for step in range(30):  # across epoch boundaries
        a = sorted(i for s in even for i in s.indices(step))
        b = [s.indices(step) for s in split]
        assert [len(x) for x in b] == [11, 5]
        assert sorted(i for x in b for i in x) == a


def _launch(out, balance: str, slow_rank: int) -> dict:
    code, output = run_cli(["launch", "--workers", 2, "--servers", 1, "--balance", balance,
                            "--out", out, "--quiet", SCRIPT, STEPS, slow_rank], timeout_s=180)
    assert code == 0, output
    return json.loads((out / "summary.json").read_text())


def _one_process() -> dict:
    """The same model trained in one process at the global batch (2 x 32) each step."""
    data = load_dataset(DataConfig(dataset="digits"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sampler = ShardSampler(len(data.train), batch_size=64, num_workers=1, rank=0, seed=0)
    for step in range(STEPS):
        idx = torch.from_numpy(sampler.indices(step))
        opt.zero_grad()
        F.cross_entropy(model(data.train.x[idx]), data.train.y[idx]).backward()
        opt.step()
    return model.state_dict()


def test_straggler_gets_fewer_samples_and_the_step_is_the_global_mean(tmp_path):
    summary = _launch(tmp_path / "run", "speed", slow_rank=1)
    fast, slow = summary["balance"]
    # Worker 1 computes 3x slower per sample: after the warm-up period it was given less.
    assert slow["balance_uneven_steps"] > 0 and slow["balance_min_share"] < 24, summary
    assert slow["balance_samples"] < fast["balance_samples"], summary
    assert fast["balance_samples"] + slow["balance_samples"] == STEPS * 64
    # Weighted pushes: every step applied the mean over its 64 samples, as one process does.
    got = load_file(tmp_path / "run" / "final.safetensors")
    for name, want in _one_process().items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=name)


def test_equal_speed_run_is_bit_identical_to_plain_sync(tmp_path):
    # Every sample sleeps the same on both workers: the split never leaves even, every
    # push has weight 1.0, and the result is plain sync's, bit for bit.
    summary = _launch(tmp_path / "speed", "speed", slow_rank=-1)
    assert all(w["balance_uneven_steps"] == 0 for w in summary["balance"]), summary
    _launch(tmp_path / "off", "off", slow_rank=-1)
    a = load_file(tmp_path / "off" / "final.safetensors")
    b = load_file(tmp_path / "speed" / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_balance_needs_sync_mode_and_a_known_value(tmp_path):
    code, output = run_cli(["run", ROOT / "examples" / "digits.toml", "--balance", "fast",
                            "--out", tmp_path / "a"], timeout_s=60)
    assert code != 0 and "--balance (train.balance)" in output and "'speed'" in output
    assert "Traceback" not in output
    code, output = run_cli(["run", ROOT / "examples" / "digits.toml", "--balance", "speed",
                            "--mode", "async", "--out", tmp_path / "b"], timeout_s=60)
    assert code != 0 and "needs --mode sync" in output and "Traceback" not in output


@pytest.fixture
def make_cluster():
    """Parameter servers in threads of this process (tests/test_server_inproc.py)."""
    p = nn.Parameter(torch.zeros(1))
    p.grad = torch.ones(1)
    torch.optim.SGD([p], lr=0.1).step()  # torch.optim's lazy imports, before a timeout runs
    made: list[InprocCluster] = []

    def make(layout, **kwargs) -> InprocCluster:
        made.append(InprocCluster(layout, **kwargs))
        return made[-1]

    yield make
    for cluster in made:
        cluster.close()


def test_server_weights_pushes_and_echoes_speeds(make_cluster):
    # Real server threads and clients: worker 0 had 48 of 64 samples (weight 1.5), worker
    # 1 had 16 (0.5): the step is (1.5 g0 + 0.5 g1) / 2, and each reply of clock 1 carries
    # both workers' [speed, weight] of clock 0. A weight outside (0, W] is refused.
    model, cluster, (c0, c1) = start(make_cluster, mode="sync", num_workers=2,
                                     optimizer=OptimizerConfig(name="sgd", lr=0.1),
                                     num_servers=1, partition_elems=1000)
    g0 = torch.full((cluster.shard_map.total_elems,), 1.0)
    g1 = torch.full((cluster.shard_map.total_elems,), 3.0)
    c0.weight, c0.rate = 1.5, 3000.0
    c1.weight, c1.rate = 0.5, 1000.0
    first = c0.push(0, g0, 0)
    got = c1.push(0, g1, 0).wait()
    torch.testing.assert_close(got[0], flat_of(model) - 0.1 * (1.5 * g0 + 0.5 * g1) / 2)
    first.wait()
    assert c0.rates[1] == c1.rates[1] == [[3000.0, 1.5], [1000.0, 0.5]]
    c0.weight = 2.5
    with pytest.raises(ServerError, match="push weight must be in"):
        c0.push(0, g0, 1).wait()


def test_async_server_refuses_a_weighted_push(make_cluster):
    _, cluster, (c0, _) = start(make_cluster, mode="async", num_workers=2,
                                optimizer=OptimizerConfig(name="sgd", lr=0.1),
                                num_servers=1, partition_elems=1000)
    c0.weight = 1.5
    with pytest.raises(ServerError, match="needs sync mode"):
        c0.push(0, torch.ones(cluster.shard_map.total_elems), 0).wait()


def test_tessera_run_with_balance_trains_the_global_batch(tmp_path):
    # The built-in trainer's path ([train] balance through --balance): whatever split the
    # workers' speeds gave, every step is the one-process step on the same 64 samples.
    from tessera.config.load import load_config
    from tessera.models import build_model
    code, output = run_cli(["run", ROOT / "examples" / "digits.toml", "--steps", 30,
                            "--balance", "speed", "--out", tmp_path / "run", "--quiet"],
                           timeout_s=180)
    assert code == 0, output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sum(w["balance_samples"] for w in summary["balance"]) == 30 * 64
    cfg = load_config(ROOT / "examples" / "digits.toml")
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr,
                          momentum=cfg.optimizer.momentum)
    sampler = ShardSampler(len(data.train), batch_size=64, num_workers=1, rank=0,
                           seed=cfg.train.seed)
    for step in range(30):
        idx = torch.from_numpy(sampler.indices(step))
        opt.zero_grad()
        F.cross_entropy(model(data.train.x[idx]), data.train.y[idx]).backward()
        opt.step()
    got = load_file(tmp_path / "run" / "final.safetensors")
    for name, want in model.state_dict().items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=name)
