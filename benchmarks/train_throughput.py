"""Training throughput (samples/s) of examples/mnist.toml's CNN with 2 workers:
Tessera in sync mode over 2 parameter servers, against DistributedDataParallel over
Gloo with 2 processes, in the same run (DESIGN.md, "Performance principles").

* ``tessera``: ``tessera run examples/mnist.toml --workers 2 --servers 2 --mode sync
  --steps N --quiet --out DIR`` as a subprocess (the whole job: coordinator,
  2 servers, 2 workers). ``tessera_samples_per_s`` is summary.json's
  ``samples_per_s``: every step of the loop, the first ones and the periodic
  evaluation (every 50 steps, on the test split) included.
  ``tessera_steady_samples_per_s`` is the same run measured like DDP below: the
  metrics.jsonl windows (5 steps each) after the first ``--warmup`` steps,
  leaving out the windows an evaluation ran in.
* ``ddp``: the same model (``tessera.models.build_model``), data
  (``load_dataset`` + the same ``ShardSampler`` order), batch 32 per worker, SGD
  lr 0.05 momentum 0.9 (all read from the same job file), one intra-op thread
  per process as Tessera's workers get on 2 cores; ``--warmup`` untimed steps,
  then ``--steps`` timed ones.

The two systems run alternately ``--repeats`` times; each field is the median.
Output: one JSON line on stdout; progress on stderr.

    .venv/bin/python benchmarks/train_throughput.py            # 300 timed steps, 3 repeats
    .venv/bin/python benchmarks/train_throughput.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "examples" / "mnist.toml"
WORKERS = 2
SERVERS = 2

from _machine import busy_s as _busy_s, foreign_cpu_pct as _foreign_cpu_pct  # noqa: E402
from _machine import free_port as _free_port, log as _log, own_s as _own_s  # noqa: E402


# ------------------------------------------------------------------ Tessera


def run_tessera(steps: int, warmup: int, batch_size: int, deadline: float, *,
                mode: str = "sync", servers: int = SERVERS) -> dict:
    """One ``tessera run``; returns summary.json's and the steady-state throughput
    (steady: worker 0's metric windows, so only for the modes where every worker
    steps together: sync and allreduce)."""
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "tessera.cli.main", "run", str(JOB),
               "--workers", str(WORKERS), "--servers", str(servers), "--mode", mode,
               "--batch-size", str(batch_size), "--steps", str(warmup + steps),
               "--quiet", "--out", str(out)]
        t0 = time.monotonic()
        # Its own session: on a timeout the whole job (launcher and roles) is ended.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise TimeoutError("tessera run did not finish before the benchmark's deadline")
        finally:
            if proc.poll() is None:
                _kill_group(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"tessera run exited with {proc.returncode}:\n{output[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                   if line.strip()]
    # Steady state: the metrics.jsonl windows that start after the warm-up and hold
    # no evaluation. Each record covers the steps since the previous record; a
    # record that carries eval_* fields is the window the evaluation ran in.
    samples = seconds = 0.0
    prev = 0
    for r in records:
        evaluated = any(k.startswith("eval_") for k in r)
        if prev >= warmup and not evaluated:
            n = (r["step"] - prev) * batch_size * WORKERS
            samples += n
            seconds += n / r["samples_per_s"]
        prev = r["step"]
    return {"samples_per_s": summary["samples_per_s"],
            "steady_samples_per_s": samples / seconds if seconds else float("nan"),
            "job_wall_s": time.monotonic() - t0, "loop_wall_s": summary.get("wall_s")}


def _kill_group(proc: subprocess.Popen) -> None:
    """End the process group we started for ``proc`` (the launcher and its roles)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


# ---------------------------------------------------------------------- DDP


def _ddp_rank(rank: int, port: int, steps: int, warmup: int, batch_size: int, conn) -> None:
    try:
        from _machine import watch_parent
        watch_parent()
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F
        from torch.nn.parallel import DistributedDataParallel as DDP

        from tessera.config import load_config
        from tessera.data.datasets import load_dataset
        from tessera.data.sampler import ShardSampler
        from tessera.models import build_model

        torch.set_num_threads(1)
        cfg = load_config(str(JOB), {})
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORKERS)
        data = load_dataset(cfg.data)
        torch.manual_seed(cfg.train.seed)
        model = DDP(build_model(cfg.model, data.input_shape, data.num_classes))
        opt = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr,
                              momentum=cfg.optimizer.momentum)
        sampler = ShardSampler(len(data.train), batch_size=batch_size, num_workers=WORKERS,
                               rank=rank, seed=cfg.train.seed)

        def step(i: int) -> torch.Tensor:
            idx = torch.from_numpy(sampler.indices(i))
            loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        for i in range(warmup):
            step(i)
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            loss = step(i)
        dist.barrier()
        wall = time.perf_counter() - t0
        conn.send({"samples_per_s": steps * batch_size * WORKERS / wall, "wall_s": wall,
                   "final_loss": loss.item()})
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the driver shows it
        conn.send({"error": traceback.format_exc()})
        raise


