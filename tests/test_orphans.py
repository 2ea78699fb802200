"""Every process a launcher starts ends when the launcher ends, whatever way (here
``kill -9``), whatever the process is blocked in: the kernel sends it SIGKILL
(``PR_SET_PDEATHSIG``, set in :func:`tessera.launch.process.spawn`)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tessera.launch.process import signals_interrupt
from tests.harness import ROOT, Job, alive, wait_for

BLOCKED = str(ROOT / "tests" / "scripts" / "blocked.py")


def test_kill_9_of_the_launcher_ends_every_process_it_started(tmp_path):
    out = tmp_path / "run"
    # Worker 0 blocks in a C call holding the GIL (its heartbeat watchdog cannot run);
    # worker 1 still trains, waiting on worker 0 in sync mode; the servers serve.
    job = Job(["launch", "--workers", 2, "--servers", 2, "--out", out, "--quiet", BLOCKED],
              timeout_s=120)
    try:
        wait_for(lambda: (out / "blocked").exists() or job.proc.poll() is not None, 90,
                 "worker 0 to block")
        assert job.proc.poll() is None, job.wait()[1]
        pids = [p["pid"] for p in json.loads((out / "cluster.json").read_text())["processes"]]
        assert len(pids) == 5 and all(alive(p) for p in pids), pids
        os.kill(job.proc.pid, signal.SIGKILL)  # the launcher only, not its group
        job.proc.wait(timeout=10)
        t0 = time.monotonic()
        wait_for(lambda: not any(alive(p) for p in pids), 5,
                 f"the launcher's children {[p for p in pids if alive(p)]} to end")
        print(f"all {len(pids)} children gone {time.monotonic() - t0:.2f} s after kill -9")
    finally:
        job.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_a_launchers_cue_to_checkpoint_and_stop(sig):
    """SIGUSR1 interrupts a launcher as SIGINT and SIGTERM do (Slurm's --signal=USR1@T
    reaches every process; the children ignore it: tests/test_multihost.py)."""
    before = signal.getsignal(sig)
    with pytest.raises(KeyboardInterrupt):
        with signals_interrupt():
            os.kill(os.getpid(), sig)
            time.sleep(5)
    assert signal.getsignal(sig) == before


def test_an_interrupt_after_the_coordinator_died_stops_at_once(tmp_path):
    """SIGTERM asks the coordinator for a checkpoint and waits for it; a coordinator that
    is gone answers nothing, so the launcher stops at once (it waited out 2x
    cluster.timeout_s, 60 s here, before) and says no checkpoint was completed."""
    out = tmp_path / "run"
    job = Job(["run", ROOT / "examples" / "digits.toml", "--steps", 100000, "--quiet",
               "--out", out], timeout_s=120)
    try:
        cluster = wait_for(lambda: (out / "metrics.jsonl").exists() and
                           json.loads((out / "cluster.json").read_text()), 90, "training")
        coordinator = next(p["pid"] for p in cluster["processes"] if p["role"] == "coordinator")
        os.kill(coordinator, signal.SIGKILL)
        os.kill(job.proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        code, output = job.wait()
        assert time.monotonic() - t0 < 15, output
        said = " ".join(output.split())  # (the console wraps long lines)
        assert code == 130 and "no checkpoint was completed" in said, output
        assert "the coordinator was killed by SIGKILL before answering the checkpoint" \
            in said, output
        assert "Traceback" not in output
    finally:
        job.kill()
