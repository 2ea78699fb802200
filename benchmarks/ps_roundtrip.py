"""Push + pull of one flat fp32 vector through Tessera's parameter servers, against
what a user would pick instead, in the same run (DESIGN.md, "Performance principles").

For every case (``elements`` x ``servers``) one worker pushes a gradient for every
partition of the vector and waits for every reply, which carries the partition's
new values (push and pull in one round trip). Systems measured:

* ``tessera``: real :class:`tessera.ps.server.ParameterServer` processes, each on
  its own authenticated ``ServerEndpoint`` (127.0.0.1), SGD lr 0.01 applied by the
  servers, one :class:`tessera.ps.client.PSClient` worker; the shard map comes
  from ``plan_shards`` with 4 MiB partitions, as ``tessera run`` cuts it.
* ``zmq``: raw pyzmq moving the same bytes in the same partitions to the same
  number of server processes: DEALER -> ROUTER echo, ``copy=False`` on both ends,
  no update, no auth. The transport's ceiling.
* ``zmq_sgd``: the ``zmq`` echo, its server also stepping SGD (lr 0.01, one
  ``add_`` into a master per partition, as Tessera's plain SGD does) and answering with the
  master, zero-copy: the least a parameter server over this transport must do. Tessera
  over it is Tessera's own cost; ``zmq`` over it, the update's on this machine (on two
  cores the step's pass over the bytes competes with the transport's copies).
* ``rpc``: a ``torch.distributed.rpc`` parameter server per server process (as in
  PyTorch's parameter-server tutorial): each holds its contiguous shard of the
  vector; the worker ``rpc_async``-calls every server with the gradient of its
  shard, the server applies SGD and returns the new shard. TensorPipe over its TCP
  transport (``_transports=["uv"]``) with its tensors over that connection too
  (``_channels=["basic"]``), as Tessera's bytes go here: its default same-host transport
  (shm) busy-polls about a core in every rpc process even while idle (``sched_yield``: 0.9
  of a core each, measured), so the rpc processes ran beside every other system's turn;
  without them raw pyzmq's echo ran up to 1.7x faster (``--rpc-transport default``
  measures rpc with it). Its default *channel* on one host, cross-memory attach (one copy
  straight out of the other process), is a same-host path like Tessera's shared memory,
  which this benchmark leaves off: that pair is measured in ``shm_roundtrip.py``
  (``--rpc-channels default`` measures it here; until 2026-12-04 it was on here, against
  Tessera over TCP).
* ``tessera_costs``: ``tessera`` with the servers' per-request CPU breakdown on
  (``ServerOptions.cost_breakdown``): the serve thread's CPU by phase (decode, validation,
  dedup, copy, replicate, apply, encode), printed as ``tessera_costs_server_cpu_us_per_msg``.
  Its ~9 reads of the thread's CPU clock a request cost the server time a job's servers do
  not spend (they run without it), so ``tessera``'s figures and ratios are taken with it
  off, as ``server_load.py`` takes its own (until 2026-12-08 they were taken with it on).
* ``tessera_glibc``: ``tessera`` with glibc's own malloc defaults, as before the
  launcher set its variables: a 4 MiB receive buffer freed after a push is unmapped and the
  next one faulted in again, page by page. Every process of this benchmark otherwise runs
  with the environment Tessera's launcher gives a job's processes
  (``tessera.config.env.MALLOC_DEFAULTS``, :func:`_machine.as_launched`), the alternatives'
  processes included. Only with ``--systems`` naming it.
* ``tessera_batched``: ``tessera`` with the worker's pushes of partitions under 256 KiB
  batched per server (``PSClient(batch_bytes=...)``, ``[ps] batch_kib``): one message per
  server and iteration where partitions are small (``--partition-mb``). Only with
  ``--systems`` naming it.
* ``gloo_allreduce``: ``all_reduce`` of the whole vector over Gloo with 2 processes
  (the DDP path; independent of the server count).

Bandwidth is (bytes pushed + bytes pulled) / seconds per iteration, i.e.
``2 * 4 * elements / t`` (for all-reduce: the tensor's bytes in and out of each
rank, the same ``2 * 4 * elements``), in GB/s (1e9 bytes), median over the timed
iterations after warm-up. A round is ``--iters`` iterations, or as many as last
``--min-round-s`` by the system's warm-up (at 1M, 4 iterations take ~15 ms: medians of
12 such moved the 1M ratios 0.5-0.9x between runs of the same code). Each system keeps its processes for all sizes; only one
system is measured at a time; rounds of the systems are interleaved so that a
slow phase of loopback TCP hits all of them alike.

Output: one JSON object per line and case on stdout; progress on stderr.

    .venv/bin/python benchmarks/ps_roundtrip.py            # 1M, 10M, 25M x 1, 2 servers
    .venv/bin/python benchmarks/ps_roundtrip.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import secrets
import signal
import statistics
import sys
import time
import traceback

from tessera.config.env import MALLOC_DEFAULTS

GB = 1e9
#: The environment of tessera_glibc's processes (glibc reads it at start-up): the
#: launcher's malloc variables unset.
GLIBC_ENV = dict.fromkeys(MALLOC_DEFAULTS)
PARTITION_MB = 4.0
#: tessera_batched's PSClient batch_bytes ([ps] batch_kib's default).
BATCH_BYTES = 256 * 1024
#: The systems that run Tessera's servers and client, each in processes of its own.
TESSERA_SYSTEMS = ("tessera", "tessera_costs", "tessera_glibc", "tessera_batched")
#: Raw pyzmq: the echo, and the echo that steps SGD.
ZMQ_SYSTEMS = ("zmq", "zmq_sgd")
LR = 0.01


# ------------------------------------------------------------------ helpers


from _machine import as_launched as _as_launched, cpu_s as _cpu_s, recv as _recv  # noqa: E402
from _machine import busy_s as _busy_s, foreign_cpu_pct as _foreign_cpu_pct  # noqa: E402
from _machine import free_port as _free_port, log as _log, own_s as _own_s  # noqa: E402
from _machine import ready_to_serve as _ready_to_serve, rpc_transports as _rpc_options  # noqa: E402
from _machine import launched_threads as _launched_threads  # noqa: E402
from _machine import profile_dir as _profile_dir  # noqa: E402


def _child_setup(needs_torch: bool) -> None:
    """Every child: one intra-op thread, and exit if the benchmark driver dies."""
    import warnings

    if needs_torch:  # ~1.3 s of CPU: the zmq echo servers do without
        import torch
        torch.set_num_threads(1)
    # rpc.shutdown() warns about its own internal use of a Gloo group.
    warnings.filterwarnings("ignore", message="You are using a Backend")
    from _machine import watch_parent
    watch_parent()


def _child(fn, conn, *args) -> None:
    """Run ``fn``; report an exception to the driver instead of dying silently."""
    try:
        _child_setup(needs_torch=fn is not _zmq_echo)
        fn(conn, *args)
    except BaseException:  # noqa: BLE001 - the driver shows it
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
        raise


def _gbps(elements: int, seconds: float) -> float:
    return 2 * 4 * elements / seconds / GB


def _profile_to(path):
    """A context that profiles the block with cProfile into ``path`` (or does nothing)."""
    import contextlib
    if not path:
        return contextlib.nullcontext()
    import cProfile

    @contextlib.contextmanager
    def run():
        prof = cProfile.Profile()
        prof.enable()
        try:
            yield
        finally:
            prof.disable()
            prof.dump_stats(path)
    return run()


# ------------------------------------------------------------------ Tessera


def _breakdown(options_cls) -> dict:
    """Ask for the per-request CPU breakdown (servers older than it run without)."""
    return {"cost_breakdown": True} if "cost_breakdown" in options_cls.__dataclass_fields__ \
        else {}


def _tessera_server(conn, rank: int, secret: str, stop, profile_dir,
                    breakdown: bool = False) -> None:
    import zmq

    from tessera.config.schema import OptimizerConfig
    from tessera.ps.server import ParameterServer, ServerHooks, ServerOptions
    from tessera.ps.sharding import partition_elems_for
    from tessera.transport.endpoint import ServerEndpoint, close_context

    ctx = zmq.Context()
    max_frame = partition_elems_for(PARTITION_MB) * 4 + (1 << 20)  # as tessera.cluster.role
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        _, partitions, mode, tag = cmd
        endpoint = ServerEndpoint(ctx, "127.0.0.1", secret, max_frame_bytes=max_frame)
        server = ParameterServer(ServerOptions(rank=rank, num_workers=1, mode=mode,
                                               **(_breakdown(ServerOptions) if breakdown
                                                  else {})),
                                 endpoint=endpoint, partitions=partitions,
                                 optimizer=OptimizerConfig(name="sgd", lr=LR),
                                 hooks=ServerHooks(should_stop=stop.is_set))
        _ready_to_serve()
        conn.send(endpoint.address)
        prof = (os.path.join(profile_dir, f"tessera-server{rank}-{tag}.prof")
                if profile_dir else None)
        with _profile_to(prof):
            server.serve()
        endpoint.close()
        conn.send(dict(server.stats))
    close_context(ctx)


def _tessera_worker(conn, secret: str, profile_dir, batch_bytes: int = 0) -> None:
    import torch
    import zmq

    from tessera.ps.client import PSClient
    from tessera.ps.sharding import partition_elems_for, plan_shards
    from tessera.transport.wire import ParamSpec

    ctx = zmq.Context()
    state = {}
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        if cmd[0] == "open":
            _, n, num_servers, addresses, partition_mb = cmd
            shard_map = plan_shards([ParamSpec(name="w", shape=[n], numel=n)], num_servers,
                                    partition_elems_for(partition_mb))
            client = PSClient(ctx=ctx, shard_map=shard_map, server_addresses=addresses,
                              secret=secret, worker=0, timeout_s=60.0, batch_bytes=batch_bytes)
            client.connect()
            _launched_threads("worker")
            gen = torch.Generator().manual_seed(0)
            client.init_params(torch.randn(n, generator=gen))
            grad = torch.randn(n, generator=gen).mul_(1e-3)
            state.update(client=client, grad=grad, parts=shard_map.partitions, clock=0, n=n)
            conn.send("open")
        elif cmd[0] == "run":
            _, iters, tag = cmd
            client, grad, parts = state["client"], state["grad"], state["parts"]
            times = []
            prof = os.path.join(profile_dir, f"tessera-worker-{tag}.prof") if profile_dir else None
            with _profile_to(prof):
                for _ in range(iters):
                    clock = state["clock"]
                    t0 = time.perf_counter()
                    handles = [client.push(p.id, grad[p.start:p.stop], clock) for p in parts]
                    for h in handles:  # each reply consumed as it is taken, as the zmq
                        h.wait()       # worker does (and PSDataParallel, which copies it)
                        h.release()
                    times.append(time.perf_counter() - t0)
                    state["clock"] = clock + 1
            conn.send(times)
        elif cmd[0] == "close":
            state["client"].close()
            state.clear()
            conn.send("closed")
    ctx.destroy(linger=0)


# --------------------------------------------------------------- raw pyzmq


def _zmq_echo(conn, sgd: bool = False) -> None:
    """A ROUTER that sends every message straight back (zero-copy both ways); with
    ``sgd``, it steps SGD on a master per partition and sends the master back instead."""
    import zmq
    events, pollin = int(zmq.EVENTS), int(zmq.POLLIN)  # (ints: the enums cost ~0.6 µs a call)
    if sgd:
        import torch
        torch.set_num_threads(1)  # as every other server here (_child_setup)
    masters = {}  # sgd: partition id (the message's first part) -> its fp32 master

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    conn.send(f"tcp://127.0.0.1:{port}")
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not conn.poll(0):
        if not poller.poll(100):
            continue
        while sock.get(events) & pollin:
            parts = sock.recv_multipart(copy=False)
            if sgd and len(parts) == 3 and len(parts[2]):  # [peer, id, gradient]
                grad = torch.frombuffer(parts[2].buffer, dtype=torch.float32)
                key = parts[1].bytes
                master = masters.get(key)
                if master is None or master.numel() != grad.numel():
                    master = masters[key] = torch.zeros(grad.numel())
                master.add_(grad, alpha=-LR)
                # The master itself: the worker reads it before it pushes again.
                parts = [parts[0], parts[1], memoryview(master.numpy()).cast("B")]
            sock.send_multipart(parts, copy=False)
    sock.close(linger=0)
    ctx.destroy(linger=0)


def _zmq_worker(conn) -> None:
    import torch
    import zmq

    ctx = zmq.Context()
    state = {}
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        if cmd[0] == "open":
            _, n, addresses, parts = cmd  # parts: [(start, stop, server)]
            socks = []
            for addr in addresses:
                s = ctx.socket(zmq.DEALER)
                s.linger = 0
                s.setsockopt(zmq.SNDHWM, 0)
                s.setsockopt(zmq.RCVHWM, 0)
                s.connect(addr)
                socks.append(s)
            grad = torch.randn(n, generator=torch.Generator().manual_seed(0))
            # The bytes of each partition, as Tessera's frames are: views, no copies.
            frames = [(memoryview(grad[a:b].numpy()).cast("B"), srv) for a, b, srv in parts]
            for s in socks:  # connection up before timing
                s.send_multipart([b"hello", b""])
                s.recv_multipart()
            state.update(socks=socks, frames=frames)
            conn.send("open")
        elif cmd[0] == "run":
            _, iters, _tag = cmd
            socks, frames = state["socks"], state["frames"]
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                for i, (frame, srv) in enumerate(frames):
                    socks[srv].send_multipart([i.to_bytes(4, "little"), frame], copy=False)
                for frame, srv in frames:
                    reply = socks[srv].recv_multipart(copy=False)
                    assert len(reply[1]) == len(frame)
                times.append(time.perf_counter() - t0)
            conn.send(times)
        elif cmd[0] == "close":
            for s in state["socks"]:
                s.close(linger=0)
            state.clear()
            conn.send("closed")
    ctx.destroy(linger=0)


# ------------------------------------------------------ torch.distributed.rpc

_RPC_SHARD = {}


def _rpc_set(values) -> int:
    _RPC_SHARD["w"] = values.clone()
    return values.numel()


def _rpc_push_pull(grad):
    """Server side of one step: SGD on the shard, return the new values."""
    w = _RPC_SHARD["w"]
    w.add_(grad, alpha=-LR)
    return w


def _rpc_proc(conn, rank: int, world: int, port: int, transport: str,
              channels: str = "basic") -> None:
    """Rank 0 is the worker (takes commands); ranks 1.. are servers ps0, ps1, ...
    ``transport``: TensorPipe's ("uv", TCP) or "default" (its own choice: shm here);
    ``channels``: how tensors travel ("basic": over the transport; "default": its
    same-host channel on one host, cross-memory attach)."""
    import torch
    import torch.distributed.rpc as rpc

    opts = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{port}", rpc_timeout=120,
        **_rpc_options(transport, channels))
    name = "worker" if rank == 0 else f"ps{rank - 1}"
    rpc.init_rpc(name, rank=rank, world_size=world, rpc_backend_options=opts)
    state = {}
    while rank == 0:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        if cmd[0] == "open":
            _, n, servers = cmd  # the first `servers` of the world's servers take part
            bounds = [(n * s // servers, n * (s + 1) // servers) for s in range(servers)]
            gen = torch.Generator().manual_seed(0)
            init = torch.randn(n, generator=gen)
            grad = torch.randn(n, generator=gen).mul_(1e-3)
            for s, (a, b) in enumerate(bounds):
                rpc.rpc_sync(f"ps{s}", _rpc_set, args=(init[a:b].clone(),))
            state["shards"] = [grad[a:b].clone() for a, b in bounds]
            conn.send("open")
        elif cmd[0] == "run":
            shards = state["shards"]
            servers = len(shards)
            times = []
            for _ in range(cmd[1]):
                t0 = time.perf_counter()
                futs = [rpc.rpc_async(f"ps{s}", _rpc_push_pull, args=(shards[s],))
                        for s in range(servers)]
                for f in futs:
                    f.wait()
                times.append(time.perf_counter() - t0)
            conn.send(times)
        elif cmd[0] == "close":
            state.clear()
            conn.send("closed")
    rpc.shutdown()  # servers wait here until the worker is done


# -------------------------------------------------------------- Gloo all_reduce


def _gloo_proc(conn, rank: int, port: int) -> None:
    """Both ranks take the same commands; rank 0 reports the times."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    state = {}
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        if cmd[0] == "open":
            state["t"] = torch.randn(cmd[1], generator=torch.Generator().manual_seed(rank))
            dist.barrier()
            conn.send("open")
        elif cmd[0] == "run":
            t, times = state["t"], []
            for _ in range(cmd[1]):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(t)
                times.append(time.perf_counter() - t0)
            conn.send(times)
        elif cmd[0] == "close":
            state.clear()
            conn.send("closed")
    dist.destroy_process_group()


