"""A standby worker: a process that has already paid for Python, torch and Tessera's
imports, waiting to become a restarted worker.

Where the job has a fork server (:mod:`tessera.launch.forkserver`, the default) no
standby is kept: a restarted process is a fork of it, and :func:`become` turns that fork
into the process, as it turns a standby. Standbys serve ``TESSERA_FORKSERVER=0``.

With ``--max-restarts`` the launcher keeps one standby per machine once the cluster
is up. When a worker dies, the launcher hands the standby the dead worker's
environment, command and log on its stdin (one JSON line), and the standby becomes
that worker: the environment is replaced, output goes to the worker's log, and the
worker's program runs as ``__main__``. Rejoining then costs the registration and the
join, not the ~2-5 s that starting an interpreter and importing torch takes (measured
in ``benchmarks/faults.py``). End of input (the launcher is gone) ends it.

In allreduce and hybrid modes a worker's death re-forms the whole group (every
process, as a new generation, from the newest checkpoint). There the launcher keeps
one standby per process of its share of the job: ``ROLE`` (worker, server or
coordinator) picks the imports paid ahead, and the order's command (``python -m
tessera.cluster.role coordinator|server`` too) is run as ``__main__``.

    python -m tessera.train.standby [ROLE]   # started by the launcher only
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import time
from typing import Optional

#: The built-in worker program, whose dataset a standby loads ahead.
TRAINER = "tessera.train.trainer"
#: The imports a worker pays for, done before it is needed (the point of a standby).
WARM = ("torch", "tessera.api", "tessera.factory", "tessera.parallel.ps",
        "tessera.train.tasks", "tessera.data.datasets", "tessera.models")
#: What a standby for the next generation of a re-formed allreduce/hybrid group imports,
#: by the role it will take (``python -m tessera.train.standby ROLE``; "": a PS worker).
WARM_BY_ROLE = {"": WARM,
                # DistributedDataParallel's first construction imports torch._dynamo: ~1 s
                # on a quiet machine, 5-6 s under load, most of a re-form's time.
                "worker": (*WARM, "torch.distributed", "torch.nn.parallel", "torch._dynamo"),
                # (not tessera.cluster.role itself: runpy runs it afresh as __main__)
                # A server's first torch.optim rule imports torch._dynamo too (its
                # _disable_dynamo decorator): ~1.5 s of CPU in every server otherwise.
                "server": ("torch", "tessera.cluster.session", "tessera.ps.server",
                           "tessera.ps.checkpoint", "torch._dynamo"),
                "coordinator": ("tessera.cluster.coordinator", "tessera.ps.checkpoint")}

from tessera.config import env as envvars


def _job_config():
    """The job's configuration (``config.json`` in this process's run directory)."""
    from tessera.config import config_from_dict
    me = envvars.Identity.from_env(envvars.process_environ(), required=(envvars.RUN_DIR,))
    with open(os.path.join(me.run_dir, "config.json")) as f:
        return config_from_dict(json.load(f))


def preload():
    """The job's dataset, loaded ahead for the built-in trainer (classification data,
    MovieLens); None when there is nothing to load ahead, or loading failed (the worker
    then loads it itself and reports what went wrong)."""
    try:
        from tessera.train.tasks import load_ahead
        return load_ahead(_job_config())
    except Exception:  # noqa: BLE001 - the worker will load (and report) it itself
        return None


def compile_ahead(role: str = "server") -> str:
    """A server's compiled kernels, compiled ahead: the row kernels of the built-in
    task's tables (:func:`tessera.train.tasks.table_optimizers`), and on a half-width
    wire the dense ones (:func:`tessera.cluster.role.warm_dense_kernels`). numba's
    compiled code lives in the process, so every server forked from this one (or this
    standby, once it becomes a server) finds them compiled, and its own calls before it
    serves have nothing left to do. The row kernels took a table server about 2 s of CPU
    before its first request, the dense ones about 1 s: paid once per fork server
    instead of once per server, and not at all by a re-formed group's servers
    (``benchmarks/faults.py``'s worker-hybrid recovery). Returns what was compiled, for
    the log ("" where nothing was, or compiling failed: the server then compiles them
    itself, as one without a fork server does).

    ``role`` "worker": the kernel a worker compiles at its first large lookup
    (:func:`tessera.ps.kernels.warm_worker`, about 1.3 s), where the built-in task
    looks up that many ids a step (the click model: batch x fields)."""
    try:
        from tessera.ps import kernels
        from tessera.train.tasks import table_optimizers, worker_ids_per_lookup
        if not kernels.ENABLED:
            return ""
        cfg = _job_config()
        if role == "worker":
            if worker_ids_per_lookup(cfg) >= kernels.WORKER_MIN_IDS:
                kernels.warm_worker()
                return "unique ids"
            return ""
        done = []
        names = table_optimizers(cfg)
        if names:
            kernels.warm(names)
            done.append(f"tables: {', '.join(sorted(names))}")
        if cfg.precision != "fp32" and cfg.ps.mode != "hybrid" and cfg.cluster.servers:
            from tessera.cluster.role import warm_dense_kernels
            warm_dense_kernels(cfg, None)  # (the optimizer is not known yet: plain SGD's too)
            done.append(f"dense: {cfg.precision} wire")
        return "; ".join(done)
    except Exception:  # noqa: BLE001 - each server compiles (and reports) for itself
        return ""


def become(order: dict, data=None) -> None:
    """Turn this process into the worker ``order`` describes, and run it."""
    log = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    envvars.adopt(order["env"])
    if "ready" in order:
        print(f"started from a standby (pid {os.getpid()}, imports done {order['ready']} s "
              f"before)", flush=True)
    elif "forked" in order:
        print(f"started as a fork of the fork server (pid {os.getpid()}, imports done "
              f"{order['forked']} s before)", flush=True)
    cmd = order["cmd"]
    if cmd[1] == "-m":
        module, args = cmd[2], cmd[3:]
        sys.argv = [module, *args]
        if module == TRAINER:  # the built-in worker, as `python -m` runs it
            from tessera.cluster.role import run_guarded
            from tessera.train import trainer
            run_guarded(lambda: trainer.main(data), "worker")
            return
        sys.modules.pop(module, None)  # imported ahead by another: runpy runs it afresh
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    script, args = cmd[1], cmd[2:]
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


def main(stdin=None, role: str = "") -> Optional[int]:
    for name in WARM_BY_ROLE.get(role, WARM):
        importlib.import_module(name)
    data = preload() if role in ("", "worker") else None
    if role in ("", "worker", "server"):  # (a coordinator compiles nothing)
        compile_ahead("server" if role == "server" else "worker")
    print(f"standby ready ({role or 'worker'}, pid {os.getpid()})", flush=True)
    ready = time.time()
    line = (stdin or sys.stdin).readline()
    if not line.strip():
        return 0  # the launcher is gone, or the job ended without needing us
    become(dict(json.loads(line), ready=f"{time.time() - ready:.1f}"), data)
    return None


if __name__ == "__main__":
    code = main(role=sys.argv[1] if len(sys.argv) > 1 else "")
    if code is not None:
        sys.exit(code)
