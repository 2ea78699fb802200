"""Test-only worker script for train.balance: every sample costs a sleep, 3x on one rank.

    balance.py STEPS SLOW_RANK (-1: nobody slow)

The job's ``--balance`` decides whether the split follows the workers' speeds
(tessera.train.balance.SpeedBalance over the ``tessera.shard`` sampler). The planted
cost is per sample, so a worker given fewer samples is done sooner.
"""

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import tessera
from tessera.config.schema import DataConfig
from tessera.data.datasets import load_dataset
from tessera.train.balance import SpeedBalance

PER_SAMPLE_S = 0.0006  # 19 ms for 32 samples: the sleep, not the machine's load, sets speed
steps = int(sys.argv[1])
slow_rank = int(sys.argv[2])

job = tessera.init()
torch.set_num_threads(1)
data = load_dataset(DataConfig(dataset="digits"))
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
model = tessera.distribute(model, "sgd", lr=0.1, momentum=0.9)
sampler = tessera.shard(len(data.train), batch_size=32)
factor = 3.0 if tessera.rank() == slow_rank else 1.0
balance = SpeedBalance(model.client, sampler) if job.cfg.train.balance == "speed" else None
for step in range(steps):
    if balance:
        balance.begin()
    idx = torch.from_numpy(sampler.indices(step))
    time.sleep(factor * PER_SAMPLE_S * len(idx))
    loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
    model.scale_loss(loss).backward()
    if balance:
        balance.computed()
    model.step()
    if balance:
        balance.after_step(model.clock)
tessera.finish(steps=steps, **(balance.stats() if balance else {}))
