"""A fork server: the job's processes start as forks of one process whose imports are done.

Every Tessera process imports Python, torch and Tessera: 1.5-2 s of CPU each, paid again
by every coordinator, server and worker, and all at once at a job's start, where they
compete for the same cores. The local launchers (``tessera run``, ``tessera launch``,
``tessera node``) start one fork server per job instead, which pays for the imports
(and loads the built-in trainer's dataset) once, then forks each process on order. A
fork is a few milliseconds, shares the imported pages copy-on-write, and is as good a
process as a fresh one: its own session, its own environment (replaced whole, as
:mod:`tessera.train.standby` does), its log, ``SIGKILL`` when its parent ends.
PyTorch's own DataLoader workers are forks of an interpreter that imported torch, and
the same rules hold: the fork server runs no torch op and starts no thread of its own
(OpenBLAS's pool is re-made in the child by its fork handlers), so nothing is held
across the fork; and it runs on one intra-op thread, so no OpenMP pool exists to be
inherited without its threads (the child sets its own count, as a fresh process has).

Protocol (on the fork server's stdin and stdout, JSON lines): the launcher writes
``{"id", "cmd", "env", "log"}``; the fork server answers ``{"id", "pid"}`` once forked
and ``{"pid", "exit"}`` when that child ends (``exit`` as :attr:`subprocess.Popen.returncode`:
negative for a signal). The launcher sees its children as :class:`ForkedProcess`, which
answers ``poll``, ``wait``, ``kill`` as a ``Popen`` does. End of input ends the fork
server once its children have ended; the fork server's own death ends its children
(their parent-death signal), and the launcher counts them killed.

A command the fork server cannot run (an interpreter other than this one, interpreter
flags) is started as before, with :func:`~tessera.launch.process.spawn`; so is every
process when the fork server could not start.

    python -m tessera.launch.forkserver [ROLE ...]   # started by a launcher only
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import IO, Optional

from tessera.config import env as envvars
from tessera.config import nopickle
from tessera.launch.process import (ROLE_MODULE, LaunchError, PolledProcess, die_with_parent,
                                    spawn, standby_runs)

#: The module a launcher starts as its fork server.
MODULE = "tessera.launch.forkserver"


class ForkedProcess(PolledProcess):
    """One child of the fork server, seen from the launcher as a ``subprocess.Popen``."""

    def __init__(self, server: "ForkServer", pid: int, args: list[str]):
        self.pid, self.args, self._server = pid, args, server
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self._server.collect()
        return self.returncode

    def _pause(self, wait_s: float) -> None:
        self._server.collect(wait_s=wait_s)


class ForkServer:
    """The launcher's side: starts the fork server, orders forks, collects exits."""

    def __init__(self, env: dict, log: IO, roles: tuple[str, ...] = (),
                 python: str = sys.executable, proc=None):
        """``proc``: a fork server started already (:mod:`tessera.launch.warmpool`'s),
        as a ``Popen`` with pipes on its stdin and stdout; else one is started here."""
        self.python = python
        self.proc = proc
        if proc is None:
            cmd = nopickle.wrap_command([python, "-m", MODULE, *roles], env)
            self.proc = spawn(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=log)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._buf = b""
        self._next_id = 0
        self._pids: dict[int, int] = {}  # order id -> pid
        self._children: dict[int, ForkedProcess] = {}
        self._exits: dict[int, int] = {}  # exits reported before their ForkedProcess exists
        self._gone = False

    @property
    def alive(self) -> bool:
        return not self._gone and self.proc.poll() is None

    def start(self, cmd: list[str], env: dict, log_path, timeout_s: float = 120.0
              ) -> Optional[ForkedProcess]:
        """``cmd`` as a fork (None: the fork server cannot run it, or is gone)."""
        if self._gone or not standby_runs(cmd, self.python):
            return None
        self._next_id += 1
        order = self._next_id
        try:
            self.proc.stdin.write(json.dumps({"id": order, "cmd": cmd, "env": env,
                                              "log": str(log_path)}).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            self._lost()
            return None
        deadline = time.monotonic() + timeout_s  # the first order waits for the imports
        while order not in self._pids:
            if self._gone:
                return None
            if time.monotonic() > deadline:
                raise LaunchError(f"the fork server (pid {self.proc.pid}) did not start "
                                  f"{' '.join(cmd[1:3])} within {timeout_s:.0f} s")
            self.collect(wait_s=0.05)
        pid = self._pids.pop(order)
        child = self._children[pid] = ForkedProcess(self, pid, cmd)
        if pid in self._exits:
            child.returncode = self._exits.pop(pid)
        return child

    def collect(self, wait_s: float = 0.0) -> None:
        """Take the fork server's reports (waiting up to ``wait_s`` for one)."""
        if self._gone:
            return
        out = self.proc.stdout
        if wait_s > 0:
            select.select([out], [], [], wait_s)
        try:
            chunk = out.read()
        except OSError:
            chunk = None
        if chunk == b"":  # end of file: the fork server is gone, and its children with it
            self._lost()
            return
        if chunk:
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:
                self._report(json.loads(line))

    def _report(self, msg: dict) -> None:
        if "exit" in msg:
            child = self._children.get(msg["pid"])
            if child is None:
                self._exits[msg["pid"]] = msg["exit"]
            else:
                child.returncode = msg["exit"]
        elif "id" in msg:
            self._pids[msg["id"]] = msg["pid"]

    def _lost(self) -> None:
        """The fork server ended: its children got their parent-death SIGKILL."""
        self._gone = True
        for child in self._children.values():
            if child.returncode is None:
                try:
                    os.kill(child.pid, signal.SIGKILL)  # where no parent-death signal exists
                except ProcessLookupError:
                    pass
                child.returncode = -signal.SIGKILL

    def close(self, timeout_s: float = 5.0) -> None:
        """End of orders; the fork server ends once its children have (the launcher
        stopped them first)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._gone = True


# ------------------------------------------------------------ the fork server


def _child(order: dict, reports: IO, threads: int) -> dict:
    """In the fork: leave the fork server's pipes and session; die with it; take the
    intra-op threads a fresh process would have (``OMP_NUM_THREADS`` of its own
    environment, else torch's default, ``threads``)."""
    import torch
    wanted = order["env"].get(envvars.OMP_NUM_THREADS, "")
    torch.set_num_threads(int(wanted) if wanted.isdigit() and int(wanted) > 0 else threads)
    reports.close()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.setsid()
    die_with_parent()  # SIGKILL with the fork server; SIGUSR1 is the launchers' cue alone
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return order


def warm(roles: list[str]) -> int:
    """The imports of ``roles``' processes, on one intra-op thread; returns the thread
    count a fresh process would have had (each child takes it back)."""
    import importlib

    import torch

    from tessera.train import standby
    # No OpenMP thread pool in this process: a fork inherits the pool's bookkeeping but
    # not its threads, and its first parallel region would wait for them for ever. So
    # whatever runs here (imports, the dataset loaded ahead) runs on one thread; each
    # child sets its own count, and its pool is made in it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name in dict.fromkeys(n for r in roles or [""] for n in standby.WARM_BY_ROLE[r]):
        importlib.import_module(name)
    return threads


def serve(roles: list[str]) -> Optional[tuple[dict, object]]:
    """Import, then fork on each order. Returns in a child: (its order, the dataset
    loaded ahead); in the fork server at end of input, once its children ended: None."""
    return loop(roles, warm(roles))


def loop(roles: list[str], threads: int, launcher: Optional[int] = None
         ) -> Optional[tuple[dict, object]]:
    """The fork server's orders on stdin, its reports on stdout (see the module's
    docstring). ``launcher``: a pidfd to watch (:mod:`tessera.launch.warmpool`, where the
    launcher is not the parent): its end ends this process, and so its children."""
    from tessera.train import standby
    reports = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what this process prints goes to its log, not into the reports
    print(f"fork server ready (pid {os.getpid()}, roles {roles or ['worker']})", flush=True)
    ready = time.time()
    data, loaded, compiled = None, False, False
    children: set[int] = set()
    buf, open_ = b"", True
    watched = [] if launcher is None else [launcher]
    while open_ or children:
        if watched and select.select(watched, [], [], 0)[0]:
            os._exit(1)  # the launcher ended: the children get their parent-death SIGKILL
        if open_ and select.select([0], [], [], 0.05)[0]:
            chunk = os.read(0, 1 << 16)
            open_ = bool(chunk)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                order = json.loads(line)
                if not loaded and order["cmd"][1:3] == ["-m", standby.TRAINER]:
                    data, loaded = standby.preload(), True  # once, for every worker
                    _compile_ahead("worker")
                if not compiled and order["cmd"][1:4] == ["-m", ROLE_MODULE, "server"]:
                    compiled = True  # once, for every server
                    _compile_ahead("server")
                pid = os.fork()
                if pid == 0:
                    if launcher is not None:
                        os.close(launcher)
                    order["forked"] = f"{time.time() - ready:.1f}"
                    return _child(order, reports, threads), data
                children.add(pid)
                reports.write(json.dumps({"id": order["id"], "pid": pid}) + "\n")
        elif not open_:
            time.sleep(0.05)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            reports.write(json.dumps({"pid": pid,
                                      "exit": os.waitstatus_to_exitcode(status)}) + "\n")
    return None


def _compile_ahead(role: str) -> None:
    """What the ``role`` processes of this job would compile, compiled here once before
    forking the first of them (:func:`tessera.train.standby.compile_ahead`)."""
    from tessera.train import standby
    t0 = time.monotonic()
    what = standby.compile_ahead(role)
    if what:
        print(f"kernels compiled for the job's {role}s ({what}) in "
              f"{time.monotonic() - t0:.1f} s", flush=True)


def finish(got: Optional[tuple[dict, object]]) -> None:
    """After :func:`loop`: in a fork, become the process ordered; in the fork server
    (every child ended), exit without the teardown of the imports (1-2 s of CPU)."""
    if got is None:
        sys.stdout.flush()
        os._exit(0)
    order, data = got
    from tessera.train import standby
    standby.become(order, data)


def main(argv: list[str]) -> None:
    finish(serve(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
