"""Test-only worker script that unpickles, for tests/test_no_pickle.py: under
``TESSERA_FORBID_PICKLE=1`` the guard must end the process and so the job.

    tessera launch ... unpickles.py loads    # worker 0 calls pickle.loads on a dict
    tessera launch --mode allreduce --servers 0 --workers 2 ... unpickles.py objects
        # worker 0 sends torch.distributed.send_object_list, worker 1 receives it
        # (torch unpickles it, as PipelineStage's shape inference did before static shapes)

Without the guard the job completes (each worker writes done-<rank>).
"""

import pickle
import sys

import torch
import torch.distributed as dist
from torch import nn

import tessera

how = sys.argv[1]
session = tessera.init()
if how == "loads":
    print("unpickled", pickle.loads(pickle.dumps({"a": 1})), flush=True)
else:
    tessera.distribute(nn.Linear(2, 2), "sgd", lr=0.1)  # joins the Gloo group
    objects = [{"shape": [4, 32]}]  # plain data: no class is looked up, yet it is unpickled
    if tessera.rank() == 0:
        dist.send_object_list(objects, dst=1)
    else:
        received = [None]
        dist.recv_object_list(received, src=0)
        print("received", received, flush=True)
    torch.zeros(1)
(session.run_dir / f"done-{tessera.rank()}").write_text("ok")
tessera.finish(steps=0)