def run_ddp(steps: int, warmup: int, batch_size: int, deadline: float) -> dict:
    return run_ranks(_ddp_rank, (steps, warmup, batch_size), deadline)


def run_ranks(target, args: tuple, deadline: float, world: int = WORKERS) -> dict:
    """``world`` spawned processes of ``target(rank, port, *args, conn)``, each sending
    one dict back (``error``: its traceback); the slowest rank's dict."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    os.environ.update(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    pipes, procs = [], []
    try:
        for rank in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=target, args=(rank, port, *args, child),
                            name=f"ddp{rank}", daemon=True)
            p.start()
            child.close()
            pipes.append(parent)
            procs.append(p)
        results = []
        for rank, (conn, p) in enumerate(zip(pipes, procs)):
            while not conn.poll(0.2):
                if not p.is_alive() and not conn.poll(0):
                    raise RuntimeError(f"DDP rank {rank} exited with code {p.exitcode}")
                if time.monotonic() > deadline:
                    raise TimeoutError("DDP did not finish before the benchmark's deadline")
            r = conn.recv()
            if "error" in r:
                raise RuntimeError(f"DDP rank {rank} failed:\n{r['error']}")
            results.append(r)
        for p in procs:
            p.join(timeout=max(1.0, min(20.0, deadline - time.monotonic())))
        # Both ranks timed the same barrier-to-barrier loop: the slower rate; every
        # other field (the final loss, ...) is rank 0's, as the other systems report it.
        return dict(results[0], samples_per_s=min(r["samples_per_s"] for r in results))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


# ------------------------------------------------------------------ driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="timed steps per run (default 300)")
    ap.add_argument("--warmup", type=int, default=20,
                    help="untimed steps before them (Tessera runs warmup + steps)")
    ap.add_argument("--batch-size", type=int, default=32, help="samples per worker per step")
    ap.add_argument("--repeats", type=int, default=3,
                    help="alternating Tessera/DDP runs; fields are medians (default 3)")
    ap.add_argument("--timeout", type=float, default=230.0, help="hard limit for the whole run, s")
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 steps, one repeat")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.repeats = 40, 10, 1

    def on_alarm(signum, frame):
        raise TimeoutError(f"train_throughput: hard timeout of {a.timeout:.0f} s reached")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(a.timeout))
    deadline = time.monotonic() + a.timeout - 5
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    busy0, own0 = _busy_s(), _own_s()
    tessera, ddp = [], []
    try:
        longest = 0.0
        for i in range(a.repeats):
            if i and time.monotonic() + 1.5 * longest > deadline:
                _log(f"stopping after {i} repeats: another would overrun --timeout")
                break
            started = time.monotonic()
            r0 = time.monotonic(), _busy_s(), _own_s()
            t = run_tessera(a.steps, a.warmup, a.batch_size, deadline)
            tessera.append(t)
            _log(f"tessera run {i + 1}/{a.repeats}: {t['samples_per_s']:.0f} samples/s "
                 f"(steady {t['steady_samples_per_s']:.0f}; job {t['job_wall_s']:.1f} s; other "
                 f"processes {_foreign_cpu_pct(r0[1], r0[2], time.monotonic() - r0[0]):.0f}% CPU)")
            r0 = time.monotonic(), _busy_s(), _own_s()
            d = run_ddp(a.steps, a.warmup, a.batch_size, deadline)
            ddp.append(d)
            _log(f"ddp run {i + 1}/{a.repeats}: {d['samples_per_s']:.0f} samples/s (other "
                 f"processes {_foreign_cpu_pct(r0[1], r0[2], time.monotonic() - r0[0]):.0f}% CPU)")
            longest = max(longest, time.monotonic() - started)
    except TimeoutError as exc:
        _log(f"{exc}; {len(ddp)} complete repeat(s)")
        if not ddp:
            return 2
        tessera = tessera[:len(ddp)]
    finally:
        signal.alarm(0)

    foreign = _foreign_cpu_pct(busy0, own0, time.monotonic() - t0)
    _log(f"done in {time.monotonic() - t0:.0f} s; other processes used {foreign:.0f}% of the "
         f"machine's CPU meanwhile")
    import torch
    t_all = statistics.median(t["samples_per_s"] for t in tessera)
    t_steady = statistics.median(t["steady_samples_per_s"] for t in tessera)
    d_sps = statistics.median(d["samples_per_s"] for d in ddp)
    row = {"bench": "train_throughput", "job": "examples/mnist.toml", "model": "cnn",
           "workers": WORKERS, "servers": SERVERS, "mode": "sync", "batch_size": a.batch_size,
           "steps": a.steps, "warmup_steps": a.warmup, "repeats": len(ddp),
           "tessera_samples_per_s": round(t_all, 1),
           "tessera_steady_samples_per_s": round(t_steady, 1),
           "ddp_samples_per_s": round(d_sps, 1),
           "ratio": round(t_all / d_sps, 3), "ratio_steady": round(t_steady / d_sps, 3),
           "loadavg_1m": round(load_before, 2), "foreign_cpu_pct": round(foreign, 1),
           "torch": torch.__version__}
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
