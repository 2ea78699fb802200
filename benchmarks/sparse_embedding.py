"""Row pulls and row-sparse pushes of a sharded embedding table through Tessera's
parameter servers, against a ``torch.distributed.rpc`` embedding server, in one run
(DESIGN.md, "Performance principles").

Table: dim 64, unbounded hashed ids (``num_embeddings=None``), rows created on
first touch, Adagrad (lr 0.05) applied by the servers. Each batch draws
``batch`` ids from a Zipf distribution (a = 1.1, truncated to an id space of 10^7)
and the client sends its *unique* ids, as a recommender's embedding layer does;
rows/s counts those unique rows. One iteration:

1. pull: split the unique ids by owner (:func:`tessera.ps.embedding_ids.owner_of`),
   ask every server for its rows at once, wait for all replies;
2. push: send every server the random gradients of its rows (clock = iteration),
   wait for all acks.

Systems measured (same batches, same owner split, same client process):

* ``tessera``: real :class:`tessera.ps.server.ParameterServer` processes, each on
  an authenticated ``ServerEndpoint`` (127.0.0.1; payloads of 64 KiB and more through
  shared memory, as a one-host job sends them, unless ``--shm off``) with one
  ``TableSpec(name="emb", dim=64, num_embeddings=None, optimizer=adagrad lr 0.05)``,
  ``mode="async"``, ``num_workers=1``; one :class:`tessera.ps.client.PSClient`.
* ``rpc``: one ``torch.distributed.rpc`` (TensorPipe) server process per server
  holding the same vectorised id index as Tessera's shard
  (:class:`tessera.ps.embedding_index.IdIndex`) over a growable fp32 tensor, rows
  created lazily (uniform +-0.01), the same Adagrad arithmetic; the client
  ``rpc_async``-calls every server with the ids tensor and gets the rows back,
  then sends ``(ids, grads)``. With the same index on both sides, the ratio measures
  the system around the table, not the index. TensorPipe over its TCP transport
  (``_transports=["uv"]``; payloads still go through its same-host channel): its default
  same-host transport (shm) busy-polls about a core in every rpc process even while idle
  (``sched_yield``, 0.9 of a core each), this client's process included, so it ran beside
  the other systems' turns and slowed them by up to 5x (``--rpc-transport default``
  measures rpc with it).
* ``local`` (the local limit): the same table trained in this one process,
  ``nn.Embedding(V, 64, sparse=True)`` with ``torch.optim.Adagrad`` (lr 0.05, sparse
  gradients), the ids mapped beforehand (untimed) to a vocabulary of the V distinct ids
  of the run, as a single-machine recommender builds its vocabulary offline. Pull: the
  forward lookup of the batch's unique ids; push: backward of the same gradient rows,
  ``step()``, ``zero_grad()``.

Rates are median over the timed iterations (after warm-up) of rows / seconds of
that phase (``*_rows_per_s`` without a phase: rows / seconds of pull + push);
``*_per_server`` divides by the number of servers. ``tessera_vs_rpc``,
``tessera_vs_local`` (and their ``_pull``, ``_push`` forms) are Tessera's rate over the
other system's, from the same run. On a machine
shared with other work wall-clock rates swing with the load, so each row also
gives CPU microseconds per row, summed over the timed iterations:
``*_server_cpu_us_per_{pulled,pushed}_row`` (all server processes, from
/proc/PID/stat) and ``*_client_cpu_us_per_{pulled,pushed}_row`` (this process).
A server needs <= 1 us of CPU per pulled row to pull 1M rows/s on one core. Rounds of the two
systems alternate so that a busy phase of the machine hits both alike. Each
server count gets fresh servers (empty tables); batch sizes run in increasing
order on the same tables, so the Zipf head is already stored and tail ids keep
creating rows, in both systems alike.

Then the server's per-row loops alone (``sparse_kernels`` lines, ``--kernel-calls``):
4,100 random rows of a 1.5M-row table per call, fresh rows each call (from memory, as
a table far larger than the caches serves them), each loop against what it replaces,
interleaved call by call: the Adagrad step against the same loop without asking for rows
ahead, the gather of a pull's rows against numpy's ``take`` and torch's
``index_select``, an index lookup (2M ids) against the probe loop without asking ahead.
``tessera_vs_*`` is the other's median time over Tessera's (above 1: Tessera faster).

Output: one JSON object per line and case on stdout; progress on stderr.

    .venv/bin/python benchmarks/sparse_embedding.py            # 10k, 50k, 100k x 1, 2 servers
    .venv/bin/python benchmarks/sparse_embedding.py --quick    # smoke run, seconds
    .venv/bin/python benchmarks/sparse_embedding.py --profile DIR   # cProfile the servers
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import signal
import statistics
import sys
import threading
import time
import traceback

DIM = 64
LR = 0.05
EPS = 1e-10  # torch.optim.Adagrad's default, as OptimizerConfig's
ID_SPACE = 10 ** 7
ZIPF_A = 1.1
#: The several-tables case: this many more tables (t0, t1, ...) on every server.
TABLES = 4

from _machine import cpu_s as _cpu_s, recv as _recv  # noqa: E402
from _machine import busy_s as _busy_s  # noqa: E402
from _machine import free_port as _free_port, log as _log, own_s as _own_s  # noqa: E402
from _machine import launched_threads as _launched_threads  # noqa: E402
from _machine import ready_to_serve as _ready_to_serve  # noqa: E402
from _machine import watch_parent as _watch_parent  # noqa: E402
from _machine import profile_dir as _profile_dir  # noqa: E402
from _machine import as_launched as _as_launched, rpc_transports as _rpc_options  # noqa: E402


def zipf_batches(batch: int, count: int, seed: int):
    """``count`` arrays of the unique ids of ``batch`` Zipf(a) draws in [0, ID_SPACE)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        got, have = [], 0
        while have < batch:  # truncated Zipf: redraw values beyond the id space
            z = rng.zipf(ZIPF_A, size=batch)
            z = z[z <= ID_SPACE]
            got.append(z)
            have += len(z)
        ids = np.concatenate(got)[:batch] - 1
        out.append(np.unique(ids).astype(np.int64))
    return out


