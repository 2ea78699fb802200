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

CPU time too (steadier than wall time on a shared machine): while a job trains, the
benchmark samples the CPU seconds of its servers and workers (``/proc``, pids from
``cluster.json``) against the step ``metrics.jsonl`` has reached, and reports the CPU
milliseconds per step between 10 % and 90 % of the steps (``cpu_ms_per_step``: no
start-up, no shutdown) with the same two ratios (``cpu_vs_unreplicated``,
``cpu_vs_same_servers``). ``foreign_cpu_pct``: the share of the machine's CPU other
processes used during the benchmark; ``loadavg``: the 1-minute load average before
and after.

Output: one JSON object per line and case on stdout; progress on stderr.

    .venv/bin/python benchmarks/replication_cost.py --mode sync,async --epochs 150 --rounds 3
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
from _machine import busy_s, cpu_s, foreign_cpu_pct, own_s  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {"2 servers": ["--servers", "2"],
         "2 servers --replication 2": ["--servers", "2", "--replication", "2"],
         "3 servers": ["--servers", "3"],
         "3 servers --replication 2": ["--servers", "3", "--replication", "2"]}


def _last_step(metrics: Path) -> int:
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = f.read().splitlines()
    except OSError:
        return -1
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written
    return -1


def _pids(out: Path) -> list[int]:
    try:
        procs = json.loads((out / "cluster.json").read_text())["processes"]
    except (OSError, ValueError, KeyError):
        return []
    return [p["pid"] for p in procs if p["role"] in ("server", "worker")]


def run(mode: str, epochs: int, flags: list[str], out: Path) -> tuple[float, float]:
    """One job: its ``wall_s`` and the CPU ms per step of its servers and workers
    between 10 % and 90 % of its steps."""
    cmd = [sys.executable, "-m", "tessera.cli.main", "run", str(ROOT / "examples" / "digits.toml"),
           "--out", str(out), "--quiet", "--mode", mode, "--epochs", str(epochs), *flags]
    samples: list[tuple[int, float]] = []
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 1800
        pids: list[int] = []
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"{' '.join(cmd)} took over 1800 s")
            time.sleep(0.05)
            pids = pids or _pids(out)
            if not pids:
                continue
            step = _last_step(out / "metrics.jsonl")
            try:
                cpu = cpu_s(pids)
            except OSError:
                continue  # one has exited: the job is ending
            if step >= 0:
                samples.append((step, cpu))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.with_suffix('.log').read_text()[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    steps = int(summary["steps"])
    inside = [(s, c) for s, c in samples if 0.1 * steps <= s <= 0.9 * steps]
    if len(inside) < 2 or inside[-1][0] == inside[0][0]:
        raise SystemExit(f"{' '.join(cmd)}: too few CPU samples while it trained ({len(inside)})")
    (s0, c0), (s1, c1) = inside[0], inside[-1]
    return float(summary["wall_s"]), 1000.0 * (c1 - c0) / (s1 - s0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="sync",
                        help="sync, async or ssp, or several: sync,async (one after the other)")
    parser.add_argument("--epochs", type=int, default=150, help="150: 3,300 steps")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    modes = args.mode.split(",")
    for mode in modes:
        if mode not in ("sync", "async", "ssp"):
            raise SystemExit(f"--mode: {mode!r} is not sync, async or ssp")
    for mode in modes:
        measure(mode, args.epochs, args.rounds)


def measure(mode: str, epochs: int, rounds: int) -> None:
    """Every case in ``rounds`` interleaved rounds; one JSON line per case."""
    times: dict[str, list[float]] = {name: [] for name in CASES}
    cpus: dict[str, list[float]] = {name: [] for name in CASES}
    load0 = os.getloadavg()[0]
    busy0, own0, t0 = busy_s(), own_s(), time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, flags in CASES.items():
                wall, cpu = run(mode, epochs, flags, Path(tmp) / f"{r}-{len(times[name])}"
                                f"-{name.replace(' ', '_')}")
                times[name].append(wall)
                cpus[name].append(cpu)
                print(f"{mode} round {r + 1}: {name}: {wall:.1f} s, {cpu:.2f} CPU ms/step, "
                      f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    # Our own CPU includes the jobs' (the CLI waits for its processes, we wait for it).
    foreign = round(foreign_cpu_pct(busy0, own0, time.monotonic() - t0), 1)
    load = [round(load0, 1), round(os.getloadavg()[0], 1)]
    med = {name: statistics.median(walls) for name, walls in times.items()}
    cmed = {name: statistics.median(c) for name, c in cpus.items()}
    for name, walls in times.items():
        same = name.split(" --")[0]
        print(json.dumps({"case": name, "mode": mode, "epochs": epochs,
                          "wall_s": [round(w, 2) for w in walls],
                          "median_s": round(med[name], 2),
                          "vs_unreplicated": round(med[name] / med["2 servers"], 2),
                          **({"vs_same_servers": round(med[name] / med[same], 2)}
                             if "--replication" in name else {}),
                          "cpu_ms_per_step": [round(c, 2) for c in cpus[name]],
                          "cpu_vs_unreplicated": round(cmed[name] / cmed["2 servers"], 2),
                          **({"cpu_vs_same_servers": round(cmed[name] / cmed[same], 2)}
                             if "--replication" in name else {}),
                          "foreign_cpu_pct": foreign, "loadavg": load}), flush=True)


if __name__ == "__main__":
    main()
