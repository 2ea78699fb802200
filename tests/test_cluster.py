"""Tier 3: whole jobs on real processes over loopback, through the CLI.

Each test starts a real cluster (coordinator, servers, workers: separate OS
processes talking ZeroMQ over TCP) through tests/harness.py.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time

import pytest

from tests.harness import ROOT, Job, run_cli, run_job, wait_for
from tests.reference import train_reference

DIGITS = str(ROOT / "examples" / "digits.toml")
MNIST = str(ROOT / "examples" / "mnist.toml")


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def write_job(tmp_path, name: str, optimizer: str, extra: str = "") -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""
        name = "{name}"
        [model]
        name = "mlp"
        hidden = [64, 32]
        [data]
        dataset = "digits"
        batch_size = 16
        [train]
        seed = 3
        eval_every = 1000
        log_every = 5
        [optimizer]
        {optimizer}
        [ps]
        mode = "sync"
        partition_mb = 0.01
        {extra}
    """))
    return str(path)


# ------------------------------------------------------------------ quality


def test_digits_sync_reaches_095(tmp_path):
    summary = run_job(DIGITS, tmp_path / "run", "--workers", 2, "--servers", 2, "--mode", "sync")
    assert summary["eval_accuracy"] >= 0.95, summary
    assert summary["mode"] == "sync" and summary["workers"] == 2 and summary["servers"] == 2
    assert summary["bytes_pushed"] > 0 and summary["bytes_pulled"] > 0
    # Both servers applied the same number of updates: one per partition per step.
    assert len(set(summary["server_updates"])) == 1 and summary["server_updates"][0] > 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines and all({"step", "loss", "samples_per_s", "wall_s"} <= set(x) for x in lines)
    assert any("eval_accuracy" in x for x in lines)
    cluster = json.loads((tmp_path / "run" / "cluster.json").read_text())
    roles = sorted((p["role"], p["rank"]) for p in cluster["processes"])
    assert roles == [("coordinator", 0), ("server", 0), ("server", 1), ("worker", 0), ("worker", 1)]
    assert all(p["pid"] > 0 for p in cluster["processes"])
    assert all(p["address"].startswith("tcp://127.0.0.1:")
               for p in cluster["processes"] if p["role"] != "worker")


def test_digits_async_reaches_093(tmp_path):
    # 16 epochs, not the example's 8: at 8, async runs ended at 0.939-0.972 (16 runs),
    # too near the bar; at 16, 0.975-0.989 (8 runs), for 0.3 s more.
    summary = run_job(DIGITS, tmp_path / "run", "--mode", "async", "--epochs", 16)
    assert summary["mode"] == "async"
    assert summary["eval_accuracy"] >= 0.93, summary


def test_mnist_sync_reaches_093(tmp_path):
    summary = run_job(MNIST, tmp_path / "run", "--mode", "sync", timeout_s=240)
    assert summary["eval_accuracy"] >= 0.93, summary


# ---------------------------------------------------------------- exactness


def test_sync_two_workers_equal_one_worker_with_double_batch(tmp_path):
    job = write_job(tmp_path, "exact", 'name = "sgd"\nlr = 0.1\nmomentum = 0.9')
    two = run_job(job, tmp_path / "w2", "--workers", 2, "--servers", 2, "--batch-size", 16,
                  "--steps", 20)
    one = run_job(job, tmp_path / "w1", "--workers", 1, "--servers", 2, "--batch-size", 32,
                  "--steps", 20)
    assert rel(two["eval_loss"], one["eval_loss"]) <= 1e-4, (two["eval_loss"], one["eval_loss"])
    # And both equal plain PyTorch on one process (the oracle).
    ref = train_reference(job, global_batch=32, steps=20)
    assert rel(two["eval_loss"], ref["eval_loss"]) <= 1e-4, (two["eval_loss"], ref["eval_loss"])


@pytest.mark.parametrize("optimizer", [
    'name = "sgd"\nlr = 0.05\nmomentum = 0.9\nnesterov = true\nweight_decay = 0.001',
    'name = "adam"\nlr = 0.003',
    'name = "adamw"\nlr = 0.003\nweight_decay = 0.01',
    'name = "adagrad"\nlr = 0.05',
], ids=["sgd-nesterov-wd", "adam", "adamw", "adagrad"])
def test_server_optimizer_matches_torch_optim(tmp_path, optimizer):
    job = write_job(tmp_path, "opt", optimizer)
    got = run_job(job, tmp_path / "run", "--workers", 2, "--servers", 2, "--batch-size", 16,
                  "--steps", 20)
    ref = train_reference(job, global_batch=32, steps=20)
    assert rel(got["eval_loss"], ref["eval_loss"]) <= 1e-4, (got["eval_loss"], ref["eval_loss"])
    assert got["partitions"] > 2  # small partitions: tensors split over both servers


# ------------------------------------------------------------------ failures


def test_killed_worker_ends_the_run_naming_it(tmp_path):
    out = tmp_path / "run"
    job = Job(["run", DIGITS, "--out", out, "--quiet", "--epochs", 400], timeout_s=120)
    try:
        cluster = wait_for(lambda: (out / "cluster.json").exists() and
                           json.loads((out / "cluster.json").read_text()), 90, "cluster.json")
        wait_for(lambda: (out / "metrics.jsonl").exists() and
                 (out / "metrics.jsonl").stat().st_size > 0, 60, "training to start")
        victim = next(p for p in cluster["processes"] if p["role"] == "worker" and p["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        code, output = job.wait()
        elapsed = time.monotonic() - killed_at
    finally:
        if job.proc.poll() is None:
            job.kill()
    assert code != 0, output
    assert elapsed < 30, f"run took {elapsed:.1f} s to end after the kill"
    assert "worker 1" in output and "SIGKILL" in output, output
    # No process of the job is left behind.
    for p in cluster["processes"]:
        with pytest.raises(ProcessLookupError):
            wait_for(lambda pid=p["pid"]: _gone(pid), 10, f"{p['role']} {p['rank']} to exit")
            os.kill(p["pid"], 0)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("body, flags, needle", [
    ('[model]\nhiden = [3]\n', [], "model.hiden"),
    ('[train]\nsteps = "many"\n', [], "train.steps"),
    ('', ["--workers", "0"], "--workers"),
    ('[data]\ndataset = "npy"\npath = "/no/such/dir"\n', [], "data.path"),
    ('', ["--mode", "sideways"], "--mode"),
], ids=["unknown-field", "wrong-type", "zero-workers", "missing-data-path", "bad-mode"])
def test_bad_input_exits_nonzero_with_one_line(tmp_path, body, flags, needle):
    job = tmp_path / "bad.toml"
    job.write_text(body)
    code, output = run_cli(["run", job, "--out", tmp_path / "run", *flags], timeout_s=30)
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], output
    assert "Traceback" not in output


def test_missing_job_file_is_a_clear_error(tmp_path):
    code, output = run_cli(["run", tmp_path / "nope.toml"], timeout_s=30)
    assert code == 2 and "does not exist" in output and "Traceback" not in output


# ---------------------------------------------------------- user's own script


def test_user_script_via_launch(tmp_path):
    script = ROOT / "examples" / "train_script.py"
    code, output = run_cli(["launch", "--workers", 2, "--servers", 1, "--out", tmp_path / "run",
                            "--quiet", script, "--steps", 150], timeout_s=180)
    assert code == 0, output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.9, summary