# ------------------------------------------------------------------ Tessera


def _tessera_server(rank: int, secret: str, conn, stop, profile_path, shm: bool) -> None:
    """A real ParameterServer holding one table; serves until ``stop`` is set."""
    _watch_parent()
    try:
        import msgspec
        import torch
        import zmq

        from tessera.config.schema import OptimizerConfig
        from tessera.ps.server import ParameterServer, ServerHooks, ServerOptions
        from tessera.transport.endpoint import ServerEndpoint, close_context
        from tessera.transport.wire import TableSpec

        torch.set_num_threads(1)
        ctx = zmq.Context()
        spec = TableSpec(name="emb", dim=DIM, num_embeddings=None,
                         optimizer=OptimizerConfig(name="adagrad", lr=LR))
        endpoint = ServerEndpoint(ctx, "127.0.0.1", secret, shm=shm)
        tables = [spec] + [msgspec.structs.replace(spec, name=f"t{k}") for k in range(TABLES)]
        server = ParameterServer(ServerOptions(rank=rank, num_workers=1, mode="async"),
                                 endpoint=endpoint, partitions=[],
                                 optimizer=OptimizerConfig(name="sgd", lr=LR),
                                 tables=tables, hooks=ServerHooks(should_stop=stop.is_set))
        _ready_to_serve(tables)
        conn.send(endpoint.address)
        if profile_path:
            import cProfile
            prof = cProfile.Profile()
            prof.enable()
            server.serve()
            prof.disable()
            prof.dump_stats(profile_path)
        else:
            server.serve()
        stats = dict(server.stats)
        stats.update(server.tables.table_stats())
        endpoint.close()
        close_context(ctx)
        conn.send(("stats", stats))
    except BaseException:  # noqa: BLE001 - the driver shows it
        conn.send(("error", traceback.format_exc()))
        raise


def torch_rows(ids):
    """Gradient rows for ``ids`` (made outside any measured phase in the main cases;
    here the same for both variants)."""
    import torch
    return torch.full((len(ids), DIM), 0.01)


