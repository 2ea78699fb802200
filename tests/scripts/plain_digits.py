"""A user's script, as examples/train_script.py but short, for tests/test_inprocess.py.

Run as ``python plain_digits.py STEPS [fail]`` (no launcher: the whole job in this
process) or under ``tessera launch``. It reports its eval loss and leaves its final
parameters in the run directory (``final_params.npy``) for the tests to compare;
with ``fail`` it raises after training instead of calling ``tessera.finish()``.
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import tessera
from tessera.data.datasets import digits_arrays

steps = int(sys.argv[1])
session = tessera.init()
torch.set_num_threads(1)
data, target = digits_arrays()  # sklearn's load_digits(), without importing sklearn
x = torch.tensor(data / 16.0, dtype=torch.float32)
y = torch.tensor(target)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, test = perm[:1400], perm[1400:]
train_x, train_y, test_x, test_y = x[train], y[train], x[test], y[test]

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
sampler = tessera.shard(len(train_x), batch_size=32)
model = tessera.distribute(model, "sgd", lr=0.1, momentum=0.9)
for step in range(model.start_step(steps), steps):
    idx = torch.from_numpy(sampler.indices(step))
    loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
    model.scale_loss(loss).backward()
    model.step()

if sys.argv[2:] == ["fail"]:
    raise RuntimeError("plain_digits failed on purpose after training")
with torch.no_grad():
    eval_loss = F.cross_entropy(model(test_x), test_y).item()
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
np.save(session.run_dir / "final_params.npy", flat.numpy())
tessera.finish(eval_loss=eval_loss, steps=steps)