# ------------------------------------------------------------------ driver


def _plan(n: int, servers: int, partition_mb: float = PARTITION_MB):
    from tessera.ps.sharding import partition_elems_for, plan_shards
    from tessera.transport.wire import ParamSpec
    return plan_shards([ParamSpec(name="w", shape=[n], numel=n)], servers,
                       partition_elems_for(partition_mb))


class Bench:
    """Owns every child process; measures the systems case by case, round-robin."""

    def __init__(self, args):
        self.a = args
        self.ctx = mp.get_context("spawn")
        self.procs = []
        self.proc_of = {}
        self.deadline = time.monotonic() + args.timeout - 10
        self.secret = secrets.token_hex(16)
        self.stop = self.ctx.Event()  # ends a Tessera server's serve() loop

    # ---------------------------------------------------------- processes

    def spawn(self, name, fn, *args, env=None):
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_child, args=(fn, child, *args), name=name, daemon=True)
        saved = {k: os.environ.get(k) for k in env or {}}
        for k, v in (env or {}).items():  # a spawned child starts with this environment
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        try:
            p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        self.procs.append(p)
        self.proc_of[parent] = p
        return parent

    def ask(self, conn, msg, what):
        conn.send(msg)
        return self.recv(conn, what)

    def recv(self, conn, what):
        return _recv(conn, self.procs, self.deadline, what)

    def retire(self, conns, grace: float = 20.0) -> None:
        """Ask these children to quit and wait for them (killing any that hang)."""
        for c in conns:
            try:
                c.send(("quit",))
            except (BrokenPipeError, OSError):
                pass
        end = time.monotonic() + grace
        for c in conns:
            p = self.proc_of[c]
            p.join(timeout=max(0.1, end - time.monotonic()))
            if p.is_alive():
                _log(f"  {p.name} did not quit within {grace:.0f} s; killing it")
                p.kill()
                p.join(timeout=5)
            self.procs.remove(p)
        if conns:
            _log(f"  stopped {', '.join(self.proc_of[c].name for c in conns)}")

    def cleanup(self) -> None:
        self.stop.set()
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs.clear()

    # -------------------------------------------------------------- cases

    def run(self, systems):
        a = self.a
        max_s = max(a.servers)
        results = {}
        tess = [s for s in TESSERA_SYSTEMS if s in systems]
        t_servers, t_worker = {}, {}
        for s in tess:
            env = GLIBC_ENV if s == "tessera_glibc" else None
            t_servers[s] = [self.spawn(f"{s}-server{r}", _tessera_server, r, self.secret,
                                       self.stop, a.profile, s == "tessera_costs", env=env)
                            for r in range(max_s)]
            t_worker[s] = self.spawn(f"{s}-worker", _tessera_worker, self.secret, a.profile,
                                     BATCH_BYTES if s == "tessera_batched" else 0, env=env)
        z_echo, z_worker, echo_addrs = {}, {}, {}
        for z in ZMQ_SYSTEMS:
            if z in systems:
                z_echo[z] = [self.spawn(f"{z}-echo{r}", _zmq_echo, z == "zmq_sgd")
                             for r in range(max_s)]
                z_worker[z] = self.spawn(f"{z}-worker", _zmq_worker)
                echo_addrs[z] = [self.recv(c, f"{z} echo start") for c in z_echo[z]]
        if "gloo" in systems:
            port = _free_port()
            gloo = [self.spawn(f"gloo{r}", _gloo_proc, r, port) for r in range(2)]
        if "rpc" in systems:  # one world: the worker and max(servers) servers
            port = _free_port()
            rpc_procs = [self.spawn(f"rpc{r}", _rpc_proc, r, max_s + 1, port, a.rpc_transport,
                                    a.rpc_channels)
                         for r in range(max_s + 1)]
            rpc_worker = rpc_procs[0]
        longest = 0.0
        for servers in a.servers:
            for n in a.sizes:
                # Leave time to stop everything (~15 s) rather than overrun --timeout.
                if longest and time.monotonic() + 1.5 * longest + 15 > self.deadline:
                    _log(f"  skipping {n:,d} elements, {servers} server(s): it would overrun "
                         f"--timeout")
                    continue
                case_start = time.monotonic()
                busy0, own0 = _busy_s(), _tree_cpu_s([p.pid for p in self.procs])
                tag = f"{n}-{servers}"
                shard_map = _plan(n, servers, a.partition_mb)
                runners = {}  # system -> function(iters, tag) -> times
                pids = {}  # system -> the processes that do its work in this case
                for s in tess:
                    addrs = [self.ask(t_servers[s][r], ("serve", list(shard_map.on_server(r)),
                                                        a.mode, tag), f"{s} server {r} start")
                             for r in range(servers)]
                    self.ask(t_worker[s], ("open", n, servers, addrs, a.partition_mb),
                             f"{s} worker connect")
                    runners[s] = lambda k, t, s=s: self.ask(t_worker[s], ("run", k, t), s)
                    pids[s] = [self.proc_of[c].pid
                               for c in [t_worker[s]] + t_servers[s][:servers]]
                for z in z_worker:
                    parts = [(p.start, p.stop, p.server) for p in shard_map.partitions]
                    self.ask(z_worker[z], ("open", n, echo_addrs[z][:servers], parts),
                             f"{z} worker connect")
                    runners[z] = lambda k, t, z=z: self.ask(z_worker[z], ("run", k, t), z)
                    pids[z] = [self.proc_of[c].pid for c in [z_worker[z]] + z_echo[z][:servers]]
                if "rpc" in systems:
                    self.ask(rpc_worker, ("open", n, servers), "rpc open")
                    runners["rpc"] = lambda k, t: self.ask(rpc_worker, ("run", k, t), "rpc")
                    pids["rpc"] = [self.proc_of[c].pid for c in rpc_procs[:servers + 1]]
                if "gloo" in systems:
                    for c in gloo:
                        c.send(("open", n))
                    for c in gloo:
                        self.recv(c, "gloo open")

                    def gloo_run(k, t):
                        for c in gloo:
                            c.send(("run", k, t))
                        out = [self.recv(c, "gloo all_reduce") for c in gloo]
                        return out[0]
                    runners["gloo"] = gloo_run
                    pids["gloo"] = [self.proc_of[c].pid for c in gloo]
                # Warm-up, then rounds that alternate the systems, so that whatever
                # else the machine does (or loopback TCP's moods) hits all of them.
                # CPU time of each system's processes is summed over the timed rounds:
                # unlike wall time, it does not depend on what else the machine runs.
                times = {k: [] for k in runners}
                cpu = {k: 0.0 for k in runners}
                cpu_worker = {k: 0.0 for k in runners}  # the first pid is the worker's
                # Each system's rounds last at least --min-round-s, measured on its
                # warm-up: at 1M a round of 4 iterations is 15 ms, and a median over 12
                # such iterations moved 0.5-0.9x between runs of the same code.
                iters = {}
                for name, fn in runners.items():
                    warm = fn(a.warmup, f"{tag}-warmup")
                    iters[name] = _iters_for(a, warm)
                for rnd in range(a.rounds):
                    for name, fn in runners.items():
                        c0, w0 = _cpu_s(pids[name]), _cpu_s(pids[name][:1])
                        times[name].extend(fn(iters[name], f"{tag}-r{rnd}"))
                        cpu[name] += _cpu_s(pids[name]) - c0
                        cpu_worker[name] += _cpu_s(pids[name][:1]) - w0
                # Close the case.
                row = results[(n, servers)] = {k: statistics.median(v) for k, v in times.items()}
                row["timed_iters"] = {k: len(v) for k, v in times.items()}
                row["cpu_ms_per_iter"] = {k: 1e3 * v / len(times[k]) for k, v in cpu.items()}
                row["worker_cpu_ms_per_iter"] = {k: 1e3 * v / len(times[k])
                                                 for k, v in cpu_worker.items()}
                for s in tess:
                    self.ask(t_worker[s], ("close",), f"{s} close")
                if tess:
                    self.stop.set()
                    for s in tess:
                        stats = [self.recv(t_servers[s][r], f"{s} server {r} stop")
                                 for r in range(servers)]
                        served = sum(st["updates"] for st in stats) / len(shard_map.partitions)
                        row[f"{s}_server_apply_ms_per_iter"] = (
                            1e3 * sum(st["apply_s"] for st in stats) / max(1.0, served))
                        row[f"{s}_server_cpu_us_per_msg"] = _merge_costs(stats)
                    self.stop.clear()
                for z in z_worker:
                    self.ask(z_worker[z], ("close",), f"{z} close")
                if "rpc" in systems:
                    self.ask(rpc_worker, ("close",), "rpc close")
                if "gloo" in systems:
                    for c in gloo:
                        c.send(("close",))
                    for c in gloo:
                        self.recv(c, "gloo close")
                wall = time.monotonic() - case_start
                foreign = (_busy_s() - busy0) - (_tree_cpu_s([p.pid for p in self.procs]) - own0)
                row["foreign_cpu_pct"] = max(0.0, 100 * foreign / (wall * (os.cpu_count() or 1)))
                print(json.dumps(_row(a, n, servers, row)), flush=True)
                _log(f"  {n:>11,d} elements, {servers} server(s): " + ", ".join(
                    f"{k} {_gbps(n, row[k]):.2f} GB/s" for k in runners)
                    + f" (other processes: {row['foreign_cpu_pct']:.0f}% CPU)")
                longest = max(longest, time.monotonic() - case_start)
        # Everyone quits at once (each exit costs a second or two of CPU).
        self.retire([c for c in self.proc_of if self.proc_of[c] in self.procs])
        return results


