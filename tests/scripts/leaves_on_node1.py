"""Worker 1 ends before it joins the job (a script's early exit, without tessera.init());
worker 0 joins and waits for it. Run by `tessera node` on two nodes: worker 1 is on the node
without the coordinator (tests/test_node.py)."""

import os
import sys

import torch

if os.environ.get("RANK") == "1":
    sys.exit(0)

import tessera  # noqa: E402

tessera.distribute(torch.nn.Linear(2, 1), "sgd", lr=0.1)  # waits for every worker to join
tessera.finish()