def tables_case(system, batches, servers: int, rounds: int, iters: int) -> dict:
    """Steps of TABLES tables, each with its own Zipf batch's unique ids, batched (one
    message per server per step) and per table, in alternating rounds."""
    from tessera.ps.embedding_ids import owner_of

    def split(ids):
        owners = owner_of(ids, servers)
        return [ids[owners == s] for s in range(servers)]
    steps = [[(f"t{k}", split(batches[(i * TABLES + k) % len(batches)]))
              for k in range(TABLES)] for i in range(rounds * iters * 2 + 2)]
    times = {True: [], False: []}
    system.step_tables(steps[0], True)
    system.step_tables(steps[1], False)
    at = 2
    for _ in range(rounds):
        for batched in (True, False):
            for _ in range(iters):
                t0 = time.perf_counter()
                system.step_tables(steps[at], batched)
                times[batched].append(time.perf_counter() - t0)
                at += 1
    rows = statistics.median(sum(len(p) for _, parts in st for p in parts) for st in steps)
    return {"bench": "sparse_embedding_tables", "tables": TABLES, "servers": servers,
            "unique_rows_per_table": int(rows / TABLES),
            "batched_step_ms": round(1e3 * statistics.median(times[True]), 2),
            "per_table_step_ms": round(1e3 * statistics.median(times[False]), 2),
            "messages_per_step_batched": 2 * servers,
            "messages_per_step_per_table": 2 * servers * TABLES,
            "batched_vs_per_table": round(statistics.median(times[False])
                                          / statistics.median(times[True]), 3)}


class TesseraSystem:
    name = "tessera"

    def __init__(self, mpctx, servers: int, secret: str, profile_dir, deadline: float,
                 shm: bool = True):
        import zmq

        from tessera.ps.client import PSClient
        from tessera.ps.sharding import ShardMap

        self.servers = servers
        self.stop = mpctx.Event()
        self.conns, self.procs = [], []
        for r in range(servers):
            parent, child = mpctx.Pipe()
            prof = (os.path.join(profile_dir, f"tessera-server{r}-of{servers}.prof")
                    if profile_dir else None)
            p = mpctx.Process(target=_tessera_server, args=(r, secret, child, self.stop, prof, shm),
                              name=f"tessera-server-{r}", daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        addresses = [_recv(c, self.procs, deadline, f"tessera server {r} start")
                     for r, c in enumerate(self.conns)]
        self.ctx = zmq.Context()
        self.client = PSClient(ctx=self.ctx, shard_map=ShardMap(layout=(), partitions=(),
                                                                num_servers=servers),
                               server_addresses=addresses, secret=secret, worker=0,
                               timeout_s=60.0)
        self.client.connect()
        _launched_threads("worker")
        self.clock = 0
        self.pids = [p.pid for p in self.procs]

    def pull(self, parts):
        hs = [self.client.pull_rows("emb", s, ids, self.clock) for s, ids in enumerate(parts)]
        return [h.wait().view(-1, DIM) for h in hs]

    def push(self, parts, grads):
        hs = [self.client.push_rows("emb", s, ids, g, self.clock)
              for s, (ids, g) in enumerate(zip(parts, grads))]
        for h in hs:
            h.wait()
        self.clock += 1

    def step_tables(self, tables, batched: bool) -> None:
        """One step of several tables: ``tables`` is ``[(name, per-server ids), ...]``;
        pull every table's rows, then push a gradient for each (``batched``: one message
        per server for all tables, else one per table and server)."""
        c, clock = self.client, self.clock
        servers = range(self.servers)
        if batched:
            hs = [c.pull_tables(s, [(n, parts[s], DIM) for n, parts in tables], clock)
                  for s in servers]
        else:
            hs = [c.pull_rows(n, s, parts[s], clock) for n, parts in tables for s in servers]
        rows = [h.wait() for h in hs]
        grads = {n: [torch_rows(r) for r in parts] for n, parts in tables}
        if batched:
            hs = [c.push_tables(s, [(n, parts[s], grads[n][s]) for n, parts in tables], clock)
                  for s in servers]
        else:
            hs = [c.push_rows(n, s, parts[s], grads[n][s], clock)
                  for n, parts in tables for s in servers]
        for h in hs:
            h.wait()
        del rows
        self.clock += 1

    def close(self, deadline: float) -> list[dict]:
        self.client.close()
        self.stop.set()
        stats = []
        for r, c in enumerate(self.conns):
            msg = _recv(c, self.procs, deadline, f"tessera server {r} stop")
            stats.append(msg[1])
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.ctx.destroy(linger=0)
        return stats


# ------------------------------------------------------ torch.distributed.rpc

_TABLE = {}


class _RpcTable:
    """A plain embedding server: the same vectorised id index as Tessera's shard
    (:class:`tessera.ps.embedding_index.IdIndex`, whole batches at a time, no per-id
    Python), growable fp32 rows, Adagrad state; so that the ratio measures the
    system around the table (transport, dispatch, validation), not the index."""

    def __init__(self):
        import torch

        from tessera.ps.embedding_index import IdIndex
        self.index = IdIndex()
        self.values = torch.empty((1024, DIM))
        self.sums = torch.zeros((1024, DIM))
        self.lock = threading.Lock()  # TensorPipe runs requests on a thread pool

    def slots(self, ids):
        import torch
        ids = ids.numpy()
        slots = self.index.find(ids)
        missing = slots < 0
        if missing.any():  # lazily create rows: uniform in (-0.01, 0.01)
            slots[missing] = self.index.insert(ids[missing], 0)
            need = self.index.slots.end
            n = self.values.shape[0]
            if need > n:
                cap = max(need, 2 * n)
                values, sums = torch.empty((cap, DIM)), torch.zeros((cap, DIM))
                values[:n], sums[:n] = self.values, self.sums
                self.values, self.sums = values, sums
            new = torch.from_numpy(slots[missing])
            self.values.index_copy_(0, new, torch.rand((len(new), DIM)).mul_(0.02).sub_(0.01))
        return torch.from_numpy(slots)

    def pull(self, ids):
        with self.lock:
            index = self.slots(ids)  # may grow self.values: look it up afterwards
            return self.values.index_select(0, index)

    def push(self, ids, grads):
        with self.lock:
            index = self.slots(ids)
            s = self.sums.index_select(0, index).addcmul_(grads, grads, value=1)
            p = self.values.index_select(0, index)
            p.addcdiv_(grads, s.sqrt().add_(EPS), value=-LR)
            self.sums.index_copy_(0, index, s)
            self.values.index_copy_(0, index, p)
        return len(ids)


def _rpc_reset() -> int:
    _TABLE["emb"] = _RpcTable()
    return 0


def _rpc_pull(ids):
    return _TABLE["emb"].pull(ids)


def _rpc_push(ids, grads):
    return _TABLE["emb"].push(ids, grads)


def _rpc_rows() -> int:
    return len(_TABLE["emb"].index)


def _rpc_server(rank: int, world: int, port: int, conn, transport: str) -> None:
    _watch_parent()
    try:
        import warnings

        import torch
        import torch.distributed.rpc as rpc

        warnings.filterwarnings("ignore", message="You are using a Backend")
        torch.set_num_threads(1)
        conn.send(os.getpid())
        opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}",
                                               rpc_timeout=120, **_rpc_options(transport))
        rpc.init_rpc(f"ps{rank - 1}", rank=rank, world_size=world, rpc_backend_options=opts)
        _rpc_reset()
        rpc.shutdown()  # waits here until the worker is done
    except BaseException:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))
        raise


