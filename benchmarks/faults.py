"""Faults at random moments: kill -9 a worker or a server mid-run, many times, and
count what survives (issue 14).

Each case is ``--trials`` real ``tessera run`` jobs on this machine. Each trial
draws a step uniformly from 10-90 % of the run (seeded: ``--seed``), waits until
worker 0's ``metrics.jsonl`` reaches it, waits a further random 0-40 ms (so the
kill lands anywhere inside a step), and sends SIGKILL to the victim by its pid in
``cluster.json``. Cases:

==================  ====================================================================
worker-sync         digits, 2 workers x 2 servers, ``--max-restarts 1``, kill worker 1
worker-async        the same in async mode
worker-ssp          the same in ssp mode (staleness 2)
worker-hybrid       MovieLens (tables), ``--mode hybrid --max-restarts 1 --checkpoint-every 20``
worker-allreduce    digits, ``--mode allreduce --servers 0 --max-restarts 1 --checkpoint-every 50``
worker-pipeline     digits, 2 pipeline stages (``--stages 2 --servers 0``), ``--max-restarts 1
                    --checkpoint-every 50``, kill worker 1 (the last stage)
worker-tables       MovieLens (DLRM with sharded tables), sync, ``--max-restarts 1``
server-dense        digits, 3 servers, ``--replication 2``, kill server 1
server-async        the same in async mode (workers keep a window of answered pushes)
server-tables       MovieLens, 3 servers, ``--replication 2``, kill server 1
server-replace      digits (60 epochs), 2 servers, ``--replication 2 --max-restarts 1``,
                    kill server 1; ``replaced`` counts the trials whose replacement joined
                    (``servers_replaced``) before the end
==================  ====================================================================

Per case, one JSON line on stdout:

- ``completed``: trials whose job ended with exit code 0, of ``trials_run``;
- ``acked_lost``: summed over completed trials, ``max(0, pushes_acked -
  pushes_applied)``: acknowledged updates the surviving servers do not hold (must
  be 0); ``acked_minus_applied`` lists each trial's raw difference (a negative one:
  pushes the killed worker sent in its last step, applied, but never saw answered;
  ``summary.json``'s ``pushes_unanswered`` bounds it);
- ``metric`` against ``bar`` (digits: ``eval_accuracy`` >= 0.95 sync, 0.93 stale
  modes; MovieLens: ``eval_rmse`` <= 1.0), with ``below_bar`` trials;
- ``recovery_s``: seconds from the kill to the next completed step: for a worker,
  its replacement's first step (the replacement's log gives its unix time); for a
  server, the next step in ``metrics.jsonl`` (each record has its unix ``time``).
  Median and max;
- ``failures``: the first line of why each failed trial failed (the launcher's
  one-line refusal or failure). A case the code refuses up front (a settings
  refusal, exit 2, before any process starts) is run once and reported as
  ``refused`` with that line and ``completed`` 0, not skipped; a case whose first
  ``--give-up`` trials all fail stops there (``stopped_early``), so that a
  stalling combination does not take 20 timeouts.

    .venv/bin/python benchmarks/faults.py                 # 20 trials per case
    .venv/bin/python benchmarks/faults.py --trials 2      # a quick look
    .venv/bin/python benchmarks/faults.py --cases worker-sync,server-dense
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_s, foreign_cpu_pct, log, own_s  # noqa: E402

DIGITS = str(ROOT / "examples" / "digits.toml")
MOVIELENS = str(ROOT / "examples" / "movielens.toml")

#: name -> (job file, flags, victim role, victim rank, metric, bar, higher is better)
CASES = {
    "worker-sync": (DIGITS, ["--epochs", "16", "--max-restarts", "1"], "worker", 1,
                    "eval_accuracy", 0.95, True),
    "worker-async": (DIGITS, ["--epochs", "16", "--max-restarts", "1", "--mode", "async"],
                     "worker", 1, "eval_accuracy", 0.93, True),
    "worker-ssp": (DIGITS, ["--epochs", "16", "--max-restarts", "1", "--mode", "ssp",
                            "--staleness", "2"], "worker", 1, "eval_accuracy", 0.93, True),
    "worker-hybrid": (MOVIELENS, ["--epochs", "1", "--max-restarts", "1", "--mode", "hybrid",
                                  "--checkpoint-every", "20"],
                      "worker", 1, "eval_rmse", 1.0, False),
    "worker-allreduce": (DIGITS, ["--epochs", "16", "--max-restarts", "1", "--mode",
                                  "allreduce", "--servers", "0", "--checkpoint-every", "50"],
                         "worker", 1,
                         "eval_accuracy", 0.95, True),
    "worker-pipeline": (DIGITS, ["--epochs", "16", "--max-restarts", "1", "--mode",
                                 "allreduce", "--servers", "0", "--stages", "2",
                                 "--microbatches", "2", "--checkpoint-every", "50"],
                        "worker", 1, "eval_accuracy", 0.95, True),
    "worker-tables": (MOVIELENS, ["--epochs", "1", "--max-restarts", "1"], "worker", 1,
                      "eval_rmse", 1.0, False),
    "server-dense": (DIGITS, ["--epochs", "16", "--servers", "3", "--replication", "2"],
                     "server", 1, "eval_accuracy", 0.95, True),
    "server-async": (DIGITS, ["--epochs", "16", "--servers", "3", "--replication", "2",
                              "--mode", "async"], "server", 1, "eval_accuracy", 0.93, True),
    "server-tables": (MOVIELENS, ["--epochs", "1", "--servers", "3", "--replication", "2"],
                      "server", 1, "eval_rmse", 1.0, False),
    "server-replace": (DIGITS, ["--epochs", "60", "--servers", "2", "--replication", "2",
                                "--max-restarts", "1"], "server", 1, "eval_accuracy", 0.95, True),
}


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return found


def first_line(text: str) -> str:
    """The launcher's one-line reason (its wrapped paragraph joined), and the failing
    process's last log line when the launcher quotes it."""
    lines = [ln.strip() for ln in text.splitlines()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("tessera:")), None)
    if start is None:
        return (next((ln for ln in reversed(lines) if ln), "(no output)"))[:300]
    para = []
    for ln in lines[start:]:
        if not ln or ln.startswith("(logs:") or ln.startswith("Last lines of"):
            break
        para.append(ln)
    why = " ".join(para)
    quoted = [ln for ln in lines[start + len(para):] if ln and not ln.startswith("(logs:")]
    if len(quoted) > 1:
        why += " | " + quoted[-1]
    return why[:400]


