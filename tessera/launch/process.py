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
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Mapping, Optional

from tessera.config import env as envvars
from tessera.train.standby import TRAINER

#: The built-in worker program (``tessera run``), started as ``python -m WORKER_MODULE``
#: (one name with the standby's and the fork server's, which load its data ahead).
WORKER_MODULE = TRAINER
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


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork
    except (OSError, AttributeError):
        return None


#: libc's prctl (Linux), looked up once at import: never between fork and exec.
_PRCTL = _load_prctl()
#: prctl option: the signal this process gets when its parent ends.
PR_SET_PDEATHSIG = 1


#: What makes a launcher checkpoint the job and stop it (:func:`signals_interrupt`).
#: Its children ignore SIGUSR1 (:func:`die_with_parent`), so a scheduler that signals every
#: process of a job, as Slurm does (``#SBATCH --signal=USR1@120``), reaches only launchers;
#: SIGTERM from Slurm reaches every process, and a server ends on it at once.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def die_with_parent() -> None:
    """``preexec_fn`` of every process a launcher starts: the kernel sends it SIGKILL
    when the launcher ends, whatever way (even ``kill -9``), whatever the child is blocked
    in (a C call, a collective, a socket). Runs in the child between fork and exec; the
    setting survives exec. Elsewhere than Linux the heartbeat's parent check remains.
    SIGUSR1 is ignored (that too survives exec): it is the launchers' cue alone."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    except ValueError:  # forked from another thread than the main one: leave it
        pass


def spawn(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Start a launcher's child: its own session (a signal to the launcher's terminal
    group does not reach it) and :func:`die_with_parent`."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent, **kwargs)


class PolledProcess:
    """A process the launcher did not start itself, answering ``poll``, ``wait``,
    ``send_signal``, ``terminate`` and ``kill`` as a ``subprocess.Popen`` does: a fork of
    the fork server, or a fork server of the warm pool. A subclass sets ``pid``, ``args``
    and ``returncode`` and gives :meth:`poll` and :meth:`_pause` (wait up to ``wait_s``
    for news of the process)."""

    pid: int
    args: list
    returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        raise NotImplementedError

    def _pause(self, wait_s: float) -> None:
        raise NotImplementedError

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._pause(0.05 if left is None else min(0.05, left))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped yet: the pid is still this process's
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


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
    """While inside: SIGINT, SIGTERM and SIGUSR1 (:data:`INTERRUPTS`) raise
    KeyboardInterrupt (the launcher's cue to checkpoint and stop the job); the previous
    handlers come back on leaving."""
    previous = {s: signal.getsignal(s) for s in INTERRUPTS}

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

