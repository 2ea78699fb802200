"""Worker script of benchmarks/stragglers.py (run by ``tessera launch``, not by hand).

Trains an MLP on digits with ``tessera.distribute(model, "sgd", lr=0.1,
momentum=0.9)``; rank ``--slow-rank`` is a persistent straggler that sleeps at the
start of every step: a fixed ``--sleep-ms``, or (calibration, ``--sleep-ms 0``)
whatever makes its step ``--slow-factor`` times the other workers' median step
time: the others publish their median of the last 20 steps in ``fast_ms`` under
``--sync-dir``, and the straggler sleeps ``factor * fast - own work`` (its own
median step time without the sleep), or ``(factor - 1) * own work`` before the
first number arrives.

How many steps each worker takes:

* default: every worker takes ``--steps`` steps (sync and ssp need equal clock
  counts: a worker that stops early would leave the other waiting for it);
* ``--budget B``: the workers share a budget of B steps, claimed one at a time
  from a counter file under ``--sync-dir`` (flock); a faster worker claims more.
  Only safe in async mode, where nobody waits for anybody.

With the job's ``--balance speed`` (stragglers.py's "balance" system), each step's
global batch is split by the workers' measured speeds
(:class:`tessera.train.balance.SpeedBalance`), and the straggler's sleep is per
sample: ``--sleep-ms`` is for a step of ``--batch-size`` samples and scales with its
share (it computes 3x slower, whatever its share). Without balance every share is
``--batch-size``, so the sleep is the same as before.

All workers start their first step together (a file barrier under ``--sync-dir``,
after start-up), and each writes ``stats.<rank>.json`` there: steps taken, wall
clock of its first step's start and last step's end, median step time. Worker 0
waits until every worker has finished training, pulls the final parameters,
evaluates on the test split and passes ``eval_accuracy`` to ``tessera.finish``.
"""

import argparse
import fcntl
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import tessera
from tessera.config.schema import DataConfig
from tessera.data.datasets import load_dataset

from stragglers import transient_delayed  # (this script's directory is on sys.path)

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--budget", type=int, default=0, help="shared step budget (async only)")
ap.add_argument("--slow-factor", type=float, default=3.0)
ap.add_argument("--sleep-ms", type=float, default=0.0, help="> 0: sleep this long per step")
ap.add_argument("--slow-rank", type=int, default=1)
ap.add_argument("--batch-size", type=int, default=32)
ap.add_argument("--sync-dir", required=True)
ap.add_argument("--transient", type=float, default=0.0,
                help="> 0: no persistent straggler; at each step, with this probability, one "
                     "worker drawn at random takes 3x --base-ms instead of --base-ms")
ap.add_argument("--base-ms", type=float, default=10.0,
                help="transient case: every step's emulated compute (a sleep), ms")
args = ap.parse_args()


def transient_pause(index: int) -> float:
    """Seconds this worker sleeps at global step ``index`` in the transient case: the
    same draw on every worker (seeded by the step), so at most one is delayed."""
    delayed = transient_delayed(index, args.transient, workers) == rank
    return (3.0 if delayed else 1.0) * args.base_ms / 1e3


def wait_files(names, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not all(os.path.exists(os.path.join(args.sync_dir, n)) for n in names):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s} s for {names} in {args.sync_dir}")
        time.sleep(0.001)


def touch(name):
    with open(os.path.join(args.sync_dir, name), "w"):
        pass


def publish_fast_ms(ms: float) -> None:
    path = os.path.join(args.sync_dir, "fast_ms")
    with open(path + f".{rank}", "w") as f:
        f.write(repr(ms))
    os.replace(path + f".{rank}", path)


def read_fast_ms() -> float:
    try:
        with open(os.path.join(args.sync_dir, "fast_ms")) as f:
            return float(f.read())
    except (OSError, ValueError):
        return 0.0


class Budget:
    """A step counter shared by the workers: claim() -> the global index of this step."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def claim(self) -> int:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(self.fd, 8, 0)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else 0
            os.pwrite(self.fd, (n + 1).to_bytes(8, "little"), 0)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return n


job = tessera.init()
torch.set_num_threads(1)
rank, workers = tessera.rank(), tessera.num_workers()
data = load_dataset(DataConfig(dataset="digits"))
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                      nn.Linear(64, 10))
model = tessera.distribute(model, "sgd", lr=0.1, momentum=0.9)
sampler = tessera.shard(len(data.train), batch_size=args.batch_size)
slow = rank == args.slow_rank and not args.transient
budget = Budget(os.path.join(args.sync_dir, "budget")) if args.budget else None
balance = None
if job.cfg.train.balance == "speed":
    from tessera.train.balance import SpeedBalance
    balance = SpeedBalance(model.client, sampler)
samples = 0

touch(f"ready.{rank}")
wait_files([f"ready.{r}" for r in range(workers)])
t_first = time.time()
step_s, work_s, slept_s = [], [], []
step = 0
delayed = 0
while True:
    index = budget.claim() if budget else step
    if index >= (args.budget if budget else args.steps):
        break
    t0 = time.perf_counter()
    if balance:
        balance.begin()
    idx = torch.from_numpy(sampler.indices(step))
    share = len(idx) / args.batch_size  # 1 unless balanced
    samples += len(idx)
    if args.transient:
        pause = transient_pause(index)
        delayed += pause > args.base_ms / 1e3
        time.sleep(pause)
    elif slow:  # the straggler's extra compute
        if args.sleep_ms > 0:
            pause = args.sleep_ms / 1e3
        elif work_s:
            own = statistics.median(work_s[-20:])
            fast = read_fast_ms()
            pause = (max(0.0, args.slow_factor * fast / 1e3 - own) if fast
                     else (args.slow_factor - 1) * own)
        else:
            pause = 0.0
        time.sleep(pause * share)
        slept_s.append(pause * share)
    t1 = time.perf_counter()
    loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
    model.scale_loss(loss).backward()
    if balance:
        balance.computed()
    model.step()
    if balance:
        balance.after_step(model.clock)
    t2 = time.perf_counter()
    step_s.append(t2 - t0)
    work_s.append(t2 - t1)
    step += 1
    if not slow and args.sleep_ms <= 0 and step % 10 == 0:
        publish_fast_ms(1e3 * statistics.median(step_s[-20:]))
t_last = time.time()
with open(os.path.join(args.sync_dir, f"stats.{rank}.json"), "w") as f:
    json.dump({"rank": rank, "steps": step, "t_first": t_first, "t_last": t_last,
               "step_ms": 1e3 * statistics.median(step_s) if step_s else 0.0,
               "work_ms": 1e3 * statistics.median(work_s) if work_s else 0.0,
               "sleep_ms": 1e3 * statistics.median(slept_s) if slept_s else 0.0,
               "slow": slow, "delayed_steps": delayed, "samples": samples,
               "final_loss": float(loss.item()) if step_s else None}, f)
touch(f"done.{rank}")

stats = {"steps": step}
if rank == 0:
    # Every worker's last push has been applied once its done file exists: pull the
    # final parameters (clock 0 never waits) and evaluate them.
    wait_files([f"done.{r}" for r in range(workers)])
    model._copy_in(model.client.pull(clock=0))
    with torch.no_grad():
        accuracy = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
    stats["eval_accuracy"] = accuracy
tessera.finish(**stats)
