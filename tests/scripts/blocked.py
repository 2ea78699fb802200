"""A user's script for tests/test_orphans.py: trains a few digits steps, then blocks in a C
call that holds the GIL (libc ``sleep`` through ``ctypes.PyDLL``), so that neither its
heartbeat thread nor any Python signal handler can run: only the kernel can end it.
It leaves ``blocked`` in the run directory when it is there."""

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

import tessera

session = tessera.init()
torch.set_num_threads(1)
torch.manual_seed(0)
model = tessera.distribute(nn.Sequential(nn.Linear(64, 10)), "sgd", lr=0.1)
for step in range(20):
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    model.step()
(session.run_dir / "blocked").write_text("")
ctypes.PyDLL(None).sleep(600)  # the GIL held for 10 minutes
tessera.finish()
