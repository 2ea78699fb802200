"""A warm pool: one long-lived process whose imports are done, that hands each local job
a fork server already warm (``TESSERA_WARM_POOL``).

A job's fork server (:mod:`tessera.launch.forkserver`) pays 2-3 s of CPU for Python,
torch (with ``torch._dynamo``, which the first ``torch.optim`` optimizer and DDP import)
and Tessera before its first fork. Where many short jobs run one after another on one
machine (a hyperparameter sweep, a notebook, a test suite) that is most of their CPU.
The pool pays it once: ``python -m tessera.launch.warmpool SOCKET`` imports what every
role imports, then listens on a Unix socket. A launcher whose environment has
``TESSERA_WARM_POOL=SOCKET`` sends the pool its fork server's three pipes (stdin,
stdout, log) with ``SCM_RIGHTS``, its environment and working directory; the pool
forks, and the fork becomes that job's fork server: its own session, the job's
environment (replaced whole) and directory, the same order loop as a fork server the
launcher started itself. It ends when the launcher ends (a pidfd on the launcher: the
launcher is not its parent), and its children with it (their parent-death signal), as
they would with a fork server the launcher had started.

The pool refuses (and the launcher then starts its own fork server, as without a pool)
a job whose environment differs from the pool's in what a process reads only at its
start (glibc's malloc tunables, ``PYTHONPATH``, ``LD_PRELOAD``, ...), a job under the
no-pickle guard (installed before any import), another interpreter, and a peer that is
not this user (``SO_PEERCRED``). The socket is made 0600 in a directory the caller
chose; the pool exits when the process that started it does.

    python -m tessera.launch.warmpool /run/user/1000/tessera-pool.sock
    TESSERA_WARM_POOL=/run/user/1000/tessera-pool.sock tessera run job.toml
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import sys
import time
from typing import Optional

from tessera.config import env as envvars
from tessera.launch.process import _PRCTL, PR_SET_PDEATHSIG, PolledProcess, die_with_parent

MODULE = "tessera.launch.warmpool"
#: Every role's imports (a job may need any of them).
ROLES = ["", "worker", "server", "coordinator"]
#: What a process reads from its environment only when it starts: a job that differs
#: from the pool here cannot be served by a fork of it.
AT_START = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
            "PYTHONPATH", "PYTHONHASHSEED", "PYTHONOPTIMIZE", "PYTHONMALLOC", "LD_PRELOAD",
            "LD_LIBRARY_PATH", envvars.FORBID_PICKLE)
#: The Linux namespaces a launcher must share with the pool (``ip netns exec``, a
#: container): the fork server and its forks live in the pool's.
NAMESPACES = ("net", "mnt", "pid", "ipc", "uts", "user")
#: Seconds a launcher waits for the pool's answer.
ANSWER_S = 10.0


def refusal(job_env: dict, python: str, launcher: int) -> str:
    """Why the pool cannot serve this job ('' when it can): its launcher's pid,
    interpreter and environment."""
    for ns in NAMESPACES:  # a fork lives in the pool's namespaces, not the launcher's
        try:
            theirs = os.stat(f"/proc/{launcher}/ns/{ns}").st_ino
            ours = os.stat(f"/proc/self/ns/{ns}").st_ino
        except OSError as exc:
            return f"the launcher's {ns} namespace cannot be read ({exc})"
        if theirs != ours:
            return f"the launcher runs in another {ns} namespace than the pool"
    if os.path.realpath(python) != os.path.realpath(sys.executable):
        return f"the job's interpreter {python} is not the pool's {sys.executable}"
    if envvars.forbid_pickle(job_env):
        return "the no-pickle guard is installed at a process's start"
    for name in AT_START:
        if job_env.get(name) != os.environ.get(name):
            return f"{name} differs from the pool's (read at a process's start)"
    return ""


# ------------------------------------------------------------------ the launcher's side


def fork_server(env: dict, log, roles: tuple[str, ...], python: str = sys.executable):
    """The job's fork server from the pool that ``env`` names (TESSERA_WARM_POOL), or
    None: no pool, or the pool cannot serve this job (the reason goes to ``log``; the
    launcher then starts a fork server of its own)."""
    path = env.get(envvars.WARM_POOL)
    if not path:
        return None
    try:
        return PooledForkServer(path, env, log, roles, python)
    except OSError as exc:
        log.write(f"warm pool {path} not used ({exc}): a fork server of our own\n")
        log.flush()
        return None


class PooledForkServer(PolledProcess):
    """A fork server forked by the pool, seen by the launcher as the ``subprocess.Popen``
    of one it started itself: ``stdin``, ``stdout``, ``pid``, ``poll``, ``wait``,
    ``kill``, ``returncode`` (the pool reports the exit on the request's connection)."""

    def __init__(self, path: str, env: dict, log, roles: tuple[str, ...], python: str):
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(ANSWER_S)
            conn.connect(path)
            request = json.dumps({"env": env, "cwd": os.getcwd(), "roles": list(roles),
                                  "python": python}).encode()
            socket.send_fds(conn, [request], [stdin_r, stdout_w, log.fileno()])
            answer, rest = _read_line(conn, ANSWER_S)
            if "pid" not in answer:
                raise OSError(answer.get("refused", f"unexpected answer {answer}"))
        except BaseException:
            conn.close()
            for fd in (stdin_w, stdout_r):
                os.close(fd)
            raise
        finally:
            os.close(stdin_r)
            os.close(stdout_w)
        self.pid = int(answer["pid"])
        self.args = [MODULE, path]
        self.stdin = os.fdopen(stdin_w, "wb")
        self.stdout = os.fdopen(stdout_r, "rb")
        self.returncode: Optional[int] = None
        self._conn, self._buf = conn, rest  # (the exit, if it came with the pid)
        conn.setblocking(False)

    def poll(self) -> Optional[int]:
        if self.returncode is None and b"\n" not in self._buf:
            try:
                chunk = self._conn.recv(4096)
            except BlockingIOError:
                return None
            except OSError:
                chunk = b""
            if not chunk:  # the pool is gone: so is every fork server it made
                self.returncode = -signal.SIGKILL
            self._buf += chunk
        if self.returncode is None and b"\n" in self._buf:
            self.returncode = int(json.loads(self._buf.split(b"\n")[0])["exit"])
        if self.returncode is not None and self._conn.fileno() >= 0:
            self._conn.close()
        return self.returncode

    def _pause(self, wait_s: float) -> None:
        select.select([self._conn], [], [], wait_s)


def _read_line(conn: socket.socket, timeout_s: float) -> tuple[dict, bytes]:
    """The first JSON line on ``conn``, and what came after it."""
    buf, deadline = b"", time.monotonic() + timeout_s
    while b"\n" not in buf:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = conn.recv(4096)
        if not chunk:
            raise OSError("the warm pool closed the connection")
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    return json.loads(line), rest


# ------------------------------------------------------------------------- the pool


def serve(path: str):
    """Import, listen, fork a fork server per request. Returns only in a fork: what
    :func:`tessera.launch.forkserver.loop` returns there."""
    from tessera.launch import forkserver
    threads = forkserver.warm(ROLES)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o177)
    try:
        listener.bind(path)  # 0600: this user only (and SO_PEERCRED is checked too)
    finally:
        os.umask(old)
    listener.listen(64)
    print(f"warm pool ready (pid {os.getpid()}, {path})", flush=True)
    pool = os.getpid()
    served: dict[int, socket.socket] = {}  # fork server pid -> its request's connection
    try:
        while True:
            if select.select([listener], [], [], 0.2)[0]:
                conn, _ = listener.accept()
                forked = _accept(conn, threads, served)
                if forked:  # in a fork: a job's fork server (or its child)
                    listener.close()
                    return forked[0]
            while served:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = served.pop(pid, None)
                if conn is not None:
                    _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
                    conn.close()
    finally:
        if os.getpid() == pool:
            listener.close()
            try:
                os.unlink(path)
            except OSError:
                pass


