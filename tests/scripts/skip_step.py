"""A loop that skips a step after backward, as many scripts guard against a bad gradient:
``norm = clip_grad_norm_(...)``; ``if not torch.isfinite(norm): optimizer.zero_grad();
continue``. Worker 0's loss is NaN at ``--nan-at`` (plain: the global batch's). With
``--no-clip`` the script skips every ``--nan-at``-th step by its own rule instead, which
the servers cannot follow (the gradients left during backward). Plain (``--plain``) it
runs one process at batch W·b on the same global batches.

    python skip_step.py --plain --out want.json
    tessera launch --workers 2 --servers 1 skip_step.py --out got.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

import tessera
from tessera.data.datasets import digits_arrays


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--workers", type=int, default=2, help="with --plain: the W to match")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--nan-at", type=int, default=4)
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    x, y = digits_arrays()
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rank, world, batch = 0, 1, args.batch * args.workers
    if not args.plain:
        model, optimizer = tessera.distribute(model, optimizer)
        rank, world, batch = tessera.rank(), tessera.num_workers(), args.batch
    skipped = []
    for step in range(args.steps):
        at = step * batch * world + rank * batch
        loss = F.cross_entropy(model(x[at:at + batch]), y[at:at + batch])
        if step == args.nan_at and rank == 0 and not args.no_clip:
            loss = loss * float("nan")
        loss.backward()
        if args.no_clip:
            if step % args.nan_at == args.nan_at - 1:  # the script's own rule
                optimizer.zero_grad()
                skipped.append(step)
                continue
        else:
            norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0) if args.plain
                    else model.clip_grad_norm_(10.0))
            if not torch.isfinite(norm):
                optimizer.zero_grad()
                skipped.append(step)
                continue
        optimizer.step()
        optimizer.zero_grad()
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"skipped": skipped, "params": {k: v.reshape(-1).tolist()
                                                      for k, v in model.state_dict().items()}}, f)
    if not args.plain:
        tessera.finish()


if __name__ == "__main__":
    main()
