"""Delta checkpoints against full ones on a followed click stream, in one run.

The same stream (click-log shards with the Zipf ids of ``tessera.data.clicks``, all
written before the jobs start, ``_END`` last) is trained twice, 2 workers x 2 servers
sync, checkpointing every ``--every`` steps: once with ``[checkpoint] delta_every = 5``
(every 5th checkpoint full, the others only the table rows touched since the previous
one), once with every checkpoint full. Then the last checkpoint of each is read back as
``tessera export`` reads it (the delta one through its chain), alternately, ``--rounds``
times. One JSON line: bytes of each checkpoint at the same clocks, ``delta_vs_full``
(bytes of the delta checkpoints over the full ones at the same clocks), the export times,
both runs' samples/s, and the machine's load (``foreign_cpu_pct``).

    .venv/bin/python benchmarks/delta_checkpoint.py [--shards 24] [--quick]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_s, foreign_cpu_pct, log, own_s  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JOB = """
name = "{name}"
[model]
embedding_optimizer = "adagrad"
embedding_lr = 0.05
[data]
dataset = "clicks"
path = "{data}"
follow = true
follow_poll_s = 0.1
batch_size = 512
id_space = 100000000
[train]
eval_every = 100000
log_every = 50
[ps]
mode = "sync"
[cluster]
workers = 2
servers = 2
[checkpoint]
every = {every}
delta_every = {delta_every}
keep = 1000
"""


def train(tmp: Path, data: Path, name: str, every: int, delta_every: int) -> dict:
    job = tmp / f"{name}.toml"
    job.write_text(JOB.format(name=name, data=data, every=every, delta_every=delta_every))
    out = tmp / name
    proc = subprocess.run([sys.executable, "-m", "tessera.cli.main", "run", str(job), "--quiet",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return {"out": out, "summary": json.loads((out / "summary.json").read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=24, help="shards of 8192 samples")
    ap.add_argument("--every", type=int, default=16, help="checkpoint every N steps")
    ap.add_argument("--rounds", type=int, default=3, help="alternating export rounds")
    ap.add_argument("--quick", action="store_true", help="smoke run: 6 shards")
    args = ap.parse_args()
    if args.quick:
        args.shards, args.rounds = 6, 1
    from tessera.data.stream import produce_clicks
    from tessera.ps.checkpoint import CheckpointStore
    from tessera.ps.export import checkpoint_state
    t0, busy0, own0 = time.monotonic(), busy_s(), own_s()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        produce_clicks(str(data), shards=args.shards, size=8192, end=True)
        runs = {}
        for name, delta_every in (("delta", 5), ("full", 0)):
            log(f"training {name}")
            runs[name] = train(tmp, data, name, args.every, delta_every)
        stores = {k: CheckpointStore(str(v["out"] / "checkpoints")) for k, v in runs.items()}
        clocks = stores["delta"].clocks()[0]
        assert clocks == stores["full"].clocks()[0], (clocks, stores["full"].clocks()[0])
        kinds = ["delta" if stores["delta"].manifest(c).get("delta") else "full" for c in clocks]
        size = {k: [stores[k].manifest(c)["bytes"] for c in clocks] for k in stores}
        at_deltas = [(d, f) for d, f, kind in zip(size["delta"], size["full"], kinds)
                     if kind == "delta"]
        export_s: dict[str, list[float]] = {"delta": [], "full": []}
        for r in range(args.rounds):
            for name in (("delta", "full") if r % 2 == 0 else ("full", "delta")):
                t = time.perf_counter()
                state, manifest = checkpoint_state(str(runs[name]["out"]))
                export_s[name].append(round(time.perf_counter() - t, 3))
                log(f"export {name} clock {manifest['clock']}: {export_s[name][-1]} s")
        a, _ = checkpoint_state(str(runs["delta"]["out"]))
        b, _ = checkpoint_state(str(runs["full"]["out"]))
        identical = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    row = {"bench": "delta_checkpoint", "shards": args.shards, "samples": args.shards * 8192,
           "every": args.every, "delta_every": 5, "clocks": clocks, "kinds": kinds,
           "bytes_delta_run": size["delta"], "bytes_full_run": size["full"],
           "delta_vs_full": round(sum(d for d, _ in at_deltas) / sum(f for _, f in at_deltas), 3)
           if at_deltas else None,
           "run_bytes_delta_vs_full": round(sum(size["delta"]) / sum(size["full"]), 3),
           "export_s_delta_chain": statistics.median(export_s["delta"]),
           "export_s_full": statistics.median(export_s["full"]),
           "export_rounds": export_s, "exports_identical": identical,
           "samples_per_s_delta_run": round(runs["delta"]["summary"]["samples_per_s"], 1),
           "samples_per_s_full_run": round(runs["full"]["summary"]["samples_per_s"], 1),
           "rows_at_end": sum(runs["full"]["summary"]["rows_per_server"]["weights"]),
           "loadavg_1m": round(load, 2),
           "foreign_cpu_pct": round(foreign_cpu_pct(busy0, own0, time.monotonic() - t0), 1)}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
