"""The local launcher: starts a whole job on this machine and watches it.

Phases:

1. Make the run directory, write the resolved ``config.json``, draw the job's
   secret (32 random bytes, handed to children in their environment, never on
   a command line where ``ps`` would show it).
2. Start the coordinator; wait for it to publish its address.
3. Start the servers and workers, each its own process, logs in ``logs/``.
4. Watch: the progress bar follows ``metrics.jsonl``; the first process to exit
   with an error (or be killed) fails the job. The launcher names it, gives the
   others a moment to notice through their heartbeats, then ends them.
5. On success, print the summary table from ``summary.json``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional

from tessera.config import config_to_dict
from tessera.config.schema import JobConfig


class LaunchError(RuntimeError):
    pass


@dataclass
class Child:
    role: str
    rank: int
    proc: subprocess.Popen
    log_path: Path
    log: IO = field(repr=False, default=None)

    @property
    def name(self) -> str:
        return f"{self.role} {self.rank}"


def default_run_dir(cfg: JobConfig) -> Path:
    return Path(cfg.out or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class Launcher:
    def __init__(self, cfg: JobConfig, *, worker_cmd: Optional[list[str]] = None,
                 quiet: bool = False):
        self.cfg = cfg
        self.run_dir = default_run_dir(cfg).resolve()
        self.worker_cmd = worker_cmd or [sys.executable, "-m", "tessera.cluster.trainer"]
        self.quiet = quiet
        self.children: list[Child] = []
        # "curve:" asks every endpoint for CURVE encryption; keys derive from the secret.
        self.secret = ("curve:" if cfg.cluster.encrypt else "") + secrets.token_hex(32)

    # --------------------------------------------------------------- phases

    def _spawn(self, role: str, rank: int, cmd: list[str], env: dict) -> Child:
        log_path = self.run_dir / "logs" / f"{role}-{rank}.log"
        log = open(log_path, "w")
        child_env = dict(env, TESSERA_ROLE=role, TESSERA_RANK=str(rank))
        proc = subprocess.Popen(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        child = Child(role, rank, proc, log_path, log)
        self.children.append(child)
        return child

    def start(self) -> None:
        cfg = self.cfg
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        for stale in ("coordinator.json", "cluster.json", "summary.json", "metrics.jsonl"):
            (self.run_dir / stale).unlink(missing_ok=True)
        env = dict(os.environ, TESSERA_RUN_DIR=str(self.run_dir), TESSERA_SECRET=self.secret,
                   PYTHONUNBUFFERED="1")
        coord = self._spawn("coordinator", 0, [sys.executable, "-m", "tessera.cluster.role",
                                               "coordinator"], env)
        addr_file = self.run_dir / "coordinator.json"
        deadline = time.monotonic() + 60
        while not addr_file.exists():
            if coord.proc.poll() is not None:
                raise LaunchError(f"the coordinator {describe_exit(coord.proc.returncode)} "
                                  f"before it was up:\n{tail(coord.log_path)}")
            if time.monotonic() > deadline:
                raise LaunchError("the coordinator did not publish its address within 60 s")
            time.sleep(0.02)
        env["TESSERA_COORDINATOR"] = json.loads(addr_file.read_text())["address"]
        for rank in range(cfg.cluster.servers):
            self._spawn("server", rank, [sys.executable, "-m", "tessera.cluster.role", "server"],
                        env)
        for rank in range(cfg.cluster.workers):
            self._spawn("worker", rank, self.worker_cmd, env)

    def stop_all(self, grace_s: float = 3.0) -> None:
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in self.children:
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(timeout=5)
        for c in self.children:
            if c.log:
                c.log.close()

    def watch(self, progress=None) -> Optional[str]:
        """Wait for the job; returns None on success, else the failure (one paragraph)."""
        first_failure: Optional[Child] = None
        failed_at = 0.0
        # After the first failure, the others get this long to stop on their own
        # (they learn from heartbeats within heartbeat_timeout_s).
        settle_s = min(10.0, self.cfg.cluster.heartbeat_timeout_s + 2.0)
        while True:
            if progress:
                progress()
            running = [c for c in self.children if c.proc.poll() is None]
            for c in self.children:
                code = c.proc.returncode
                if code not in (None, 0) and first_failure is None:
                    first_failure, failed_at = c, time.monotonic()
            if not running:
                break
            if first_failure and time.monotonic() - failed_at > settle_s:
                break
            time.sleep(0.1)
        if progress:
            progress()
        if first_failure is None:
            return None
        self.stop_all()
        c = first_failure
        return (f"{c.name} (pid {c.proc.pid}) {describe_exit(c.proc.returncode)}; "
                f"the job was stopped. Last lines of {c.log_path}:\n{tail(c.log_path)}")

    def run(self) -> int:
        """Start, watch, report. Returns the exit code for the CLI."""
        from tessera.cluster.console import ProgressView, print_failure, print_summary
        view = None if self.quiet else ProgressView(self.run_dir, self.cfg)
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def interrupted(signum, _frame):
            raise KeyboardInterrupt

        for s in previous:
            signal.signal(s, interrupted)
        try:
            self.start()
            if view:
                view.start()
            failure = self.watch(view.update if view else None)
        except KeyboardInterrupt:
            if view:
                view.stop()
            self.stop_all()
            print_failure("interrupted: every process of the job was stopped", self.run_dir)
            return 130
        except LaunchError as exc:
            if view:
                view.stop()
            self.stop_all()
            print_failure(str(exc), self.run_dir)
            return 1
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if view:
            view.stop()
        self.stop_all()
        if failure:
            print_failure(failure, self.run_dir)
            return 1
        summary_path = self.run_dir / "summary.json"
        if not summary_path.exists():
            print_failure("every process exited cleanly but no summary.json was written",
                          self.run_dir)
            return 1
        print_summary(json.loads(summary_path.read_text()), self.run_dir, quiet=self.quiet)
        return 0
