"""Job start-up and end: processes forked from the fork server against processes started
afresh (each its own interpreter, as torchrun or ``TESSERA_FORKSERVER=0`` start them), and
from a fork server that a warm pool handed out (``TESSERA_WARM_POOL``, imports done once
for every job: tessera/launch/warmpool.py).

One short real job (``examples/digits.toml``, 2 servers x 2 workers, sync, ``--epochs``)
run ``--rounds`` times each way, interleaved (fork, fresh, pool, fork, ...). Per way:

- ``*_wall_s``: median seconds from ``tessera run`` to its exit;
- ``*_first_step_s``: median seconds from ``tessera run`` to worker 0's first metrics line;
- ``*_cpu_s``: median CPU seconds of the launcher and every process of the job (waited
  children's rusage: the fork server reaps its forks, so they count too; with the pool,
  the pool's own CPU and its reaped children's, read from ``/proc/PID/stat``).

``fork_vs_fresh_*`` and ``pool_vs_fork_*`` are the ratios (below 1: faster / cheaper);
``foreign_cpu_pct`` is the share of the machine other processes used (the pool is this
benchmark's child, waited for before it is computed).

    .venv/bin/python benchmarks/startup.py              # 5 rounds each way
    .venv/bin/python benchmarks/startup.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_s, foreign_cpu_pct, log, own_s  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def children_cpu() -> float:
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime + c.ru_stime


def pool_cpu(pid: int) -> float:
    """CPU seconds of the pool and of the children it has reaped (utime, stime, cutime,
    cstime of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def one_job(way: str, epochs: int, out: Path, pool=None) -> dict:
    env = dict(os.environ, TESSERA_FORKSERVER="0" if way == "fresh" else "1")
    env.pop("TESSERA_WARM_POOL", None)
    if way == "pool":
        env["TESSERA_WARM_POOL"] = str(pool[1])
    cpu0, t0 = children_cpu() + (pool_cpu(pool[0].pid) if way == "pool" else 0.0), time.time()
    proc = subprocess.run([sys.executable, "-m", "tessera.cli.main", "run",
                           str(ROOT / "examples" / "digits.toml"), "--out", str(out), "--quiet",
                           "--epochs", str(epochs)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"tessera run failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["time"]
    if way == "pool":
        if "warm pool" in (out / "logs" / "forkserver.log").read_text():
            raise RuntimeError(f"the pool refused the job: {out / 'logs' / 'forkserver.log'}")
        time.sleep(0.5)  # the pool reaps the job's fork server in its next loop (0.2 s)
    cpu = children_cpu() + (pool_cpu(pool[0].pid) if way == "pool" else 0.0) - cpu0
    return {"wall_s": wall, "first_step_s": first - t0, "cpu_s": cpu}


def start_pool(tmp: Path):
    path = tmp / "pool.sock"
    proc = subprocess.Popen([sys.executable, "-m", "tessera.launch.warmpool", str(path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # "warm pool ready ...", once its imports are done
    if "warm pool ready" not in line:
        raise RuntimeError(f"the warm pool did not start: {line}{proc.stdout.read()}")
    return proc, path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    busy0, own0, start = busy_s(), own_s(), time.monotonic()
    runs: dict[str, list[dict]] = {"fork": [], "fresh": [], "pool": []}
    with tempfile.TemporaryDirectory() as tmp:
        pool = start_pool(Path(tmp))
        try:
            for r in range(args.rounds):
                for way in runs:
                    got = one_job(way, args.epochs, Path(tmp) / f"{way}{r}", pool)
                    log(way, r, {k: round(v, 2) for k, v in got.items()})
                    runs[way].append(got)
        finally:
            pool[0].terminate()
            pool[0].wait(timeout=30)
    result = {"bench": "startup", "job": "digits 2x2 sync", "epochs": args.epochs,
              "rounds": args.rounds}
    for way, got in runs.items():
        for key in ("wall_s", "first_step_s", "cpu_s"):
            result[f"{way}_{key}"] = round(statistics.median(g[key] for g in got), 3)
    result["fork_vs_fresh_wall"] = round(result["fork_wall_s"] / result["fresh_wall_s"], 3)
    result["fork_vs_fresh_first_step"] = round(
        result["fork_first_step_s"] / result["fresh_first_step_s"], 3)
    result["fork_vs_fresh_cpu"] = round(result["fork_cpu_s"] / result["fresh_cpu_s"], 3)
    for key in ("wall", "first_step", "cpu"):
        result[f"pool_vs_fork_{key}"] = round(result[f"pool_{key}_s"] / result[f"fork_{key}_s"], 3)
    result["foreign_cpu_pct"] = round(foreign_cpu_pct(busy0, own0, time.monotonic() - start), 1)
    result["loadavg"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
