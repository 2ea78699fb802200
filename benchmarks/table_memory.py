"""Table memory that stays bounded: a stream of up to 10^8 distinct ids through a real
server under a byte cap, against the same stream into an unbounded table.

Two real :class:`tessera.ps.server.ParameterServer` processes, each holding one
table (``dim`` 16, Adagrad, ``admit_after = 2``): ``capped`` with ``memory_bytes`` =
``--cap-mb`` (``eviction`` LFU with decay, by default) and ``unbounded`` (no cap,
exact admission counts: today's behaviour without ``max_rows``). Every batch is
65,536 ids: half one-off ids never seen before, half Zipf(1.1) draws over 10^6 hot
ids; the driver pulls the rows of the batch's unique ids and pushes a gradient for
them, to one server then the other (the order alternates). The unbounded server
leaves the run once its RSS passes ``--unbounded-limit`` x the cap (it would go on
growing); the capped one takes the whole stream, up to ``--distinct`` distinct ids
or ``--seconds`` of streaming, whichever comes first.

Memory is measured from the processes, not from counts the table keeps:

* each server samples its own RSS (``/proc/self/statm``) and row count every 0.25 s;
* ``peak_rss_mb`` is the kernel's high-water mark (``VmHWM``), so no spike between
  samples is missed;
* ``base_rss_mb`` is the server's RSS before its ParameterServer and table are built
  (interpreter, torch, zmq, the compiled row kernels a job's fork server loads before it
  forks a server); ``table_rss_mb = peak - base`` is what the server, its
  table and its traffic took, and ``over_cap_pct`` compares it with the cap.

JSON lines: ``table_memory`` (memory, rows, rates and the CPU each server spent per
id, ``capped_vs_unbounded_cpu_per_id``), then with ``--clicks`` a ``table_memory_auc``
line: examples/clicks.toml's eval AUC with the cap (``--clicks-cap-mb`` per server,
LFU, admit_after 2) and without one (same seed, same data). A PNG memory curve is
written next to the JSON (``--out``, default ``benchmarks/table_memory.png``).

    .venv/bin/python benchmarks/table_memory.py                       # ~10 min
    .venv/bin/python benchmarks/table_memory.py --distinct 2e7 --seconds 120
    .venv/bin/python benchmarks/table_memory.py --clicks              # + AUC (~10 min more)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import busy_s, cpu_s, foreign_cpu_pct, log, own_s, recv, watch_parent  # noqa: E402
from _machine import as_launched  # noqa: E402

DIM = 16
BATCH = 65_536
HOT = 1_000_000
ZIPF_A = 1.1
PAGE = os.sysconf("SC_PAGE_SIZE")
#: One-off ids: 2^62 + a bijection of a counter mod 2^62 (never a hot id, never twice).
_FRESH_BASE, _FRESH_MUL = 1 << 62, 0x9E3779B97F4A7C15


def _rss(pid="self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _hwm(pid="self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _server(name: str, secret: str, conn, stop, spec_kw: dict) -> None:
    """A real ParameterServer with one table; samples its RSS and rows until stopped."""
    watch_parent()
    try:
        import torch
        import zmq

        from tessera.config.schema import OptimizerConfig
        from tessera.ps.server import ParameterServer, ServerHooks, ServerOptions
        from tessera.transport.endpoint import ServerEndpoint, close_context
        from tessera.transport.wire import TableSpec

        torch.set_num_threads(1)
        ctx = zmq.Context()
        spec = TableSpec(name="emb", dim=DIM, num_embeddings=None,
                         optimizer=OptimizerConfig(name="adagrad", lr=0.05), **spec_kw)
        from tessera.ps import kernels
        kernels.warm()  # loaded before the fork, as a job's fork server does
        base = _rss()  # before the server and its table exist
        endpoint = ServerEndpoint(ctx, "127.0.0.1", secret)
        server = ParameterServer(ServerOptions(rank=0, num_workers=1, mode="async"),
                                 endpoint=endpoint, partitions=[],
                                 optimizer=OptimizerConfig(name="sgd", lr=0.05),
                                 tables=[spec], hooks=ServerHooks(should_stop=stop.is_set))
        shard = server.tables.tables["emb"].shard
        samples, done = [], threading.Event()

        def sample() -> None:
            while not done.wait(0.25):
                samples.append((time.monotonic(), _rss(), shard.num_rows))

        conn.send((endpoint.address, base))
        threading.Thread(target=sample, daemon=True).start()
        server.serve()
        done.set()
        stats = {"samples": samples, "base_rss": base, "hwm": _hwm(), "rows": shard.num_rows,
                 "evictions": shard.evictions, "nbytes": shard.nbytes,
                 "capacity_rows": shard.capacity.rows if shard.capacity else None}
        endpoint.close()
        close_context(ctx)
        conn.send(("stats", stats))
    except BaseException:  # noqa: BLE001 - the driver shows it
        conn.send(("error", f"{name}: " + traceback.format_exc()))
        raise


class Server:
    def __init__(self, mpctx, name: str, spec_kw: dict, deadline: float):
        import zmq

        from tessera.ps.client import PSClient
        from tessera.ps.sharding import ShardMap

        secret = secrets.token_hex(16)
        self.name, self.stop = name, mpctx.Event()
        self.conn, child = mpctx.Pipe()
        self.proc = mpctx.Process(target=_server, args=(name, secret, child, self.stop, spec_kw),
                                  name=f"table-{name}", daemon=True)
        self.proc.start()
        child.close()
        address, self.base_rss = recv(self.conn, [self.proc], deadline, f"{name} start")
        self.ctx = zmq.Context()
        self.client = PSClient(ctx=self.ctx, shard_map=ShardMap(layout=(), partitions=(),
                                                                num_servers=1),
                               server_addresses=[address], secret=secret, worker=0,
                               timeout_s=120.0)
        self.client.connect()
        self.clock, self.ids = 0, 0
        self.open = True

    def step(self, ids, grads) -> None:
        self.client.pull_rows("emb", 0, ids, self.clock).wait()
        self.client.push_rows("emb", 0, ids, grads[:len(ids)], self.clock).wait()
        self.clock += 1
        self.ids += len(ids)

    def cpu(self) -> float:
        return cpu_s([self.proc.pid], missing_ok=True)

    def close(self, deadline: float) -> dict:
        self.client.close()
        self.stop.set()
        stats = recv(self.conn, [self.proc], deadline, f"{self.name} stop")[1]
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
        self.ctx.destroy(linger=0)
        self.open = False
        return stats


def stream(args, deadline: float) -> tuple[dict, dict]:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    mpctx = mp.get_context("spawn")
    cap = int(args.cap_mb * (1 << 20))
    capped = Server(mpctx, "capped", dict(memory_bytes=cap, admit_after=2,
                                          eviction=args.eviction,
                                          lfu_half_life=args.half_life), deadline)
    unbounded = Server(mpctx, "unbounded", dict(admit_after=2), deadline)
    servers = [capped, unbounded]
    rng = np.random.default_rng(0)
    grads = torch.full((BATCH, DIM), 0.01)
    hot_seen = np.zeros(HOT, dtype=bool)
    fresh, distinct, marks, cpu = 0, 0, [], {s.name: 0.0 for s in servers}
    ub_stop = None
    load, t0, busy0, own0 = os.getloadavg()[0], time.monotonic(), busy_s(), own_s()
    cpu0 = {s.name: s.cpu() for s in servers}  # (the servers are this benchmark's too)
    step = 0
    while distinct < args.distinct and time.monotonic() - t0 < args.seconds:
        half = BATCH // 2
        z = rng.zipf(ZIPF_A, size=2 * half)
        hot = z[z <= HOT][:half] - 1
        hot_seen[hot] = True
        with np.errstate(over="ignore"):
            one = ((np.arange(fresh, fresh + half, dtype=np.uint64) * np.uint64(_FRESH_MUL))
                   & np.uint64((1 << 62) - 1)).astype(np.int64) + _FRESH_BASE
        fresh += half
        ids = np.unique(np.concatenate([hot.astype(np.int64), one]))
        order = servers if step % 2 == 0 else servers[::-1]
        for s in order:
            if not s.open:
                continue
            c0 = s.cpu()
            s.step(ids, grads)
            cpu[s.name] += s.cpu() - c0
        step += 1
        distinct = fresh + int(hot_seen.sum()) if step % 16 == 0 else fresh + HOT // 2
        marks.append((time.monotonic(), fresh))
        if unbounded.open and _rss(unbounded.proc.pid) > unbounded.base_rss + \
                args.unbounded_limit * cap:
            ub_stop = {"distinct_ids": fresh + int(hot_seen.sum()), "ids": unbounded.ids,
                       "rss_mb": _rss(unbounded.proc.pid) / 2**20}
            stats_ub = unbounded.close(deadline)
            log(f"unbounded server left at {ub_stop['distinct_ids']:,} distinct ids, "
                f"RSS {ub_stop['rss_mb']:.0f} MB")
        if step % 100 == 0:
            log(f"{fresh + int(hot_seen.sum()):,} distinct ids, capped RSS "
                f"{_rss(capped.proc.pid) / 2**20:.0f} MB")
    wall = time.monotonic() - t0
    distinct = fresh + int(hot_seen.sum())
    # own_s() counts a server only once it is joined, and then its whole life: add the
    # running ones' CPU since t0, take out the joined ones' CPU before it.
    live = sum(s.cpu() - cpu0[s.name] for s in servers if s.open)
    joined_before = sum(cpu0[s.name] for s in servers if not s.open)
    foreign = foreign_cpu_pct(busy0, own0 - live + joined_before, wall)
    stats = capped.close(deadline)
    if unbounded.open:
        stats_ub = unbounded.close(deadline)
    table_rss = stats["hwm"] - stats["base_rss"]
    row = {
        "bench": "table_memory", "cap_mb": args.cap_mb, "eviction": args.eviction,
        "lfu_half_life": args.half_life, "admit_after": 2, "dim": DIM, "batch": BATCH,
        "distinct_ids": distinct, "lookups": capped.ids, "steps": step,
        "stream_s": round(wall, 1),
        "ids_per_s": round(capped.ids / wall), "distinct_ids_per_s": round(distinct / wall),
        "base_rss_mb": round(stats["base_rss"] / 2**20, 1),
        "peak_rss_mb": round(stats["hwm"] / 2**20, 1),
        "table_rss_mb": round(table_rss / 2**20, 1),
        "over_cap_pct": round(100 * (table_rss / cap - 1), 2),
        "storage_mb": round(stats["nbytes"] / 2**20, 2),
        "capacity_rows": stats["capacity_rows"], "final_rows": stats["rows"],
        "evictions": stats["evictions"],
        "capped_cpu_us_per_id": round(1e6 * cpu["capped"] / max(capped.ids, 1), 2),
        "unbounded_cpu_us_per_id": round(1e6 * cpu["unbounded"] / max(unbounded.ids, 1), 2),
        "unbounded_ids": unbounded.ids,
        "unbounded_peak_rss_mb": round(stats_ub["hwm"] / 2**20, 1),
        "unbounded_rows": stats_ub["rows"],
        "unbounded_left_at": ub_stop,
        "loadavg_1m": round(load, 2), "foreign_cpu_pct": round(foreign, 1),
    }
    row["capped_vs_unbounded_cpu_per_id"] = round(
        row["capped_cpu_us_per_id"] / max(row["unbounded_cpu_us_per_id"], 1e-9), 3)
    if unbounded.ids:  # bytes per distinct id the unbounded table grew by
        ub_table = stats_ub["hwm"] - stats_ub["base_rss"]
        ub_distinct = (ub_stop or {}).get("distinct_ids", distinct)
        row["unbounded_bytes_per_distinct_id"] = round(ub_table / max(ub_distinct, 1), 1)
        row["unbounded_projected_gb_at_1e8"] = round(
            row["unbounded_bytes_per_distinct_id"] * 1e8 / 2**30, 2)
    curves = {"capped": stats["samples"], "unbounded": stats_ub["samples"], "marks": marks,
              "base": {"capped": stats["base_rss"], "unbounded": stats_ub["base_rss"]},
              "cap": cap}
    return row, curves


def plot(curves: dict, row: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        log("matplotlib is not installed: no PNG")
        return False
    marks = np.array(curves["marks"], dtype=np.float64).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax2 = ax.twinx()
    for name, color in (("capped", "tab:blue"), ("unbounded", "tab:red")):
        s = np.array(curves[name], dtype=np.float64).reshape(-1, 3)
        if not len(s) or not len(marks):
            continue
        # Distinct one-off ids streamed by each sample's time (the hot set adds <= 10^6).
        x = np.interp(s[:, 0], marks[:, 0], marks[:, 1]) / 1e6
        ax.plot(x, (s[:, 1] - curves["base"][name]) / 2**20, color=color,
                label=f"{name}: RSS - RSS before the table")
        ax2.plot(x, s[:, 2] / 1e6, color=color, linestyle=":", label=f"{name}: rows")
    cap = curves["cap"] / 2**20
    ax.axhline(cap, color="black", linewidth=0.8, label=f"cap {cap:.0f} MiB")
    ax.axhline(1.05 * cap, color="black", linestyle="--", linewidth=0.8, label="cap + 5%")
    ax.set_xlabel("one-off ids streamed (millions)")
    ax.set_ylabel("table memory, MiB (from the process RSS)")
    ax2.set_ylabel("rows stored (millions)")
    ax.set_ylim(0, max(2.2 * cap, ax.get_ylim()[1]))
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    ax.set_title(f"table_memory: {row['distinct_ids'] / 1e6:.0f}M distinct ids, "
                 f"peak {row['over_cap_pct']:+.1f}% vs cap, {row['eviction']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def clicks(args) -> dict:
    """examples/clicks.toml with and without the cap: eval AUC, same seed and data."""
    base = (ROOT / "examples" / "clicks.toml").read_text()
    base = base.replace("max_rows_per_server = 600000", "max_rows_per_server = 0")
    capped = base.replace("max_rows_per_server = 0",
                          f"table_memory_mb = {args.clicks_cap_mb}\neviction = \"lfu\"\n"
                          f"lfu_half_life = {args.half_life}\nadmit_after = 2")
    out = {"bench": "table_memory_auc", "job": "examples/clicks.toml",
           "cap_mb_per_server": args.clicks_cap_mb, "eviction": "lfu", "admit_after": 2}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("unbounded", base), ("capped", capped)):
            job = Path(tmp) / f"{name}.toml"
            job.write_text(text)
            run = Path(tmp) / f"run-{name}"
            log(f"clicks job, {name} table")
            subprocess.run([sys.executable, "-m", "tessera.cli.main", "run", str(job), "--out",
                            str(run), "--quiet"], env=env, check=True, timeout=1800,
                           stdout=subprocess.DEVNULL)
            s = json.loads((run / "summary.json").read_text())
            out[f"{name}_auc"] = round(s["eval_auc"], 5)
            out[f"{name}_rows_per_server"] = s["rows_per_server"]["weights"]
            out[f"{name}_table_bytes_per_server"] = s["table_bytes_per_server"]["weights"]
            out["reference_auc"] = round(s["reference_auc"], 5)
            if name == "capped":
                out["capped_evictions_per_server"] = s["table_evictions_per_server"]["weights"]
    out["auc_gap"] = round(out["unbounded_auc"] - out["capped_auc"], 5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cap-mb", type=float, default=256)
    ap.add_argument("--eviction", choices=["lru", "lfu"], default="lfu")
    ap.add_argument("--half-life", type=int, default=1000,
                    help="lfu: clocks over which lookup counts halve")
    ap.add_argument("--distinct", type=float, default=1e8)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--unbounded-limit", type=float, default=2.0,
                    help="the unbounded server leaves at this many times the cap")
    ap.add_argument("--clicks", action="store_true", help="also the clicks AUC comparison")
    ap.add_argument("--clicks-cap-mb", type=float, default=8)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "table_memory"))
    args = ap.parse_args()
    deadline = time.monotonic() + args.seconds + 600
    row, curves = stream(args, deadline)
    out = Path(args.out)
    row["png"] = str(out.with_suffix(".png")) if plot(curves, row, out.with_suffix(".png")) \
        else None
    print(json.dumps(row), flush=True)
    out.with_suffix(".json").write_text(json.dumps(row) + "\n")
    if args.clicks:
        auc = clicks(args)
        print(json.dumps(auc), flush=True)
        with out.with_suffix(".json").open("a") as f:
            f.write(json.dumps(auc) + "\n")


if __name__ == "__main__":
    as_launched()
    main()
