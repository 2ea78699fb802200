"""What every launcher shares: a started child process, how it ended, its log, and GPUs.

The local launcher (:mod:`tessera.launch.launcher`), the per-node one
(:mod:`tessera.launch.node`) and the Ray one (:mod:`tessera.launch.ray_backend`)
all start the same entry points (:data:`WORKER_MODULE`, :data:`ROLE_MODULE`) and
name a dead process the same way ("worker 1 (pid N) was killed by SIGKILL"). This
module holds that common ground, so the launchers import it and not each other.

It imports no torch (a launcher starts in a fraction of a second).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Mapping, Optional

from tessera.config import env as envvars

#: The built-in worker program (``tessera run``), started as ``python -m WORKER_MODULE``.
WORKER_MODULE = "tessera.train.trainer"
#: A standby worker (``--max-restarts``): imports done, waiting to replace a dead worker.
STANDBY_MODULE = "tessera.train.standby"
#: Coordinator and server entry points: ``python -m ROLE_MODULE coordinator|server``.
ROLE_MODULE = "tessera.cluster.role"


def role_cmd(python: str, role: str) -> list[str]:
    """The command that starts the coordinator or a server with interpreter ``python``."""
    return [python, "-m", ROLE_MODULE, role]


def standby_runs(cmd: list[str], python: str) -> bool:
    """Whether a standby started with ``python`` can become a worker started as ``cmd``:
    ``python -m MODULE ...`` or ``python SCRIPT ...`` (no interpreter flags)."""
    if len(cmd) < 2 or cmd[0] != python:
        return False
    if cmd[1] == "-m":
        return len(cmd) >= 3
    return not cmd[1].startswith("-")


class LaunchError(RuntimeError):
    """The job could not be started or watched; the message is for a person."""


@dataclass
class Child:
    """A process the launcher started on this machine, with its open log."""

    role: str
    rank: int
    proc: subprocess.Popen
    log_path: Path
    log: IO = field(repr=False, default=None)

    @property
    def name(self) -> str:
        return f"{self.role} {self.rank}"


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


@contextlib.contextmanager
def signals_interrupt():
    """While inside: SIGINT and SIGTERM raise KeyboardInterrupt (the launcher's cue to
    checkpoint and stop the job); the previous handlers come back on leaving."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def interrupted(signum, _frame):
        raise KeyboardInterrupt

    for s in previous:
        signal.signal(s, interrupted)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------ GPUs


def visible_gpus(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """This node's GPUs, without importing torch: the ``CUDA_VISIBLE_DEVICES`` list when
    set (empty: none), else one entry per ``GPU`` line of ``nvidia-smi -L``."""
    environ = envvars.process_environ() if environ is None else environ
    listed = envvars.cuda_visible_devices(environ)
    if listed is not None:
        return listed
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [str(i) for i, _ in enumerate(
        line for line in out.stdout.splitlines() if line.startswith("GPU "))]

