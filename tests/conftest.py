"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest
import zmq

from tessera.transport.endpoint import _Auth


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    _Auth.stop(context)
    context.destroy(linger=0)


@pytest.fixture(scope="session", autouse=True)
def warm_pool(tmp_path_factory):
    """One warm pool (tessera/launch/warmpool.py) for the whole session: every job's fork
    server is forked from it with its imports done, not started and importing torch
    afresh (2-3 s of CPU per job). Tests of the fork server itself, and every job the pool
    refuses (the no-pickle guard), start their own as without a pool."""
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
