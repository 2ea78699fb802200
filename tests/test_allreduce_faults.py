"""Faults in the process-group modes: checkpoints of the dense replica, --resume, and
--max-restarts re-forming the worker group, with real processes (issue 14 item 7)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.harness import ROOT, Job, run_cli, run_job, wait_for
from tests.test_faults import finish, kill_after

DIGITS = str(ROOT / "examples" / "digits.toml")
ADAM = str(ROOT / "tests" / "jobs" / "digits_adam.toml")
MOVIELENS = str(ROOT / "examples" / "movielens.toml")
ALLREDUCE = ["--mode", "allreduce", "--servers", 0, "--workers", 2]


def test_allreduce_resumed_run_ends_equal_to_one_never_interrupted(tmp_path):
    """Adam (step, exp_avg, exp_avg_sq and its groups) in fp16 with loss scaling on 2 Gloo
    workers: 30 steps with a checkpoint every 10; the checkpoint at step 20, resumed to 30,
    ends bit-identical to the run never interrupted, with the same loss scale (it grows
    every 6 clean steps, so a scaler restarted from scratch would end lower); and `tessera
    export` of the last checkpoint is the model the run ended with."""
    import shutil
    job = tmp_path / "adam_fp16.toml"
    job.write_text('precision = "fp16"\n' + open(ADAM).read() + "\n[amp]\ngrowth_interval = 6\n")
    job = str(job)
    whole = run_job(job, tmp_path / "whole", *ALLREDUCE, "--steps", 30, "--checkpoint-every", 10)
    assert whole["checkpoints"] == [10, 20, 30], whole
    # The checkpoint at step 20 alone (--resume takes the newest complete one).
    at20 = tmp_path / "at20" / "clock-00000020"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "clock-00000020", at20)
    manifest = json.loads((at20 / "manifest.json").read_text())
    assert manifest["dense"]["file"] == "worker-0.safetensors" and manifest["mode"] == "allreduce"
    resumed = run_job(job, tmp_path / "resumed", *ALLREDUCE, "--steps", 30,
                      "--resume", tmp_path / "at20")
    assert resumed["worker_first_steps"] == [20, 20] and resumed["steps"] == 30, resumed
    assert "clock 20" in resumed["resumed_from"], resumed
    a = load_file(str(tmp_path / "resumed" / "final.safetensors"))
    b = load_file(str(tmp_path / "whole" / "final.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), (key, (a[key] - b[key]).abs().max())
    assert resumed["eval_loss"] == whole["eval_loss"], (resumed, whole)
    # A scaler restarted at step 20 would grow once at most in 10 steps (to 131072).
    assert resumed["loss_scale"] == whole["loss_scale"] >= 65536.0 * 4, (resumed, whole)
    # The last checkpoint (step 30) exports as the plain model's state_dict.
    out = tmp_path / "exported.safetensors"
    code, output = run_cli(["export", tmp_path / "whole", "--out", out], timeout_s=60)
    assert code == 0, output
    exported = load_file(str(out))
    assert exported.keys() == b.keys()
    assert all(torch.equal(exported[k], b[k]) for k in b)


# kill -9 of an allreduce worker mid-run, the group re-formed from the newest checkpoint,
# the job's steps done at the no-kill bar: test_regroup.py's
# test_group_reformed_by_forks_of_the_fork_server (the same job; it was run twice).


@pytest.mark.parametrize("flags, says", [
    (["--stages", 2, "--max-restarts", 1], "add --checkpoint-every N"),
    (["--max-restarts", 1], "add --checkpoint-every N"),
], ids=["pipeline-restarts-without-checkpoints", "restarts-without-checkpoints"])
def test_refused_in_one_line(tmp_path, flags, says):
    args = ["run", DIGITS, "--out", tmp_path / "r", "--mode", "allreduce", "--servers", 0,
            *flags]
    code, output = run_cli(args, timeout_s=60)
    assert code == 2 and says in output and "Traceback" not in output, output


def test_dense_state_round_trip_keeps_buffers_optimizer_groups_and_loss_scale():
    """The pieces of worker 0's file: BatchNorm buffers, Adam's tuple betas, the fp16
    loss scaler's state, into a fresh replica; nothing but tensors and JSON."""
    from tessera.amp.scaler import LossScaler
    from tessera.parallel.dense_checkpoint import dense_state, load_dense

    def replica():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        return model, torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.95))

    model, opt = replica()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
    scaler = LossScaler(init_scale=1024.0, growth_interval=7)
    scaler.update(found_inf=True)
    scaler.update(found_inf=False)
    tensors, meta = dense_state(model, opt, scaler, clock=3)
    json.dumps(meta)  # plain JSON
    assert "model/1.running_mean" in tensors and "model/1.num_batches_tracked" in tensors
    fresh, fresh_opt = replica()
    fresh_scaler = LossScaler(init_scale=1024.0, growth_interval=7)
    assert load_dense(tensors, json.loads(json.dumps(meta)), fresh, fresh_opt, fresh_scaler,
                      "test") == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    assert fresh_opt.param_groups[0]["betas"] == (0.8, 0.95)
    a, b = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    assert (fresh_scaler.scale, fresh_scaler.clean_steps, fresh_scaler.skipped_steps) == \
        (512.0, 1, 1)


