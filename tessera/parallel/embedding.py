"""Sharded embedding tables: drop-ins for ``nn.Embedding`` and ``nn.EmbeddingBag``.

The table lives on the parameter servers, rows spread over them by hashing the
id (:func:`tessera.ps.embedding.owner_of`), created on first touch from a seeded
initializer, so a table can be declared with 10^9 or more virtual rows and only
the touched ones take memory (the PERSIA / Monolith design).

Phases of one step for a table (driven by :class:`~tessera.parallel.ps.PSDataParallel`):

1. ``forward(ids)``: the batch's *unique* ids are split by owner and pulled
   (for the current clock, so sync mode sees every earlier update); the rows
   become a leaf tensor that requires grad, and the output indexes it.
2. ``backward`` fills that leaf's gradient: one row per unique id.
3. ``step()``: the row-sparse gradient is pushed to the owning servers (every
   server gets a push, possibly empty, so it knows the clock is complete); the
   servers apply the sparse optimizer on fp32 rows.

Only the rows a batch touches travel, in both directions.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tessera.config.schema import OptimizerConfig
from tessera.ps.embedding_ids import owner_of
from tessera.transport.wire import TableSpec


class _Attached:
    """What a table needs from the wrapper: the client, the clock, the policy."""

    def __init__(self, client, clock_fn, param_dtype, device):
        self.client, self.clock_fn, self.param_dtype, self.device = (client, clock_fn,
                                                                     param_dtype, device)


class ShardedEmbeddingBase(nn.Module):
    def __init__(self, num_embeddings: Optional[int], embedding_dim: int, *, name: str = "",
                 init_scale: float = 0.01, seed: int = 0, optimizer: str = "adagrad",
                 lr: float = 0.05, admit_after: int = 1, evict_after: int = 0,
                 max_rows: int = 0, **optimizer_args):
        super().__init__()
        self.spec = TableSpec(name=name or "unnamed", dim=embedding_dim,
                              num_embeddings=num_embeddings, init_scale=init_scale, seed=seed,
                              admit_after=admit_after, evict_after=evict_after, max_rows=max_rows,
                              optimizer=OptimizerConfig(name=optimizer, lr=lr, **optimizer_args))
        self._named = bool(name)
        self.embedding_dim = embedding_dim
        self.num_embeddings = num_embeddings
        self._ps: Optional[_Attached] = None
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []

    @property
    def name(self) -> str:
        return self.spec.name

    def attach(self, ps: _Attached) -> None:
        self._ps = ps

    def _check(self, ids: torch.Tensor) -> None:
        where = f"table {self.name!r}"
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{where}: ids must be an int64 or int32 tensor, got {got}")
        if ids.numel() == 0:
            return
        low = int(ids.min())
        if low < 0:
            raise ValueError(f"{where}: ids must be >= 0, got {low}")
        if self.num_embeddings is not None:
            high = int(ids.max())
            if high >= self.num_embeddings:
                raise ValueError(f"{where}: id {high} is out of range; this table has "
                                 f"{self.num_embeddings} rows (ids 0..{self.num_embeddings - 1})")

    def _lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ps is None:
            raise RuntimeError(f"table {self.name!r} lives on the parameter servers: pass the "
                               f"model through tessera.distribute() before calling it")
        self._check(ids)
        ps = self._ps
        flat = ids.reshape(-1).to("cpu", torch.int64)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        uniq_np = uniq.numpy()
        num_servers = len(ps.client.servers)
        owners = owner_of(uniq_np, num_servers)
        clock = ps.clock_fn()
        handles = []
        for s in range(num_servers):
            mask = owners == s
            if mask.any():
                handles.append((mask, ps.client.pull_rows(self.name, s, uniq_np[mask], clock,
                                                           dim=self.embedding_dim)))
        rows = torch.empty(len(uniq_np), self.embedding_dim, dtype=ps.param_dtype)
        for mask, h in handles:
            rows[torch.from_numpy(mask)] = h.wait().reshape(-1, self.embedding_dim).to(
                ps.param_dtype)
        rows = rows.to(ps.device)
        if torch.is_grad_enabled() and self.training:
            rows.requires_grad_()
            self._pending.append((uniq_np, rows))
        return rows, inverse.reshape(ids.shape).to(ps.device)

    def push(self, clock: int, scale: float = 1.0) -> list:
        """Phase 3: push this step's row gradients to every server; returns handles."""
        ps = self._ps
        if ps is None:
            return []
        dim = self.embedding_dim
        if self._pending:
            ids = np.concatenate([u for u, _ in self._pending])
            grads = torch.cat([(r.grad if r.grad is not None else torch.zeros_like(r))
                               .detach().to("cpu", torch.float32) for _, r in self._pending])
            uniq, inverse = np.unique(ids, return_inverse=True)
            if len(uniq) != len(ids):  # the same id looked up twice this step: sum
                merged = torch.zeros(len(uniq), dim)
                merged.index_add_(0, torch.from_numpy(inverse.astype(np.int64)), grads)
                ids, grads = uniq, merged
        else:
            ids, grads = np.empty(0, dtype=np.int64), torch.zeros(0, dim)
        self._pending.clear()
        num_servers = len(ps.client.servers)
        owners = owner_of(ids, num_servers) if len(ids) else np.empty(0, dtype=np.int64)
        handles = []
        for s in range(num_servers):
            mask = owners == s
            handles.append(ps.client.push_rows(self.name, s, ids[mask],
                                               grads[torch.from_numpy(mask)], clock, scale))
        return handles


class ShardedEmbedding(ShardedEmbeddingBase):
    """Like ``nn.Embedding(num_embeddings, embedding_dim)``; ``num_embeddings=None``
    declares an unbounded hashed id space."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows, inverse = self._lookup(ids)
        return F.embedding(inverse, rows)


class ShardedEmbeddingBag(ShardedEmbeddingBase):
    """Like ``nn.EmbeddingBag(num_embeddings, embedding_dim, mode=...)``."""

    def __init__(self, num_embeddings: Optional[int], embedding_dim: int, *, mode: str = "mean",
                 **kwargs):
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"mode must be 'sum', 'mean' or 'max', got {mode!r}")
        self.mode = mode

    def forward(self, ids: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows, inverse = self._lookup(ids)
        return F.embedding_bag(inverse, rows, offsets, mode=self.mode,
                               per_sample_weights=per_sample_weights)


def tables_state(client, tables) -> dict[str, torch.Tensor]:
    """Every row the servers hold of each table, with its id (``tables.<name>.ids``,
    increasing, and ``tables.<name>.rows``): what ``final.safetensors`` and ``tessera
    export`` write for a table."""
    out: dict[str, torch.Tensor] = {}
    for table in tables:
        parts = [client.dump_rows(table.name, server) for server in client.row_servers()]
        ids = torch.cat([i for i, _ in parts])
        rows = torch.cat([r.reshape(len(i), table.embedding_dim) for i, r in parts])
        order = torch.argsort(ids)
        out[f"tables.{table.name}.ids"] = ids[order].contiguous()
        out[f"tables.{table.name}.rows"] = rows[order].contiguous()
    return out


def find_tables(model: nn.Module) -> list[ShardedEmbeddingBase]:
    """The model's sharded tables, named by their module path unless named explicitly."""
    tables = []
    for path, module in model.named_modules():
        if isinstance(module, ShardedEmbeddingBase):
            if not module._named:
                module.spec.name = path or "embedding"
            tables.append(module)
    names = [t.name for t in tables]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"two sharded tables share the name {sorted(dupes)[0]!r}; give each a "
                         f"distinct name=")
    return tables
