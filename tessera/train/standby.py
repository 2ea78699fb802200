"""A standby worker: a process that has already paid for Python, torch and Tessera's
imports, waiting to become a restarted worker.

With ``--max-restarts`` the launcher keeps one standby per machine once the cluster
is up. When a worker dies, the launcher hands the standby the dead worker's
environment, command and log on its stdin (one JSON line), and the standby becomes
that worker: the environment is replaced, output goes to the worker's log, and the
worker's program runs as ``__main__``. Rejoining then costs the registration and the
join, not the ~2-5 s that starting an interpreter and importing torch takes (measured
in ``benchmarks/faults.py``). End of input (the launcher is gone) ends it.

    python -m tessera.train.standby        # started by the launcher only
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
from typing import Optional

#: The imports a worker pays for, done before it is needed (the point of a standby).
WARM = ("torch", "tessera.api", "tessera.factory", "tessera.parallel.ps",
        "tessera.train.tasks", "tessera.data.datasets", "tessera.models")

from tessera.config import env as envvars


def preload():
    """The job's dataset, loaded ahead for the built-in trainer (classification data,
    MovieLens); None when there is nothing to load ahead, or loading failed (the worker
    then loads it itself and reports what went wrong)."""
    try:
        from tessera.config import config_from_dict
        from tessera.train.tasks import load_ahead
        me = envvars.Identity.from_env(envvars.process_environ(), required=(envvars.RUN_DIR,))
        with open(os.path.join(me.run_dir, "config.json")) as f:
            return load_ahead(config_from_dict(json.load(f)))
    except Exception:  # noqa: BLE001 - the worker will load (and report) it itself
        return None


def become(order: dict, data=None) -> None:
    """Turn this process into the worker ``order`` describes, and run it."""
    log = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    envvars.adopt(order["env"])
    cmd = order["cmd"]
    if cmd[1] == "-m":
        module, args = cmd[2], cmd[3:]
        sys.argv = [module, *args]
        if module == "tessera.train.trainer":  # the built-in worker, as `python -m` runs it
            from tessera.cluster.role import run_guarded
            from tessera.train import trainer
            run_guarded(lambda: trainer.main(data), "worker")
            return
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    script, args = cmd[1], cmd[2:]
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


def main(stdin=None) -> Optional[int]:
    for name in WARM:
        importlib.import_module(name)
    data = preload()
    line = (stdin or sys.stdin).readline()
    if not line.strip():
        return 0  # the launcher is gone, or the job ended without needing us
    become(json.loads(line), data)
    return None


if __name__ == "__main__":
    code = main()
    if code is not None:
        sys.exit(code)
