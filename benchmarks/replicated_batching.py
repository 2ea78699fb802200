"""Batching of small partitions in sync mode with ``--replication 2``: batched against one
push per partition (``--batch-kib 0``, what sync + replication was limited to before),
rounds interleaved.

Each case is ``tessera run examples/digits.toml --quiet --mode sync --replication 2
--partition-mb 0.004`` (17 partitions of 4 KiB over 2 servers), with the default
``batch_kib`` or ``--batch-kib 0``. Each round runs both, in turn. Reported per case:
``wall_s`` (``summary.json``, the training loop), the CPU milliseconds per step of its
servers and workers between 10 % and 90 % of the steps (``cpu_ms_per_step``, sampled
from ``/proc``: steadier than wall time on a shared machine; as
``benchmarks/replication_cost.py``), the messages the servers took off their sockets
(``server_messages``, counted by the endpoint: the workers' requests and the
replication traffic), and the batched case's ratios to the unbatched one
(``vs_unbatched``). ``foreign_cpu_pct``: the share of the machine's CPU other processes
used meanwhile; ``loadavg``: the 1-minute load average before and after.

    .venv/bin/python benchmarks/replicated_batching.py --epochs 40 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_s, foreign_cpu_pct, own_s  # noqa: E402
from replication_cost import run  # noqa: E402

SMALL = ["--servers", "2", "--replication", "2", "--partition-mb", "0.004"]
CASES = {"batched": SMALL, "unbatched": [*SMALL, "--batch-kib", "0"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40, help="40: 880 steps")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    walls: dict[str, list[float]] = {k: [] for k in CASES}
    cpus: dict[str, list[float]] = {k: [] for k in CASES}
    msgs: dict[str, list[int]] = {k: [] for k in CASES}
    load0 = os.getloadavg()[0]
    busy0, own0, t0 = busy_s(), own_s(), time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, flags in CASES.items():
                out = Path(tmp) / f"{r}-{name}"
                wall, cpu = run("sync", args.epochs, flags, out)
                summary = json.loads((out / "summary.json").read_text())
                walls[name].append(wall)
                cpus[name].append(cpu)
                msgs[name].append(sum(summary["server_messages"]))
                print(f"round {r + 1}: {name}: {wall:.1f} s, {cpu:.2f} CPU ms/step, "
                      f"{msgs[name][-1]} messages, load {os.getloadavg()[0]:.1f}",
                      file=sys.stderr, flush=True)
    foreign = round(foreign_cpu_pct(busy0, own0, time.monotonic() - t0), 1)
    load = [round(load0, 1), round(os.getloadavg()[0], 1)]
    med = {k: statistics.median(v) for k, v in walls.items()}
    cmed = {k: statistics.median(v) for k, v in cpus.items()}
    mmed = {k: statistics.median(v) for k, v in msgs.items()}
    for name in CASES:
        print(json.dumps({"case": name, "mode": "sync", "replication": 2,
                          "epochs": args.epochs,
                          "wall_s": [round(w, 2) for w in walls[name]],
                          "median_s": round(med[name], 2),
                          "cpu_ms_per_step": [round(c, 2) for c in cpus[name]],
                          "server_messages": msgs[name],
                          **({"vs_unbatched": {
                              "wall": round(med[name] / med["unbatched"], 2),
                              "cpu": round(cmed[name] / cmed["unbatched"], 2),
                              "messages": round(mmed[name] / mmed["unbatched"], 2)}}
                             if name == "batched" else {}),
                          "foreign_cpu_pct": foreign, "loadavg": load}))


if __name__ == "__main__":
    main()