def test_hybrid_worker_killed_tables_and_replica_resume_at_one_clock(tmp_path):
    """Hybrid mode (MovieLens DLRM: tables on 2 servers, dense MLP on 2 workers): kill -9
    of worker 1 after the first checkpoint re-forms the job from it; the checkpoint holds
    the servers' tables and worker 0's replica at one clock, and exports as one model.
    The tables run 2 clocks stale (--staleness 2), and the run meets the MovieLens bar:
    this is also test_embedding_cluster's hybrid case."""
    out = tmp_path / "run"
    job = Job(["run", MOVIELENS, "--out", out, "--quiet", "--mode", "hybrid", "--workers", 2,
               "--servers", 2, "--staleness", 2, "--steps", 200, "--checkpoint-every", 40,
               "--max-restarts", 1],
              timeout_s=240)
    wait_for(lambda: list((out / "checkpoints").glob("clock-*/manifest.json"))
             or job.proc.poll() is not None, 120, "the first checkpoint")
    kill_after(job, out, "worker", 1, 1)
    output = finish(job)
    summary = json.loads((out / "summary.json").read_text())
    assert "re-forming the worker group" in output and "resuming at clock" in output, output
    assert summary["group_restarts"] == 1 and summary["steps"] == 200, summary
    first = summary["worker_first_steps"]
    assert first[0] == first[1] and first[0] > 0 and first[0] % 40 == 0, summary
    for server in (0, 1):
        log = (out / "logs" / f"server-{server}.log").read_text()
        assert f"at clock {first[0]} from" in log, log[-2000:]
    assert summary["eval_rmse"] <= 0.95, summary  # the MovieLens bar
    # Only touched rows exist, spread over both servers (test_embedding_cluster's checks).
    rows = summary["rows_per_server"]
    assert set(rows) >= {"user", "item"} and min(rows["user"]) > 0 and min(rows["item"]) > 0
    assert sum(rows["user"]) <= 943 and sum(rows["item"]) <= 1682
    manifest = json.loads((out / "checkpoints" / "clock-00000200" / "manifest.json").read_text())
    assert manifest["dense"] and sorted(manifest["files"]) == ["0", "1"], manifest
    exported = tmp_path / "model.safetensors"
    code, text = run_cli(["export", out, "--out", exported], timeout_s=60)
    assert code == 0, text
    keys = set(load_file(str(exported)))
    assert {"tables.user.rows", "tables.item.rows", "mlp.0.weight"} <= keys, keys


def test_the_coordinator_takes_a_dense_file_only_from_worker_0(tmp_path):
    """A round of a dense mode completes with worker 0's `worker-0.safetensors` (and every
    live server's file); any other worker report is refused, not joined into a path."""
    from tessera.cluster.checkpoint_rounds import CheckpointRounds
    from tessera.config import load_config
    from tessera.transport import wire

    cfg = load_config(DIGITS, {"ps.mode": "allreduce", "cluster.servers": 0,
                               "checkpoint.every": 5})
    rounds = CheckpointRounds(cfg, tmp_path)

    def saved(rank, name, clock=5):
        return wire.CheckpointSaved(req=1, rank=rank, clock=clock, file=name, nbytes=8,
                                    role="worker")

    assert "only worker 0" in rounds.report(saved(1, "worker-0.safetensors"))
    assert "only worker 0" in rounds.report(saved(0, "../../etc/passwd"))
    done = []
    rounds.complete(set(), lambda clock, files: {"clock": clock}, lambda: done.append(1))
    assert not done and rounds.completed == []
    assert rounds.report(saved(0, "worker-0.safetensors")) == ""
    (tmp_path / "checkpoints" / "clock-00000005").mkdir(parents=True)  # where its file went
    rounds.complete(set(), lambda clock, files: {"clock": clock,
                                                 "dense": rounds.dense_reports[clock]},
                    lambda: done.append(1))
    rounds.flush(10, lambda: done.append(1))  # the manifest is written on a writer thread
    assert done and rounds.completed == [5]
    sync = CheckpointRounds(load_config(DIGITS, {"checkpoint.every": 5}), tmp_path / "s")
    assert "allreduce or hybrid" in sync.report(saved(0, "worker-0.safetensors"))
