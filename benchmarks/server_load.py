"""One parameter server under many concurrent clients: latency, throughput, lost updates,
against what a user would pick instead, in the same run.

64 clients (``--clients``) each loop: push the gradient of one partition and wait for
the reply, then push again (closed loop, one request in flight per client), for
``--seconds`` per system. Each client is a socket of its own (its own TCP connection
and handshake); the clients are spread over ``--procs`` processes, each driving its
sockets from one poll loop (threads would only add GIL hand-offs on 2 cores).
Systems measured:

* ``tessera``: a real :class:`tessera.ps.server.ParameterServer` in a process of its
  own on an authenticated ``ServerEndpoint`` (127.0.0.1), mode ``async``, one
  partition of ``--partition-kib`` KiB (fp32) per client, SGD lr 0.01, one worker id
  per client. Every push is a ``wire.Push`` whose reply is the ``wire.Params`` with
  the partition's new values (push and pull in one round trip).
* ``tessera_curve``: the same with a ``curve:`` secret (``--encrypt``: CURVE
  encryption on every socket). Measured unless ``--systems`` leaves it out.
* ``tessera_costs``: the same as ``tessera`` with ``ServerOptions(cost_breakdown=True)``:
  the serve thread's CPU per request by phase (``tessera_costs_server_cpu_us_per_msg``).
  Its clock reads (a ``clock_gettime`` syscall per phase) cost CPU themselves, so
  ``tessera``'s figures are taken with the breakdown off.
* ``zmq``: a raw pyzmq ROUTER in a process of its own that sends every message
  straight back (``copy=False``), no update, no authentication: the same bytes per
  request and reply. The transport's ceiling.
* ``zmq_sgd``: the ``zmq`` echo, its server also stepping SGD as Tessera's does here
  (one ``add_`` of the gradient, scaled by lr/clients, into a master per client) and
  answering with that master: the least a parameter server over this transport does
  per push, as ``ps_roundtrip.py``'s system of that name. Tessera against it is
  Tessera's own cost; ``zmq`` against it, the update's.

Reported per system: latency percentiles p50/p90/p99/max of every request (ms, from
send to the reply being taken by the client's loop), ``ops_per_s`` (replies per
second, all clients), ``errors`` (replies that were not the expected answer, and
requests left unanswered; must be 0). For Tessera: ``acked_pushes`` (pushes the
clients saw answered with new values) and ``server_updates`` (the server's count of
applied updates, read from its stats when it exits): ``lost_updates`` is their
difference and must be 0. Ratios: ``<system>_p50_vs_zmq``, ``<system>_p99_vs_zmq``
(latency, lower is better) and ``<system>_ops_vs_zmq`` (throughput, higher is
better). Systems alternate in ``--rounds`` rounds (``--seconds`` split between them)
so that other load on the machine hits all of them. Diagnostics:
``<system>_server_cpu_us_per_op`` (the server process's CPU per reply, which other
load barely moves) and ``foreign_cpu_pct`` (see README.md).

Output: one JSON object on stdout; progress on stderr.

    .venv/bin/python benchmarks/server_load.py            # 30 s per system
    .venv/bin/python benchmarks/server_load.py --quick    # 5 s per system
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import signal
import sys
import time
import traceback

from _machine import cpu_s as _cpu_s, recv as _recv  # noqa: E402
from _machine import busy_s as _busy_s, foreign_cpu_pct as _foreign_cpu_pct  # noqa: E402
from _machine import log as _log, own_s as _own_s  # noqa: E402
from _machine import watch_parent as _watch_parent  # noqa: E402
from _machine import as_launched as _as_launched, ready_to_serve as _ready_to_serve  # noqa: E402

LR = 0.01
#: A client that has not had its reply this long after the run counts it as an error.
DRAIN_S = 30.0


# ------------------------------------------------------------------ children


def _child(fn, conn, *args) -> None:
    """Run ``fn``; report an exception to the driver instead of dying silently."""
    try:
        _watch_parent()
        fn(conn, *args)
    except BaseException:  # noqa: BLE001 - the driver shows it
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
        raise


def _tessera_server(conn, secret: str, clients: int, elems: int, stop,
                    breakdown: bool = False) -> None:
    import torch
    import zmq

    from tessera.config.schema import OptimizerConfig
    from tessera.ps.server import ParameterServer, ServerHooks, ServerOptions
    from tessera.transport.endpoint import ServerEndpoint, close_context
    from tessera.transport.wire import PartitionInfo

    torch.set_num_threads(1)
    ctx = zmq.Context()
    endpoint = ServerEndpoint(ctx, "127.0.0.1", secret, max_frame_bytes=elems * 4 + (1 << 20))
    parts = [PartitionInfo(id=i, start=i * elems, stop=(i + 1) * elems, server=0)
             for i in range(clients)]
    # The per-phase breakdown reads the thread's CPU clock ~9 times a request (a
    # syscall): measured as a system of its own (tessera_costs), never in tessera's figures.
    breakdown = {"cost_breakdown": True} \
        if breakdown and "cost_breakdown" in ServerOptions.__dataclass_fields__ else {}
    server = ParameterServer(ServerOptions(rank=0, num_workers=clients, mode="async",
                                           **breakdown),
                             endpoint=endpoint, partitions=parts,
                             optimizer=OptimizerConfig(name="sgd", lr=LR),
                             hooks=ServerHooks(should_stop=stop.is_set))
    _ready_to_serve()
    conn.send(endpoint.address)
    server.serve()
    endpoint.close()
    close_context(ctx)
    conn.send(dict(server.stats))


def _zmq_echo(conn, stop, sgd: bool = False) -> None:
    """A ROUTER that sends every message straight back (zero-copy both ways); with
    ``sgd``, it steps SGD on a master per client (the header's second 8 bytes) and
    answers with the master instead of the gradient."""
    import zmq
    events, pollin = int(zmq.EVENTS), int(zmq.POLLIN)  # (ints: the enums cost ~0.6 µs a call)
    if sgd:
        import torch
        torch.set_num_threads(1)  # as Tessera's server here
    masters = {}  # sgd: client id -> its fp32 master

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    conn.send(f"tcp://127.0.0.1:{port}")
    while not stop.is_set():
        if not sock.poll(100):
            continue
        while sock.get(events) & pollin:
            parts = sock.recv_multipart(copy=False)
            if sgd and len(parts) == 3 and len(parts[2]):  # [peer, header, gradient]
                grad = torch.frombuffer(parts[2].buffer, dtype=torch.float32)
                key = parts[1].bytes[8:16]
                master = masters.get(key)
                if master is None:
                    master = masters[key] = torch.zeros(grad.numel())
                # (scaled by 1/clients, as Tessera's async step scales by 1/workers)
                master.add_(grad, alpha=-LR / len(masters))
                parts = [parts[0], parts[1], memoryview(master.numpy()).cast("B")]
            sock.send_multipart(parts, copy=False)
    sock.close(linger=0)
    ctx.destroy(linger=0)
    conn.send({})


class _Tessera:
    """One client socket speaking Tessera's wire protocol: push partition ``pid``."""

    def __init__(self, ctx, address: str, secret: str, pid: int, elems: int, payload):
        from tessera.transport import wire
        from tessera.transport.endpoint import ClientEndpoint

        self.wire, self.pid, self.nbytes, self.payload = wire, pid, elems * 4, payload
        self.ep = ClientEndpoint(ctx, address, secret, f"server (client {pid})", sndtimeo_s=30,
                                 max_frame_bytes=elems * 4 + (1 << 20))
        self.ep.wait_connected(30)
        self.sock = self.ep.sock
        self.seq = 0

    def send(self) -> None:
        self.seq += 1
        # worker = partition id: each client is a worker of its own; seq orders its pushes.
        header = self.wire.encode(self.wire.Push(req=self.seq, worker=self.pid, seq=self.seq,
                                                 clock=self.seq, partitions=[self.pid]))
        self.sock.send_multipart([header, self.payload], copy=False)

    def check(self, parts) -> str:
        """'' when ``parts`` is the reply to the last push, else what is wrong."""
        try:
            msg = self.wire.decode(parts[0].buffer)
        except self.wire.WireError as exc:
            return f"undecodable reply: {exc}"
        if isinstance(msg, self.wire.Error):
            return f"server refused: {msg.message}"
        if (not isinstance(msg, self.wire.Params) or msg.req != self.seq or msg.skipped
                or msg.partitions != [self.pid] or len(parts) != 2
                or len(parts[1]) != self.nbytes):
            return f"unexpected reply {msg!r} with {len(parts) - 1} frame(s)"
        return ""

    def close(self) -> None:
        self.ep.close()


class _Echo:
    """One plain DEALER to the echo server, sending the same bytes as a Tessera push."""

    def __init__(self, ctx, address: str, pid: int, elems: int, payload):
        import zmq

        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(address)
        self.pid, self.nbytes, self.payload, self.seq = pid, elems * 4, payload, 0
        from tessera.transport import wire
        self.header_len = len(wire.encode(wire.Push(req=1, worker=pid, seq=1, clock=1,
                                                    partitions=[pid])))
        self.sock.send_multipart([b"hello", b""])  # connection up before timing
        self.sock.recv_multipart()

    def send(self) -> None:
        self.seq += 1
        header = (self.seq.to_bytes(8, "little") + self.pid.to_bytes(8, "little")).ljust(
            self.header_len, b"\0")
        self.sock.send_multipart([header, self.payload], copy=False)

    def check(self, parts) -> str:
        if len(parts) != 2 or int.from_bytes(parts[0].bytes[:8], "little") != self.seq \
                or len(parts[1]) != self.nbytes:
            return "unexpected echo"
        return ""

    def close(self) -> None:
        self.sock.close(linger=0)


def _clients(conn, ids: list[int], elems: int) -> None:
    """A process of clients: sockets opened on ``open``, driven by one poll loop on ``run``."""
    import numpy as np
    import zmq

    ctx = zmq.Context()
    payload = memoryview(np.random.default_rng(ids[0]).standard_normal(elems, dtype=np.float32)
                         * np.float32(1e-3)).cast("B")
    socks = {}
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        if cmd[0] == "open":
            _, system, address, secret = cmd
            socks[system] = [_Tessera(ctx, address, secret, i, elems, payload)
                             if system.startswith("tessera") else _Echo(ctx, address, i, elems,
                                                                        payload)
                             for i in ids]
            conn.send("open")
        elif cmd[0] == "run":
            _, system, seconds = cmd
            conn.send(_drive(socks[system], seconds))
        elif cmd[0] == "close":
            for c in socks.pop(cmd[1]):
                c.close()
            conn.send("closed")
    ctx.destroy(linger=0)


def _drive(clients: list, seconds: float) -> dict:
    """Closed loop: each client sends, and sends again when its reply is in, until the
    deadline; then every outstanding reply is awaited (DRAIN_S)."""
    import zmq
    events, pollin = int(zmq.EVENTS), int(zmq.POLLIN)  # (ints: the enums cost ~0.6 µs a call)

    poller = zmq.Poller()
    by_sock = {}
    for c in clients:
        poller.register(c.sock, zmq.POLLIN)
        by_sock[c.sock] = c
    latencies, errors, first_error = [], 0, ""
    sent_at = {}
    deadline = time.perf_counter() + seconds
    for c in clients:
        sent_at[c] = time.perf_counter()
        c.send()
    running = True
    drain_end = None
    while sent_at:
        now = time.perf_counter()
        if running and now >= deadline:
            running, drain_end = False, now + DRAIN_S
        if not running and now >= drain_end:
            errors += len(sent_at)
            first_error = first_error or f"{len(sent_at)} requests unanswered after {DRAIN_S} s"
            break
        for sock, _ in poller.poll(100):
            c = by_sock[sock]
            while sock.get(events) & pollin:
                parts = sock.recv_multipart(copy=False)
                t = time.perf_counter()
                latencies.append(t - sent_at.pop(c))
                why = c.check(parts)
                if why:
                    errors += 1
                    first_error = first_error or why
                if running:
                    sent_at[c] = time.perf_counter()
                    c.send()
    return dict(latencies=latencies, errors=errors, first_error=first_error,
                acked=len(latencies) - errors)


# ------------------------------------------------------------------ driver


def _init_partitions(address: str, secret: str, clients: int, elems: int) -> None:
    """Worker 0's part: initial values for every partition (one InitParams)."""
    import numpy as np
    import zmq

    from tessera.transport import wire
    from tessera.transport.endpoint import ClientEndpoint

    ctx = zmq.Context()
    ep = ClientEndpoint(ctx, address, secret, "server", sndtimeo_s=30)
    try:
        ep.wait_connected(30)
        values = np.random.default_rng(0).standard_normal(clients * elems, dtype=np.float32)
        frames = [memoryview(values[i * elems:(i + 1) * elems]).cast("B") for i in range(clients)]
        msg, _ = ep.request(wire.InitParams(req=1, partitions=list(range(clients))), frames,
                            timeout_s=30)
        if not isinstance(msg, wire.Ack):
            raise RuntimeError(f"initial values refused: {msg!r}")
    finally:
        ep.close()
        ctx.destroy(linger=0)


def _percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, int(q / 100 * len(sorted_ms)))]


