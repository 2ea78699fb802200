"""What ``--replication 2`` costs: digits jobs with and without it, rounds interleaved.

Cases (each ``tessera run examples/digits.toml --quiet``, same steps and mode):

* ``2 servers``: the unreplicated run (the issue's reference);
* ``2 servers --replication 2``: the same servers, each also the other's backup
  (replication's own cost);
* ``3 servers``: unreplicated, the issue's server count (what a third server process
  costs by itself: on a 2-core machine, more than a little);
* ``3 servers --replication 2``: the issue's configuration (replication plus a third
  server process).

Each round runs every case once, in turn, so that a busy phase of the machine hits
them alike; the figure is each case's median ``wall_s`` from ``summary.json`` (the
training loop, without start-up), its ratio to the unreplicated 2-server run
(``vs_unreplicated``, the issue's measure) and, for a replicated case, to the
unreplicated run on as many servers (``vs_same_servers``: replication's own cost).

Output: one JSON object per line and case on stdout; progress on stderr.

    .venv/bin/python benchmarks/replication_cost.py --mode sync --epochs 150 --rounds 3
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
CASES = {"2 servers": ["--servers", "2"],
         "2 servers --replication 2": ["--servers", "2", "--replication", "2"],
         "3 servers": ["--servers", "3"],
         "3 servers --replication 2": ["--servers", "3", "--replication", "2"]}


def run(mode: str, epochs: int, flags: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "tessera.cli.main", "run", str(ROOT / "examples" / "digits.toml"),
           "--out", str(out), "--quiet", "--mode", mode, "--epochs", str(epochs), *flags]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}")
    return float(json.loads((out / "summary.json").read_text())["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="sync", choices=["sync", "async", "ssp"])
    parser.add_argument("--epochs", type=int, default=150, help="150: 3,300 steps")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, flags in CASES.items():
                wall = run(args.mode, args.epochs, flags, Path(tmp) / f"{r}-{len(times[name])}"
                           f"-{name.replace(' ', '_')}")
                times[name].append(wall)
                print(f"round {r + 1}: {name}: {wall:.1f} s", file=sys.stderr, flush=True)
    base = statistics.median(times["2 servers"])
    for name, walls in times.items():
        same = statistics.median(times[name.split(" --")[0]])
        print(json.dumps({"case": name, "mode": args.mode, "epochs": args.epochs,
                          "wall_s": [round(w, 2) for w in walls],
                          "median_s": round(statistics.median(walls), 2),
                          "vs_unreplicated": round(statistics.median(walls) / base, 2),
                          **({"vs_same_servers": round(statistics.median(walls) / same, 2)}
                             if "--replication" in name else {})}))


if __name__ == "__main__":
    main()
