"""Recommendation models whose embedding tables live on the parameter servers."""

from __future__ import annotations

import msgspec
import torch
from torch import nn

from tessera.config.schema import ModelConfig
from tessera.parallel.embedding import ShardedEmbedding


def _table(cfg: ModelConfig, num: int | None, dim: int, name: str, seed: int) -> ShardedEmbedding:
    table = ShardedEmbedding(num, dim, name=name, init_scale=cfg.embedding_init, seed=seed,
                             optimizer=cfg.embedding_optimizer, lr=cfg.embedding_lr,
                             weight_decay=cfg.embedding_weight_decay,
                             admit_after=cfg.admit_after, evict_after=cfg.evict_after,
                             max_rows=cfg.max_rows_per_server)
    if cfg.table_memory_mb:  # the byte cap of each server's shard (tessera.ps.embedding)
        table.spec = msgspec.structs.replace(
            table.spec, memory_bytes=int(cfg.table_memory_mb * (1 << 20)),
            eviction=cfg.eviction, lfu_half_life=cfg.lfu_half_life,
            filter_bytes=int(cfg.admission_filter_mb * (1 << 20)))
    return table


class DLRM(nn.Module):
    """A small DLRM (Naumov et al., 2019) for ratings: sharded user, item and side-feature
    embeddings, their pairwise dot products, and an MLP, plus the global mean rating.

    ``forward(users, items, user_side, item_side)`` with side features as int64
    ``[batch, n]`` codes; predicts a rating.
    """

    def __init__(self, cfg: ModelConfig, *, num_users: int, num_items: int,
                 side_sizes: dict[str, int], global_mean: float):
        super().__init__()
        d = cfg.embedding_dim
        self.user = _table(cfg, num_users, d, "user", 1)
        self.item = _table(cfg, num_items, d, "item", 2)
        self.user_bias = _table(cfg, num_users, 1, "user_bias", 3)
        self.item_bias = _table(cfg, num_items, 1, "item_bias", 4)
        self.side_names = list(side_sizes)
        self.side = nn.ModuleList(_table(cfg, size, d, f"side_{name}", 10 + i)
                                  for i, (name, size) in enumerate(side_sizes.items()))
        n = 2 + len(self.side)
        layers, width = [], n * d + n * (n - 1) // 2
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))

    def forward(self, users, items, side):
        vecs = [self.user(users), self.item(items)] + [t(side[:, i]) for i, t in enumerate(self.side)]
        stacked = torch.stack(vecs, dim=1)  # [B, n, d]
        dots = torch.bmm(stacked, stacked.transpose(1, 2))
        iu = torch.triu_indices(len(vecs), len(vecs), offset=1)
        inter = dots[:, iu[0], iu[1]]
        x = torch.cat([stacked.flatten(1), inter], dim=1)
        out = self.mlp(x).squeeze(1) + (vecs[0] * vecs[1]).sum(1)
        return out + self.user_bias(users).squeeze(1) + self.item_bias(items).squeeze(1) \
            + self.global_mean


class HashedLogReg(nn.Module):
    """Logistic regression over hashed feature ids: one sharded scalar weight per id
    (an unbounded table: only ids seen take memory), summed over fields, plus a bias."""

    def __init__(self, cfg: ModelConfig, *, id_space: int):
        super().__init__()
        self.weights = _table(cfg, id_space, 1, "weights", 7)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, ids):  # [B, fields] -> logits [B]
        return self.weights(ids).squeeze(-1).sum(1) + self.bias