def run(a) -> dict:
    spawn_ctx = mp.get_context("spawn")
    procs, deadline = [], time.monotonic() + a.timeout - 10
    elems = a.partition_kib * 1024 // 4
    systems = a.systems.split(",")
    secret = {"tessera": secrets.token_hex(32), "tessera_curve": "curve:" + secrets.token_hex(32),
              "tessera_costs": secrets.token_hex(32)}
    stops = {s: spawn_ctx.Event() for s in systems}

    def spawn(name, fn, *args):
        parent, child = spawn_ctx.Pipe()
        p = spawn_ctx.Process(target=_child, args=(fn, child, *args), name=name, daemon=True)
        p.start()
        child.close()
        procs.append(p)
        return parent, p

    def ask(conn, msg, what):
        conn.send(msg)
        return _recv(conn, procs, deadline, what)

    try:
        servers = {}
        for s in systems:
            if s in ("zmq", "zmq_sgd"):
                servers[s] = spawn(f"{s}-echo", _zmq_echo, stops[s], s == "zmq_sgd")
            else:
                servers[s] = spawn(f"{s}-server", _tessera_server, secret[s], a.clients, elems,
                                   stops[s], s == "tessera_costs")
        ids = [list(range(a.clients))[i::a.procs] for i in range(a.procs)]
        spawned = [spawn(f"clients{i}", _clients, ids[i], elems) for i in range(a.procs)]
        clients, client_pids = [c for c, _ in spawned], [p.pid for _, p in spawned]
        addresses = {s: _recv(conn, procs, deadline, f"{s} server start")
                     for s, (conn, _) in servers.items()}
        for s in systems:
            if s.startswith("tessera"):
                _init_partitions(addresses[s], secret[s], a.clients, elems)
            for c in clients:
                c.send(("open", s, addresses[s], secret.get(s, "")))
            for c in clients:
                _recv(c, procs, deadline, f"{s} clients connect")
        _log(f"{a.clients} clients in {a.procs} processes connected to {', '.join(systems)}")

        results = {s: dict(latencies=[], errors=0, first_error="", acked=0, wall=0.0, cpu=0.0,
                        client_cpu=0.0)
                   for s in systems}
        busy0, own0 = _busy_s(), _own_s() + _cpu_s([p.pid for p in procs])
        t_all = time.monotonic()
        per_round = a.seconds / a.rounds
        for rnd in range(a.rounds):
            for s in systems:
                server_pid = servers[s][1].pid
                cpu0, t0 = _cpu_s([server_pid]), time.monotonic()
                ccpu0 = _cpu_s(client_pids)
                for c in clients:
                    c.send(("run", s, per_round))
                outs = [_recv(c, procs, deadline, f"{s} round {rnd}") for c in clients]
                r = results[s]
                r["wall"] += time.monotonic() - t0
                r["cpu"] += _cpu_s([server_pid]) - cpu0
                r["client_cpu"] += _cpu_s(client_pids) - ccpu0
                for o in outs:
                    r["latencies"] += o["latencies"]
                    r["errors"] += o["errors"]
                    r["acked"] += o["acked"]
                    r["first_error"] = r["first_error"] or o["first_error"]
                _log(f"  round {rnd}: {s} {sum(len(o['latencies']) for o in outs) / per_round:,.0f}"
                     f" ops/s")
        wall_all = time.monotonic() - t_all
        foreign = (_busy_s() - busy0) - (_own_s() + _cpu_s([p.pid for p in procs]) - own0)
        foreign_pct = max(0.0, 100 * foreign / (wall_all * (os.cpu_count() or 1)))
        for s in systems:
            for c in clients:
                c.send(("close", s))
            for c in clients:
                _recv(c, procs, deadline, f"{s} clients close")
        stats = {}
        for s, (conn, _) in servers.items():
            stops[s].set()
            stats[s] = _recv(conn, procs, deadline, f"{s} server stop")
        for c in clients:
            c.send(("quit",))
    finally:  # on success everyone is quitting already; on failure, end them
        for s in stops.values():
            s.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                _log(f"  {p.name} did not exit within 10 s; terminating it")
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    row = {"bench": "server_load", "clients": a.clients, "client_procs": a.procs,
           "partition_kib": a.partition_kib, "mode": "async", "seconds_per_system": a.seconds,
           "rounds": a.rounds}
    for s in systems:
        r = results[s]
        ms = sorted(1e3 * x for x in r["latencies"])
        n = len(ms)
        row.update({f"{s}_p50_ms": round(_percentile(ms, 50), 3),
                    f"{s}_p90_ms": round(_percentile(ms, 90), 3),
                    f"{s}_p99_ms": round(_percentile(ms, 99), 3),
                    f"{s}_max_ms": round(ms[-1], 3) if ms else None,
                    f"{s}_ops_per_s": round(n / r["wall"], 1),
                    f"{s}_errors": r["errors"],
                    f"{s}_server_cpu_us_per_op": round(1e6 * r["cpu"] / max(1, n), 1),
                    f"{s}_client_cpu_us_per_op": round(1e6 * r["client_cpu"] / max(1, n), 1)})
        if r["first_error"]:
            row[f"{s}_first_error"] = r["first_error"][:300]
        if s.startswith("tessera"):
            updates = stats[s]["updates"]
            row.update({f"{s}_acked_pushes": r["acked"], f"{s}_server_updates": updates,
                        f"{s}_lost_updates": updates - r["acked"]})
            if "cpu_us_per_msg" in stats[s]:  # the serve thread's time per request, by phase
                row[f"{s}_server_cpu_us_per_msg"] = stats[s]["cpu_us_per_msg"]
    if "zmq" in systems:
        for s in systems:
            if s != "zmq":
                row[f"{s}_p50_vs_zmq"] = round(row[f"{s}_p50_ms"] / row["zmq_p50_ms"], 3)
                row[f"{s}_p99_vs_zmq"] = round(row[f"{s}_p99_ms"] / row["zmq_p99_ms"], 3)
                row[f"{s}_ops_vs_zmq"] = round(row[f"{s}_ops_per_s"] / row["zmq_ops_per_s"], 3)
    if "zmq_sgd" in systems:  # Tessera's own cost: against the least a server that updates does
        for s in systems:
            if s.startswith("tessera"):
                row[f"{s}_p99_vs_zmq_sgd"] = round(row[f"{s}_p99_ms"] / row["zmq_sgd_p99_ms"], 3)
                row[f"{s}_ops_vs_zmq_sgd"] = round(row[f"{s}_ops_per_s"]
                                                   / row["zmq_sgd_ops_per_s"], 3)
    row["foreign_cpu_pct"] = round(foreign_pct, 1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--seconds", type=float, default=30.0,
                    help="load time per system, split over the rounds (default 30)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the systems alternate")
    ap.add_argument("--partition-kib", type=int, default=16, help="partition size (default 16)")
    ap.add_argument("--systems", default="tessera,tessera_curve,zmq,zmq_sgd",
                    help="comma-separated subset of tessera,tessera_curve,tessera_costs,zmq,"
                         "zmq_sgd (tessera_costs: tessera with the per-phase CPU breakdown on; "
                         "zmq_sgd: the echo stepping SGD)")
    ap.add_argument("--timeout", type=float, default=230.0, help="hard limit for the whole run, s")
    ap.add_argument("--quick", action="store_true", help="smoke run: 5 s per system, 2 rounds")
    a = ap.parse_args(argv)
    if a.quick:
        a.seconds, a.rounds = 5.0, 2
    unknown = set(a.systems.split(",")) - {"tessera", "tessera_curve", "tessera_costs", "zmq",
                                           "zmq_sgd"}
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}; choose from tessera, tessera_curve, "
                 f"tessera_costs, zmq, zmq_sgd")

    def on_alarm(signum, frame):
        raise TimeoutError(f"server_load: hard timeout of {a.timeout:.0f} s reached")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(a.timeout))
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    busy0, own0 = _busy_s(), _own_s()
    try:
        row = run(a)
    except TimeoutError as exc:
        _log(str(exc))
        return 2
    finally:
        signal.alarm(0)
    print(json.dumps(row), flush=True)
    _log(f"done in {time.monotonic() - t0:.0f} s; other processes used "
         f"{_foreign_cpu_pct(busy0, own0, time.monotonic() - t0):.0f}% of the machine's CPU "
         f"meanwhile (load average before: {load_before:.2f})")
    bad = [k for k, v in row.items() if k.endswith(("_errors", "_lost_updates")) and v != 0]
    if bad:
        _log(f"FAILED: {', '.join(f'{k}={row[k]}' for k in bad)}")
        return 1
    return 0


if __name__ == "__main__":
    _as_launched()
    sys.exit(main())
