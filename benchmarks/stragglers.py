"""A persistent straggler: samples/s and accuracy of sync, ssp (K=2), async and
the remedy (sync with ``--balance speed``) on the same total samples (DESIGN.md,
"Performance principles").

Each case is a real ``tessera launch --workers 2 --servers 2 --mode M`` of
``benchmarks/_straggler_worker.py``: an MLP (64-128-64-10) on digits, batch 32
per worker, ``tessera.distribute(model, "sgd", lr=0.1, momentum=0.9)``. Worker 1
is slowed to a third of worker 0's speed. Calibration: the first run (async,
where neither worker waits for the other) has the straggler sleep, at the start
of every step, what makes its step three times worker 0's median step (worker 0
publishes it in a file); the median of those sleeps is then fixed for every
later run, so every mode meets the same straggler (``slow_sleep_ms``). A fixed
sleep chosen up front would not do: a fast step takes 2-13 ms on the shared
2-core machine this was written on, depending on what else runs, and the
straggler's own work is slower than the fast worker's (it wakes up to busy
cores). ``slow_factor`` is the two workers' median step time ratio in the async
runs.

Same total samples in every mode: 2 x ``steps`` steps of 32 samples.

* ``sync`` and ``ssp``: each worker takes ``steps`` steps (clock counts must match:
  a worker that stopped early would leave the other waiting for it). In ssp the
  fast worker may run at most K clocks ahead, so it ends at most K steps earlier.
* ``balance`` (the remedy, issue 15 item 6): sync with ``--balance speed``; each
  worker takes ``steps`` steps, but each step's global batch of 2 x 32 is split by
  the workers' measured speeds (tessera/train/balance.py) and the servers weight
  each push by its share, so every step is still the mean over its 64 samples. The
  straggler's sleep is per sample (it scales with its share): a worker that computes
  3x slower, not one that loses a fixed time per step. ``remedy_vs_sync`` is its
  ``vs_sync_samples_per_s``.
* ``async``: the two workers share a budget of 2 x ``steps`` steps, claimed one at
  a time from a counter file; the fast worker takes about three quarters of them.

``wall_s`` runs from the first step (both workers start together after start-up,
at a file barrier) to the end of the last one; ``tessera_samples_per_s`` = total
samples / ``wall_s``. Worker 0 then pulls the final parameters and evaluates on
the test split (``eval_accuracy``). The modes are run in interleaved rounds
(``--repeats``); a mode reports medians over its runs, ``vs_sync_*`` as the
median of ratios (differences) to the sync run of the same round, which saw the
same minutes of the machine's load, and every run's numbers.

Output: one JSON object per line and mode on stdout; progress on stderr.

    .venv/bin/python benchmarks/stragglers.py            # 200 steps per worker, 2 rounds
    .venv/bin/python benchmarks/stragglers.py --quick    # 40 steps, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "benchmarks" / "_straggler_worker.py"
BATCH = 32
WORKERS, SERVERS = 2, 2

from _machine import T0 as _T0, busy_s as _busy_s, log as _log  # noqa: E402


def transient_delayed(index: int, p: float, workers: int) -> int:
    """The transient case's worker delayed at global step ``index`` (-1: none). One draw
    seeded by the step, made alike by every worker (_straggler_worker.py) and here."""
    draw = random.Random(index * 1_000_003 + 17)
    return draw.randrange(workers) if draw.random() < p else -1


def ssp_ceiling(p: float, workers: int, steps: int, base_ms: float, other_ms: float,
                staleness: int | None) -> float:
    """What bounded staleness can gain over sync at best with the delays this run draws:
    sync's time over ssp's when nothing but the steps themselves costs time. Every
    worker's step ``t`` takes ``base_ms`` (3x where :func:`transient_delayed` names it)
    plus ``other_ms`` (the measured rest of a step: the real forward, backward and
    round trip); sync waits for the slowest worker at every step; ssp's worker starts
    step ``t`` once every worker has finished step ``t - staleness - 1`` (None: never
    waits). A replay of the same draws, not a model of Tessera: the figure to hold the
    measured ratio against."""
    ms = [[base_ms + other_ms] * workers for _ in range(steps)]
    for t in range(steps):
        w = transient_delayed(t, p, workers)
        if w >= 0:
            ms[t][w] = 3 * base_ms + other_ms
    sync = sum(max(row) for row in ms)
    done: list[list[float]] = []  # done[t][w]: when worker w finishes step t under ssp
    for t, row in enumerate(ms):
        gate = max(done[t - staleness - 1]) if staleness is not None and t > staleness else 0.0
        done.append([max(done[t - 1][w] if t else 0.0, gate) + row[w] for w in range(workers)])
    return sync / max(done[-1])


def _children_s() -> float:
    import resource
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime + c.ru_stime


def run_case(mode: str, staleness: int, steps: int, slow_factor: float, sleep_ms: float,
             timeout_s: float, transient: float = 0.0, base_ms: float = 10.0) -> dict:
    with tempfile.TemporaryDirectory(prefix="tessera-stragglers-") as tmp:
        tmp = Path(tmp)
        sync_dir = tmp / "sync"
        sync_dir.mkdir()
        system = "sync" if mode == "balance" else mode
        cmd = [sys.executable, "-m", "tessera.cli.main", "launch", "--workers", str(WORKERS),
               "--servers", str(SERVERS), "--mode", system, "--quiet", "--out", str(tmp / "run")]
        if mode == "balance":
            cmd += ["--balance", "speed"]
        if mode == "ssp":
            cmd += ["--staleness", str(staleness)]
        cmd += [str(WORKER), "--slow-factor", str(slow_factor), "--sleep-ms", str(sleep_ms),
                "--slow-rank", "1",
                "--batch-size", str(BATCH), "--sync-dir", str(sync_dir),
                "--transient", str(transient), "--base-ms", str(base_ms)]
        cmd += ["--budget", str(WORKERS * steps)] if mode == "async" else ["--steps", str(steps)]
        t0 = time.monotonic()
        busy0, own0 = _busy_s(), _children_s()
        # Own session: on a timeout the launcher's whole process group goes.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
            raise RuntimeError(f"tessera launch --mode {mode} did not finish in {timeout_s:.0f} s:"
                               f"\n{out}")
        launch_s = time.monotonic() - t0
        if proc.returncode != 0:
            logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}"
                           for p in sorted((tmp / "run" / "logs").glob("*.log")))
            raise RuntimeError(f"tessera launch --mode {mode} failed ({proc.returncode}):\n"
                               f"{out}{logs}")
        foreign = max(0.0, 100.0 * ((_busy_s() - busy0) - (_children_s() - own0))
                      / (launch_s * (os.cpu_count() or 1)))
        summary = json.loads((tmp / "run" / "summary.json").read_text())
        stats = [json.loads((sync_dir / f"stats.{r}.json").read_text()) for r in range(WORKERS)]
    wall = max(s["t_last"] for s in stats) - min(s["t_first"] for s in stats)
    total_steps = sum(s["steps"] for s in stats)
    fast = [s for s in stats if not s["slow"]]
    slow = [s for s in stats if s["slow"]] or fast  # transient: nobody is slow for good
    return {"mode": mode, "staleness": staleness if mode == "ssp" else None,
            "wall_s": wall, "total_samples": total_steps * BATCH,
            "samples_per_s": total_steps * BATCH / wall,
            "steps_per_worker": [s["steps"] for s in stats],
            "eval_accuracy": summary["eval_accuracy"],
            "max_clock_gap": summary.get("max_clock_gap", 0),
            "fast_step_ms": statistics.median(s["step_ms"] for s in fast),
            "slow_step_ms": statistics.median(s["step_ms"] for s in slow),
            "slow_work_ms": statistics.median(s["work_ms"] for s in slow),
            "slow_sleep_ms": statistics.median(s["sleep_ms"] for s in slow),
            "delayed_steps": [s.get("delayed_steps", 0) for s in stats],
            "samples_per_worker": [s.get("samples", 0) for s in stats],
            "launch_s": launch_s, "foreign_cpu_pct": foreign}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="steps per worker in sync (default 200)")
    ap.add_argument("--slow-factor", type=float, default=3.0,
                    help="calibration: the straggler's step time over the fast worker's")
    ap.add_argument("--sleep-ms", type=float, default=0.0,
                    help="> 0: skip the calibration, the straggler sleeps this long per step")
    ap.add_argument("--staleness", type=int, default=2, help="ssp bound K (default 2)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the three modes")
    ap.add_argument("--timeout", type=float, default=285.0, help="hard limit for the run, s")
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 steps, one round")
    ap.add_argument("--transient", type=float, default=0.0,
                    help="the transient case: at each step, with this probability (issue 15: "
                         "0.25), one worker drawn at random takes 3x --base-ms")
    ap.add_argument("--base-ms", type=float, default=10.0,
                    help="transient case: every step's emulated compute (a sleep), ms")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--systems", default="async,sync,ssp,balance",
                    help="comma-separated, of async,sync,ssp,balance (sync is always run: "
                         "the ratios are to it; async calibrates unless --sleep-ms is set)")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.repeats = 40, 1
    global WORKERS
    WORKERS = a.workers
    wanted = set(a.systems.split(",")) | {"sync"}
    if a.sleep_ms <= 0 and not a.transient:
        wanted.add("async")
    # async first: its first run calibrates the straggler's sleep for every later run.
    # The remedy runs on the persistent straggler only (a transient one is not a speed).
    modes = [(m, k) for m, k in [("async", 0), ("sync", 0), ("ssp", a.staleness),
                                 ("balance", 0)]
             if m in wanted and not (m == "balance" and a.transient)]
    deadline = time.monotonic() + a.timeout
    rounds: list[dict[str, dict]] = []
    sleep_ms = a.sleep_ms
    load_before = os.getloadavg()[0]
    round_s = 0.0
    for rnd in range(a.repeats):
        if rnd and deadline - time.monotonic() < 1.2 * round_s:
            _log(f"skipping rounds {rnd}..{a.repeats - 1}: a round took {round_s:.0f} s and "
                 f"{deadline - time.monotonic():.0f} s are left of --timeout {a.timeout:.0f}")
            break
        t_round = time.monotonic()
        rounds.append({})
        for mode, k in modes:
            left = deadline - time.monotonic()
            if left < 20:
                raise TimeoutError("stragglers: out of time (raise --timeout or lower --repeats)")
            r = run_case(mode, k, a.steps, a.slow_factor, sleep_ms, timeout_s=min(left, 150.0),
                         transient=a.transient, base_ms=a.base_ms)
            if sleep_ms <= 0 and not a.transient:
                sleep_ms = round(r["slow_sleep_ms"], 1)
                _log(f"calibrated: the straggler sleeps {sleep_ms} ms per step from now on")
            rounds[-1][mode] = r
            _log(f"round {rnd}: {mode:5s} {r['samples_per_s']:7.0f} samples/s "
                 f"(wall {r['wall_s']:.2f} s, steps {r['steps_per_worker']}), accuracy "
                 f"{r['eval_accuracy']:.4f}, steps fast {r['fast_step_ms']:.1f} ms / slow "
                 f"{r['slow_step_ms']:.1f} ms (slept {r['slow_sleep_ms']:.1f}), "
                 f"launch {r['launch_s']:.0f} s, foreign CPU {r['foreign_cpu_pct']:.0f}%")
        round_s = max(round_s, time.monotonic() - t_round)

    med = statistics.median
    ref = "async" if "async" in rounds[0] else "sync"
    slow_factor = med(rd[ref]["slow_step_ms"] / rd[ref]["fast_step_ms"] for rd in rounds)
    import torch
    for mode, k in [(m, k) for m, k in [("sync", 0), ("ssp", a.staleness), ("async", 0),
                                        ("balance", 0)] if m in rounds[0]]:
        rs = [rd[mode] for rd in rounds]
        # Ratios within a round (same minutes of the machine's load), then the median.
        speedup = [rd[mode]["samples_per_s"] / rd["sync"]["samples_per_s"] for rd in rounds]
        points = [100 * (rd[mode]["eval_accuracy"] - rd["sync"]["eval_accuracy"])
                  for rd in rounds]
        row = {"bench": "stragglers", "mode": mode, "staleness": k if mode == "ssp" else None,
               "workers": WORKERS, "servers": SERVERS, "batch_size": BATCH,
               "steps_per_worker_sync": a.steps, "total_samples": rs[0]["total_samples"],
               "steps_per_worker": rs[0]["steps_per_worker"],
               "case": f"transient p={a.transient}" if a.transient else "persistent",
               "base_ms": a.base_ms if a.transient else None,
               "delayed_steps": rs[0]["delayed_steps"],
               "samples_per_worker": rs[0]["samples_per_worker"],
               "slow_sleep_ms": sleep_ms, "slow_factor": round(slow_factor, 2),
               "wall_s": round(med(r["wall_s"] for r in rs), 3),
               "tessera_samples_per_s": round(med(r["samples_per_s"] for r in rs), 1),
               "eval_accuracy": round(med(r["eval_accuracy"] for r in rs), 4),
               "vs_sync_samples_per_s": round(med(speedup), 3),
               "vs_sync_accuracy_points": round(med(points), 2),
               "max_clock_gap": max(r["max_clock_gap"] for r in rs),
               "fast_step_ms": round(med(r["fast_step_ms"] for r in rs), 2),
               "slow_step_ms": round(med(r["slow_step_ms"] for r in rs), 2),
               "runs": len(rs),
               "runs_samples_per_s": [round(r["samples_per_s"], 1) for r in rs],
               "runs_vs_sync_samples_per_s": [round(x, 3) for x in speedup],
               "runs_eval_accuracy": [round(r["eval_accuracy"], 4) for r in rs],
               "loadavg_1m": round(load_before, 2),
               "foreign_cpu_pct": round(med(r["foreign_cpu_pct"] for r in rs), 1),
               "torch": torch.__version__}
        if mode == "ssp" and a.transient:  # the same draws replayed: ssp's best, and no bound's
            other = row["fast_step_ms"] - a.base_ms
            row["ceiling_vs_sync"] = round(ssp_ceiling(a.transient, WORKERS, a.steps, a.base_ms,
                                                       other, k), 3)
            row["unbounded_ceiling_vs_sync"] = round(ssp_ceiling(
                a.transient, WORKERS, a.steps, a.base_ms, other, None), 3)
            row["vs_ceiling"] = round(row["vs_sync_samples_per_s"] / row["ceiling_vs_sync"], 3)
        if mode == "balance":
            row.update(remedy_vs_sync=row["vs_sync_samples_per_s"],
                       remedy_vs_sync_accuracy_points=row["vs_sync_accuracy_points"])
        print(json.dumps(row), flush=True)
    _log(f"done in {time.monotonic() - _T0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
