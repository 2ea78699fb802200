"""The single-process oracle: the same job in a plain PyTorch loop, no Tessera.

Same data order (one worker with the global batch), same model initialisation
(seeded), and ``torch.optim`` itself. Synchronous Tessera with W workers of batch
B must match this with batch W*B up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.config import load_config
from tessera.data.datasets import load_dataset
from tessera.data.sampler import ShardSampler
from tessera.models import build_model
from tessera.ps.optim import torch_optimizer


def train_reference(job_file: str, *, global_batch: int, steps: int, overrides=None) -> dict:
    cfg = load_config(job_file, overrides or {})
    torch.set_num_threads(1)
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    opt = torch_optimizer(cfg.optimizer, model.parameters(), foreach=False)
    sampler = ShardSampler(len(data.train), batch_size=global_batch, num_workers=1, rank=0,
                           seed=cfg.train.seed)
    for step in range(steps):
        idx = torch.from_numpy(sampler.indices(step))
        loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(data.test.x)
        return {"eval_loss": F.cross_entropy(logits, data.test.y, reduction="sum").item()
                / len(data.test.y),
                "eval_accuracy": (logits.argmax(1) == data.test.y).float().mean().item()}
