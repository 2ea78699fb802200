"""Pipeline parallelism with real processes: gradients equal the unsplit model's
(GPipe and 1F1B, 2 and 4 stages); static stage shapes from the local batch (another
shape refused, a larger message from a peer refused); cutting rules; bad input named."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tessera.parallel.pipeline import PipelineConfigError, Stage, _balanced, stage_boundaries
from tests.harness import ROOT, run_cli
from tests.scripts.pipeline_model import batch, make_model


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipelined_gradients_equal_the_unsplit_model(tmp_path, stages, schedule):
    out = tmp_path / "run"
    code, output = run_cli(["launch", "--mode", "allreduce", "--servers", 0, "--workers", stages,
                            "--stages", stages, "--microbatches", 4, "--schedule", schedule,
                            "--batch-size", 16, "--out", out, "--quiet",
                            ROOT / "tests" / "scripts" / "pipeline_grads.py"], timeout_s=180)
    assert code == 0, output
    got: dict = {}
    losses = []
    for rank in range(stages):
        doc = json.loads((out / f"grads-{rank}.json").read_text())
        assert not set(doc["grads"]) & set(got), "two stages hold the same parameter"
        got.update(doc["grads"])
        if doc["loss"] is not None:
            losses.append(doc["loss"])
        # The stages were built for this batch's shape: another is refused in one line.
        assert "built for batches shaped [16, 12] float32, got [8, 12]" in doc["refused"]
    # The oracle: the whole model, the whole batch, one process.
    ref = make_model()
    x, y = batch()
    loss = F.mse_loss(ref(x), y)
    loss.backward()
    names = [n for n, _ in ref.named_parameters()]
    assert sorted(got) == sorted(names)  # every parameter lives on exactly one stage
    for name, p in ref.named_parameters():
        torch.testing.assert_close(torch.tensor(got[name]), p.grad, rtol=1e-5, atol=1e-6)
    assert losses == pytest.approx([loss.item()], rel=1e-5)


def test_a_stage_sizes_what_it_receives_from_its_own_batch_not_a_peer(tmp_path):
    """Stage shapes are static, computed from the local batch (no metadata object is
    received, nothing unpickled): a previous stage sending more than that is refused
    by Gloo on receipt, not received into a buffer the peer sized."""
    out = tmp_path / "run"
    code, output = run_cli(["launch", "--mode", "allreduce", "--servers", 0, "--workers", 2,
                            "--stages", 2, "--microbatches", 4, "--batch-size", 16, "--out", out,
                            "--quiet", ROOT / "tests" / "scripts" / "pipeline_grads.py",
                            "mismatch"], timeout_s=180)
    assert code != 0 and "worker 1" in output, output
    log = (out / "logs" / "worker-1.log").read_text()
    assert "Received data size doesn't match expected size" in log, log
    assert not (out / "grads-1.json").exists()


def test_balanced_cut_minimises_the_largest_stage():
    assert _balanced([10, 10, 10, 10], 2) == [2]
    assert _balanced([30, 1, 1, 1, 30], 3) == [1, 4]
    assert _balanced([5, 1, 1, 1, 1, 1], 2) == [1]


def test_stage_markers_and_split_points():
    m = nn.Sequential(nn.Linear(2, 2), Stage(), nn.Linear(2, 2), nn.Linear(2, 2))
    assert stage_boundaries(m, 2) == [2]
    plain = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    assert stage_boundaries(plain, 2, ["2"]) == [2]
    with pytest.raises(PipelineConfigError, match="'9' is not a child"):
        stage_boundaries(plain, 2, ["9"])
    with pytest.raises(PipelineConfigError, match="3 stages need 2"):
        stage_boundaries(plain, 3, ["1"])
    with pytest.raises(PipelineConfigError, match="Stage markers"):
        stage_boundaries(m, 3)
    with pytest.raises(PipelineConfigError, match="nn.Sequential"):
        stage_boundaries(nn.Linear(2, 2), 2)


@pytest.mark.parametrize("flags, needle", [
    (["--mode", "allreduce", "--servers", 0, "--workers", 3, "--stages", 2], "--stages"),
    (["--mode", "allreduce", "--servers", 0, "--stages", 2, "--microbatches", 5],
     "pipeline.microbatches"),
    (["--stages", 2], "allreduce"),
], ids=["stages-vs-workers", "microbatches-vs-batch", "needs-allreduce"])
def test_bad_pipeline_settings_are_named(tmp_path, flags, needle):
    code, output = run_cli(["run", ROOT / "examples" / "digits.toml", "--out", tmp_path / "r",
                            *flags], timeout_s=30)
    assert code == 2 and needle in output and "Traceback" not in output, output


def test_split_point_that_does_not_exist_is_named(tmp_path):
    job = tmp_path / "bad.toml"
    job.write_text('[pipeline]\nstages = 2\nsplit_points = ["nope"]\n[ps]\nmode = "allreduce"\n'
                   '[cluster]\nservers = 0\n[train]\nsteps = 2\n')
    code, output = run_cli(["run", job, "--out", tmp_path / "r", "--quiet"], timeout_s=120)
    assert code != 0 and "pipeline.split_points" in output and "'nope'" in output, output