def _accept(conn: socket.socket, threads: int, served: dict) -> Optional[tuple]:
    """One request: refused (one line back) or forked. In the pool, returns None; in
    the fork, ``(what forkserver.loop returned,)``."""
    fds: list[int] = []
    try:
        conn.settimeout(ANSWER_S)
        peer, uid = _peer(conn)  # the launcher: pid and uid as the kernel gives them
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(msg)
        why = refusal(request["env"], request["python"], peer)
        if uid != os.getuid():
            why = f"peer uid {uid} is not this pool's user"
        elif len(fds) != 3:
            why = f"3 file descriptors expected, got {len(fds)}"
        if not why:
            launcher = os.pidfd_open(peer)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = f"bad request: {exc}"
    if why:
        _send(conn, {"refused": why})
        conn.close()
        for fd in fds:
            os.close(fd)
        return None
    pid = os.fork()
    if pid == 0:
        conn.close()
        for conn_ in served.values():
            conn_.close()
        return (_become_forkserver(request, fds, launcher, threads),)
    for fd in (*fds, launcher):
        os.close(fd)
    served[pid] = conn
    _send(conn, {"pid": pid})
    return None


def _become_forkserver(request: dict, fds: list[int], launcher: int, threads: int):
    from tessera.launch import forkserver
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.setsid()
    die_with_parent()  # with the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a fork server the launcher started
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [forkserver.MODULE, *request["roles"]]
    return forkserver.loop(request["roles"], threads, launcher=launcher)


def _peer(conn: socket.socket) -> tuple[int, int]:
    """The connected process's pid and uid (``SO_PEERCRED``)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, array.array("i").itemsize * 3)
    pid, uid, _ = array.array("i", creds)
    return pid, uid


def _send(conn: socket.socket, msg: dict) -> None:
    try:
        conn.setblocking(True)
        conn.settimeout(ANSWER_S)
        conn.sendall(json.dumps(msg).encode() + b"\n")
    except OSError:
        pass


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m tessera.launch.warmpool SOCKET")
    if len(os.fsencode(argv[0])) > 107:
        sys.exit(f"tessera: warm pool socket path {argv[0]!r} is longer than a Unix socket's "
                 f"107 bytes; pick a shorter one (e.g. under /tmp)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(argv[0]))):
        sys.exit(f"tessera: the directory of warm pool socket {argv[0]!r} does not exist; "
                 f"create it (mode 0700) first")
    missing = {k: v for k, v in envvars.MALLOC_DEFAULTS.items() if k not in os.environ}
    if missing:  # as a launcher's children have them, read at start: start again with them
        os.execve(sys.executable, [sys.executable, "-m", MODULE, *argv],
                  {**os.environ, **missing})
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM))  # ends with what started it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from tessera.launch import forkserver
    forkserver.finish(serve(argv[0]))  # (serve returns only in a job's fork server)


if __name__ == "__main__":
    main(sys.argv[1:])
