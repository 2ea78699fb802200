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
* ``rpc``: a ``torch.distributed.rpc`` parameter server per server process (as in
  PyTorch's parameter-server tutorial): each holds its contiguous shard of the
  vector; the worker ``rpc_async``-calls every server with the gradient of its
  shard, the server applies SGD and returns the new shard.
* ``gloo_allreduce``: ``all_reduce`` of the whole vector over Gloo with 2 processes
  (the DDP path; independent of the server count).

Bandwidth is (bytes pushed + bytes pulled) / seconds per iteration, i.e.
``2 * 4 * elements / t`` (for all-reduce: the tensor's bytes in and out of each
rank, the same ``2 * 4 * elements``), in GB/s (1e9 bytes), median over the timed
iterations after warm-up. Each system keeps its processes for all sizes; only one
system is measured at a time; rounds of the systems are interleaved so that a
slow phase of loopback TCP hits all of them alike.

Output: one JSON object per line and case on stdout; progress on stderr.

    .venv/bin/python benchmarks/ps_roundtrip.py            # 1M, 10M, 25M x 1, 2 servers
    .venv/bin/python benchmarks/ps_roundtrip.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import signal
import socket
import statistics
import sys
import threading
import time
import traceback

GB = 1e9
PARTITION_MB = 4.0
LR = 0.01


# ------------------------------------------------------------------ helpers


_T0 = time.monotonic()


def _log(*args) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s]", *args, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_setup() -> None:
    """Every child: one intra-op thread, and exit if the benchmark driver dies."""
    import warnings

    import torch
    torch.set_num_threads(1)
    # rpc.shutdown() warns about its own internal use of a Gloo group.
    warnings.filterwarnings("ignore", message="You are using a Backend")
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _child(fn, conn, *args) -> None:
    """Run ``fn``; report an exception to the driver instead of dying silently."""
    try:
        _child_setup()
        fn(conn, *args)
    except BaseException:  # noqa: BLE001 - the driver shows it
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
        raise


def _recv(conn, procs, deadline: float, what: str):
    """The next message from a child, failing (not hanging) if it died or took too long."""
    while not conn.poll(0.2):
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            if conn.poll(0):
                break
            raise RuntimeError(f"{what}: process {dead[0].name} exited with code "
                               f"{dead[0].exitcode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: no answer before the benchmark's deadline")
    msg = conn.recv()
    if isinstance(msg, tuple) and msg and msg[0] == "error":
        raise RuntimeError(f"{what}: child failed:\n{msg[1]}")
    return msg


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


def _tessera_server(conn, rank: int, secret: str, stop, profile_dir) -> None:
    import zmq

    from tessera.config.schema import OptimizerConfig
    from tessera.ps.server import ParameterServer
    from tessera.ps.sharding import partition_elems_for
    from tessera.transport.endpoint import ServerEndpoint

    ctx = zmq.Context()
    max_frame = partition_elems_for(PARTITION_MB) * 4 + (1 << 20)  # as tessera.cluster.role
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        _, partitions, mode, tag = cmd
        endpoint = ServerEndpoint(ctx, "127.0.0.1", secret, max_frame_bytes=max_frame)
        server = ParameterServer(rank=rank, endpoint=endpoint, partitions=partitions,
                                 optimizer=OptimizerConfig(name="sgd", lr=LR), num_workers=1,
                                 mode=mode, check=lambda: None, should_stop=stop.is_set)
        conn.send(endpoint.address)
        prof = os.path.join(profile_dir, f"tessera-server{rank}-{tag}.prof") if profile_dir else None
        with _profile_to(prof):
            server.serve()
        endpoint.close()
        conn.send(dict(server.stats))
    ctx.destroy(linger=0)


def _tessera_worker(conn, secret: str, profile_dir) -> None:
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
            _, n, num_servers, addresses = cmd
            shard_map = plan_shards([ParamSpec(name="w", shape=[n], numel=n)], num_servers,
                                    partition_elems_for(PARTITION_MB))
            client = PSClient(ctx=ctx, shard_map=shard_map, server_addresses=addresses,
                              secret=secret, worker=0, timeout_s=60.0)
            client.connect()
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
                    for h in handles:
                        h.wait()
                    times.append(time.perf_counter() - t0)
                    state["clock"] = clock + 1
            conn.send(times)
        elif cmd[0] == "close":
            state["client"].close()
            state.clear()
            conn.send("closed")
    ctx.destroy(linger=0)


# --------------------------------------------------------------- raw pyzmq


def _zmq_echo(conn) -> None:
    """A ROUTER that sends every message straight back (zero-copy both ways)."""
    import zmq

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
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            parts = sock.recv_multipart(copy=False)
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


