"""A plain PyTorch training script made distributed with Tessera (see README).

    tessera launch --workers 2 --servers 2 examples/train_script.py --steps 200

Every line marked `# tessera` is what was added to the single-process version.
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import tessera  # tessera

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()

tessera.init()  # tessera: join the job the launcher started
torch.set_num_threads(1)
digits = load_digits()
x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, test = perm[:1400], perm[1400:]
train_x, train_y, test_x, test_y = x[train], y[train], x[test], y[test]

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
sampler = tessera.shard(len(train_x), batch_size=args.batch_size)  # tessera: this worker's share
model = tessera.distribute(model, "sgd", lr=0.1, momentum=0.9)  # tessera: replaces torch.optim.SGD

# A resumed job (--resume) or a restarted worker (--max-restarts) starts mid-run.
for step in range(model.start_step(args.steps), args.steps):
    idx = torch.from_numpy(sampler.indices(step))
    loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
    model.scale_loss(loss).backward()  # tessera: loss scaling (a no-op unless fp16)
    model.step()  # tessera: replaces optimizer.step(); optimizer.zero_grad()

with torch.no_grad():
    accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
if tessera.rank() == 0:
    print(f"test accuracy {accuracy:.4f}")
tessera.finish(eval_accuracy=accuracy, steps=args.steps)  # tessera: report and leave
