"""Modules whose state lives on the parameter servers.

``tessera.nn.ShardedEmbedding`` and ``tessera.nn.ShardedEmbeddingBag`` are drop-ins
for ``torch.nn.Embedding`` / ``EmbeddingBag``; see :mod:`tessera.parallel.embedding`.
"""

from tessera.parallel.embedding import ShardedEmbedding, ShardedEmbeddingBag

__all__ = ["ShardedEmbedding", "ShardedEmbeddingBag"]
