"""A server made hot on purpose: how much sooner the job ends when the coordinator moves
partitions off it (``[ps] rebalance = true``, issue 16 item 3; DLRover reports -36%).

Each case is a real ``tessera run examples/digits.toml`` (MLP 64-128-64-10, 2 workers,
2 servers, sync, batch 32 per worker, ``--partition-mb 0.01``: 7 dense partitions, 4 on
server 0 and 3 on server 1) with ``TESSERA_SLOW_SERVER=0:MS``: server 0 sleeps MS ms per
partition named in every push or pull it serves, a machine that serves its share several
times slower than the others. Two systems, the same job and steps:

* ``static``: no rebalancing (what the job does without the feature): every step waits
  for server 0.
* ``rebalance``: ``--rebalance``: the coordinator reads each server's busy seconds from
  its heartbeats, sees server 0 stay hot, and moves partitions from it to server 1 live
  (the workers keep training; requests that reach server 0 for a moved partition are
  answered "moved" and re-sent).

The ``tables`` case (``--cases``) does the same with the rows of embedding tables:
``tessera run examples/movielens.toml`` (the DLRM, its tables sharded over the 2 servers,
sync) with ``TESSERA_SLOW_SERVER=0:MS:rows``: server 0 sleeps MS ms per table named in
every row request it serves. There the coordinator moves server 0's table shard (one
unit: the rows hashed to server 0) onto server 1.

Figures: ``<system>_train_s`` (the summary's ``wall_s``: worker 0's first step to its last,
start-up not included) and ``<system>_total_s`` (the whole ``tessera run``, start-up and
shut-down included), medians over interleaved rounds (static, rebalance, static, ...:
each pair sees the same minutes of the machine's load); ``rebalance_vs_static_train`` and
``rebalance_vs_static_total``: the median of the per-round ratios (< 1: sooner).
``sooner_pct`` = 100 (1 - that train ratio). Every run checks that the job acknowledged
and applied the same number of pushes (``pushes_ok``) and reports where the partitions
ended (``owners``), when the move was ordered, and the final accuracy of both.

Output: one JSON line per case on stdout; progress on stderr.

    .venv/bin/python benchmarks/elastic.py            # both cases, 500 and 300 steps, 2 rounds
    .venv/bin/python benchmarks/elastic.py --cases tables
    .venv/bin/python benchmarks/elastic.py --quick    # 150 steps, 1 round
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_s, log, own_s  # noqa: E402


#: case -> (job file, extra flags, TESSERA_SLOW_SERVER's suffix, the eval metric)
CASES = {
    "dense": ("examples/digits.toml", ["--partition-mb", "0.01"], "", "eval_accuracy"),
    "tables": ("examples/movielens.toml", [], ":rows", "eval_rmse"),
}


def run_case(case: str, system: str, steps: int, slow_ms: float, timeout_s: float) -> dict:
    job, flags, slow_what, metric = CASES[case]
    with tempfile.TemporaryDirectory(prefix="tessera-elastic-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "tessera.cli.main", "run", job,
               "--out", str(out), "--quiet", *flags, "--steps", str(steps)]
        if system == "rebalance":
            cmd.append("--rebalance")
        env = dict(os.environ, TESSERA_SLOW_SERVER=f"0:{slow_ms:g}{slow_what}",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        busy0, own0, t0 = busy_s(), own_s(), time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
        total = time.monotonic() - t0
        foreign = max(0.0, 100.0 * ((busy_s() - busy0) - (own_s() - own0))
                      / (total * (os.cpu_count() or 1)))
        if proc.returncode != 0:
            raise RuntimeError(f"{system} run failed (exit {proc.returncode}):\n{output[-3000:]}")
        s = json.loads((out / "summary.json").read_text())
        moves = s.get("elastic", {}).get("moves", [])
        return {"train_s": float(s["wall_s"]), "total_s": total,
                "pushes_ok": s["pushes_acked"] == s["pushes_applied"],
                "eval": s.get(metric), "owners": s.get("owners"),
                "moves": [m["why"] for m in moves], "foreign_cpu_pct": foreign}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="dense,tables", help="comma-separated: dense, tables")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per run (default: 500 dense, 300 tables)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--slow-ms", type=float, default=5.0,
                    help="server 0's sleep per partition of each push or pull (dense) or per "
                         "table of each row request (tables)")
    ap.add_argument("--timeout", type=float, default=900.0, help="the whole benchmark")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or any(c not in CASES for c in cases):
        raise SystemExit(f"elastic.py: --cases: choose from {', '.join(CASES)}")
    if args.quick:
        args.rounds = 1
    deadline = time.monotonic() + args.timeout
    for case in cases:
        job, _, slow_what, metric = CASES[case]
        steps = args.steps or (150 if args.quick else {"dense": 500, "tables": 300}[case])
        runs: dict[str, list[dict]] = {"static": [], "rebalance": []}
        for r in range(args.rounds):
            for system in ("static", "rebalance"):
                left = deadline - time.monotonic()
                if left < 30:
                    log(f"skipping {case} {system} round {r + 1}: the --timeout is near")
                    continue
                got = run_case(case, system, steps, args.slow_ms, left)
                runs[system].append(got)
                log(f"{case} round {r + 1} {system}: train {got['train_s']:.1f} s, total "
                    f"{got['total_s']:.1f} s, moves {got['moves']}, foreign CPU "
                    f"{got['foreign_cpu_pct']:.0f}%")
        pairs = list(zip(runs["static"], runs["rebalance"]))
        if not pairs:
            raise SystemExit(f"{case}: no complete round within --timeout")
        med = statistics.median
        train_ratio = med(b["train_s"] / a["train_s"] for a, b in pairs)
        total_ratio = med(b["total_s"] / a["total_s"] for a, b in pairs)
        line = {"bench": "elastic", "case": case, "job": job, "eval_metric": metric,
                "steps": steps, "slow_ms": args.slow_ms,
                "slow_what": slow_what.lstrip(":") or "all",
                "rounds": len(pairs), "workers": 2, "servers": 2, "mode": "sync",
                "static_train_s": round(med(a["train_s"] for a, _ in pairs), 2),
                "rebalance_train_s": round(med(b["train_s"] for _, b in pairs), 2),
                "static_total_s": round(med(a["total_s"] for a, _ in pairs), 2),
                "rebalance_total_s": round(med(b["total_s"] for _, b in pairs), 2),
                "rebalance_vs_static_train": round(train_ratio, 3),
                "rebalance_vs_static_total": round(total_ratio, 3),
                "sooner_pct": round(100.0 * (1.0 - train_ratio), 1),
                "pushes_ok": all(x["pushes_ok"] for a, b in pairs for x in (a, b)),
                "static_eval": pairs[-1][0]["eval"],
                "rebalance_eval": pairs[-1][1]["eval"],
                "rebalance_moves": pairs[-1][1]["moves"],
                "rebalance_owners": pairs[-1][1]["owners"],
                "foreign_cpu_pct": round(med(x["foreign_cpu_pct"] for a, b in pairs
                                             for x in (a, b)), 1),
                "loadavg": list(os.getloadavg())}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