def planned_steps(out: Path, proc: subprocess.Popen, deadline: float) -> int:
    while not (out / "plan.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return 0
        time.sleep(0.05)
    time.sleep(0.05)
    return json.loads((out / "plan.json").read_text())["steps"]


def kill_at(out: Path, proc: subprocess.Popen, role: str, rank: int, step: int,
            deadline: float, rng: random.Random) -> float:
    """SIGKILL ``role rank`` once worker 0 logged ``step``; the kill's unix time (0: the
    job ended or the wait ran out first)."""
    while True:
        rec = records(out)
        if rec and rec[-1]["step"] >= step:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            return 0.0
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.04))
    procs = json.loads((out / "cluster.json").read_text())["processes"]
    pid = next(p["pid"] for p in procs if p["role"] == role and p["rank"] == rank)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return 0.0
    return time.time()


def recovery(out: Path, role: str, rank: int, killed: float) -> float | None:
    if role == "worker":
        log_path = out / "logs" / f"worker-{rank}.log"
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        found = re.search(r"completed step \d+ at unix ([\d.]+)", text)
        return float(found.group(1)) - killed if found else None
    after = [r["time"] for r in records(out) if r.get("time", 0) > killed]
    return min(after) - killed if after else None


def trial(name: str, index: int, rng: random.Random, timeout_s: float) -> dict:
    job, flags, role, rank, metric, _, _ = CASES[name]
    out = Path(tempfile.mkdtemp(prefix=f"faults-{name}-{index}-"))
    cmd = [sys.executable, "-m", "tessera.cli.main", "run", job, "--out", str(out), "--quiet",
           *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    result = {"trial": index}
    try:
        steps = planned_steps(out, proc, deadline)
        kill_step = int(rng.uniform(0.1, 0.9) * steps) if steps else 0
        result["kill_step"] = kill_step
        killed = kill_at(out, proc, role, rank, kill_step, deadline, rng) if steps else 0.0
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            output, _ = proc.communicate(timeout=30)
            result.update(ok=False, why=f"did not finish within {timeout_s:.0f} s")
            return result
        result["exit"] = proc.returncode
        if not killed and proc.returncode == 0:
            result.update(ok=False, why="the job ended before the kill")
            return result
        if proc.returncode != 0:
            result.update(ok=False, why=first_line(output), refused=proc.returncode == 2)
            return result
        summary = json.loads((out / "summary.json").read_text())
        if role == "server" and "--max-restarts" in flags:
            # Whether the replacement joined before the end: a late kill can leave less
            # of the run than a new server process takes to start (counted, not failed).
            result["replaced"] = bool(summary.get("servers_replaced", {}).get(str(rank)))
        result.update(ok=True, metric=summary.get(metric),
                      acked=summary.get("pushes_acked", 0),
                      applied=summary.get("pushes_applied", 0),
                      unanswered=summary.get("pushes_unanswered", 0),
                      short_clocks=summary.get("short_clocks"),
                      recovery_s=recovery(out, role, rank, killed))
        return result
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(out)], check=False)


