"""Profiler overhead: step time of the same job with and without --profile, same run.

Runs ``tessera run examples/mnist.toml`` (2 workers, 2 servers, sync) alternately
without and with ``--profile`` (``rounds`` times each, alternating so that drift
on a shared machine hits both alike) and compares the median step time, taken
from each run's summary.json (``wall_s / steps``, training loop only). Target:
overhead <= 3%.

    .venv/bin/python benchmarks/profiler_overhead.py [--quick] [--job examples/mnist.toml]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step_ms(job: str, steps: int, profile: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "tessera.cli.main", "run", job, "--steps", str(steps),
               "--quiet", "--out", str(out)] + (["--profile"] if profile else [])
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
        s = json.loads((out / "summary.json").read_text())
        return s["wall_s"] / s["steps"] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default=str(ROOT / "examples" / "mnist.toml"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps, rounds = (30, 1) if args.quick else (args.steps, args.rounds)
    off, on = [], []
    for _ in range(rounds):
        off.append(step_ms(args.job, steps, False))
        on.append(step_ms(args.job, steps, True))
    off_ms, on_ms = statistics.median(off), statistics.median(on)
    print(json.dumps({"bench": "profiler_overhead", "job": Path(args.job).name, "steps": steps,
                      "rounds": rounds, "off_step_ms": round(off_ms, 3),
                      "profile_step_ms": round(on_ms, 3),
                      "overhead": round(on_ms / off_ms - 1, 4),
                      "off_runs_ms": [round(x, 3) for x in off],
                      "profile_runs_ms": [round(x, 3) for x in on]}), flush=True)


if __name__ == "__main__":
    main()
