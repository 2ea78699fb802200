"""A recipe's metric collectives in the server modes, against Gloo, in one run.

A DDP script sums its metrics with ``torch.distributed`` (``all_reduce`` of a loss sum
and a correct count after an evaluation, ``all_gather_object`` of a few figures, a
``barrier``). In the server modes (sync, async, ssp) Tessera's workers form a group of
their own for that, whose collectives go through the coordinator's authenticated store
(``tessera/parallel/collectives.py``); allreduce mode and DDP use Gloo, which opens
unauthenticated sockets between the workers. Three systems, 2 workers each, the same
calls (``_collectives_worker.py``):

* ``tessera``: ``tessera launch --workers 2 --servers 1`` (sync): the store-backed group;
* ``tessera_gloo``: ``tessera launch --workers 2 --servers 0 --mode allreduce``: Gloo,
  rendezvoused through the coordinator;
* ``gloo``: the script as plain DDP would run it, ``init_process_group("gloo")`` under
  torchrun's environment (a TCPStore on loopback).

Per call kind, the median microseconds of ``--calls`` calls (worker 0's), and
``tessera_vs_gloo``: Tessera's time over plain Gloo's (above 1: slower). The systems
alternate over ``--rounds`` rounds; medians over rounds. ``foreign_cpu_pct``: the share
of the machine's CPU other processes used meanwhile.

    .venv/bin/python benchmarks/metric_collectives.py [--rounds 3] [--calls 300] [--quick]
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
from _machine import alternate, busy_s, foreign_cpu_pct, own_s  # noqa: E402
from recipe_throughput import run_pair  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_collectives_worker.py"
SYSTEMS = ("tessera", "tessera_gloo", "gloo")
KINDS = ("all_reduce_16B", "all_reduce_64KiB", "all_gather_object", "broadcast_16B", "barrier")


def measure(system: str, calls: int, warmup: int, deadline: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="tessera-collectives-") as tmp:
        out = Path(tmp) / "result.json"
        script = [str(WORKER), "--calls", str(calls), "--warmup", str(warmup), "--out", str(out)]
        launch = {"tessera": ["--servers", "1"], "tessera_gloo": ["--servers", "0", "--mode",
                                                                  "allreduce"], "gloo": None}[system]
        run_pair(script, launch, tmp, deadline)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300, help="timed calls per kind")
    ap.add_argument("--warmup", type=int, default=20, help="untimed calls before them")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    ap.add_argument("--timeout", type=float, default=300.0, help="for the whole run, s")
    ap.add_argument("--quick", action="store_true", help="smoke run: 30 calls, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.calls, args.warmup, args.rounds = 30, 5, 1
    deadline = time.monotonic() + args.timeout
    load = os.getloadavg()[0]
    t0, busy0, own0 = time.monotonic(), busy_s(), own_s()
    runs: dict[str, list[dict]] = alternate(
        SYSTEMS, args.rounds, lambda system: measure(system, args.calls, args.warmup, deadline),
        lambda got: f" ({got['backend']}): " + ", ".join(
            f"{k} {got[f'{k}_us']:.0f} us" for k in KINDS))
    foreign = round(foreign_cpu_pct(busy0, own0, time.monotonic() - t0), 1)
    for kind in KINDS:
        row = {"bench": "metric_collectives", "call": kind, "workers": 2, "calls": args.calls,
               "rounds": args.rounds}
        for system in SYSTEMS:
            row[f"{system}_backend"] = runs[system][0]["backend"]
            row[f"{system}_us"] = round(statistics.median(x[f"{kind}_us"] for x in runs[system]), 1)
        row["tessera_vs_gloo"] = round(row["tessera_us"] / row["gloo_us"], 2)
        row["tessera_vs_tessera_gloo"] = round(row["tessera_us"] / row["tessera_gloo_us"], 2)
        row.update(loadavg_1m=round(load, 2), foreign_cpu_pct=foreign)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
