"""Faults in pipeline mode (issue 14 item 7): every stage's checkpoint at one clock,
--resume, and --max-restarts re-forming the stages from the newest checkpoint, with
real processes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.harness import ROOT, Job, run_cli, run_job, wait_for
from tests.test_faults import finish, kill_after

DIGITS = str(ROOT / "examples" / "digits.toml")
ADAM = str(ROOT / "tests" / "jobs" / "digits_adam.toml")
PIPELINE = ["--mode", "allreduce", "--servers", 0, "--stages", 2, "--microbatches", 2]
STAGE_FILES = ["worker-0.safetensors", "worker-1.safetensors"]


@pytest.fixture
def no_pickle(monkeypatch):
    """Every process of the job under the no-pickle guard: writing, reading and restoring
    stage checkpoints unpickles nothing (an unpickle would end the process)."""
    from tessera.config import env as envvars
    monkeypatch.setenv(envvars.FORBID_PICKLE, "1")


def test_pipeline_resumed_run_ends_equal_to_one_never_interrupted(tmp_path, no_pickle):
    """Adam on 2 stages: K = 20 steps with a checkpoint every 10; the checkpoint at step
    K/2, resumed to K, ends bit-identical to the run never interrupted: each stage's
    parameters and Adam state (step, exp_avg, exp_avg_sq) in the step-20 checkpoint, the
    evaluated loss, and so the data position too (a resumed run that took other batches
    would end elsewhere). `tessera export` joins the stages into one model."""
    whole = run_job(ADAM, tmp_path / "whole", *PIPELINE, "--workers", 2, "--steps", 20,
                    "--checkpoint-every", 10)
    assert whole["checkpoints"] == [10, 20], whole
    at10 = tmp_path / "at10" / "clock-00000010"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "clock-00000010", at10)
    manifest = json.loads((at10 / "manifest.json").read_text())
    assert [s["file"] for s in manifest["dense"]["stages"]] == STAGE_FILES, manifest
    assert manifest["data"]["offset"] == 10 * 32, manifest["data"]  # one replica's batches
    resumed = run_job(ADAM, tmp_path / "resumed", *PIPELINE, "--workers", 2, "--steps", 20,
                      "--checkpoint-every", 10, "--resume", tmp_path / "at10")
    assert resumed["worker_first_steps"] == [10, 10] and resumed["checkpoints"] == [20], resumed
    assert "clock 10" in resumed["resumed_from"], resumed
    keys = set()
    for name in STAGE_FILES:
        a = load_file(str(tmp_path / "resumed" / "checkpoints" / "clock-00000020" / name))
        b = load_file(str(tmp_path / "whole" / "checkpoints" / "clock-00000020" / name))
        assert a.keys() == b.keys() and any(k.startswith("optim/") for k in a), a.keys()
        params = {k for k in a if k.startswith("model/")}
        assert not keys & params, "two stages saved the same parameter"
        keys |= params
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key, (a[key] - b[key]).abs().max())
    assert resumed["eval_loss"] == whole["eval_loss"], (resumed, whole)
    # One model out of the stages' files: every parameter of the MLP, once.
    from tessera.ps.export import checkpoint_state  # what `tessera export` writes
    exported, _ = checkpoint_state(str(tmp_path / "whole"))
    assert sorted(exported) == sorted(k[len("model/"):] for k in keys)
    # Another stage count cannot load these files: one line, before anything starts.
    code, output = run_cli(["run", ADAM, "--out", tmp_path / "no", "--quiet", "--mode",
                            "allreduce", "--servers", 0, "--workers", 2, "--resume",
                            tmp_path / "at10"], timeout_s=60)
    assert code == 2 and "holds 2 pipeline stages; resume it with --stages 2" in output, output
    assert "Traceback" not in output and not (tmp_path / "no").exists()


def test_pipeline_stage_killed_the_stages_are_reformed_from_the_checkpoint(tmp_path,
                                                                           no_pickle):
    """2 stages x 2 replicas; kill -9 of worker 2 (replica 1's first stage) while training
    runs, after the first checkpoint: the launcher ends every process and starts them again
    from the newest checkpoint (replica 0's stage files, loaded by both replicas), and the
    job completes its steps at the pipeline's no-kill accuracy bar."""
    out = tmp_path / "run"
    job = Job(["run", DIGITS, "--out", out, "--quiet", *PIPELINE, "--workers", 4,
               "--steps", 400, "--checkpoint-every", 40, "--max-restarts", 1], timeout_s=240)
    wait_for(lambda: list((out / "checkpoints").glob("clock-*/manifest.json"))
             or job.proc.poll() is not None, 120, "the first checkpoint")
    kill_after(job, out, "worker", 2, 1)  # training runs: metrics.jsonl has a record
    output = finish(job)
    summary = json.loads((out / "summary.json").read_text())
    assert "re-forming the worker group" in output and "resuming at clock" in output, output
    assert summary["group_restarts"] == 1 and summary["steps"] == 400, summary
    first = summary["worker_first_steps"]
    assert len(set(first)) == 1 and 0 < first[0] < 400 and first[0] % 40 == 0, summary
    assert f"restored from {out / 'checkpoints'} clock {first[0]}" in \
        (out / "logs" / "worker-1.log").read_text()
    assert summary["eval_accuracy"] >= 0.93, summary
    last = json.loads((out / "checkpoints" / "clock-00000400" / "manifest.json").read_text())
    assert [s["file"] for s in last["dense"]["stages"]] == STAGE_FILES, last
    assert last["data"]["workers"] == 2, last["data"]  # two pipelines share the data


def test_interrupted_pipeline_checkpoints_every_stage_at_one_clock(tmp_path):
    """SIGINT on the launcher of a pipelined job without --checkpoint-every: the stages
    agree (every 4 steps) that the launcher asked, each of replica 0's stages writes its
    file of that one clock, the launcher stops at exit 130 naming it, and --resume
    continues from it."""
    import signal

    from tessera.ps.checkpoint import CheckpointStore
    from tests.test_faults import metric_lines
    out = tmp_path / "run"
    job = Job(["run", DIGITS, "--out", out, "--quiet", *PIPELINE, "--workers", 2,
               "--steps", 100000], timeout_s=120)
    wait_for(lambda: metric_lines(out) >= 2 or job.proc.poll() is not None, 90,
             "training to start")
    job.proc.send_signal(signal.SIGINT)
    code, output = job.wait()
    assert code == 130 and "checkpoint at clock" in output, output
    latest = CheckpointStore(str(out / "checkpoints")).latest()
    assert latest is not None and latest["clock"] > 0 and latest["clock"] % 4 == 0, latest
    assert [s["file"] for s in latest["dense"]["stages"]] == STAGE_FILES, latest
    summary = run_job(DIGITS, tmp_path / "more", *PIPELINE, "--workers", 2, "--resume", out,
                      "--steps", latest["clock"] + 4)
    assert summary["worker_first_steps"] == [latest["clock"]] * 2, summary


def test_the_coordinator_takes_stage_files_only_from_replica_0s_stages(tmp_path):
    """A pipeline round completes with worker-<s>.safetensors from worker s of every stage
    s; a report from another replica, or of another name, is refused, not joined into a
    path; a manifest whose stage table names anything but worker-<s> is refused."""
    from tessera.cluster.checkpoint_rounds import CheckpointRounds
    from tessera.config import load_config
    from tessera.ps.checkpoint import CheckpointError, check_manifest
    from tessera.transport import wire

    cfg = load_config(DIGITS, {"ps.mode": "allreduce", "cluster.servers": 0,
                               "cluster.workers": 4, "pipeline.stages": 2,
                               "checkpoint.every": 5})
    rounds = CheckpointRounds(cfg, tmp_path)

    def saved(rank, name, clock=5):
        return wire.CheckpointSaved(req=1, rank=rank, clock=clock, file=name, nbytes=8,
                                    role="worker")

    for rank, name in ((2, "worker-2.safetensors"), (1, "worker-0.safetensors"),
                       (1, "../worker-1.safetensors"), (0, "server-0.safetensors")):
        assert "replica 0" in rounds.report(saved(rank, name)), (rank, name)
    assert rounds.report(saved(0, "worker-0.safetensors")) == ""
    directory = tmp_path / "checkpoints" / "clock-00000005"
    directory.mkdir(parents=True)
    for name in STAGE_FILES:
        (directory / name).write_bytes(b"x")
    done = []
    rounds.complete(set(), lambda clock, files: rounds.manifest(
        clock, files, shard_map=_no_shards(), layout=[], tables=[], optimizer=None,
        samples=1437, dead_servers=set()), lambda: done.append(1))
    rounds.flush(10, lambda: done.append(1))
    assert not done and rounds.completed == []  # stage 1's file is not reported yet
    assert rounds.report(saved(1, "worker-1.safetensors")) == ""
    rounds.complete(set(), lambda clock, files: rounds.manifest(
        clock, files, shard_map=_no_shards(), layout=[], tables=[], optimizer=None,
        samples=1437, dead_servers=set()), lambda: done.append(1))
    rounds.flush(10, lambda: done.append(1))
    assert done and rounds.completed == [5]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["dense"]["stages"] == [{"file": n, "bytes": 8} for n in STAGE_FILES]
    assert manifest["data"]["offset"] == 5 * 2 * 32  # 2 replicas' batches per clock
    for evil in ("../worker-1.safetensors", "worker-0.safetensors", "/etc/passwd", None):
        bad = json.loads(json.dumps(manifest))
        bad["dense"]["stages"][1]["file"] = evil
        with pytest.raises(CheckpointError, match="refusing") as info:
            check_manifest(bad, "m.json")
        assert "\n" not in str(info.value)


def _no_shards():
    from tessera.ps.sharding import ShardMap
    return ShardMap(layout=(), partitions=(), num_servers=0)


@pytest.mark.parametrize("branch", [False, True], ids=["plain", "branch"])
def test_pipeline_replicas_start_from_replica_0_and_stay_equal(tmp_path, branch):
    """2 stages x 2 replicas, every worker built from its own seed and fed its replica's
    own batches: after 3 Adam steps stage s holds the same parameters, bit for bit, on
    both replicas (replica 0's are broadcast at the start, gradients averaged), which is
    why replica 0's stage files are the whole job's checkpoint. ``branch``: each replica
    takes another of two layers, so each leaves one without a gradient (the replicas
    used to all-reduce only their own, pairing one layer's gradient with the other's)."""
    out = tmp_path / "run"
    code, output = run_cli(["launch", "--mode", "allreduce", "--servers", 0, "--workers", 4,
                            "--stages", 2, "--microbatches", 2, "--batch-size", 16, "--out",
                            out, "--quiet", ROOT / "tests" / "scripts" / "pipeline_replicas.py",
                            *(["branch"] if branch else [])],
                           timeout_s=180)
    assert code == 0, output
    digest = [json.loads((out / f"replica-{r}.json").read_text())["digest"] for r in range(4)]
    assert digest[0] == digest[2] and digest[1] == digest[3], digest
    assert digest[0] != digest[1]
