"""One rank of a two-process DDP over Gloo with tessera's half-width all-reduce hook.

    python halfwidth_grads.py RANK STORE_FILE

For each wire dtype (bfloat16, float16), prints (rank 0) the averaged gradient of a
64-element parameter whose per-rank gradients are random fp32 values, and the fp32
mean they would average to, as one JSON line.
"""

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from tessera.parallel.halfwidth import WIRE, half_width_hook

rank, path = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
inputs = [torch.randn(1, 64, generator=torch.Generator().manual_seed(r)) for r in range(2)]
found = {}
for wire in WIRE:
    model = torch.nn.Linear(64, 1, bias=False)
    ddp = DDP(model)
    ddp.register_comm_hook(None, half_width_hook(wire))
    ddp(inputs[rank]).sum().backward()  # d/dw of w . x is x: this rank's gradient is its input
    found[wire] = {"grad": model.weight.grad.reshape(-1).tolist(),
                   "mean": ((inputs[0] + inputs[1]) / 2).reshape(-1).tolist()}
if rank == 0:
    print(json.dumps(found), flush=True)
dist.barrier()  # neither rank tears Gloo down while the other still talks to it
dist.destroy_process_group()
# End here: a DDP reducer torn down by the interpreter's exit after its group was destroyed
# can abort ("terminate called without an active exception"), once in a few runs on a
# loaded machine; the result above is what the test reads.
sys.stdout.flush()
os._exit(0)
