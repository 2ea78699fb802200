"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest
import zmq

from tessera.transport.endpoint import close_context

#: The files that take longest (seconds on a 2-core machine, one at a time), run first.
#: ``make test`` runs two files at once (pytest-xdist, ``--dist loadfile``: a file's tests
#: stay on one worker, so its module fixtures run once); a long file drawn last would run
#: alone at the end while the other worker idles.
SLOWEST_FILES = ["test_recipe.py",             # 313
                 "test_multihost.py",          # 91
                 "test_elastic.py",            # 71
                 "test_faults.py",             # 64
                 "test_embedding_cluster.py",  # 55
                 "test_table_faults.py",       # 52
                 "test_no_pickle.py",          # 44
                 "test_row_kernels.py",        # 42
                 "test_replication_faults.py",  # 41
                 "test_ray.py",                # 37
                 "test_stream.py",             # 37
                 "test_table_cache.py",        # 35
                 "test_pipeline_faults.py",    # 35
                 "test_table_rereplication.py",  # 35
                 "test_regroup.py",            # 33
                 "test_table_memory.py"]       # 32


def pytest_collection_modifyitems(config, items):
    """The slowest files first (above); every other file, and the tests within each file,
    in the order collected."""
    first = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    close_context(context)


@pytest.fixture(scope="session", autouse=True)
def warm_pool(tmp_path_factory):
    """One warm pool (tessera/launch/warmpool.py) for the whole session (for each xdist
    worker under ``make test``): every job's fork server is forked from it with its
    imports done, not started and importing torch afresh (2-3 s of CPU per job). Tests of
    the fork server itself, and every job the pool refuses (the no-pickle guard), start
    their own as without a pool."""
    import os
    import subprocess
    import sys
    import time

    from tessera.config import env as envvars

    where, ours = tmp_path_factory.mktemp("pool"), None
    if len(str(where)) > 80:  # a Unix socket's path has at most 107 bytes
        import tempfile
        where = ours = Path(tempfile.mkdtemp(prefix="tessera-pool-", dir="/tmp"))
    path, log = where / "pool.sock", where / "pool.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tessera.launch.warmpool", str(path)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while "warm pool ready" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, \
            f"the warm pool did not start: {log.read_text()}"
        time.sleep(0.1)
    os.environ[envvars.WARM_POOL] = str(path)
    yield path
    os.environ.pop(envvars.WARM_POOL, None)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    if ours is not None:
        import shutil
        shutil.rmtree(ours, ignore_errors=True)
