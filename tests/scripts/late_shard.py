"""Test-only worker script: ``tessera.shard`` called after ``tessera.distribute`` (so the
dataset size is not known when the worker registers). Trains ``argv[1]`` steps of digits
and writes the step and sample ids of its first step to ``RUN_DIR/first-<rank>.json``."""

import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

import tessera
from tessera.config.schema import DataConfig
from tessera.data.datasets import load_dataset

steps = int(sys.argv[1])
session = tessera.init()
torch.set_num_threads(1)
data = load_dataset(DataConfig(dataset="digits"))
torch.manual_seed(0)
model = tessera.distribute(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), "sgd", lr=0.1)
sampler = tessera.shard(len(data.train), batch_size=32)
first = model.start_step(steps)
for step in range(first, steps):
    idx = torch.from_numpy(sampler.indices(step))
    if step == first:
        (session.run_dir / f"first-{tessera.rank()}.json").write_text(
            json.dumps({"step": step, "ids": idx.tolist(), "samples": len(data.train)}))
    model.scale_loss(F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])).backward()
    model.step()
tessera.finish(steps=steps)
