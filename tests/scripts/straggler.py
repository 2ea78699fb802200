"""Test-only worker script: on rank 1 the model's forward sleeps, making it a straggler."""

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import tessera
from tessera.config.schema import DataConfig
from tessera.data.datasets import load_dataset

SLOW_RANK, SLEEP_S = 1, 0.012
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40


class Sleepy(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        if self.seconds:
            time.sleep(self.seconds)
        return x


tessera.init()
torch.set_num_threads(1)
data = load_dataset(DataConfig(dataset="digits"))
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), Sleepy(SLEEP_S if tessera.rank() == SLOW_RANK else 0.0),
                      nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
model = tessera.distribute(model, "sgd", lr=0.1, momentum=0.9)
sampler = tessera.shard(len(data.train), batch_size=32)
for step in range(steps):
    idx = torch.from_numpy(sampler.indices(step))
    loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
    model.scale_loss(loss).backward()
    model.step()
tessera.finish(steps=steps)
