"""Run every benchmark, one after another, and regenerate benchmarks/README.md's results.

This is what `make bench` runs. Each benchmark's JSON lines (stdout) go to
`OUT/<name>.jsonl` and its progress (stderr) to `OUT/<name>.log`; `OUT/index.json` records,
per benchmark, the command, exit code, wall time, the commit and the machine's load. A
benchmark that fails is recorded and the next one runs. At the end `report.py` turns the
JSON lines into the tables between the results markers of `benchmarks/README.md`.

The sizes here are the ones the README's tables are made with: the whole set takes 45-90
minutes on a quiet 2-core machine (88 on a 2-core AVX2 EPYC, 2026-12-06). Longer runs of
single benchmarks (`faults.py --trials 20`, `table_memory.py --seconds 1500`) are written
up in `benchmarks/HISTORY.md`.

    .venv/bin/python benchmarks/run_all.py                      # everything, then the report
    .venv/bin/python benchmarks/run_all.py --only ps_roundtrip,startup
    .venv/bin/python benchmarks/run_all.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: name -> the script and its arguments (``{out}`` is the output directory)
BENCHES: dict[str, list[str]] = {
    "startup": ["startup.py"],
    "ps_roundtrip": ["ps_roundtrip.py"],
    "shm_roundtrip": ["shm_roundtrip.py"],
    "server_load": ["server_load.py", "--seconds", "20"],
    "server_costs": ["server_load.py", "--seconds", "10", "--systems", "tessera_costs,zmq"],
    "sparse_embedding": ["sparse_embedding.py"],
    "train_throughput": ["train_throughput.py"],
    "precision": ["precision.py"],
    "profiler_overhead": ["profiler_overhead.py"],
    "allreduce_vs_ps": ["allreduce_vs_ps.py"],
    "recipe_throughput": ["recipe_throughput.py", "--steps", "600"],
    "metric_collectives": ["metric_collectives.py"],
    "stragglers": ["stragglers.py", "--steps", "600"],
    "stragglers_transient": ["stragglers.py", "--transient", "0.25"],
    "pipeline": ["pipeline.py"],
    "lm_shakespeare": ["lm_shakespeare.py"],
    "table_cache": ["table_cache.py", "--rounds", "5", "--timeout", "900", "--png",
                    "{out}/table_cache.png"],
    "elastic": ["elastic.py"],
    "replication_cost": ["replication_cost.py", "--epochs", "80", "--rounds", "5", "--mode",
                         "sync,async"],
    "replicated_batching": ["replicated_batching.py"],
    "delta_checkpoint": ["delta_checkpoint.py"],
    "movielens_seeds": ["movielens_seeds.py"],
    "faults": ["faults.py", "--trials", "5", "--seed", "7"],
    "table_memory": ["table_memory.py", "--seconds", "360", "--clicks"],
}


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "tessera", "benchmarks/*.py", "examples"], cwd=ROOT,
                               text=True, capture_output=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (sha + ("+dirty" if dirty.strip() else "")) or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="output directory")
    ap.add_argument("--only", default="", help="comma-separated names (see --list)")
    ap.add_argument("--skip", default="", help="comma-separated names to leave out")
    ap.add_argument("--list", action="store_true", help="print the names and commands")
    ap.add_argument("--no-report", action="store_true", help="do not rewrite README.md")
    args = ap.parse_args()
    if args.list:
        for name, argv in BENCHES.items():
            print(f"{name:22s} {' '.join(argv)}")
        return 0
    only = [n for n in args.only.split(",") if n]
    skip = [n for n in args.skip.split(",") if n]
    unknown = [n for n in only + skip if n not in BENCHES]
    if unknown:
        print(f"run_all.py: unknown benchmark {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    failed = []
    commit = _commit()  # the code measured: tessera/, the benchmarks and the examples
    for name, argv in BENCHES.items():
        if (only and name not in only) or name in skip:
            continue
        cmd = [sys.executable, str(HERE / argv[0])] + [a.format(out=out) for a in argv[1:]]
        print(f"[bench] {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
        load0 = os.getloadavg()[0]
        t0 = time.monotonic()
        with open(out / f"{name}.jsonl", "w") as so, open(out / f"{name}.log", "w") as se:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=so, stderr=se).returncode
        wall = time.monotonic() - t0
        index[name] = {"argv": argv, "rc": rc, "wall_s": round(wall, 1), "commit": commit,
                       "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                       "loadavg_1m_before": round(load0, 2)}
        index_path.write_text(json.dumps(index, indent=1) + "\n")
        print(f"[bench] {name}: exit {rc}, {wall:.0f} s", file=sys.stderr, flush=True)
        if rc != 0:
            failed.append(name)
    if not args.no_report:
        subprocess.run([sys.executable, str(HERE / "report.py"), "--out", str(out)], cwd=ROOT)
    if failed:
        print(f"[bench] failed: {', '.join(failed)} (see {out}/<name>.log)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