def run_case(name: str, trials: int, give_up: int, seed: int, timeout_s: float) -> dict:
    _, _, role, _, metric, bar, higher = CASES[name]
    rng = random.Random(f"{seed}-{name}")
    runs = []
    load, t0, busy0, own0 = os.getloadavg()[0], time.monotonic(), busy_s(), own_s()
    for i in range(trials):
        r = trial(name, i, rng, timeout_s)
        runs.append(r)
        log(f"{name} trial {i}: " + json.dumps(r))
        if r.get("refused"):
            break  # a settings refusal: every trial would say the same
        if i + 1 == give_up and not any(x.get("ok") for x in runs):
            break
    done = [r for r in runs if r.get("ok")]
    values = [r["metric"] for r in done if r.get("metric") is not None]
    below = [v for v in values if (v < bar if higher else v > bar)]
    rec = [r["recovery_s"] for r in done if r.get("recovery_s") is not None]
    line = {
        "case": name, "victim": role, "trials": trials, "trials_run": len(runs),
        "completed": len(done),
        "acked_lost": sum(max(0, r["acked"] - r["applied"]) for r in done),
        "acked_minus_applied": [r["acked"] - r["applied"] for r in done],
        "unanswered": [r["unanswered"] for r in done],
        # Trials whose servers applied more than acknowledged + unanswered (the README's
        # bound: pushes_acked <= pushes_applied <= pushes_acked + pushes_unanswered).
        "beyond_bound": sum(r["applied"] - r["acked"] > r["unanswered"] for r in done),
        **({"replaced": sum(r["replaced"] for r in done)} if any("replaced" in r for r in done)
           else {}),
        "metric": metric, "bar": bar,
        "metric_median": statistics.median(values) if values else None,
        "metric_worst": (min(values) if higher else max(values)) if values else None,
        "below_bar": len(below),
        "recovery_s_median": round(statistics.median(rec), 3) if rec else None,
        "recovery_s_max": round(max(rec), 3) if rec else None,
        "failures": sorted({r["why"] for r in runs if not r.get("ok")}),
        "loadavg_1m": round(load, 2),
        "foreign_cpu_pct": round(foreign_cpu_pct(busy0, own0, time.monotonic() - t0), 1),
    }
    if runs and runs[-1].get("refused"):
        line["refused"] = runs[-1]["why"]
    elif len(runs) < trials:
        line["stopped_early"] = f"the first {len(runs)} trials all failed"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="trials per case (default 20)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--seed", type=int, default=0, help="draws the kill steps")
    ap.add_argument("--give-up", type=int, default=2,
                    help="stop a case whose first N trials all failed (default 2)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per trial")
    args = ap.parse_args()
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or args.trials < 1:
        sys.exit(f"faults.py: --cases: unknown {unknown}; choose from {', '.join(CASES)}"
                 if unknown else "faults.py: --trials must be >= 1")
    for name in names:
        print(json.dumps(run_case(name, args.trials, args.give_up, args.seed, args.timeout)),
              flush=True)


if __name__ == "__main__":
    main()
