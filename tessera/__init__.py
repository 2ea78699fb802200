"""Tessera: distributed training for PyTorch on sharded parameter servers.

The public API lives in :mod:`tessera.api` and is re-exported here lazily, so
that processes which never touch torch (the coordinator, the CLI's argument
checks) do not pay for importing it.
"""

__version__ = "0.1.0"

_API = ("init", "distribute", "shard", "finish", "rank", "num_workers", "profiler", "current",
        "Job", "DistributedSampler", "log", "device")


def __getattr__(name):
    if name in _API:
        from tessera import api
        return getattr(api, name)
    raise AttributeError(f"module 'tessera' has no attribute {name!r}")


__all__ = list(_API)
