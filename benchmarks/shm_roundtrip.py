"""Push + pull through shared memory against the loopback-TCP path, in the same run
(issue 15 item 4: shared memory on one host).

One worker pushes a gradient for every partition of a flat fp32 vector and waits for
every reply (the partition's new values: push and pull in one round trip), as
``ps_roundtrip.py`` does. Systems, each with its own processes, measured in rounds
that alternate so that the machine's load hits them alike:

* ``shm``: real :class:`tessera.ps.server.ParameterServer` processes whose
  ``ServerEndpoint`` offers shared memory (``[cluster] shm = "auto"``, the default),
  one :class:`tessera.ps.client.PSClient` worker whose gradient lives in
  ``PSClient.shared_zeros`` memory, as ``PSDataParallel``'s does: the server reads each
  push there in place (lent, not copied into the segment), the sync replies are read from
  the server's master in its arena (no copy on the server), headers over ZeroMQ; the
  worker waits for the server to let go of the gradient each step (``wait_lent``), as
  ``PSDataParallel.step`` does;
* ``tcp``: the same with ``shm = "off"``: every byte over loopback TCP;
* ``zmq``: raw pyzmq moving the same bytes in the same partitions (DEALER -> ROUTER
  echo, ``copy=False``, no update, no auth): the TCP transport's ceiling, for reference.
* ``rpc``: the ``torch.distributed.rpc`` parameter server of ``ps_roundtrip.py`` with
  TensorPipe's same-host path: its tensors through its default channel on one host,
  cross-memory attach (one copy straight out of the other process's memory), its
  control over TCP (``_transports=["uv"]``: its shm transport busy-polls a core in every
  process, ``ps_roundtrip.py``). The same-host alternative to Tessera's shared memory:
  ``shm_vs_rpc``.

Bandwidth is ``2 * 4 * elements / t`` (bytes pushed + pulled per iteration) in GB/s,
median over the timed iterations. ``shm_vs_tcp`` is shm's bandwidth over tcp's; CPU
time of each system's processes per iteration is printed too, since the machine is
shared (``foreign_cpu_pct``: the share of the machine other processes used meanwhile).

    .venv/bin/python benchmarks/shm_roundtrip.py            # 1M, 10M, 25M elements, 1 server
    .venv/bin/python benchmarks/shm_roundtrip.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import time
import traceback

from _machine import as_launched, busy_s, cpu_s, foreign_cpu_pct, free_port, log, own_s
from _machine import launched_threads, recv as recv_from, watch_parent
from ps_roundtrip import PARTITION_MB, _plan, _rpc_proc, _zmq_echo  # the same plan, echo, rpc

GB = 1e9
LR = 0.01


def _child(fn, conn, *args) -> None:
    try:
        import torch
        torch.set_num_threads(1)
        watch_parent()
        fn(conn, *args)
    except BaseException:  # noqa: BLE001 - the driver shows it
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
        raise


def _server(conn, rank: int, secret: str, use_shm: bool) -> None:
    import threading

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
        _, partitions = cmd
        stop = threading.Event()
        endpoint = ServerEndpoint(ctx, "127.0.0.1", secret, max_frame_bytes=max_frame,
                                  shm=use_shm)
        server = ParameterServer(ServerOptions(rank=rank, num_workers=1, mode="sync"),
                                 endpoint=endpoint, partitions=partitions,
                                 optimizer=OptimizerConfig(name="sgd", lr=LR),
                                 hooks=ServerHooks(should_stop=stop.is_set))
        thread = threading.Thread(target=server.serve)
        thread.start()
        conn.send(endpoint.address)
        conn.recv()  # "stop"
        stop.set()
        thread.join()
        conn.send(dict(shm_in=endpoint.shm_bytes_in, shm_out=endpoint.shm_bytes_out))
        endpoint.close()
    close_context(ctx)


def _worker(conn, secret: str) -> None:
    import torch
    import zmq

    from tessera.ps.client import PSClient

    ctx = zmq.Context()
    state = {}
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        if cmd[0] == "open":
            _, n, addresses = cmd
            shard_map = _plan(n, len(addresses))
            client = PSClient(ctx=ctx, shard_map=shard_map, server_addresses=addresses,
                              secret=secret, worker=0, timeout_s=60.0)
            client.connect()
            launched_threads("worker")
            gen = torch.Generator().manual_seed(0)
            grad = client.shared_zeros(n)  # as PSDataParallel keeps its gradients
            if grad is None:
                grad = torch.empty(n)
            client.init_params(torch.randn(n, generator=gen))
            grad.copy_(torch.randn(n, generator=gen).mul_(1e-3))
            values = torch.empty(n)
            state.update(client=client, grad=grad, values=values, parts=shard_map.partitions,
                         clock=0)
            conn.send("open")
        elif cmd[0] == "run":
            client, grad, values, parts = (state["client"], state["grad"], state["values"],
                                           state["parts"])
            times = []
            for _ in range(cmd[1]):
                clock = state["clock"]
                t0 = time.perf_counter()
                handles = [client.push(p.id, grad[p.start:p.stop], clock) for p in parts]
                for p, h in zip(parts, handles):  # the values copied out, as a worker does
                    values[p.start:p.stop].copy_(h.wait()[p.id])
                    h.release()
                client.wait_lent()  # before the gradient may be written again
                times.append(time.perf_counter() - t0)
                state["clock"] = clock + 1
            conn.send(times)
        elif cmd[0] == "close":
            client = state.pop("client")
            stats = dict(shm_out=sum(ep.shm_bytes_out for ep in client.servers),
                         shm_in=sum(ep.shm_bytes_in for ep in client.servers),
                         checksum=float(state["values"].double().sum()))
            client.close()
            state.clear()
            conn.send(stats)
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
            _, n, addresses, parts = cmd
            socks = []
            for addr in addresses:
                s = ctx.socket(zmq.DEALER)
                s.linger = 0
                s.connect(addr)
                socks.append(s)
            grad = torch.randn(n, generator=torch.Generator().manual_seed(0))
            frames = [(memoryview(grad[a:b].numpy()).cast("B"), srv) for a, b, srv in parts]
            for s in socks:
                s.send_multipart([b"hello", b""])
                s.recv_multipart()
            state.update(socks=socks, frames=frames)
            conn.send("open")
        elif cmd[0] == "run":
            socks, frames = state["socks"], state["frames"]
            times = []
            for _ in range(cmd[1]):
                t0 = time.perf_counter()
                for i, (frame, srv) in enumerate(frames):
                    socks[srv].send_multipart([i.to_bytes(4, "little"), frame], copy=False)
                for frame, srv in frames:
                    reply = socks[srv].recv_multipart(copy=False)
                    assert len(reply[1]) == len(frame)
                times.append(time.perf_counter() - t0)
            conn.send(times)
        elif cmd[0] == "close":
            for s in state.pop("socks"):
                s.close(linger=0)
            state.clear()
            conn.send("closed")
    ctx.destroy(linger=0)


class Bench:
    def __init__(self, a):
        self.a = a
        self.mp = mp.get_context("spawn")
        self.procs, self.of = [], {}
        self.deadline = time.monotonic() + a.timeout - 10
        self.secret = secrets.token_hex(16)

    def spawn(self, name, fn, *args):
        parent, child = self.mp.Pipe()
        p = self.mp.Process(target=_child, args=(fn, child, *args), name=name, daemon=True)
        p.start()
        child.close()
        self.procs.append(p)
        self.of[parent] = p
        return parent

    def recv(self, conn, what):
        return recv_from(conn, self.procs, self.deadline, what)

    def ask(self, conn, msg, what):
        conn.send(msg)
        return self.recv(conn, what)

    def cleanup(self) -> None:
        for c in self.of:
            try:
                c.send(("quit",))
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def run(self) -> list:
        a = self.a
        top = max(a.servers)
        systems = [s for s in ("shm", "tcp", "zmq", "rpc") if s in a.systems]
        servers = {s: [self.spawn(f"{s}-server{r}", _server, r, self.secret, s == "shm")
                       for r in range(top)] for s in ("shm", "tcp") if s in systems}
        workers = {s: self.spawn(f"{s}-worker", _worker, self.secret)
                   for s in ("shm", "tcp") if s in systems}
        if "zmq" in systems:
            echo = [self.spawn(f"zmq-echo{r}", _zmq_echo) for r in range(top)]
            echo_at = [self.recv(c, "zmq echo start") for c in echo]
            workers["zmq"] = self.spawn("zmq-worker", _zmq_worker)
        if "rpc" in systems:  # one world: the worker (rank 0) and `top` servers
            port = free_port()
            rpc = [self.spawn(f"rpc{r}", _rpc_proc, r, top + 1, port, "uv", "default")
                   for r in range(top + 1)]
            workers["rpc"] = rpc[0]
        rows = []
        for k in a.servers:
            for n in a.sizes:
                t0, busy0, own0 = time.monotonic(), busy_s(), own_s()
                # The benchmark's own children run all along (own_s counts only the
                # waited-for): their CPU is this benchmark's, not other processes'.
                kids = [p.pid for p in self.of.values()]
                kids0 = cpu_s(kids, missing_ok=True)
                shard_map = _plan(n, k)
                pids = {}
                for s in ("shm", "tcp"):
                    if s in systems:
                        addrs = [self.ask(servers[s][r], ("serve", list(shard_map.on_server(r))),
                                          f"{s} server {r}") for r in range(k)]
                        self.ask(workers[s], ("open", n, addrs), f"{s} worker open")
                        pids[s] = [self.of[c].pid for c in [workers[s], *servers[s][:k]]]
                if "zmq" in systems:
                    parts = [(p.start, p.stop, p.server) for p in shard_map.partitions]
                    self.ask(workers["zmq"], ("open", n, echo_at[:k], parts), "zmq open")
                    pids["zmq"] = [self.of[c].pid for c in [workers["zmq"], *echo[:k]]]
                if "rpc" in systems:
                    self.ask(workers["rpc"], ("open", n, k), "rpc open")
                    pids["rpc"] = [self.of[c].pid for c in rpc[:k + 1]]
                times = {s: [] for s in systems}
                cpu = {s: 0.0 for s in systems}
                for s in systems:
                    self.ask(workers[s], ("run", a.warmup), f"{s} warm-up")
                for _ in range(a.rounds):
                    for s in systems:
                        c0 = cpu_s(pids[s])
                        times[s].extend(self.ask(workers[s], ("run", a.iters), s))
                        cpu[s] += cpu_s(pids[s]) - c0
                stats = {}
                for s in ("shm", "tcp"):
                    if s in systems:
                        stats[s] = self.ask(workers[s], ("close",), f"{s} close")
                        for c in servers[s][:k]:
                            self.ask(c, ("stop",), f"{s} server stop")
                for s in ("zmq", "rpc"):
                    if s in systems:
                        self.ask(workers[s], ("close",), f"{s} close")
                wall = time.monotonic() - t0
                row = {"bench": "shm_roundtrip", "elements": n, "servers": k, "workers": 1,
                       "mode": "sync", "partition_mb": PARTITION_MB,
                       "partitions": len(shard_map.partitions)}
                med = {s: statistics.median(times[s]) for s in systems}
                for s in systems:
                    row[f"{s}_gbps"] = round(2 * 4 * n / med[s] / GB, 3)
                    row[f"{s}_cpu_ms_per_iter"] = round(1e3 * cpu[s] / len(times[s]), 1)
                if "shm" in med and "tcp" in med:
                    row["shm_vs_tcp"] = round(med["tcp"] / med["shm"], 2)
                    row["shm_cpu_vs_tcp"] = round(row["shm_cpu_ms_per_iter"]
                                                  / max(row["tcp_cpu_ms_per_iter"], 1e-9), 2)
                    # Both ran the same updates on the same data: the same values, bit for bit.
                    row["same_values"] = stats["shm"]["checksum"] == stats["tcp"]["checksum"]
                if "shm" in med and "zmq" in med:
                    row["shm_vs_zmq"] = round(med["zmq"] / med["shm"], 2)
                if "shm" in med and "rpc" in med:
                    row["shm_vs_rpc"] = round(med["rpc"] / med["shm"], 2)
                if "tcp" in med and "zmq" in med:
                    row["tcp_vs_zmq"] = round(med["zmq"] / med["tcp"], 2)
                if "shm" in stats:  # proof that the shm system used shared memory
                    row["shm_payload_share"] = round(
                        (stats["shm"]["shm_out"] + stats["shm"]["shm_in"])
                        / (2 * 4 * n * (a.warmup + a.rounds * a.iters) + 1), 3)
                row.update(timed_iters=a.rounds * a.iters,
                           foreign_cpu_pct=round(foreign_cpu_pct(
                               busy0, own0 - (cpu_s(kids, missing_ok=True) - kids0), wall), 1),
                           loadavg=round(os.getloadavg()[0], 2))
                print(json.dumps(row), flush=True)
                log(f"  {n:,d} elements, {k} server(s): " + ", ".join(
                    f"{s} {row[f'{s}_gbps']:.2f} GB/s" for s in systems)
                    + f" (other processes: {row['foreign_cpu_pct']:.0f}% CPU)")
                rows.append(row)
        return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")],
                    default=[1_000_000, 10_000_000, 25_000_000])
    ap.add_argument("--servers", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    ap.add_argument("--systems", default="shm,tcp,zmq,rpc")
    # rpc's first pushes of a size are slow (0.5-0.9 against 4 GB/s at 1M after 20):
    # every system gets the same warm-up.
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="1M and 4M elements, fewer rounds")
    a = ap.parse_args(argv)
    a.systems = a.systems.split(",")
    if a.quick:
        a.sizes, a.warmup, a.iters, a.rounds = [1_000_000, 4_000_000], 2, 2, 2
    os.environ["OMP_NUM_THREADS"] = "1"
    bench = Bench(a)
    t0, busy0, own0, load0 = time.monotonic(), busy_s(), own_s(), os.getloadavg()[0]
    try:
        rows = bench.run()
    finally:
        bench.cleanup()
    log(f"done in {time.monotonic() - t0:.0f} s; other processes used "
        f"{foreign_cpu_pct(busy0, own0, time.monotonic() - t0):.0f}% of the machine's CPU "
        f"(load average before: {load0:.2f})")
    return 0 if rows else 1


if __name__ == "__main__":
    as_launched()
    sys.exit(main())
