"""One measured run of benchmarks/table_cache.py: the same model and batches, trained by
Tessera (as a ``tessera launch`` worker) or all-local (``--local``, one plain process).

Model: an EmbeddingBag (sum) of DIM-wide rows over hashed ids in a 10^7-row id space,
then an MLP (DIM -> 128 -> 64 -> 1), logistic loss; plain SGD for rows and dense
weights. Each sample is a bag of BAG ids drawn Zipf(a) over ranks, each rank hashed to
an id; the label is planted (the sign of a fixed random score of its ids). Batches are
made before the clock starts (seeded: every system trains the same ones).

Writes one JSON object to ``--out`` (samples/s over the timed steps, this process's CPU
seconds, the final loss, the cache's hit rate).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ID_SPACE = 10 ** 7
DIM = 64


def make_batches(count: int, batch: int, bag: int, zipf_a: float, seed: int):
    rng = np.random.default_rng(seed)
    weights = np.random.default_rng(1234).standard_normal(4096)
    out = []
    for _ in range(count):
        ranks = rng.zipf(zipf_a, size=batch * bag * 2)
        ranks = ranks[ranks <= ID_SPACE][:batch * bag] - 1
        ids = (ranks * 2654435761 + 12345) % ID_SPACE  # hashed: hot ids spread out
        score = weights[ids % 4096].reshape(batch, bag).sum(1)
        out.append((torch.from_numpy(ids.astype(np.int64)),
                    torch.arange(0, batch * bag, bag, dtype=torch.int64),
                    torch.from_numpy((score > 0).astype(np.float32))))
    return out


class Model(nn.Module):
    def __init__(self, bag: nn.Module):
        super().__init__()
        self.bag = bag
        self.mlp = nn.Sequential(nn.Linear(DIM, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                 nn.Linear(64, 1))

    def table_lookups(self, ids, offsets):  # noqa: ARG002 - what prefetch pulls
        return [(self.bag, ids)]

    def forward(self, ids, offsets):
        return self.mlp(self.bag(ids, offsets)).squeeze(1)


def run_local(args, batches) -> dict:
    # The local limit: the ids mapped beforehand (untimed) to a vocabulary of the run's
    # distinct ids, as a single-machine recommender builds its vocabulary offline.
    flat = torch.cat([b[0] for b in batches])
    vocab, inverse = torch.unique(flat, return_inverse=True)
    mapped, at = [], 0
    for ids, offsets, y in batches:
        mapped.append((inverse[at:at + len(ids)], offsets, y))
        at += len(ids)
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(len(vocab), DIM, mode="sum", sparse=True)
    nn.init.uniform_(bag.weight, -0.01, 0.01)
    model = Model(bag)
    sparse = torch.optim.SGD(bag.parameters(), lr=args.lr)
    dense = torch.optim.SGD(model.mlp.parameters(), lr=args.lr)

    def step(batch):
        ids, offsets, y = batch
        loss = F.binary_cross_entropy_with_logits(model(ids, offsets), y)
        loss.backward()
        sparse.step()
        dense.step()
        sparse.zero_grad()
        dense.zero_grad()
        return loss
    return timed(step, mapped, args.warmup)


def timed(step, batches, warmup: int, iterate=iter) -> dict:
    t0 = c0 = None
    loss = None
    for k, batch in enumerate(iterate(batches)):
        if k == warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        loss = step(batch)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = (len(batches) - warmup) * len(batches[0][2])
    return {"samples_per_s": n / wall, "cpu_s": cpu, "wall_s": wall,
            "final_loss": float(loss.item())}


def run_tessera(args, batches) -> dict:
    import tessera
    import tessera.nn
    job = tessera.init()
    torch.manual_seed(0)
    bag = tessera.nn.ShardedEmbeddingBag(ID_SPACE, DIM, mode="sum", name="bag",
                                         optimizer="sgd", lr=args.lr, init_scale=0.01)
    model = tessera.distribute(Model(bag), "sgd", lr=args.lr)

    def step(batch):
        ids, offsets, y = batch
        loss = F.binary_cross_entropy_with_logits(model(ids, offsets), y)
        loss.backward()
        model.step()
        return loss

    def iterate(items):
        if args.prefetch:
            return tessera.nn.prefetching(model, items, inputs=lambda b: b[:2])
        return iter(items)
    if args.cprofile:
        import cProfile
        prof = cProfile.Profile(time.process_time)
        prof.enable()
    out = timed(step, batches, args.warmup, iterate)
    if args.cprofile:
        prof.disable()
        prof.dump_stats(args.cprofile)
    cache = bag._cache
    out["cache_hit_rate"] = cache.hits / max(1, cache.asked) if cache is not None else 0.0
    out["cache_mb"] = cache.nbytes / 2**20 if cache is not None else 0.0
    out["comm_wait_s"] = model.comm_wait_s
    tessera.finish()
    return out if job.rank == 0 else {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local", action="store_true")
    ap.add_argument("--prefetch", action="store_true")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--bag", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cprofile", default="", help="cProfile the Tessera loop into this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    batches = make_batches(args.steps, args.batch, args.bag, args.zipf, seed=7)
    out = run_local(args, batches) if args.local else run_tessera(args, batches)
    if out:
        with open(args.out, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