def _iters_for(a, warmup_times: list) -> int:
    """Timed iterations per round for a system whose warm-up took ``warmup_times``:
    ``--iters``, or more where that many would last under ``--min-round-s``."""
    if not warmup_times or a.min_round_s <= 0:
        return a.iters
    per_iter = max(1e-6, statistics.median(warmup_times))
    return max(a.iters, min(1000, math.ceil(a.min_round_s / per_iter)))


def _merge_costs(stats: list[dict]) -> dict:
    """The servers' per-request CPU by phase (ServerOptions.cost_breakdown), weighted by
    the requests each served; {} from a server without it."""
    have = [st for st in stats if "cpu_us_per_msg" in st]
    total = sum(st["cpu_messages"] for st in have)
    if not total:
        return {}
    phases = have[0]["cpu_us_per_msg"]
    return {k: round(sum(st["cpu_us_per_msg"][k] * st["cpu_messages"] for st in have) / total, 1)
            for k in phases}


def _row(a, n: int, servers: int, r: dict) -> dict:
    """The JSON line of one case (DESIGN.md: ``bench``, parameters, ``<system>_<unit>``)."""
    import torch
    row = {"bench": "ps_roundtrip", "elements": n, "servers": servers, "workers": 1,
           "mode": a.mode, "partition_mb": a.partition_mb, "rpc_transport": a.rpc_transport,
           "rpc_channels": a.rpc_channels,
           "partitions": len(_plan(n, servers, a.partition_mb).partitions)}
    for key in (*TESSERA_SYSTEMS, *ZMQ_SYSTEMS, "rpc", "gloo"):
        if key in r:
            field = "gloo_allreduce_gbps" if key == "gloo" else f"{key}_gbps"
            row[field] = round(_gbps(n, r[key]), 3)
    for other in (*ZMQ_SYSTEMS, "rpc"):
        for t in TESSERA_SYSTEMS:
            if t != "tessera_costs" and f"{t}_gbps" in row and f"{other}_gbps" in row:
                row[f"{t}_vs_{other}"] = round(row[f"{t}_gbps"] / row[f"{other}_gbps"], 3)
    # Diagnostics: CPU time of each system's processes per iteration (all threads, user +
    # system), the worker's share of it, and the servers' time in the optimizer step.
    for key, ms in r["cpu_ms_per_iter"].items():
        row[f"{key}_cpu_ms_per_iter"] = round(ms, 1)
        if key in (*TESSERA_SYSTEMS, *ZMQ_SYSTEMS):
            row[f"{key}_worker_cpu_ms_per_iter"] = round(r["worker_cpu_ms_per_iter"][key], 1)
    for t in TESSERA_SYSTEMS:
        if f"{t}_server_apply_ms_per_iter" in r:
            row[f"{t}_server_apply_ms_per_iter"] = round(r[f"{t}_server_apply_ms_per_iter"], 2)
        if r.get(f"{t}_server_cpu_us_per_msg"):
            row[f"{t}_server_cpu_us_per_msg"] = r[f"{t}_server_cpu_us_per_msg"]
    if "tessera_glibc_cpu_ms_per_iter" in row and "tessera_cpu_ms_per_iter" in row:
        row["glibc_cpu_vs_tessera"] = round(row["tessera_glibc_cpu_ms_per_iter"]
                                            / max(0.1, row["tessera_cpu_ms_per_iter"]), 3)
    if "tessera_costs_gbps" in row and "tessera_gbps" in row:  # what the breakdown costs
        row["costs_vs_tessera"] = round(row["tessera_costs_gbps"] / row["tessera_gbps"], 3)
    if "tessera_batched_gbps" in row and "tessera_gbps" in row:
        row["batched_vs_tessera"] = round(row["tessera_batched_gbps"] / row["tessera_gbps"], 3)
    row.update(timed_iters=r["timed_iters"], foreign_cpu_pct=round(r["foreign_cpu_pct"], 1),
               torch=torch.__version__)
    return row


