"""Uneven inputs: worker 1's data runs out after 6 steps, worker 0 trains 10 (a
DistributedSampler of the script's own making, or a last partial shard). ``--plain``:
one process computing what sync mode should give: the mean of both workers' gradients
while both train, then worker 0's alone. Writes the final parameters as JSON."""

import argparse
import json

import torch
from torch import nn

ap = argparse.ArgumentParser()
ap.add_argument("--plain", action="store_true")
ap.add_argument("--out", required=True)
args = ap.parse_args()
STEPS = {0: 10, 1: 6}

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(4, 8, generator=g), torch.randint(0, 2, (4,), generator=g)


if args.plain:
    for step in range(max(STEPS.values())):
        ranks = [r for r, n in STEPS.items() if step < n]
        optimizer.zero_grad()
        loss = sum(nn.functional.cross_entropy(model(x), y)
                   for x, y in (batch(r, step) for r in ranks)) / len(ranks)
        loss.backward()
        optimizer.step()
    rank = 0
else:
    import torch.distributed as dist

    import tessera
    model, optimizer = tessera.distribute(model, optimizer)
    rank = dist.get_rank()
    for step in range(STEPS[rank]):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
if rank == 0:
    with open(args.out, "w") as f:
        json.dump({k: v.reshape(-1).tolist() for k, v in model.state_dict().items()}, f)
if not args.plain:
    tessera.finish()
