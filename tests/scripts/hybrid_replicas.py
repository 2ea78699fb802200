"""Test-only worker script for --mode hybrid: a model with a sharded embedding and a
dense MLP; every worker records a digest of its dense parameters after every step
into RUN_DIR/dense-<rank>.json, so the test can compare replicas step by step."""

import hashlib
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

import tessera
from tessera.config.schema import DataConfig
from tessera.data.datasets import load_dataset
from tessera.nn import ShardedEmbedding

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
session = tessera.init()
torch.set_num_threads(1)
data = load_dataset(DataConfig(dataset="digits"))


class DigitsWithEmbedding(nn.Module):
    """Each pixel's quantised intensity (0..16) at each position is an embedding id."""

    def __init__(self):
        super().__init__()
        self.emb = ShardedEmbedding(64 * 17, 8, name="pixels", optimizer="adagrad", lr=0.1)
        self.mlp = nn.Sequential(nn.Linear(64 * 8, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        ids = (x.reshape(len(x), 64) * 16).round().long() + 17 * torch.arange(64)
        return self.mlp(self.emb(ids).reshape(len(x), -1))


torch.manual_seed(0)
model = tessera.distribute(DigitsWithEmbedding(), "sgd", lr=0.1, momentum=0.9)
sampler = tessera.shard(len(data.train), batch_size=32)
digests = []
for step in range(steps):
    idx = torch.from_numpy(sampler.indices(step))
    loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
    model.scale_loss(loss).backward()
    model.step()
    digests.append(hashlib.sha256(model.dense_state().numpy().tobytes()).hexdigest())
with torch.no_grad():
    model.eval()
    acc = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
(session.run_dir / f"dense-{tessera.rank()}.json").write_text(json.dumps(digests))
tessera.finish(eval_accuracy=acc, steps=steps)
