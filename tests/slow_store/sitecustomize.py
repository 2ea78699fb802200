"""A slow object store for tests/test_replication_faults.py: ``slowfile://PATH`` is the
local filesystem, but every rename (how a manifest is committed) takes
``SLOW_STORE_S`` seconds. Loaded by every process whose PYTHONPATH starts here."""

import time

import fsspec
from fsspec.implementations.local import LocalFileSystem

SLOW_STORE_S = 6.0


class SlowFileSystem(LocalFileSystem):
    protocol = ("slowfile",)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("slowfile://"):
            path = path[len("slowfile://"):]
        return super()._strip_protocol(path)

    def mv(self, path1, path2, *args, **kwargs):
        time.sleep(SLOW_STORE_S)
        return super().mv(path1, path2, *args, **kwargs)


fsspec.register_implementation("slowfile", SlowFileSystem, clobber=True)
