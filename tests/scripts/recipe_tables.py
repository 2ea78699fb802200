"""A recipe with an embedding table, run plain (``--plain``) or in hybrid mode.

Digits features plus a categorical id (the sample's index mod 50) looked up in a
table of 8-wide rows; AdamW with two groups on the dense part, a warm-up + cosine
``LambdaLR``, a ``DistributedSampler``. Hybrid mode keeps the table on the servers
(``tessera.nn.ShardedEmbedding``, row-sparse SGD) and the dense part on the workers
(DDP); plain, an ``nn.Embedding`` that starts from the same rows
(``initial_rows``) is stepped by ``torch.optim.SGD``, which leaves rows without a
gradient unchanged, as the servers do.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tessera
from tessera.data.datasets import digits_arrays
import tessera.nn

ROWS, DIM = 50, 8


class Model(nn.Module):
    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table
        self.mlp = nn.Sequential(nn.Linear(64 + DIM, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x, ids):
        return self.mlp(torch.cat([x, self.table(ids)], 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--grad-scaler", action="store_true",
                    help="torch.amp.GradScaler (refused in hybrid mode: the rows leave scaled)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.manual_seed(0)
    x, y = digits_arrays()  # sklearn's load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    ids = torch.arange(len(y)) % ROWS
    train = TensorDataset(x[:1500], ids[:1500], y[:1500])
    if args.plain:
        from tessera.ps.embedding_ids import initial_rows
        table = nn.Embedding(ROWS, DIM)
        with torch.no_grad():
            table.weight.copy_(initial_rows(np.arange(ROWS), DIM, 0, 0.01))
    else:
        table = tessera.nn.ShardedEmbedding(ROWS, DIM, name="users", optimizer="sgd", lr=0.1)
    torch.manual_seed(1)  # the dense part's init, whatever building the table drew
    model = Model(table)
    dense = [p for n, p in model.mlp.named_parameters()]
    optimizer = torch.optim.AdamW([{"params": [p for p in dense if p.dim() > 1],
                                    "weight_decay": 0.1},
                                   {"params": [p for p in dense if p.dim() <= 1],
                                    "weight_decay": 0.0}], lr=3e-3)
    if args.plain:
        rows = torch.optim.SGD(table.parameters(), lr=0.1)
        sampler = torch.utils.data.DistributedSampler(train, num_replicas=1, rank=0, seed=0)
    else:
        model, optimizer = tessera.distribute(model, optimizer)
        sampler = tessera.DistributedSampler(train, seed=0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 5) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    loader = DataLoader(train, batch_size=args.batch, sampler=sampler, drop_last=True)
    step = 0
    scaler = torch.amp.GradScaler("cpu", enabled=args.grad_scaler)
    for xb, ib, yb in loader:
        if step == args.steps:
            break
        scaler.scale(F.cross_entropy(model(xb, ib), yb)).backward()
        scaler.step(optimizer)  # optimizer.step() without --grad-scaler
        scaler.update()
        if args.plain:
            rows.step()
            rows.zero_grad()
        optimizer.zero_grad()
        schedule.step()
        step += 1
    model.eval()
    with torch.no_grad():
        eval_loss = F.cross_entropy(model(x[1500:], ids[1500:]), y[1500:]).item()
    with open(args.out, "w") as f:
        json.dump({"eval_loss": eval_loss, "steps": step,
                   "lr": [g["lr"] for g in optimizer.param_groups],
                   "table": table.weight.tolist() if args.plain else None}, f)
    if not args.plain:
        tessera.finish()


if __name__ == "__main__":
    main()
