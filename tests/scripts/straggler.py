"""Test-only worker script: on rank 1 the model's forward sleeps, making it a straggler;
rank 0 evaluates on the test split every ``EVAL_EVERY`` steps, the user's own way
(``model.eval()`` and ``torch.no_grad()``), and its forward then sleeps ``EVAL_SLEEP_S``:
an evaluation of known cost, which the profile must count as evaluation, not compute."""

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import tessera
from tessera.config.schema import DataConfig
from tessera.data.datasets import load_dataset

SLOW_RANK, SLEEP_S = 1, 0.012
EVAL_EVERY, EVAL_SLEEP_S = 10, 0.03  # worker 0: 3 ms per step on average
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40


class Sleepy(nn.Module):
    def __init__(self, seconds: float, eval_seconds: float = 0.0):
        super().__init__()
        self.seconds, self.eval_seconds = seconds, eval_seconds

    def forward(self, x):
        seconds = self.seconds if self.training else self.eval_seconds
        if seconds:
            time.sleep(seconds)
        return x


tessera.init()
torch.set_num_threads(1)
data = load_dataset(DataConfig(dataset="digits"))
torch.manual_seed(0)
sleepy = Sleepy(SLEEP_S, 0.0) if tessera.rank() == SLOW_RANK else Sleepy(0.0, EVAL_SLEEP_S)
model = nn.Sequential(nn.Flatten(), sleepy,
                      nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
model = tessera.distribute(model, "sgd", lr=0.1, momentum=0.9)
sampler = tessera.shard(len(data.train), batch_size=32)
for step in range(steps):
    idx = torch.from_numpy(sampler.indices(step))
    loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
    model.scale_loss(loss).backward()
    model.step()
    if tessera.rank() == 0 and step % EVAL_EVERY == EVAL_EVERY // 2:  # within the steps
        model.eval()
        with torch.no_grad():
            accuracy = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
        model.train()
tessera.finish(steps=steps)
