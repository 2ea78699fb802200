"""Tier 3: a job's processes start as forks of one fork server (tessera/launch/forkserver.py).

The fork server pays for Python's, torch's and Tessera's imports once per job; every
coordinator, server and worker is its fork, in a session of its own, and dies with it.
``TESSERA_FORKSERVER=0`` starts each process afresh, as before.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tests.harness import Job, alive, wait_for
from tests.test_faults import DIGITS, metric_lines


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("PPid:")))


def test_every_process_is_a_fork_and_a_killed_fork_server_ends_the_job(tmp_path: Path):
    """While training runs (sync, two workers, two threads each): every process of the job
    is a child of the same fork server, in its own session; kill -9 of the fork server
    kills them all, and the launcher names the failure and ends, leaving nothing behind."""
    out = tmp_path / "run"
    job = Job(["run", DIGITS, "--out", out, "--quiet", "--epochs", "60"], timeout_s=120,
              env={"TESSERA_WARM_POOL": ""})  # the launcher's own fork server
    wait_for(lambda: metric_lines(out) >= 3 or job.proc.poll() is not None, 90,
             "training to run")
    assert job.proc.poll() is None, job.wait()[1]
    pids = [p["pid"] for p in json.loads((out / "cluster.json").read_text())["processes"]]
    assert len(pids) == 5, pids  # coordinator, 2 servers, 2 workers
    (server,) = {_parent(pid) for pid in pids}
    assert server != job.proc.pid and _parent(server) == job.proc.pid
    with open(f"/proc/{server}/cmdline", "rb") as f:
        assert b"tessera.launch.forkserver" in f.read()
    assert {os.getsid(pid) for pid in pids} == set(pids)  # each its own session
    os.kill(server, signal.SIGKILL)
    code, output = job.wait()
    assert code != 0 and "was killed by SIGKILL" in output, output
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, "the forks to be gone")


def test_forkserver_0_starts_every_process_afresh(tmp_path: Path):
    out = tmp_path / "run"
    job = Job(["run", DIGITS, "--out", out, "--quiet", "--epochs", "2"], timeout_s=120,
              env={"TESSERA_FORKSERVER": "0"})
    code, output = job.wait()
    assert code == 0, output
    assert not (out / "logs" / "forkserver.log").exists()
    assert json.loads((out / "summary.json").read_text())["eval_accuracy"] > 0.5


def test_a_job_of_the_warm_pool_dies_with_its_launcher_and_a_refused_one_runs(
        tmp_path: Path, warm_pool: Path):
    """The session's warm pool (TESSERA_WARM_POOL, tests/conftest.py) serves a job: its
    fork server is a fork of the pool, in a session of its own, the job's processes are
    its forks; kill -9 of the launcher (not its parent) ends the fork server and every
    process of the job. A job the pool cannot serve (the no-pickle guard is installed at
    a process's start) gets a fork server of its own, and its log says why."""
    out = tmp_path / "run"
    job = Job(["run", DIGITS, "--out", out, "--quiet", "--epochs", "60"], timeout_s=120)
    try:
        wait_for(lambda: metric_lines(out) >= 3 or job.proc.poll() is not None, 90,
                 "training to run")
        assert job.proc.poll() is None, job.wait()[1]
        pids = [p["pid"] for p in json.loads((out / "cluster.json").read_text())["processes"]]
        (server,) = {_parent(pid) for pid in pids}
        pool = _parent(server)
        with open(f"/proc/{pool}/cmdline", "rb") as f:
            assert str(warm_pool).encode() in f.read()  # the pool's fork, not the launcher's
        assert os.getsid(server) == server and {os.getsid(p) for p in pids} == set(pids)
        os.kill(job.proc.pid, signal.SIGKILL)  # the launcher only
        job.proc.wait(timeout=10)
        wait_for(lambda: not any(alive(p) for p in [server, *pids]), 10,
                 "the fork server and its forks to be gone")
        assert alive(pool)  # the pool serves on
    finally:
        job.kill()
    guarded = tmp_path / "guarded"
    job = Job(["run", DIGITS, "--out", guarded, "--quiet", "--steps", "3"], timeout_s=120,
              env={"TESSERA_FORBID_PICKLE": "1"})
    code, output = job.wait()
    assert code == 0, output
    log = (guarded / "logs" / "forkserver.log").read_text()
    assert "warm pool" in log and "no-pickle guard" in log and "fork server ready" in log, log


def test_a_pool_that_is_not_there_leaves_the_launcher_its_own_fork_server(tmp_path: Path):
    """TESSERA_WARM_POOL naming no live pool (a stale path, a pool that died): no pool
    fork server, and the reason in the log the launcher gives its own fork server."""
    from tessera.launch import warmpool

    log_path = tmp_path / "forkserver.log"
    with open(log_path, "w") as log:
        assert warmpool.fork_server({"TESSERA_WARM_POOL": str(tmp_path / "gone.sock")},
                                    log, ("",)) is None
        assert warmpool.fork_server({}, log, ("",)) is None  # no pool asked for: no line
    lines = log_path.read_text().splitlines()
    assert len(lines) == 1 and "gone.sock not used" in lines[0] and "own" in lines[0], lines
