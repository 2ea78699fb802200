"""Modules whose state lives on the parameter servers.

``tessera.nn.ShardedEmbedding`` and ``tessera.nn.ShardedEmbeddingBag`` are drop-ins
for ``torch.nn.Embedding`` / ``EmbeddingBag``; see :mod:`tessera.parallel.embedding`.
``tessera.nn.pull_tables`` pulls several tables' next lookups in one message per server.
``tessera.nn.prefetching(model, batches)`` iterates a loader one batch ahead, so that the
next step's rows are pulled while this step finishes (``model.prefetch(*inputs)`` names
one batch by hand); see :mod:`tessera.parallel.prefetch`.
"""

from tessera.parallel.embedding import ShardedEmbedding, ShardedEmbeddingBag, pull_tables
from tessera.parallel.prefetch import prefetching

__all__ = ["ShardedEmbedding", "ShardedEmbeddingBag", "prefetching", "pull_tables"]
