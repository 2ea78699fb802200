"""What every benchmark here needs from the machine: a timestamped log, a free
loopback port, a child's answer that never hangs, and CPU accounting to say how much of the machine *other*
processes used during a run (this machine is often shared, and wall-clock rates
swing with that load, so every line reports it)."""

from __future__ import annotations

import os
import socket
import sys
import time

#: When the benchmark started (its first import of this module).
T0 = time.monotonic()


def as_launched() -> None:
    """Run this benchmark, and every process it starts, with the environment Tessera's
    launcher gives the processes of a job (``tessera.config.env.MALLOC_DEFAULTS``: glibc
    keeps freed receive buffers instead of unmapping them) where this one lacks it: the
    benchmark execs itself once more with those variables. glibc reads them when a process
    starts, so they cannot be set later. The processes of the alternatives in the same run
    (raw pyzmq, ``torch.distributed.rpc``, Gloo) inherit the same environment, so
    both sides of each ratio run with the same allocator settings; a value the user set
    is kept, as the launcher keeps it."""
    from tessera.config.env import MALLOC_DEFAULTS
    missing = {k: v for k, v in MALLOC_DEFAULTS.items() if k not in os.environ}
    if missing:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})


def ready_to_serve(tables=()) -> None:
    """What a job's server process does before it serves
    (``tessera.cluster.role.ready_to_serve``: its tables' row kernels compiled, its
    start-up objects frozen out of the garbage collector), for a benchmark's server
    built by hand; nothing with a Tessera that has no such step (an older commit run
    for comparison)."""
    try:
        from tessera.cluster.role import ready_to_serve as ready
    except ImportError:
        return
    ready(list(tables), own_process=True)


def launched_threads(role: str) -> None:
    """The scheduler slices a launched job's process of ``role`` gives its threads
    (``[cluster] slice_us``, tessera.cluster.latency: a worker's ZeroMQ threads, so call
    it once the process's context has a socket; servers take none), for a benchmark's
    worker built by hand; nothing with a Tessera without them."""
    try:
        from tessera.cluster.latency import apply_for_role
        from tessera.config.schema import ClusterConfig
    except ImportError:
        return
    apply_for_role(role, getattr(ClusterConfig(), "slice_us", 0))


def log(*args) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s]", *args, file=sys.stderr, flush=True)


def rpc_transports(transport: str, channels: str = "default") -> dict:
    """``TensorPipeRpcBackendOptions`` keywords for ``--rpc-transport``: "uv" (TCP), or
    "default" (TensorPipe's own choice, shm on one host, whose reactor busy-polls about a
    core in every rpc process even while idle: benchmarks/HISTORY.md); and for
    ``--rpc-channels``, how tensors travel: "basic" (through the transport's connection,
    as they would between hosts), or "default" (TensorPipe's choice: on one host its
    same-host channel, cross-memory attach, which copies straight from the other
    process's memory)."""
    opts = {} if transport == "default" else {"_transports": [transport]}
    if channels != "default":
        opts["_channels"] = [channels]
    return opts


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_s() -> float:
    """CPU seconds of this process and of every child it has waited for."""
    import resource
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def profile_dir(ap, path: str) -> str:
    """``--profile DIR``: the directory, made if it is missing, as an absolute path; a path
    that names something else is the argument parser's one-line error."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        ap.error(f"--profile {path}: cannot hold the profiles ({exc.strerror}); "
                 f"give a directory")
    return os.path.abspath(path)


def rotated(items, by: int):
    """``items`` (a tuple) rotated left by ``by``: round r of an alternating benchmark runs
    its systems in ``rotated(systems, r)`` order, so each takes each place equally often."""
    k = by % len(items)
    return items[k:] + items[:k]


def alternate(systems: tuple, rounds: int, measure, describe) -> dict:
    """``{system: [measure(system) of each round]}``: ``rounds`` rounds, the systems of
    round r in ``rotated(systems, r)`` order; each result logged as ``round R: SYSTEM``
    followed by ``describe(result)``."""
    runs: dict = {s: [] for s in systems}
    for r in range(rounds):
        for system in rotated(systems, r):
            runs[system].append(measure(system))
            log(f"round {r + 1}: {system}{describe(runs[system][-1])}")
    return runs


def foreign_cpu_pct(busy0: float, own0: float, wall: float) -> float:
    """Share of the machine's CPU that processes other than this benchmark used."""
    foreign = (busy_s() - busy0) - (own_s() - own0)
    return max(0.0, 100.0 * foreign / (wall * (os.cpu_count() or 1)))


def watch_parent() -> None:
    """Exit (code 3) if the benchmark driver dies, so no child is left behind."""
    import threading
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def cpu_s(pids, missing_ok: bool = False) -> float:
    """CPU seconds (user + system, all threads) the processes ``pids`` have used so far;
    with ``missing_ok``, processes that are gone count 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            if missing_ok:
                continue
            raise
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def recv(conn, procs, deadline: float, what: str):
    """The next message from a child over ``conn``, failing (not hanging) if one of
    ``procs`` died or the deadline passed; a child's ("error", traceback) is raised."""
    while not conn.poll(0.2):
        dead = [p for p in procs if not p.is_alive()]
        if dead and not conn.poll(0):
            raise RuntimeError(f"{what}: process {dead[0].name} exited with code "
                               f"{dead[0].exitcode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: no answer before the benchmark's deadline")
    msg = conn.recv()
    if isinstance(msg, tuple) and msg and msg[0] == "error":
        raise RuntimeError(f"{what}: child failed:\n{msg[1]}")
    return msg
