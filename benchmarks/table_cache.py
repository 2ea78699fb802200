"""Prefetch and the worker row cache (issue 16 item 1) against the all-local model, in
one run.

Workload (benchmarks/_table_cache_worker.py): an EmbeddingBag (sum, 64-wide rows) over
hashed ids in a 10^7-row virtual id space, bags of 16 ids drawn Zipf(1.1), batches of
512, then an MLP (64 -> 128 -> 64 -> 1) and a logistic loss; plain SGD (lr 0.05) for
rows and weights. The table is far larger than the worker holds: it lives on the
servers, and a worker keeps at most ``cache_rows`` rows.

Systems (the same batches, made before the clock starts; one torch thread each):

* ``tessera_cached``: ``tessera launch --mode hybrid --workers 1 --servers 1`` (dense
  weights on the worker, the table on the server, as PERSIA does), batches through
  ``tessera.nn.prefetching`` (step t+1's rows pulled with step t's pushes) and
  ``[model] cache_rows = 50000, cache_staleness = 4``.
* ``tessera_prefetch``: the same, prefetch without the cache.
* ``tessera_overlap``: prefetch without a cache, rows allowed one clock old
  (``[model] cache_staleness = 1``): step t+1's rows are pulled during step t, so the
  server's work for them overlaps the worker's step (they lack step t's push).
* ``tessera``: the same job, neither.
* ``local``: one plain process, ``nn.EmbeddingBag(V, 64, sparse=True)`` over the V
  distinct ids of the run (mapped beforehand, untimed, as a single-machine model
  builds its vocabulary offline) with ``torch.optim.SGD``: the local limit.

Each round runs every system once, in turn (rotated each round); samples/s is timed
inside the process over the steps after the warm-up (startup excluded). Reported: the
median over rounds, ``<system>_vs_local`` ratios of medians, each system's worker CPU
microseconds per sample (``*_cpu_us_per_sample``: the worker process only; for Tessera
the server's CPU is not included) and ``*_vs_local_cpu`` (local's CPU per sample over the
worker's: what the ratio would be with the server on a core of its own and no other load), the cache hit rate (lookups of unique ids served
by the cache), and ``foreign_cpu_pct`` (other processes' share of the machine meanwhile).
Writes ``table_cache.png`` (samples/s per round and system) next to ``--png`` if
matplotlib imports.

    .venv/bin/python benchmarks/table_cache.py             # 3 rounds, ~2-4 min
    .venv/bin/python benchmarks/table_cache.py --quick     # 1 round, fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import busy_s as _busy_s, foreign_cpu_pct, log as _log, own_s as _own_s  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "benchmarks" / "_table_cache_worker.py"
CACHE_ROWS, CACHE_STALENESS = 50_000, 4
SYSTEMS = ("tessera_cached", "tessera_overlap", "tessera_prefetch", "tessera", "local")
#: Each system's [model] table (the job file).
MODEL = {"tessera_cached": f"cache_rows = {CACHE_ROWS}\ncache_staleness = {CACHE_STALENESS}\n",
         "tessera_overlap": "cache_staleness = 1\n"}


def run_one(system: str, tmp: Path, steps: int, warmup: int, timeout: float) -> dict:
    out = tmp / f"{system}-{time.monotonic_ns()}.json"
    args = ["--steps", str(steps), "--warmup", str(warmup), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if system == "local":
        cmd = [sys.executable, str(WORKER), "--local", *args]
    else:
        job = tmp / f"{system}.toml"
        job.write_text("[model]\n" + MODEL.get(system, ""))
        cmd = [sys.executable, "-m", "tessera.cli.main", "launch", "--job", str(job),
               "--workers", "1", "--servers", "1", "--mode", "hybrid", "--quiet",
               "--out", str(tmp / f"run-{system}-{time.monotonic_ns()}"), str(WORKER),
               *args, *(["--prefetch"] if system != "tessera" else [])]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{system} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=230.0)
    ap.add_argument("--png", default="table_cache.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 80, 20
    deadline = time.monotonic() + args.timeout
    busy0, own0, t0 = _busy_s(), _own_s(), time.monotonic()
    got: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = SYSTEMS[r % len(SYSTEMS):] + SYSTEMS[:r % len(SYSTEMS)]
            for system in order:
                left = deadline - time.monotonic()
                if left < 20:
                    _log(f"round {r}: {system} skipped (the --timeout is near)")
                    continue
                res = run_one(system, Path(tmp), args.steps, args.warmup, left)
                got[system].append(res)
                _log(f"round {r}: {system} {res['samples_per_s']:.0f} samples/s")
    wall = time.monotonic() - t0
    row = {"bench": "table_cache", "id_space": 10 ** 7, "dim": 64, "batch": 512, "bag": 16,
           "zipf_a": 1.1, "cache_rows": CACHE_ROWS, "cache_staleness": CACHE_STALENESS,
           "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds}
    n = (args.steps - args.warmup) * 512
    for system, runs in got.items():
        if not runs:
            continue
        row[f"{system}_samples_per_s"] = statistics.median(x["samples_per_s"] for x in runs)
        row[f"{system}_cpu_us_per_sample"] = statistics.median(x["cpu_s"] for x in runs) / n * 1e6
        row[f"{system}_final_loss"] = runs[-1]["final_loss"]
        if "cache_hit_rate" in runs[-1] and system == "tessera_cached":
            row["cache_hit_rate"] = runs[-1]["cache_hit_rate"]
            row["cache_mb"] = runs[-1]["cache_mb"]
        row[f"{system}_rounds"] = [round(x["samples_per_s"]) for x in runs]
    local = row.get("local_samples_per_s")
    for system in SYSTEMS[:-1]:
        if local and f"{system}_samples_per_s" in row:
            row[f"{system}_vs_local"] = row[f"{system}_samples_per_s"] / local
    for system in SYSTEMS[:-1]:  # worker CPU only: the bound an idle machine could give
        if f"{system}_cpu_us_per_sample" in row and "local_cpu_us_per_sample" in row:
            row[f"{system}_vs_local_cpu"] = (row["local_cpu_us_per_sample"]
                                             / row[f"{system}_cpu_us_per_sample"])
    if "tessera_cached_samples_per_s" in row and "tessera_samples_per_s" in row:
        row["cached_vs_plain"] = row["tessera_cached_samples_per_s"] / row["tessera_samples_per_s"]
    row["foreign_cpu_pct"] = round(foreign_cpu_pct(busy0, own0, wall), 1)
    row["loadavg"] = os.getloadavg()[0]
    print(json.dumps(row), flush=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not importable: no PNG")
        return 0
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for system, runs in got.items():
        ax.plot(range(len(runs)), [x["samples_per_s"] for x in runs], marker="o", label=system)
    ax.set_xlabel("round")
    ax.set_ylabel("samples/s")
    ax.set_title("EmbeddingBag + MLP, Zipf ids in 10^7 rows")
    ax.legend()
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png)
    _log(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
