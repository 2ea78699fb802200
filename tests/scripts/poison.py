"""Test-only worker script: worker 1 feeds one poisoned batch (inputs x1000) at step
POISON_STEP so that its fp16 gradients overflow. Every worker records what it saw
around that step into RUN_DIR/poison-<rank>.json for the test to check.
"""

import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

import tessera
from tessera.data.datasets import load_dataset
from tessera.config.schema import DataConfig

POISON_STEP = 10
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40

session = tessera.init()
torch.set_num_threads(1)
data = load_dataset(DataConfig(dataset="digits"))
torch.manual_seed(0)
# Wide enough that each of its two partitions (one per server, ~300 KB) goes through shared
# memory on one host (payloads of 64 KiB or more): tests/test_amp.py runs it both ways.
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 10))
model = tessera.distribute(model, "sgd", lr=0.1, momentum=0.9)
sampler = tessera.shard(len(data.train), batch_size=32)

record = {"applied": []}
for step in range(steps):
    idx = torch.from_numpy(sampler.indices(step))
    x, y = data.train.x[idx], data.train.y[idx]
    if step == POISON_STEP and tessera.rank() == 1:
        x = x * 1000.0
    loss = F.cross_entropy(model(x), y)
    if step == POISON_STEP:
        record["before"] = model.flat.clone().tolist()
        record["scale_before"] = model.loss_scale
    model.scale_loss(loss).backward()
    applied = model.step()
    record["applied"].append(applied)
    if step == POISON_STEP:
        record["after"] = model.flat.clone().tolist()
        record["scale_after"] = model.loss_scale
    if step == POISON_STEP + 1:
        record["next"] = model.flat.clone().tolist()

with torch.no_grad():
    acc = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
record["eval_accuracy"] = acc
(session.run_dir / f"poison-{tessera.rank()}.json").write_text(json.dumps(record))
tessera.finish(eval_accuracy=acc, steps=steps)