class RpcSystem:
    name = "rpc"

    def __init__(self, servers: int):
        self.servers = servers

    def reset(self):
        import torch.distributed.rpc as rpc
        for s in range(self.servers):
            rpc.rpc_sync(f"ps{s}", _rpc_reset)

    def pull(self, parts):
        import torch
        import torch.distributed.rpc as rpc
        futs = [rpc.rpc_async(f"ps{s}", _rpc_pull, args=(torch.from_numpy(ids),))
                for s, ids in enumerate(parts)]
        return [f.wait() for f in futs]

    def push(self, parts, grads):
        import torch
        import torch.distributed.rpc as rpc
        futs = [rpc.rpc_async(f"ps{s}", _rpc_push, args=(torch.from_numpy(ids), g))
                for s, (ids, g) in enumerate(zip(parts, grads))]
        for f in futs:
            f.wait()

    def rows(self) -> list[int]:
        import torch.distributed.rpc as rpc
        return [rpc.rpc_sync(f"ps{s}", _rpc_rows) for s in range(self.servers)]


# ------------------------------------------------------------- local limit


class LocalSystem:
    """The local limit: the same table trained in this one process, as a single-machine
    recommender does it: ``nn.Embedding(V, 64, sparse=True)`` and ``torch.optim.Adagrad``
    (lr 0.05, which takes sparse gradients), with the ids mapped to a contiguous vocabulary
    of the V distinct ids of the whole run *beforehand*, outside the timed phases (a
    recommender builds its vocabulary offline). Pull: the forward lookup of the batch's
    unique ids; push: backward of the same gradient rows, ``step()``, ``zero_grad()``."""

    name = "local"

    def __init__(self, vocab):
        import torch
        from torch import nn
        self.vocab = vocab
        self.emb = nn.Embedding(len(vocab), DIM, sparse=True)
        with torch.no_grad():
            self.emb.weight.uniform_(-0.01, 0.01)
        self.opt = torch.optim.Adagrad(self.emb.parameters(), lr=LR, eps=EPS)
        self.out = None

    def remap(self, ids):
        import numpy as np
        import torch
        return torch.from_numpy(np.searchsorted(self.vocab, ids))

    def pull(self, parts):
        self.out = self.emb(parts[0])
        return [self.out]

    def push(self, parts, grads):
        self.out.backward(grads[0])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.out = None


