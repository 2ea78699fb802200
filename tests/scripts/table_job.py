"""A small job with a sharded embedding table, for fault tests (tests/test_table_faults.py).

Digits features plus a categorical id (the sample's index mod 200) looked up in an
8-wide ``tessera.nn.ShardedEmbedding`` (adagrad on the servers); an MLP on top (SGD
with momentum on the servers). Written as a restartable loop (``model.start_step``),
so ``--max-restarts`` and ``--resume`` continue it; ``--sleep`` slows each step so a
test can kill a process while training runs (``--sleep-until FILE``: until the test
made FILE, then the rest go fast; the last step waits for FILE, so that the job cannot end
before the test has seen what it waits for, however slow the machine); ``--prefetch``
names each next batch to ``model.prefetch`` (its rows pulled with the step's pushes).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import tessera
from tessera.data.datasets import digits_arrays
import tessera.nn

ROWS, DIM = 200, 8


class Model(nn.Module):
    def __init__(self, dim: int = DIM, memory_mb: float = 0):
        super().__init__()
        self.table = tessera.nn.ShardedEmbedding(ROWS, dim, name="users", optimizer="adagrad",
                                                 lr=0.1, memory_mb=memory_mb)
        self.mlp = nn.Sequential(nn.Linear(64 + dim, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x, ids):
        return self.mlp(torch.cat([x, self.table(ids)], 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--sleep-until", default="",
                    help="sleep --sleep a step only until this file exists (a test that "
                         "acts while training runs lets the rest of the steps go fast); "
                         "the last step waits for it (at most 200 s)")
    ap.add_argument("--dim", type=int, default=DIM, help="the table's row width")
    ap.add_argument("--memory-mb", type=float, default=0, help="the table's byte cap")
    ap.add_argument("--prefetch", action="store_true",
                    help="name each next batch to model.prefetch (rows pulled ahead)")
    args = ap.parse_args()

    tessera.init()
    torch.set_num_threads(1)
    x, y = digits_arrays()  # sklearn's load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    ids = torch.arange(len(y)) % ROWS
    torch.manual_seed(0)
    model = tessera.distribute(Model(args.dim, args.memory_mb), "sgd", lr=0.05, momentum=0.9)
    sampler = tessera.shard(1500, batch_size=args.batch)
    first = model.start_step(args.steps)
    for step in range(first, args.steps):
        if args.sleep_until and step == args.steps - 1:
            deadline = time.monotonic() + 200  # then it ends, and the test says what it missed
            while not os.path.exists(args.sleep_until) and time.monotonic() < deadline:
                time.sleep(0.05)
        idx = torch.from_numpy(sampler.indices(step))
        if args.prefetch and step + 1 < args.steps:  # sent with this step's pushes
            ahead = torch.from_numpy(sampler.indices(step + 1))
            model.prefetch(x[ahead], ids[ahead], after_push=True)
        loss = F.cross_entropy(model(x[idx], ids[idx]), y[idx])
        loss.backward()
        model.step()
        if step % 5 == 4:
            tessera.log({"loss": loss.item()}, step=step + 1)
        if args.sleep and not (args.sleep_until and os.path.exists(args.sleep_until)):
            time.sleep(args.sleep)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[1500:], ids[1500:]).argmax(1) == y[1500:]).float().mean().item()
    tessera.finish(eval_accuracy=accuracy, steps=args.steps, first_step=first)


if __name__ == "__main__":
    main()
