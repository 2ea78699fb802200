"""The one spawn helper for tests with real processes (STYLE.md item 12).

Every cluster a test starts goes through :func:`run_cli` or :class:`Job`: a hard
timeout, the launcher's own process group killed on timeout or failure (the
launcher ends its children; their heartbeat watchdog ends them if it cannot),
ports taken from the OS by the processes themselves, and the launcher's output
(with the failing process's log tail) attached to any assertion.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESSERA = [sys.executable, "-m", "tessera.cli.main"]


class Job:
    """A ``tessera`` command running in the background."""

    def __init__(self, args: list[str], *, timeout_s: float = 180, env: dict = None):
        self.args = [str(a) for a in args]
        self.timeout_s = timeout_s
        self.started = time.monotonic()
        self.proc = subprocess.Popen(TESSERA + self.args, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True,
                                     env=None if env is None else {**os.environ, **env})

    def wait(self) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            out, _ = self.proc.communicate(timeout=30)
            raise AssertionError(f"tessera {' '.join(self.args)} did not finish within "
                                 f"{self.timeout_s} s; output:\n{out}")
        return self.proc.returncode, out

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_cli(args: list, *, timeout_s: float = 180) -> tuple[int, str]:
    job = Job(args, timeout_s=timeout_s)
    try:
        return job.wait()
    finally:
        if job.proc.poll() is None:
            job.kill()


def run_job(job_file: str, out: Path, *flags, timeout_s: float = 180) -> dict:
    """Run a job to completion; returns summary.json (asserts exit code 0)."""
    code, output = run_cli(["run", job_file, "--out", out, "--quiet", *flags], timeout_s=timeout_s)
    assert code == 0, f"tessera run failed (exit {code}):\n{output}"
    return json.loads((out / "summary.json").read_text())


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie of an unrelated parent counts as gone, and so does
    a process exiting while its ``/proc`` entry is read: ESRCH)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


#: The fault goals' bound on recovery: a killed process's replacement completes a step
#: within this many seconds of the kill ...
RECOVERY_S = 5.0
#: ... unless the machine's 1-minute load is over this (other tests' processes beside it).
BUSY_LOAD = 4.0


def load_1m() -> float:
    """The machine's 1-minute load average."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def recovered_in_time(seconds: float) -> bool:
    """Whether a recovery of ``seconds`` meets the fault goals' bound (or the machine was
    too busy for the bound to say anything)."""
    return seconds <= RECOVERY_S or load_1m() > BUSY_LOAD


@contextlib.contextmanager
def table_server(ctx, tables: list, *, workers: int = 1, mode: str = "sync",
                 secret: str = "secret", shm: bool = False):
    """One ParameterServer holding ``tables`` (no dense partitions) in a thread of this
    process, on a real endpoint (``shm``: offering shared memory), and a connected
    PSClient per worker; -> (server, endpoint, clients). Stopped and closed on exit."""
    from tessera.config.schema import OptimizerConfig
    from tessera.ps.client import PSClient
    from tessera.ps.server import ParameterServer, ServerHooks, ServerOptions
    from tessera.ps.sharding import ShardMap
    from tessera.transport.endpoint import ServerEndpoint

    ep = ServerEndpoint(ctx, "127.0.0.1", secret, shm=shm)
    stop = threading.Event()
    srv = ParameterServer(ServerOptions(rank=0, num_workers=workers, mode=mode), endpoint=ep,
                          partitions=[], optimizer=OptimizerConfig(), tables=tables,
                          hooks=ServerHooks(should_stop=stop.is_set))
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    shard_map = ShardMap(layout=(), partitions=(), num_servers=1)
    clients = [PSClient(ctx=ctx, shard_map=shard_map, server_addresses=[ep.address],
                        secret=secret, worker=w, timeout_s=10) for w in range(workers)]
    try:
        for c in clients:
            c.connect()
        yield srv, ep, clients
    finally:
        stop.set()
        thread.join(timeout=5)
        for c in clients:
            c.close()
        ep.close()
