"""Rows that change every clock, looked up through a worker cache: which clocks' values
did the model see? (tests/test_table_cache.py)

One sharded table of 1-wide rows, every row 0 at first (init_scale 0), plain SGD with
lr 1 on the servers, and a loss that is the sum of the rows looked up: each push
lowers each row it carries by exactly 1, so a row's value says how many pushes it had
taken, and so at which clock it was pulled. Each step looks up the 8 hot ids 0..7 and
4 of 40 cold ids (100..139, in turn: the cache of 16 rows must evict). The batches go
through ``tessera.nn.prefetching`` (the next batch's rows are pulled with this step's
pushes). ``seen.json`` (in the run directory): per step, the ids and the values the
forward got. The test recomputes each row's value at every clock and checks each seen
value was the row's value at a clock at most ``cache_staleness`` old.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

import tessera
import tessera.nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = tessera.nn.ShardedEmbedding(None, 1, name="rows", optimizer="sgd", lr=1.0,
                                                 init_scale=0.0)
        self.bias = nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, ids):
        rows = self.table(ids)
        if torch.is_grad_enabled():
            self.seen.append([ids.tolist(), rows.detach().reshape(-1).tolist()])
        return rows.sum() + self.bias.sum()


def batches(steps: int):
    for step in range(steps):
        cold = [100 + (4 * step + k) % 40 for k in range(4)]
        yield (torch.tensor(list(range(8)) + cold),)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    job = tessera.init()
    torch.set_num_threads(1)
    plain = Model()
    model = tessera.distribute(plain, "sgd", lr=0.001)
    for (ids,) in tessera.nn.prefetching(model, batches(args.steps), inputs=lambda b: b):
        model(ids).backward()
        model.step()
    if job.rank == 0:
        (job.run_dir / "seen.json").write_text(json.dumps(plain.seen))
    tessera.finish(steps=args.steps)


if __name__ == "__main__":
    main()
