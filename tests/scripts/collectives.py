"""A DDP-style script's own torch.distributed calls in a server mode: each worker checks
what every collective of the server modes' group (tessera.parallel.collectives) gave it
and writes ``--out``.rank<R>; ``--mismatch``: worker 0 calls all_reduce where worker 1
calls broadcast; ``--late S``: worker 1 sleeps S seconds before its collectives (async
workers drift apart; worker 0 waits in the first one)."""

import argparse
import json
import time

import torch
import torch.distributed as dist
from torch import nn

import tessera

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--mismatch", action="store_true")
ap.add_argument("--late", type=float, default=0.0)
args = ap.parse_args()

torch.manual_seed(0)
net = nn.Linear(4, 2)
model, optimizer = tessera.distribute(net, torch.optim.SGD(net.parameters(), lr=0.1))
rank, world = dist.get_rank(), dist.get_world_size()
for _ in range(3):
    model(torch.randn(8, 4)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
if rank == 1:
    time.sleep(args.late)
if args.mismatch:
    (dist.all_reduce(torch.ones(2)) if rank == 0 else dist.broadcast(torch.ones(2), 0))

got = {"rank": rank, "world": world, "backend": dist.get_backend(),
       "tessera_rank": tessera.rank()}
t = torch.tensor([rank + 1.0, 0.1 * (rank + 1)])
dist.all_reduce(t)
got["sum"] = t.tolist()
for name, op in (("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN),
                 ("avg", dist.ReduceOp.AVG), ("product", dist.ReduceOp.PRODUCT)):
    v = torch.tensor([rank + 2.0])
    dist.all_reduce(v, op=op)
    got[name] = v.item()
bits = torch.tensor([1 << rank], dtype=torch.int32)
dist.all_reduce(bits, op=dist.ReduceOp.BOR)
got["bor"] = bits.item()
half = torch.full((3,), rank + 1.0, dtype=torch.bfloat16)
dist.all_reduce(half)
got["bf16"] = half.float().tolist()
b = torch.tensor([42.0 if rank == 0 else -1.0])
dist.broadcast(b, src=0)
got["broadcast"] = b.item()
outs = [torch.zeros(2) for _ in range(world)]
dist.all_gather(outs, torch.tensor([rank, rank * 10.0]))
got["all_gather"] = [o.tolist() for o in outs]
flat = torch.zeros(2 * world)
dist.all_gather_into_tensor(flat, torch.tensor([rank, rank * 10.0]))
stacked = torch.zeros(world, 2, dtype=torch.int64)
dist.all_gather_into_tensor(stacked, torch.tensor([rank, rank + 7]))
got["all_gather_into_tensor"] = [flat.tolist(), stacked.tolist()]
r = torch.tensor([rank + 1.0])
dist.reduce(r, dst=1)
got["reduce_at_1"] = r.item() if rank == 1 else None
g = [torch.zeros(1) for _ in range(world)] if rank == 0 else None
dist.gather(torch.tensor([rank * 5.0]), g, dst=0)
got["gather_at_0"] = [x.item() for x in g] if rank == 0 else None
s = torch.zeros(2)
dist.scatter(s, [torch.full((2,), float(k)) for k in range(world)] if rank == 0 else None, src=0)
got["scatter"] = s.tolist()
objs = [None] * world
dist.all_gather_object(objs, {"rank": rank})
got["all_gather_object"] = objs
work = dist.all_reduce(torch.ones(1), async_op=True)
got["async_op"] = bool(work.wait() and work.is_completed())
dist.barrier()
sampler = torch.utils.data.DistributedSampler(list(range(10)), shuffle=False)
got["sampler"] = [sampler.num_replicas, sampler.rank, list(sampler)]
with open(f"{args.out}.rank{rank}", "w") as f:
    json.dump(got, f)
tessera.finish()