def _rpc_proc(conn, rank: int, world: int, port: int, sizes, warmup: int, iters: int,
              rounds: int) -> None:
    import torch
    import torch.distributed.rpc as rpc

    opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}",
                                           rpc_timeout=120)
    name = "worker" if rank == 0 else f"ps{rank - 1}"
    rpc.init_rpc(name, rank=rank, world_size=world, rpc_backend_options=opts)
    if rank == 0:
        servers = world - 1
        out = {}
        for n in sizes:
            bounds = [(n * s // servers, n * (s + 1) // servers) for s in range(servers)]
            gen = torch.Generator().manual_seed(0)
            init = torch.randn(n, generator=gen)
            grad = torch.randn(n, generator=gen).mul_(1e-3)
            for s, (a, b) in enumerate(bounds):
                rpc.rpc_sync(f"ps{s}", _rpc_set, args=(init[a:b].clone(),))
            shards = [grad[a:b].clone() for a, b in bounds]

            def step():
                futs = [rpc.rpc_async(f"ps{s}", _rpc_push_pull, args=(shards[s],))
                        for s in range(servers)]
                for f in futs:
                    f.wait()

            times = []
            for _ in range(warmup):
                step()
            for _ in range(rounds * iters):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            out[n] = times
        conn.send(out)
    rpc.shutdown()


# -------------------------------------------------------------- Gloo all_reduce


def _gloo_proc(conn, rank: int, port: int, sizes, warmup: int, iters: int, rounds: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    out = {}
    for n in sizes:
        t = torch.randn(n, generator=torch.Generator().manual_seed(rank))
        for _ in range(warmup):
            dist.all_reduce(t)
        times = []
        for _ in range(rounds * iters):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        out[n] = times
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        conn.send(out)


# ------------------------------------------------------------------ driver


class Driver:
    def __init__(self, args):
        self.args = args
        self.ctx = mp.get_context("spawn")
        self.procs = []
        self.deadline = time.monotonic() + args.timeout - 5
        self.secret = secrets.token_hex(16)

    def spawn(self, name, fn, *args):
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_child, args=(fn, child, *args), name=name, daemon=True)
        p.start()
        child.close()
        self.procs.append(p)
        return p, parent

    def recv(self, conn, procs, what):
        return _recv(conn, procs, self.deadline, what)

    def cleanup(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs.clear()

    def reap(self, procs, grace: float = 30.0) -> None:
        for p in procs:
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
            if p in self.procs:
                self.procs.remove(p)


def _plan(n: int, servers: int):
    from tessera.ps.sharding import partition_elems_for, plan_shards
    from tessera.transport.wire import ParamSpec
    return plan_shards([ParamSpec(name="w", shape=[n], numel=n)], servers,
                       partition_elems_for(PARTITION_MB))


def run_ps_systems(d: Driver, sizes, server_counts, results) -> None:
    """Tessera and raw zmq, interleaved round by round on the same cases."""
    a = d.args
    max_s = max(server_counts)
    stop = d.ctx.Event()
    t_servers = [d.spawn(f"tessera-server{r}", _tessera_server, r, d.secret, stop, a.profile)
                 for r in range(max_s)]
    t_worker = d.spawn("tessera-worker", _tessera_worker, d.secret, a.profile)
    z_echo = [d.spawn(f"zmq-echo{r}", _zmq_echo) for r in range(max_s)]
    z_worker = d.spawn("zmq-worker", _zmq_worker)
    all_procs = [p for p, _ in t_servers + [t_worker] + z_echo + [z_worker]]
    echo_addrs = [d.recv(c, all_procs, "zmq echo start") for _, c in z_echo]
    try:
        for n in sizes:
            for servers in server_counts:
                case = (n, servers)
                tag = f"{n}-{servers}"
                shard_map = _plan(n, servers)
                # Tessera: servers with their partitions, worker seeds the values.
                addrs = []
                for r in range(servers):
                    _, c = t_servers[r]
                    c.send(("serve", list(shard_map.on_server(r)), a.mode, tag))
                    addrs.append(d.recv(c, all_procs, f"tessera server {r} start"))
                wc = t_worker[1]
                wc.send(("open", n, servers, addrs))
                d.recv(wc, all_procs, "tessera worker connect")
                zc = z_worker[1]
                zc.send(("open", n, echo_addrs[:servers],
                         [(p.start, p.stop, p.server) for p in shard_map.partitions]))
                d.recv(zc, all_procs, "zmq worker connect")
                t_times, z_times = [], []
                # Warm-up, then rounds alternating the two systems.
                for conn, sink in ((wc, None), (zc, None)):
                    conn.send(("run", a.warmup, f"{tag}-warmup"))
                    d.recv(conn, all_procs, f"{tag} warm-up")
                for rnd in range(a.rounds):
                    for conn, sink, name in ((wc, t_times, "tessera"), (zc, z_times, "zmq")):
                        conn.send(("run", a.iters, f"{tag}-r{rnd}"))
                        sink.extend(d.recv(conn, all_procs, f"{name} {tag}"))
                for conn in (wc, zc):
                    conn.send(("close",))
                    d.recv(conn, all_procs, "close")
                stop.set()
                stats = [d.recv(t_servers[r][1], all_procs, f"tessera server {r} stop")
                         for r in range(servers)]
                stop.clear()
                results[case]["tessera"] = t_times
                results[case]["zmq"] = z_times
                results[case]["tessera_server_apply_s"] = sum(s["apply_s"] for s in stats)
                results[case]["tessera_server_updates"] = sum(s["updates"] for s in stats)
                _log(f"  tessera/zmq {n:>9,d} elems, {servers} server(s): tessera "
                     f"{_gbps(n, statistics.median(t_times)):.2f} GB/s, zmq "
                     f"{_gbps(n, statistics.median(z_times)):.2f} GB/s")
        for _, c in t_servers + [t_worker, z_worker]:
            c.send(("quit",))
        for _, c in z_echo:
            c.send("quit")
        d.reap(all_procs, grace=10)
    finally:
        stop.set()


def run_rpc(d: Driver, sizes, server_counts, results) -> None:
    a = d.args
    for servers in server_counts:
        port = _free_port()
        world = servers + 1
        procs = [d.spawn(f"rpc{r}", _rpc_proc, r, world, port, sizes, a.warmup, a.iters, a.rounds)
                 for r in range(world)]
        out = d.recv(procs[0][1], [p for p, _ in procs], f"rpc with {servers} server(s)")
        for n in sizes:
            results[(n, servers)]["rpc"] = out[n]
            _log(f"  rpc         {n:>9,d} elems, {servers} server(s): "
                 f"{_gbps(n, statistics.median(out[n])):.2f} GB/s")
        d.reap([p for p, _ in procs])


def run_gloo(d: Driver, sizes, server_counts, results) -> None:
    a = d.args
    port = _free_port()
    procs = [d.spawn(f"gloo{r}", _gloo_proc, r, port, sizes, a.warmup, a.iters, a.rounds)
             for r in range(2)]
    out = d.recv(procs[0][1], [p for p, _ in procs], "gloo all_reduce")
    for n in sizes:
        for servers in server_counts:
            results[(n, servers)]["gloo"] = out[n]
        _log(f"  gloo        {n:>9,d} elems, 2 ranks: {_gbps(n, statistics.median(out[n])):.2f} GB/s")
    d.reap([p for p, _ in procs])


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
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds per case; Tessera and zmq alternate round by round")
    ap.add_argument("--systems", default="tessera,rpc,gloo",
                    help="which to run: tessera (runs zmq alongside), rpc, gloo")
    ap.add_argument("--timeout", type=float, default=230.0, help="hard limit for the whole run, s")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="cProfile Tessera's server and worker processes into DIR/*.prof")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1M and 4M elements, fewer iterations")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.warmup, a.iters, a.rounds = [1_000_000, 4_000_000], 1, 2, 2
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
        a.profile = os.path.abspath(a.profile)
    systems = set(a.systems.split(","))

    # Loopback only, for every library (Gloo and TensorPipe pick an interface otherwise).
    os.environ.update(GLOO_SOCKET_IFNAME="lo", TP_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
                      OMP_NUM_THREADS="1")

    def on_alarm(signum, frame):
        raise TimeoutError(f"ps_roundtrip: hard timeout of {a.timeout:.0f} s reached")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(a.timeout))
    d = Driver(a)
    results = {(n, s): {} for n in a.sizes for s in a.servers}
    t0 = time.monotonic()
    try:
        if "tessera" in systems:
            _log("tessera + raw zmq ...")
            run_ps_systems(d, a.sizes, a.servers, results)
        if "rpc" in systems:
            _log("torch.distributed.rpc ...")
            run_rpc(d, a.sizes, a.servers, results)
        if "gloo" in systems:
            _log("gloo all_reduce ...")
            run_gloo(d, a.sizes, a.servers, results)
    finally:
        signal.alarm(0)
        d.cleanup()

    import torch
    for (n, servers), r in results.items():
        row = {"bench": "ps_roundtrip", "elements": n, "servers": servers, "workers": 1,
               "mode": a.mode, "partition_mb": PARTITION_MB,
               "partitions": len(_plan(n, servers).partitions)}
        for key in ("tessera", "zmq", "rpc", "gloo"):
            if key in r:
                field = "gloo_allreduce_gbps" if key == "gloo" else f"{key}_gbps"
                row[field] = round(_gbps(n, statistics.median(r[key])), 3)
        if "tessera_gbps" in row:
            for other in ("zmq", "rpc"):
                if f"{other}_gbps" in row:
                    row[f"tessera_vs_{other}"] = round(row["tessera_gbps"] / row[f"{other}_gbps"], 3)
            # Time the servers spent in the optimizer step, per push+pull of the vector.
            iters_served = r["tessera_server_updates"] / row["partitions"]
            row["tessera_server_apply_ms_per_iter"] = round(
                1e3 * r["tessera_server_apply_s"] / max(1.0, iters_served), 2)
        row.update(timed_iters=a.rounds * a.iters, torch=torch.__version__)
        print(json.dumps(row), flush=True)
    _log(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
