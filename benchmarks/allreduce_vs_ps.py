"""The same model under every data-parallel mode, against plain DDP, in one run.

samples/s of examples/mnist.toml's CNN with 2 workers, batch 32 per worker, under
``--mode allreduce`` (DDP over Gloo inside Tessera's launcher), ``sync`` and
``async`` parameter servers (2 servers), and plain DistributedDataParallel over
Gloo with 2 processes started by this script (``benchmarks/train_throughput.py``'s
DDP runner).

Every system is treated alike:

- each runs ``--warmup + --steps`` steps, and every figure is the whole training
  loop's rate (start-up excluded, the warm-up steps included), for Tessera from
  ``summary.json`` (every worker's samples over the slowest worker's training
  time, so async's workers each count as they ran; training time leaves out the
  periodic evaluation, and in sync and allreduce modes the other worker's wait
  for it, since DDP's loop evaluates nothing), for DDP from its own
  barrier-to-barrier loop with no untimed steps;
- the systems alternate: ``--rounds`` rounds, each running all four once, in an
  order rotated by one per round, so that neither a busy phase of the machine nor
  being first (cold caches, page cache of the dataset) favours one of them;
- the fields are medians over the rounds, each round's values listed too, with
  the share of the machine's CPU other processes used meanwhile
  (``foreign_cpu_pct``).

    .venv/bin/python benchmarks/allreduce_vs_ps.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput  # noqa: E402  (the Tessera and DDP runners live there)
from _machine import alternate, busy_s, foreign_cpu_pct, own_s  # noqa: E402

SYSTEMS = ("allreduce", "sync", "async", "ddp")


def measure(system: str, steps: int, batch: int, deadline: float) -> float:
    if system == "ddp":
        return train_throughput.run_ddp(steps, 0, batch, deadline)["samples_per_s"]
    servers = 0 if system == "allreduce" else 2
    return train_throughput.run_tessera(steps, 0, batch, deadline, mode=system,
                                        servers=servers)["samples_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="timed steps after the warm-up")
    ap.add_argument("--warmup", type=int, default=20, help="steps before them, timed alike")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    ap.add_argument("--timeout", type=float, default=1500.0, help="for the whole run, s")
    ap.add_argument("--quick", action="store_true", help="smoke run: 30 steps, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = 30, 0, 1
    steps, batch = args.warmup + args.steps, 32
    deadline = time.monotonic() + args.timeout
    load = os.getloadavg()[0]
    t0, busy0, own0 = time.monotonic(), busy_s(), own_s()
    rates: dict[str, list[float]] = alternate(
        SYSTEMS, args.rounds, lambda system: round(measure(system, steps, batch, deadline), 1),
        lambda rate: f": {rate:.0f} samples/s")
    row = {"bench": "allreduce_vs_ps", "workers": 2, "batch_size": batch, "steps": steps,
           "rounds": args.rounds}
    for system in SYSTEMS:
        key = "ddp" if system == "ddp" else f"tessera_{system}"
        row[f"{key}_samples_per_s"] = round(statistics.median(rates[system]), 1)
        row[f"{key}_rounds"] = rates[system]
    for mode in SYSTEMS[:3]:
        row[f"{mode}_vs_ddp"] = round(row[f"tessera_{mode}_samples_per_s"]
                                      / row["ddp_samples_per_s"], 3)
    row.update(loadavg_1m=round(load, 2),
               foreign_cpu_pct=round(foreign_cpu_pct(busy0, own0, time.monotonic() - t0), 1))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