def _tree_cpu_s(pids) -> float:
    """CPU seconds of this process, its reaped children and the live ones in ``pids``."""
    # A process that exited meanwhile counts once reaped (in own_s), not here.
    return _own_s() + _cpu_s(pids, missing_ok=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")],
                    default=[1_000_000, 10_000_000, 25_000_000],
                    help="comma-separated element counts (default 1e6,1e7,2.5e7)")
    ap.add_argument("--servers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                    help="comma-separated server counts (default 1,2)")
    ap.add_argument("--mode", choices=["sync", "async"], default="sync",
                    help="Tessera consistency mode (sync with 1 worker, or async)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations per case")
    ap.add_argument("--iters", type=int, default=4, help="timed iterations per round")
    ap.add_argument("--min-round-s", type=float, default=0.3,
                    help="more timed iterations per round where --iters would last less "
                         "(from the warm-up's median; 0: exactly --iters)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds per case; Tessera and zmq alternate round by round")
    ap.add_argument("--systems", default="tessera,tessera_costs,zmq,zmq_sgd,rpc,gloo",
                    help="comma-separated subset of tessera,tessera_costs,tessera_glibc,"
                         "tessera_batched,zmq,zmq_sgd,rpc,gloo")
    ap.add_argument("--rpc-transport", choices=("uv", "default"), default="uv",
                    help="TensorPipe's transport for rpc: TCP (uv), or its defaults (shm on "
                         "one host, which busy-polls a core per process between its turns)")
    ap.add_argument("--rpc-channels", choices=("basic", "default"), default="basic",
                    help="how rpc's tensors travel: over its transport's connection (basic, "
                         "as Tessera's bytes do here), or TensorPipe's defaults (on one host "
                         "cross-memory attach, a same-host path: compare it with Tessera's, "
                         "shm_roundtrip.py)")
    ap.add_argument("--partition-mb", type=float, default=PARTITION_MB,
                    help=f"partition size in MiB (default {PARTITION_MB}, as tessera run)")
    ap.add_argument("--timeout", type=float, default=230.0, help="hard limit for the whole run, s")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="cProfile Tessera's server and worker processes into DIR/*.prof")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1M and 4M elements, fewer iterations")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.warmup, a.iters, a.rounds = [1_000_000, 4_000_000], 1, 2, 2
        a.min_round_s = 0.0
    if a.profile:
        a.profile = _profile_dir(ap, a.profile)
    systems = set(a.systems.split(","))

    # Loopback only, for every library (Gloo and TensorPipe pick an interface otherwise).
    os.environ.update(GLOO_SOCKET_IFNAME="lo", TP_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
                      OMP_NUM_THREADS="1")

    def on_alarm(signum, frame):
        raise TimeoutError(f"ps_roundtrip: hard timeout of {a.timeout:.0f} s reached")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(a.timeout))
    bench = Bench(a)
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    busy0, own0 = _busy_s(), _own_s()
    try:
        results = bench.run(systems)
    except TimeoutError as exc:  # the cases measured so far were printed already
        _log(str(exc))
        return 2
    finally:
        signal.alarm(0)
        bench.cleanup()
    foreign = _foreign_cpu_pct(busy0, own0, time.monotonic() - t0)
    if not results:
        return 1
    _log(f"done in {time.monotonic() - t0:.0f} s; other processes used {foreign:.0f}% of the "
         f"machine's CPU meanwhile (load average before: {load_before:.2f})")
    return 0


if __name__ == "__main__":
    _as_launched()
    sys.exit(main())