# ------------------------------------------------------------ row kernels


def kernels_case(calls: int, table_rows: int = 1_500_000, rows: int = 4100) -> list[dict]:
    """The server's per-row loops on rows that come from memory: ``rows`` random rows of
    a ``table_rows``-row table (dim 64; fresh rows every call, so they are not in the
    caches), each loop against what it replaces, interleaved call by call: the Adagrad
    step (:func:`tessera.ps.kernels.adagrad_rows`, which asks for rows ahead) against the
    same loop without asking (the kernel before it did), the gather of a pull's rows
    against numpy's ``take`` and torch's ``index_select``, and an index lookup (2M ids)
    against the same probe loop without asking. Median microseconds per call."""
    import numpy as np
    import torch

    from tessera.ps import kernels
    from tessera.ps.embedding_index import IdIndex, gather_rows, rows_view
    if not kernels.ENABLED:
        return []
    import numba
    jit = numba.njit(cache=False, nogil=True, boundscheck=False, error_model="numpy",
                     fastmath={"contract"})

    @jit
    def adagrad_plain(values, slots, sums, grad, neg_clr, eps):
        for r in range(slots.shape[0]):
            s = slots[r]
            for c in range(values.shape[1]):
                g = grad[r, c]
                acc = sums[s, c] + g * g
                sums[s, c] = acc
                values[s, c] = values[s, c] + neg_clr * g / (np.float32(np.sqrt(acc)) + eps)

    @jit
    def find_plain(table, ids, bits, out):  # kernels.find_slots without asking ahead
        for i in range(ids.shape[0]):
            b = kernels._bucket_of(table, ids[i], bits)
            out[i] = table[b, 1] if b >= 0 else -1

    rng = np.random.default_rng(3)
    values = rng.standard_normal((table_rows, DIM), dtype=np.float32)
    sums = np.full((table_rows, DIM), 0.1, dtype=np.float32)
    grad = rng.standard_normal((rows, DIM), dtype=np.float32)
    tv = torch.from_numpy(values)
    lr, eps = np.float32(-LR), np.float32(EPS)
    index = IdIndex()
    stored = np.unique(rng.integers(0, 10**12, 2_000_000))
    index.insert(stored, 0)
    found = np.empty(rows, dtype=np.int64)
    cases = {
        "adagrad step": {
            "tessera": lambda s: kernels.adagrad_rows(values, s, sums, s, grad, lr, eps,
                                                      np.float32(0)),
            "plain loop": lambda s: adagrad_plain(values, s, sums, grad, lr, eps)},
        "gather": {
            "tessera": lambda s: gather_rows(tv, s),
            "numpy take": lambda s: np.take(rows_view(tv), s),
            "torch index_select": lambda s: tv.index_select(0, torch.from_numpy(s))},
        "index lookup": {
            "tessera": lambda q: index.find(q),
            "plain loop": lambda q: find_plain(index._table, q, index._bits, found)},
    }
    out = []
    for name, systems in cases.items():
        draw = ((lambda: np.sort(rng.choice(stored, rows, replace=False)))
                if name == "index lookup" else
                (lambda: np.sort(rng.choice(table_rows, rows, replace=False)).astype(np.int64)))
        for fn in systems.values():
            fn(draw())  # compiled, warm
        times = {k: [] for k in systems}
        for _ in range(calls):
            for k, fn in systems.items():  # interleaved: the machine's phases hit each alike
                arg = draw()
                t0 = time.perf_counter()
                fn(arg)
                times[k].append(time.perf_counter() - t0)
        row = {"bench": "sparse_kernels", "kernel": name, "rows": rows,
               "table_rows": len(stored) if name == "index lookup" else table_rows,
               "calls": calls}
        us = {k: round(1e6 * statistics.median(ts), 1) for k, ts in times.items()}
        for k, t in us.items():
            row[k.replace(" ", "_") + "_us"] = t
            if k != "tessera":
                row["tessera_vs_" + k.split()[0]] = round(t / us["tessera"], 3)
        out.append(row)
        _log(f"  {name}: " + ", ".join(f"{k} {t:.0f} us" for k, t in us.items()))
    return out


