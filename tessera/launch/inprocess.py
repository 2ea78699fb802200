"""``tessera run JOB --in-process``: a worker program run as one process's job.

The job itself (coordinator and server threads, this thread as worker 0) is
:class:`tessera.cluster.inprocess.InProcessJob`; this module runs a worker
program in it and reports as the launcher does: the summary table, or one line
naming the failure, and the launcher's exit codes (0, 2, 3, 130).
"""

from __future__ import annotations

import json
import sys
from typing import Callable

from tessera import api
from tessera.cluster.health import ClusterFailure
from tessera.cluster.inprocess import InProcessJob, start
from tessera.config.schema import JobConfig
from tessera.errors import TesseraError, UsageError
from tessera.launch.console import print_failure, print_summary


def run(cfg: JobConfig, main: Callable[[], None], *, quiet: bool = False) -> int:
    """Run ``main`` (a worker program: it calls ``tessera.init()`` ... ``tessera.finish()``)
    as worker 0 of ``cfg`` in this thread; returns the exit code a launched run has."""
    try:
        job = start(cfg)
    except UsageError as exc:  # a setting one process cannot run: as a bad flag, exit 2
        print(f"tessera: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        main()
        if not job._closed:
            job.close(failure="worker 0 returned without calling tessera.finish()")
    except KeyboardInterrupt:
        _close_quietly(job, "worker 0 was interrupted")
        print_failure("interrupted: the in-process job was stopped", job.run_dir)
        return 130
    except TesseraError as exc:
        _close_quietly(job, f"worker 0: {exc}")
        print_failure(f"{exc}", job.run_dir)
        return 3
    except BaseException as exc:
        _close_quietly(job, f"worker 0 raised {type(exc).__name__}: {exc}")
        raise
    finally:
        api.forget_job()  # a next run in this thread (a notebook, pdb) starts afresh
    print_summary(json.loads((job.run_dir / "summary.json").read_text()), job.run_dir,
                  quiet=quiet)
    return 0


def run_trainer(cfg: JobConfig, *, quiet: bool = False) -> int:
    """``tessera run JOB --in-process``: the built-in trainer as worker 0, in this process."""
    from tessera.train.trainer import main
    return run(cfg, main, quiet=quiet)


def _close_quietly(job: InProcessJob, failure: str) -> None:
    try:
        job.close(failure=failure)
    except ClusterFailure:
        pass  # the caller reports the failure that started it
