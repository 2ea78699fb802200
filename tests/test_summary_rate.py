"""``samples_per_s`` in async mode counts every worker's samples over the job's training
time, not worker 0's rate times the worker count: a worker paused mid-run (SIGSTOP, as a
preempted or swapping machine would) finishes late, and the job's rate says so."""

from __future__ import annotations

import json
import os
import signal
import time

from tests.harness import ROOT, Job, wait_for
from tests.test_restarts import finish, metric_records, planned_steps, strict_summary

DIGITS = str(ROOT / "examples" / "digits.toml")
PAUSE_S = 2.0


def test_async_rate_counts_a_slow_worker_as_it_ran(tmp_path):
    out = tmp_path / "run"
    job = Job(["run", DIGITS, "--out", out, "--quiet", "--mode", "async", "--epochs", "6"],
              timeout_s=240)
    steps = planned_steps(job, out)
    wait_for(lambda: (metric_records(out) and metric_records(out)[-1]["step"] >= steps // 4)
             or job.proc.poll() is not None, 120, "a quarter of the run", interval_s=0.02)
    assert job.proc.poll() is None, "the job ended before the pause"
    procs = json.loads((out / "cluster.json").read_text())["processes"]
    pid = next(p["pid"] for p in procs if p["role"] == "worker" and p["rank"] == 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(PAUSE_S)  # worker 0 trains on meanwhile (async: nobody waits)
    finally:
        os.kill(pid, signal.SIGCONT)
    finish(job)
    summary = strict_summary(out)
    total = 2 * steps * 32  # both workers, every step, batch 32
    lead_busy = summary["wall_s"] - summary["eval_s"]  # worker 0's training time
    # Worker 0's rate times two would be total / lead_busy; worker 1 ran about PAUSE_S
    # longer than worker 0 (it lost the pause and caught up none of it).
    assert summary["samples_per_s"] <= total / (lead_busy + 0.5 * PAUSE_S), (summary, total)
    assert summary["samples_per_s"] >= 0.5 * total / (lead_busy + PAUSE_S + 5.0), summary


def test_sync_rate_leaves_out_the_time_every_worker_waited_for_the_evaluation(tmp_path):
    # Worker 0 evaluates MNIST's test split every 10 steps; in sync mode worker 1 waits at
    # the next clock meanwhile. The job's rate is training time only: it must agree with
    # the rate of the windows that held no evaluation (measured by worker 0, step to step),
    # not fall by the evaluations' share of the wall (about half of it here).
    job_file = tmp_path / "mnist.toml"
    text = (ROOT / "examples" / "mnist.toml").read_text().replace("eval_every = 50",
                                                                   "eval_every = 10")
    assert "eval_every = 10" in text
    job_file.write_text(text)
    out = tmp_path / "run"
    job = Job(["run", job_file, "--out", out, "--quiet", "--mode", "sync", "--steps", "80"],
              timeout_s=240)
    finish(job)
    summary = strict_summary(out)
    samples = seconds = 0.0
    prev = 0
    for r in metric_records(out):
        if prev >= 10 and not any(k.startswith("eval_") for k in r):
            n = (r["step"] - prev) * 32 * 2
            samples, seconds = samples + n, seconds + n / r["samples_per_s"]
        prev = r["step"]
    steady = samples / seconds
    assert summary["eval_s"] > 0.2 * (summary["wall_s"] - summary["eval_s"]), summary
    assert 0.75 * steady <= summary["samples_per_s"] <= 1.3 * steady, (summary, steady)
