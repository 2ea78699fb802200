"""Datasets on a shared location and deterministic sharding over workers."""

from tessera.data.sampler import ShardSampler

__all__ = ["ShardSampler"]
