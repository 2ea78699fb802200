"""Modules whose state lives on the parameter servers.

``tessera.nn.ShardedEmbedding`` and ``tessera.nn.ShardedEmbeddingBag`` are drop-ins
for ``torch.nn.Embedding`` / ``EmbeddingBag``; see :mod:`tessera.parallel.embedding`.
``tessera.nn.pull_tables`` pulls several tables' next lookups in one message per server.
"""

from tessera.parallel.embedding import ShardedEmbedding, ShardedEmbeddingBag, pull_tables

__all__ = ["ShardedEmbedding", "ShardedEmbeddingBag", "pull_tables"]
