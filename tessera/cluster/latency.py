"""Short scheduler slices for the threads that carry a worker's pushes and replies.

On a host where workers' forward and backward fill every core (``tessera run``'s local
cluster, or any node that runs servers beside workers), every thread a push wakes on its
way must first get a CPU. Linux (6.6 and later) schedules ordinary threads by EEVDF, and
a thread that wakes waits until the running one has had its slice, 1.4-3 ms by default
("run to parity"). With ``sched_setattr``'s ``sched_runtime`` (Linux 6.12+) a thread
asks for a shorter slice, and a waking thread whose slice is shorter than the running
one's takes the CPU at once. It gets no larger share of the CPU: its fair share, in
shorter turns. No privilege is needed, and threads a thread starts inherit its slice.

Who gets it (:func:`apply_for_role`): a worker's ZeroMQ threads, which move its pushes
and replies (its compute thread keeps the default, long turns). On examples/mnist.toml
(2 workers, 2 servers, 2 cores) a push waited 1.2-1.3 ms for server 0 to take it,
0.72-0.80 ms with these slices. Servers keep the kernel's slices: a server that is
itself the bottleneck (64 clients' pushes, benchmarks/server_load.py) served 12-19%
fewer pushes a second in 100 µs turns, and gave the mnist job no measurable gain
(docs/architecture.md, "Scheduler slices"). Elsewhere (an older kernel, another OS, a
seccomp filter) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

#: sched_setattr's system call number where Tessera runs (no libc wrapper exists).
_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}
#: The names of ZeroMQ's background threads (libzmq names them ZMQbg/IO/n, ZMQbg/Reaper).
ZMQ_THREADS = "ZMQbg"


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr`` as of its first version (48 bytes)."""

    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
                ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
                ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64)]


def _setattr_call() -> int | None:
    """sched_setattr's system call number here; None where there is none (not Linux,
    or an architecture not in :data:`_SYS_SCHED_SETATTR`)."""
    if not sys.platform.startswith("linux"):
        return None
    return _SYS_SCHED_SETATTR.get(os.uname().machine)


def _threads(prefix: str) -> list[int]:
    """This process's thread ids whose name starts with ``prefix`` (every one for "")."""
    tids = []
    for name in os.listdir("/proc/self/task"):
        if prefix:
            try:
                with open(f"/proc/self/task/{name}/comm") as f:
                    if not f.read().startswith(prefix):
                        continue
            except OSError:  # the thread ended meanwhile
                continue
        tids.append(int(name))
    return tids


def short_slices(slice_us: int, prefix: str = "") -> int:
    """Give this process's ordinary (``SCHED_OTHER``) threads whose name starts with
    ``prefix`` a ``slice_us`` scheduler slice, keeping each one's nice value. Returns
    how many took it: 0 where the platform has no such call (the kernel may also accept
    the call and, before 6.12, ignore the slice)."""
    nr = _setattr_call()
    if nr is None or slice_us <= 0:
        return 0
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    done = 0
    for tid in _threads(prefix):
        try:
            if os.sched_getscheduler(tid) != os.SCHED_OTHER:
                continue  # (SCHED_BATCH, SCHED_IDLE: asked for by someone else)
            attr = _SchedAttr(size=ctypes.sizeof(_SchedAttr), sched_policy=os.SCHED_OTHER,
                              sched_nice=os.getpriority(os.PRIO_PROCESS, tid),
                              sched_runtime=slice_us * 1000)
        except OSError:  # the thread ended meanwhile
            continue
        if syscall(nr, tid, ctypes.byref(attr), 0) == 0:
            done += 1
    return done


#: A context with a socket runs at least these ZeroMQ threads: its I/O thread and its reaper.
_ZMQ_THREADS_AT_LEAST = 2
#: How long :func:`apply_for_role` waits for them to be named.
_NAMED_WITHIN_S = 1.0


def apply_for_role(role: str, slice_us: int) -> int:
    """:func:`short_slices` for a launched process of ``role`` (``[cluster] slice_us``):
    a worker's ZeroMQ threads (its context has a socket by then); nothing for the other
    roles. libzmq names each of its threads from inside it, once the thread first runs:
    on a busy host a thread just started may not be named yet and would keep the
    kernel's slice, so this waits (at most :data:`_NAMED_WITHIN_S`) until the I/O thread
    and the reaper both are."""
    if role != "worker" or slice_us <= 0 or _setattr_call() is None:
        return 0
    deadline = time.monotonic() + _NAMED_WITHIN_S
    while len(_threads(ZMQ_THREADS)) < _ZMQ_THREADS_AT_LEAST and time.monotonic() < deadline:
        time.sleep(0.002)
    return short_slices(slice_us, ZMQ_THREADS)