# ------------------------------------------------------------------ driver


def run_iters(system, batches, servers: int, grad_pool, pids=()):
    """Run ``batches`` through ``system``; per iteration (rows, pull s, push s,
    servers' CPU s in the pull, in the push, this process's CPU s in the pull, in
    the push)."""
    from tessera.ps.embedding_ids import owner_of
    out = []
    for ids in batches:
        # The local limit's vocabulary mapping is made offline (untimed).
        local = [system.remap(ids)] if system.name == "local" else None
        c0 = _cpu_s(pids, missing_ok=True)
        p0 = time.process_time()
        t0 = time.perf_counter()
        if local is not None:
            parts = local
        else:
            owners = owner_of(ids, servers) if servers > 1 else None
            parts = [ids] if owners is None else [ids[owners == s] for s in range(servers)]
        rows = system.pull(parts)
        t1 = time.perf_counter()
        p1 = time.process_time()
        c1 = _cpu_s(pids, missing_ok=True)
        assert sum(r.shape[0] for r in rows) == len(ids)
        # Gradients are data the trainer hands over: made outside the timed phases.
        grads, at = [], 0
        for p in parts:
            grads.append(grad_pool[at:at + len(p)])
            at += len(p)
        p2 = time.process_time()
        t2 = time.perf_counter()
        system.push(parts, grads)
        t3 = time.perf_counter()
        p3 = time.process_time()
        out.append((len(ids), t1 - t0, t3 - t2, c1 - c0, _cpu_s(pids, missing_ok=True) - c1, p1 - p0, p3 - p2))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=lambda s: [int(float(x)) for x in s.split(",")],
                    default=[10_000, 50_000, 100_000], help="ids per batch before dedup")
    ap.add_argument("--servers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations per system and case")
    ap.add_argument("--iters", type=int, default=8, help="timed iterations per round")
    ap.add_argument("--rounds", type=int, default=4, help="rounds; the systems alternate")
    ap.add_argument("--systems", default="tessera,rpc,local",
                    help="subset of tessera,rpc,local")
    ap.add_argument("--tables-batch", type=int, default=2000,
                    help="ids per table per step in the several-tables case (0: skip it)")
    ap.add_argument("--kernel-calls", type=int, default=300,
                    help="calls per loop in the row-kernels case (0: skip it)")
    ap.add_argument("--timeout", type=float, default=280.0, help="hard limit for the run, s")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="cProfile Tessera's server loops into DIR/*.prof")
    ap.add_argument("--quick", action="store_true", help="smoke run: 10k ids, few iterations")
    ap.add_argument("--shm", choices=("auto", "off"), default="auto",
                    help="Tessera's payloads through shared memory, as a one-host job sends "
                         "them ([cluster] shm = \"auto\", the default), or all over TCP")
    ap.add_argument("--rpc-transport", choices=("uv", "default"), default="uv",
                    help="TensorPipe's transport for the rpc system: TCP (uv), or its "
                         "defaults (shm on one host, which busy-polls a core per process "
                         "between its turns too)")
    a = ap.parse_args(argv)
    if a.quick:
        a.batches, a.warmup, a.iters, a.rounds, a.kernel_calls = [10_000], 1, 3, 1, 20
    if a.profile:
        a.profile = _profile_dir(ap, a.profile)
    systems = [s for s in ("tessera", "rpc", "local") if s in a.systems.split(",")]
    os.environ.update(GLOO_SOCKET_IFNAME="lo", TP_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
                      OMP_NUM_THREADS="1")

    def on_alarm(signum, frame):
        raise TimeoutError(f"sparse_embedding: hard timeout of {a.timeout:.0f} s reached")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(a.timeout))
    deadline = time.monotonic() + a.timeout - 10

    import numpy as np
    import torch
    torch.set_num_threads(1)

    mpctx = mp.get_context("spawn")
    secret = secrets.token_hex(16)  # handed to each server process as an argument
    load_before = os.getloadavg()[0]
    busy0, own0, t_start = _busy_s(), _own_s(), time.monotonic()
    rpc_procs, rpc_conns, rpc_pids = [], [], []
    tessera = None
    results = []
    try:
        per_case = a.warmup + a.rounds * a.iters
        batches = {b: zipf_batches(b, per_case, seed=b) for b in a.batches}
        max_rows = max(len(ids) for bs in batches.values() for ids in bs)
        vocab = np.unique(np.concatenate([ids for bs in batches.values() for ids in bs]))
        grad_pool = torch.randn((max_rows, DIM), generator=torch.Generator().manual_seed(1))
        grad_pool.mul_(0.1)
        _log("unique ids per batch: " + ", ".join(
            f"{b}: {statistics.median(len(x) for x in bs):.0f}" for b, bs in batches.items()))
        if "rpc" in systems:
            import torch.distributed.rpc as rpc
            world = 1 + max(a.servers)
            port = _free_port()
            for r in range(1, world):
                parent, child = mpctx.Pipe()
                p = mpctx.Process(target=_rpc_server, args=(r, world, port, child,
                                                            a.rpc_transport),
                                  name=f"rpc-server-{r - 1}", daemon=True)
                p.start()
                child.close()
                rpc_procs.append(p)
                rpc_conns.append(parent)
            rpc_pids = [_recv(c, rpc_procs, deadline, "rpc server start") for c in rpc_conns]
            opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}",
                                                   rpc_timeout=120,
                                                   **_rpc_options(a.rpc_transport))
            rpc.init_rpc("worker", rank=0, world_size=world, rpc_backend_options=opts)
        for servers in a.servers:
            runners = {}
            pids = {}
            if "tessera" in systems:
                tessera = TesseraSystem(mpctx, servers, secret, a.profile, deadline,
                                        shm=a.shm == "auto")
                runners["tessera"] = tessera
                pids["tessera"] = tessera.pids
            if "rpc" in systems:
                rpc_sys = RpcSystem(servers)
                rpc_sys.reset()
                runners["rpc"] = rpc_sys
                pids["rpc"] = rpc_pids[:servers]
            if "local" in systems:
                runners["local"] = LocalSystem(vocab)
                pids["local"] = []
            for b in a.batches:
                bs = batches[b]
                timed = {k: [] for k in runners}
                for name, system in runners.items():
                    run_iters(system, bs[:a.warmup], servers, grad_pool)
                for rnd in range(a.rounds):
                    chunk = bs[a.warmup + rnd * a.iters:a.warmup + (rnd + 1) * a.iters]
                    for name, system in runners.items():
                        timed[name].extend(run_iters(system, chunk, servers, grad_pool,
                                                     pids[name]))
                row = {"bench": "sparse_embedding", "batch": b, "servers": servers,
                       "shm": a.shm, "rpc_transport": a.rpc_transport, "dim": DIM,
                       "zipf_a": ZIPF_A, "id_space": ID_SPACE,
                       "unique_rows": int(statistics.median(len(x) for x in bs)),
                       "optimizer": "adagrad", "mode": "async", "workers": 1}
                for name, its in timed.items():
                    pull = statistics.median(n / tp for n, tp, *_ in its)
                    push = statistics.median(n / tq for n, _, tq, *_ in its)
                    rows_total = sum(n for n, *_ in its)
                    row[f"{name}_pull_rows_per_s"] = round(pull)
                    row[f"{name}_push_rows_per_s"] = round(push)
                    row[f"{name}_pull_rows_per_server_per_s"] = round(pull / servers)
                    row[f"{name}_push_rows_per_server_per_s"] = round(push / servers)
                    row[f"{name}_pull_ms"] = round(1e3 * statistics.median(x[1] for x in its), 2)
                    row[f"{name}_push_ms"] = round(1e3 * statistics.median(x[2] for x in its), 2)
                    # CPU the servers spent per row (all servers together; clock-tick
                    # sampled, summed over the timed iterations): unlike wall time, it
                    # hardly depends on what else the machine runs. 1 us/row = 1M rows/s
                    # for one server on one core.
                    row[f"{name}_server_cpu_us_per_pulled_row"] = round(
                        1e6 * sum(x[3] for x in its) / rows_total, 2)
                    row[f"{name}_server_cpu_us_per_pushed_row"] = round(
                        1e6 * sum(x[4] for x in its) / rows_total, 2)
                    row[f"{name}_client_cpu_us_per_pulled_row"] = round(
                        1e6 * sum(x[5] for x in its) / rows_total, 2)
                    row[f"{name}_client_cpu_us_per_pushed_row"] = round(
                        1e6 * sum(x[6] for x in its) / rows_total, 2)
                    row[f"{name}_rows_per_s"] = round(statistics.median(
                        n / (tp + tq) for n, tp, tq, *_ in its))
                for other in ("rpc", "local"):
                    if "tessera" in timed and other in timed:
                        for phase in ("pull_", "push_", ""):
                            row[f"tessera_vs_{other}" + (f"_{phase[:-1]}" if phase else "")] = \
                                round(row[f"tessera_{phase}rows_per_s"]
                                      / row[f"{other}_{phase}rows_per_s"], 3)
                row["timed_iters"] = a.rounds * a.iters
                results.append(row)
                _log(f"  batch {b:>7,d} ({row['unique_rows']} unique), {servers} server(s): " +
                     ", ".join(f"{k} pull {row[f'{k}_pull_rows_per_s'] / 1e6:.2f}M/s push "
                               f"{row[f'{k}_push_rows_per_s'] / 1e6:.2f}M/s" for k in timed))
            if tessera is not None and a.tables_batch:
                row = tables_case(tessera, zipf_batches(a.tables_batch, 16, seed=7), servers,
                                  a.rounds, a.iters)
                results.append(row)
                _log(f"  {TABLES} tables of {row['unique_rows_per_table']} rows, {servers} "
                     f"server(s): batched {row['batched_step_ms']} ms/step, per table "
                     f"{row['per_table_step_ms']} ms/step")
            if tessera is not None:
                stats = tessera.close(deadline)
                tessera = None
                rows = [int(s.get("rows.emb", 0)) for s in stats]
                _log(f"  tessera servers: rows stored {rows}, errors "
                     f"{sum(s['errors'] for s in stats)}")
                if any(s["errors"] for s in stats):
                    raise RuntimeError(f"tessera servers refused requests: {stats}")
                if "rpc" in runners:
                    rpc_rows = runners["rpc"].rows()
                    if sum(rpc_rows) != sum(rows):
                        raise RuntimeError(f"tables differ: tessera {rows} rows, rpc {rpc_rows}")
        if a.kernel_calls and "tessera" in systems:
            _log("row kernels on rows from memory (4,100 random rows of 1.5M):")
            results.extend(kernels_case(a.kernel_calls))
    finally:
        signal.alarm(0)
        if tessera is not None:
            try:
                tessera.stop.set()
                for p in tessera.procs:
                    p.join(timeout=5)
                    if p.is_alive():
                        p.kill()
            except Exception:  # noqa: BLE001
                pass
        if rpc_procs:
            try:
                import torch.distributed.rpc as rpc
                rpc.shutdown()
            except Exception:  # noqa: BLE001
                pass
            for p in rpc_procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    wall = time.monotonic() - t_start
    foreign = max(0.0, 100.0 * ((_busy_s() - busy0) - (_own_s() - own0))
                  / (wall * (os.cpu_count() or 1)))
    for row in results:
        row.update(loadavg_1m=round(load_before, 2), foreign_cpu_pct=round(foreign, 1),
                   torch=torch.__version__, numpy=np.__version__)
        print(json.dumps(row), flush=True)
    _log(f"done in {wall:.0f} s; other processes used {foreign:.0f}% of the machine's CPU "
         f"meanwhile (load average before: {load_before:.2f})")
    return 0


if __name__ == "__main__":
    _as_launched()
    sys.exit(main())
