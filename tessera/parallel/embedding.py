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
from tessera.ps import kernels
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
                 max_rows: int = 0, memory_mb: float = 0, eviction: str = "lru",
                 lfu_half_life: int = 0, filter_mb: float = 0, **optimizer_args):
        super().__init__()
        # memory_mb: a hard cap per server on this table's shard (rows, optimizer state,
        # index, admission filter; [model] table_memory_mb), eviction "lru" or "lfu".
        self.spec = TableSpec(name=name or "unnamed", dim=embedding_dim,
                              num_embeddings=num_embeddings, init_scale=init_scale, seed=seed,
                              admit_after=admit_after, evict_after=evict_after, max_rows=max_rows,
                              memory_bytes=int(memory_mb * (1 << 20)), eviction=eviction,
                              lfu_half_life=lfu_half_life, filter_bytes=int(filter_mb * (1 << 20)),
                              optimizer=OptimizerConfig(name=optimizer, lr=lr, **optimizer_args))
        self._named = bool(name)
        self.embedding_dim = embedding_dim
        self.num_embeddings = num_embeddings
        self._ps: Optional[_Attached] = None
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []
        #: Lookups pulled ahead (:func:`issue_pulls`), oldest first, at most
        #: MAX_AHEAD: (ids, unique ids, inverse, the _Pull, this table's index in it).
        self._prefetched: list[tuple] = []
        #: A worker cache of hot rows (use_cache), or None.
        self._cache = None
        #: How many clocks old the rows this table is served may be (use_cache; 0: the
        #: current clock's). With >= 1 a prefetch goes out during the step it follows.
        self.row_staleness = 0
        #: While prefetch() runs the model dry: the ids tensors this table was called with.
        self._recording: Optional[list] = None

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

    def _plan(self, ids: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """The batch's unique ids (numpy, increasing) and each position's index into them
        (``torch.unique``; from :data:`~tessera.ps.kernels.WORKER_MIN_IDS` ids on, the
        same answer from :func:`~tessera.ps.kernels.unique_inverse`)."""
        if self._ps is None:
            raise RuntimeError(f"table {self.name!r} lives on the parameter servers: pass the "
                               f"model through tessera.distribute() before calling it")
        self._check(ids)
        flat = ids.reshape(-1).to("cpu", torch.int64)
        if kernels.ENABLED and flat.numel() >= kernels.WORKER_MIN_IDS:
            uniq, inverse = kernels.unique_inverse(flat.contiguous().numpy())
            return uniq, torch.from_numpy(inverse)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        return uniq.numpy(), inverse

    def use_cache(self, rows: int, staleness: int) -> None:
        """Serve this table rows at most ``staleness`` clocks old, and keep up to ``rows``
        hot rows on this worker (:class:`~tessera.parallel.table_cache.RowCache`; 0 rows:
        no cache, the staleness then only lets a prefetch overlap its step)."""
        from tessera.parallel.table_cache import RowCache
        self.row_staleness = staleness
        self._cache = (RowCache(rows, staleness, self.embedding_dim, torch.float32)
                       if rows > 0 else None)

    def _lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._recording is not None:  # a dry run naming the next step's lookups
            if not any(r is ids for r in self._recording):
                self._recording.append(ids)
            zeros = torch.zeros(1, self.embedding_dim, dtype=self._ps.param_dtype,
                                device=self._ps.device)
            return zeros, torch.zeros(ids.shape, dtype=torch.int64, device=self._ps.device)
        for n, ready in enumerate(self._prefetched):
            if ready[0] is ids or (ready[0].shape == ids.shape and torch.equal(ready[0], ids)):
                del self._prefetched[n]
                _, uniq_np, inverse, pull, k = ready  # sent by pull_tables() / prefetch
                rows = pull.take(k)
                break
        else:  # (a prefetch for other ids stays for the lookup it names)
            uniq_np, inverse = self._plan(ids)
            clock = self._ps.clock_fn()
            rows = _Pull([(self, uniq_np)], clock, clock).take(0)
        return self._rows(uniq_np, rows), inverse.reshape(ids.shape).to(self._ps.device)

    def _rows(self, uniq_np: np.ndarray, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(self._ps.device)
        if torch.is_grad_enabled() and self.training:
            rows.requires_grad_()
            self._pending.append((uniq_np, rows))
        return rows

    def gradient(self) -> tuple[np.ndarray, torch.Tensor]:
        """This step's row gradients (unique ids, increasing; fp32 rows), taken: phase 3's
        payload, before it is split by server."""
        dim = self.embedding_dim
        if len(self._pending) == 1 and _increasing(self._pending[0][0]):
            # One lookup this step (the usual case): its ids are already unique and
            # sorted, its gradient needs no merge and no copy.
            ids, r = self._pending[0]
            grads = (r.grad if r.grad is not None else torch.zeros_like(r)).detach() \
                .to("cpu", torch.float32)
        elif self._pending:
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
        return ids, grads

    def push(self, clock: int, scale: float = 1.0) -> list:
        """Phase 3: push this step's row gradients to every server; returns handles."""
        ps = self._ps
        if ps is None:
            return []
        ids, grads = self.gradient()
        num_servers = ps.client.num_shards
        owners = owner_of(ids, num_servers) if len(ids) else np.empty(0, dtype=np.int64)
        handles = []
        for s in range(num_servers):
            mask = owners == s
            if num_servers == 1 or mask.all():  # one server holds them all: no copies
                handles.append(ps.client.push_rows(self.name, s, ids, grads, clock, scale))
                continue
            handles.append(ps.client.push_rows(self.name, s, ids[mask],
                                               grads[torch.from_numpy(mask)], clock, scale))
        return handles


def _increasing(ids: np.ndarray) -> bool:
    """Strictly increasing (so unique): ids as :meth:`ShardedEmbeddingBase._plan` makes."""
    return len(ids) < 2 or bool((ids[1:] > ids[:-1]).all())


def push_tables(tables, clock: int, scale: float = 1.0) -> list:
    """Phase 3 for every table at once: one push per server carrying all tables' row
    gradients (ids shared by tables sent once), as TorchRec batches an
    ``EmbeddingBagCollection``; returns the handles. One table pushes as before."""
    tables = [t for t in tables if t._ps is not None]
    if len(tables) < 2:
        return [h for t in tables for h in t.push(clock, scale)]
    client = tables[0]._ps.client
    num_servers = client.num_shards
    parts = []  # per table: ids, grads, owner of each id
    for t in tables:
        ids, grads = t.gradient()
        parts.append((t.name, ids, grads,
                      owner_of(ids, num_servers) if len(ids) else np.empty(0, np.int64)))
    handles = []
    for s in range(num_servers):
        items = []
        for name, ids, grads, owners in parts:
            if num_servers == 1:
                items.append((name, ids, grads))
                continue
            mask = owners == s
            items.append((name, ids[mask], grads[torch.from_numpy(mask)]))
        handles.append(client.push_tables(s, items, clock, scale))
    return handles


class _Pull:
    """The rows of several tables' unique ids for one clock, asked of the servers at once
    (one message per server, whatever the number of tables) and taken later:
    :meth:`take` waits for the replies (the first call waits for all of them).

    Ids a table's :class:`~tessera.parallel.table_cache.RowCache` holds fresh enough for
    ``use_clock`` (the clock of the lookup that will take them) are not asked for; the
    rows pulled go into the cache, stamped ``clock``."""

    def __init__(self, items: list, clock: int, use_clock: int):
        self.items, self.clock = items, clock  # [(table, unique ids), ...]
        ps = items[0][0]._ps
        num_servers = ps.client.num_shards
        # Per item: rows served by its cache (or None) and the ids still to pull.
        self.cached, self.asks = [], []
        for t, uniq in items:
            cached = None
            if t._cache is not None and len(uniq):
                hit, rows = t._cache.lookup(uniq, use_clock)
                if hit.any():
                    cached = (hit, rows)
            self.cached.append(cached)
            self.asks.append(uniq if cached is None else uniq[~cached[0]])
        owners = [owner_of(a, num_servers) for a in self.asks]
        self.pulls = []  # ([(item, mask among its asked ids)], handle, several tables)
        for s in range(num_servers):
            asked = [(k, o == s) for k, o in enumerate(owners)]
            asked = [(k, m) for k, m in asked if m.any()]
            if len(asked) == 1:
                (k, m), = asked
                t = items[k][0]
                ids = self.asks[k] if m.all() else self.asks[k][m]
                h = ps.client.pull_rows(t.name, s, ids, clock, dim=t.embedding_dim)
                self.pulls.append((asked, h, False))
            elif asked:
                requests = [(items[k][0].name, self.asks[k][m], items[k][0].embedding_dim)
                            for k, m in asked]
                self.pulls.append((asked, ps.client.pull_tables(s, requests, clock), True))
        self.rows: list = []

    def take(self, k: int) -> torch.Tensor:
        if not self.rows:
            got: list = [None] * len(self.items)
            for asked, h, many in self.pulls:
                answers = h.wait() if many else [h.wait()]
                for (j, m), rows in zip(asked, answers):
                    t = self.items[j][0]
                    rows = rows.reshape(-1, t.embedding_dim)
                    if m.all():  # one server held every id asked: its reply, copied once
                        got[j] = rows.to(torch.float32, copy=True)
                        continue
                    if got[j] is None:
                        got[j] = torch.empty(len(m), t.embedding_dim)
                    got[j][torch.from_numpy(m)] = rows.to(torch.float32)
            for (t, uniq), cached, ask, pulled in zip(self.items, self.cached, self.asks, got):
                dtype = t._ps.param_dtype
                if pulled is None:
                    pulled = torch.empty(0, t.embedding_dim)
                if t._cache is not None:
                    t._cache.insert(ask, pulled, self.clock)
                if cached is None:
                    self.rows.append(pulled.to(dtype))
                    continue
                hit, rows_hit = cached
                rows = torch.empty(len(uniq), t.embedding_dim, dtype=dtype)
                rows[torch.from_numpy(hit)] = rows_hit.to(dtype)
                rows[torch.from_numpy(~hit)] = pulled.to(dtype)
                self.rows.append(rows)
            self.pulls = []
        return self.rows[k]


#: Prefetched lookups a table keeps waiting for their forward (older ones are dropped).
MAX_AHEAD = 2


def issue_pulls(lookups, clock: Optional[int] = None, use_clock: Optional[int] = None) -> None:
    """Send the pulls of several tables' next lookups (``[(table, ids tensor), ...]``)
    for ``clock`` (default: the current one) without waiting; each table's next call
    with those ids (the same tensor, or an equal one) takes the rows then, at
    ``use_clock`` (default ``clock``: the cache serves rows fresh enough for it). A
    table keeps at most MAX_AHEAD such lookups; an older one never used is dropped
    (its replies taken first)."""
    lookups = [(t, ids) for t, ids in lookups if t._ps is not None]
    if not lookups:
        return
    names = [t.name for t, _ in lookups]
    if len(set(names)) != len(names):
        raise ValueError(f"pull_tables: table {sorted(n for n in names if names.count(n) > 1)[0]!r}"
                         f" appears twice; pass each table once with all its ids")
    plans = [(t, ids, *t._plan(ids)) for t, ids in lookups]
    for t, _ in lookups:
        while len(t._prefetched) >= MAX_AHEAD:  # never used: drain its replies
            old = t._prefetched.pop(0)
            old[3].take(old[4])
    clock = lookups[0][0]._ps.clock_fn() if clock is None else clock
    pull = _Pull([(t, u) for t, _, u, _ in plans], clock,
                 clock if use_clock is None else use_clock)
    for k, (t, ids, u, inverse) in enumerate(plans):
        t._prefetched.append((ids, u, inverse, pull, k))


def pull_tables(lookups) -> None:
    """Pull the rows of several tables' next lookups in one message per server.

    ``lookups`` is ``[(table, ids), ...]``, the tables and the ids tensors the model's
    forward is about to call them with (``model.user(u)``, ``model.user_bias(u)``, ...).
    Ids that hash to one server go in one request, and tables looked up with the same
    ids send them once; each table's next call with those ids (the same tensor, or an
    equal one) uses the rows pulled here instead of pulling again. The requests go out
    at once and the replies are taken by those calls (so the forward's own work before
    them overlaps the round trip)."""
    issue_pulls(lookups)


def record_lookups(module: nn.Module, tables, inputs: tuple) -> list:
    """The (table, ids) lookups ``module(*inputs)`` makes: ``module.table_lookups(*inputs)``
    when the module defines it, else a dry run of its forward (no gradients, the tables
    answering zeros without pulling). A table called twice in one forward is listed
    with its first ids (its second lookup pulls as usual)."""
    if hasattr(module, "table_lookups"):
        return list(module.table_lookups(*inputs))
    tables = [t for t in tables if t._ps is not None]
    for t in tables:
        t._recording = []
    try:
        with torch.no_grad():
            module(*inputs)
        return [(t, t._recording[0]) for t in tables if t._recording]
    finally:
        for t in tables:
            t._recording = None


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
        if rows.requires_grad and per_sample_weights is None and self.mode != "max":
            return _BagOfRows.apply(inverse, rows, offsets, self.mode)
        return F.embedding_bag(inverse, rows, offsets, mode=self.mode,
                               per_sample_weights=per_sample_weights)


class _BagOfRows(torch.autograd.Function):
    """``F.embedding_bag(inverse, rows, offsets, mode)`` for "sum" and "mean", whose
    backward adds each bag's gradient into its rows with one ``index_add_``. torch's
    dense embedding_bag backward (what a leaf ``rows`` gets) sorts the indices and
    accumulates row by row: 1.6-2.1 ms against 1.2 ms for this on a batch of 512 bags
    of 16 ids (benchmarks/table_cache.py's model), the largest single cost of a
    worker's step there. From :data:`~tessera.ps.kernels.WORKER_MIN_IDS` ids on (fp32,
    CPU) a compiled loop does the same additions in the same order without the
    gathered copy (:func:`~tessera.ps.kernels.bag_sum_backward`: 0.23 ms against 0.06
    ms on that batch)."""

    @staticmethod
    def forward(ctx, inverse, rows, offsets, mode):
        out = F.embedding_bag(inverse, rows, offsets, mode=mode)  # (it checks the input)
        ctx.save_for_backward(inverse, offsets)
        ctx.mode, ctx.num_rows, ctx.dtype = mode, rows.shape[0], rows.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        inverse, offsets = ctx.saved_tensors
        bags = grad.shape[0]
        if inverse.dim() == 2:  # one bag per row of ids, all of one length
            length = inverse.shape[1]
            lengths = torch.full((bags,), length, dtype=torch.int64, device=inverse.device)
            inverse = inverse.reshape(-1)
        else:
            ends = torch.cat([offsets[1:], offsets.new_tensor([inverse.numel()])])
            lengths = (ends - offsets).to(torch.int64)
        grad = grad.to(ctx.dtype)
        if ctx.mode == "mean":
            grad = grad / lengths.clamp(min=1).unsqueeze(1).to(grad.dtype)
        if (kernels.ENABLED and inverse.numel() >= kernels.WORKER_MIN_IDS
                and grad.device.type == "cpu" and grad.dtype == torch.float32):
            out = torch.zeros(ctx.num_rows, grad.shape[1])
            starts = torch.cumsum(lengths, 0) - lengths
            kernels.bag_sum_backward(inverse.contiguous().numpy(), starts.numpy(),
                                     grad.contiguous().numpy(), out.numpy())
            return None, out, None, None
        bag_of = torch.repeat_interleave(torch.arange(bags, device=grad.device), lengths,
                                         output_size=inverse.numel())
        out = torch.zeros(ctx.num_rows, grad.shape[1], dtype=ctx.dtype, device=grad.device)
        out.index_add_(0, inverse, grad.index_select(0, bag_of))
        return None, out, None, None


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
