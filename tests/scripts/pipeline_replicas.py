"""Test-only worker script: pipeline replicas start from replica 0's parameters.

Every worker builds the model from its own seed (so the replicas start apart unless
the stages take replica 0's values), trains 3 steps on its replica's own batches,
and writes a digest of its stage's parameters to RUN_DIR/replica-<rank>.json: the
test expects stage s equal on every replica (one replica's checkpoint is the job's).
"""

import hashlib
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

import tessera
from pipeline_model import make_model  # this script's folder is on sys.path


class Branch(nn.Module):
    """Two layers, one taken: with the argument ``branch`` replica 1 takes the other, so
    each replica leaves one of them without a gradient."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.use_b = nn.Linear(32, 32), nn.Linear(32, 32), False

    def forward(self, x):
        return self.b(x) if self.use_b else self.a(x)


session = tessera.init()
torch.set_num_threads(1)
rank = tessera.rank()
full = make_model()
if sys.argv[1:] == ["branch"]:
    torch.manual_seed(0)
    full = nn.Sequential(full[0], full[1], Branch(), *full[2:])
    full[2].use_b = rank // session.cfg.pipeline.stages == 1
torch.manual_seed(100 + rank)
with torch.no_grad():  # a different start on every worker
    for p in full.parameters():
        p.add_(torch.randn_like(p))
model = tessera.distribute(full, "adam", lr=0.01, loss_fn=F.mse_loss)
stages = session.cfg.pipeline.stages
g = torch.Generator().manual_seed(rank // stages)  # each replica its own data
for _ in range(3):
    x, y = torch.randn(16, 12, generator=g), torch.randn(16, 4, generator=g)
    model.train_step((x,), y)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                 for p in model.module.parameters())).hexdigest()
(session.run_dir / f"replica-{rank}.json").write_text(json.dumps({"digest": digest}))
tessera.finish(steps=3)
