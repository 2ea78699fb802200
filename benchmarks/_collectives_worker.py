"""One worker of ``metric_collectives.py``: a recipe's metric collectives, timed.

Under ``tessera launch`` (``tessera.distribute`` forms the workers' group: the server
modes' store-backed one, or allreduce mode's Gloo) or, with ``--ddp``, as a plain DDP
script under torchrun's environment (``init_process_group("gloo")``). Times each call
``--calls`` times after ``--warmup`` untimed ones, a barrier before each kind, and writes
the median microseconds per kind to ``--out`` (rank 0) / ``--out``.rank1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ddp", action="store_true")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    net = nn.Linear(8, 2)
    if a.ddp:
        dist.init_process_group("gloo")
    else:
        import tessera
        tessera.distribute(net, torch.optim.SGD(net.parameters(), lr=0.1))
    rank = dist.get_rank()
    metrics = torch.tensor([1.0, 2.0, 3.0, 4.0])      # a loss sum, correct, count, ...
    block = torch.ones(16384)                          # 64 KiB: a histogram, a batch of scores
    kinds = {
        "all_reduce_16B": lambda: dist.all_reduce(metrics.clone()),
        "all_reduce_64KiB": lambda: dist.all_reduce(block.clone()),
        "all_gather_object": lambda: dist.all_gather_object([None] * dist.get_world_size(),
                                                            {"rank": rank, "acc": 0.5}),
        "broadcast_16B": lambda: dist.broadcast(metrics.clone(), src=0),
        "barrier": lambda: dist.barrier(),
    }
    got = {"backend": dist.get_backend(), "world": dist.get_world_size()}
    for name, call in kinds.items():
        dist.barrier()
        for _ in range(a.warmup):
            call()
        times = []
        for _ in range(a.calls):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        got[f"{name}_us"] = round(1e6 * statistics.median(times), 1)
    with open(a.out if rank == 0 else f"{a.out}.rank{rank}", "w") as f:
        json.dump(got, f)
    if a.ddp:
        dist.destroy_process_group()
    else:
        import tessera
        tessera.finish()


if __name__ == "__main__":
    main()
