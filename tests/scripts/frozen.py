"""A fine-tuning recipe: a frozen first layer (``requires_grad=False``) under a trained
head, launched on several workers. ``same``: every worker builds the frozen layer from
one seed; ``differ``: each worker from its own (RANK), which the job must refuse."""

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import tessera

torch.manual_seed(0)
head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
if sys.argv[1] == "differ":
    torch.manual_seed(int(os.environ["RANK"]))
frozen = nn.Linear(4, 8).requires_grad_(False)
model = nn.Sequential(frozen, nn.ReLU(), head)
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
model, optimizer = tessera.distribute(model, optimizer)
data = torch.Generator().manual_seed(1 + tessera.rank())
for step in range(5):
    x = torch.randn(16, 4, generator=data)
    F.cross_entropy(model(x), x.argmax(1) % 3).backward()
    optimizer.step()
    optimizer.zero_grad()
tessera.finish()
