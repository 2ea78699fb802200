"""A whole job in one process: the same roles, as threads (STYLE.md rule 7).

With one worker and one server, the path is the launched one, only shorter:

* the **coordinator** (:func:`tessera.cluster.role.start_coordinator`, then
  ``Coordinator.run``) serves from a thread;
* **parameter server 0** (:func:`tessera.cluster.role.serve`) serves from a
  thread, with a :class:`~tessera.cluster.session.Session` of its own;
* **worker 0** is the calling thread: :meth:`InProcessJob.start` returns its
  Session, so the user's script runs, prints and stops in ``pdb`` as a plain
  script does.

Every socket of the job shares one ``zmq.Context`` and binds an ``inproc://``
address (``cluster.host = "inproc"``, :mod:`tessera.transport.address`, which
also says why authentication has nothing to add there): nothing listens on the
network. The run directory gets what a launched run leaves (``config.json``,
``cluster.json``, ``metrics.jsonl`` from the trainer, ``summary.json``); the roles'
output goes to this process's stdout instead of ``logs/``.

Its end, as in a launched job: ``tessera.finish()`` sends worker 0's report and
closes its session, which waits for the server thread (it leaves at the next
heartbeat that says ``shutdown``) and the coordinator thread (it returns once
``summary.json`` is written). If worker 0 fails instead (an exception, or the
process exits without ``tessera.finish()``), :meth:`InProcessJob.close` tells the
coordinator what the launcher would (:class:`~tessera.transport.wire.Departed`);
the coordinator fails the job, the server hears so in its next heartbeat, and
both threads end within seconds. Every join has a timeout and the threads are
daemons: nothing here can keep the process alive.

    python script.py                        # tessera.init() without a launcher
    tessera run JOB.toml --in-process       # tessera.launch.inprocess.run_trainer(cfg)
"""

from __future__ import annotations

import atexit
import contextvars
import secrets
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

import zmq

from tessera.cluster.health import ClusterFailure
from tessera.cluster.rundir import default_run_dir, prepare_run_dir
from tessera.cluster.session import Session
from tessera.config import env as envvars
from tessera.config import ConfigError, config_from_dict, config_to_dict
from tessera.config.schema import ClusterConfig, JobConfig
from tessera.errors import TesseraError, UsageError
from tessera.ps.embedding_index import stop_fault_ahead
from tessera.transport import wire
from tessera.transport.address import INPROC
from tessera.transport.endpoint import close_context

#: The modes whose workers talk only to parameter servers (the others form a
#: torch.distributed group, which needs a rendezvous address, not threads).
_MODES = ("sync", "async", "ssp")

#: The job started in this context that the next ``tessera.init()`` joins (a context
#: variable, not a global: each thread or asyncio task has its own).
_pending: contextvars.ContextVar[Optional["InProcessJob"]] = contextvars.ContextVar(
    "tessera_inprocess_job", default=None)


def launched() -> bool:
    """Whether a launcher started this process (it sets the TESSERA_* identity).

    Part of it set is a broken launch, not a plain script: Session.from_env names
    what is missing."""
    return envvars.launched(envvars.process_environ())


def job_config(cfg: JobConfig) -> JobConfig:
    """``cfg`` as one process runs it: 1 worker, 1 server, inproc addresses.

    Raises :class:`UsageError` for what cannot run as threads of one process."""
    if cfg.ps.mode not in _MODES or cfg.pipeline.stages > 1:
        what = f"pipeline stages ({cfg.pipeline.stages})" if cfg.pipeline.stages > 1 else \
            f"mode {cfg.ps.mode!r}"
        raise UsageError(f"in-process runs need a parameter-server mode ({', '.join(_MODES)}); "
                         f"{what} forms a torch.distributed group of worker processes: start "
                         f"it with `tessera run` or `tessera launch` instead")
    raw = config_to_dict(cfg)
    cl = raw["cluster"]
    changed = [f"{k} {cl[k]} -> 1" for k in ("workers", "servers") if cl[k] != 1]
    cl.update(workers=1, servers=1, host=INPROC)
    raw["ps"]["server_weights"] = None
    if changed:
        print(f"tessera: in-process: one worker (this thread) and one server thread "
              f"({', '.join(changed)})", flush=True)
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise UsageError(f"in-process (1 worker, 1 server): {exc}") from None


def script_config(argv0: str = "") -> JobConfig:
    """What ``python script.py`` gets: JobConfig's defaults (sync, fp32, seed 0, ...) as one
    worker and one server, named after the script (run directory ``runs/<script>-<time>``).
    To set more, call :func:`start` with your own JobConfig before ``tessera.init()``."""
    argv0 = argv0 or (sys.argv[0] if sys.argv else "")
    name = Path(argv0).stem if argv0 and argv0 != "-c" else "interactive"
    return job_config(JobConfig(name=name or "interactive",
                                cluster=ClusterConfig(workers=1, servers=1)))


class _WorkerSession(Session):
    """Worker 0's session: closing it (``tessera.finish()``) also ends the job's threads."""

    def __init__(self, job: "InProcessJob", **kwargs):
        super().__init__(**kwargs)
        self._job = job
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            super().close()
            self._job.close()


class InProcessJob:
    """Coordinator and server 0 in threads of this process; the caller is worker 0."""

    def __init__(self, cfg: JobConfig):
        self.cfg = job_config(cfg)
        self.run_dir = default_run_dir(self.cfg).resolve()
        self.secret = secrets.token_hex(32)  # as launched; inproc peers skip the handshake
        self.ctx: Optional[zmq.Context] = None
        self.session: Optional[_WorkerSession] = None
        self.failures: list[str] = []
        self.coordinator_code: Optional[int] = None
        self._threads: list[threading.Thread] = []
        self._closed = False

    def _copy(self) -> JobConfig:
        """Each role its own config, as each launched process reads its own config.json."""
        return config_from_dict(config_to_dict(self.cfg))

    def start(self) -> Session:
        """Start the coordinator and server threads; returns worker 0's session."""
        from tessera.cluster.role import start_coordinator
        prepare_run_dir(self.run_dir, self.cfg, logs=False)
        print(f"tessera: no launcher started this process: it runs the whole job (coordinator "
              f"and server 0 in threads, worker 0 in this thread); run directory {self.run_dir}",
              flush=True)
        self.ctx = zmq.Context()
        self.coordinator = start_coordinator(self._copy(), self.run_dir, self.secret, self.ctx)
        for name, target in (("tessera-coordinator", self._coordinate),
                             ("tessera-server-0", self._serve)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        atexit.register(self._at_exit)
        try:
            self.session = _WorkerSession(self, role="worker", rank=0, cfg=self._copy(),
                                          run_dir=self.run_dir, coordinator=self.coordinator.address,
                                          secret=self.secret, ctx=self.ctx)
        except BaseException as exc:
            self.close(failure=f"worker 0 could not join: {exc}")
            raise
        return self.session

    # ------------------------------------------------------------- the threads

    def _coordinate(self) -> None:
        try:
            self.coordinator_code = self.coordinator.run()
        except BaseException:  # noqa: BLE001 - a bug: kept whole for close() to report
            self.failures.append(f"the coordinator thread crashed:\n{traceback.format_exc()}")
            self.coordinator_code = 1

    def _serve(self) -> None:
        from tessera.cluster.role import serve
        session = None
        try:
            session = Session(role="server", rank=0, cfg=self._copy(), run_dir=self.run_dir,
                              coordinator=self.coordinator.address, secret=self.secret,
                              ctx=self.ctx)
            serve(session)
        except ClusterFailure as exc:  # the coordinator's word: nothing to tell it back
            self.failures.append(f"server 0: {exc}")
        except TesseraError as exc:  # one line, as run_guarded prints it for a process
            self.failures.append(f"server 0: {exc}")
            self._depart("server", f"server 0 failed: {exc}")
        except BaseException as exc:  # noqa: BLE001 - a bug: kept whole for close() to report
            self.failures.append(f"the server 0 thread crashed:\n{traceback.format_exc()}")
            self._depart("server", f"server 0 crashed: {type(exc).__name__}: {exc}")
        finally:
            if session is not None:
                session.close()

    def _depart(self, role: str, reason: str) -> None:
        """Tell the coordinator a role of the job is gone, as the launcher does for a
        process that exited (it fails the job: no restarts in one process)."""
        from tessera.transport.endpoint import ClientEndpoint, TransportError
        try:
            ep = ClientEndpoint(self.ctx, self.coordinator.address, self.secret, "coordinator",
                                sndtimeo_s=2.0)
        except TransportError:
            return
        try:
            ep.request(wire.Departed(req=ep.new_req(), role=role, rank=0, reason=reason),
                       timeout_s=2.0, what="departure notice")
        except TransportError:
            pass  # the coordinator is gone too: nothing is left to tell
        finally:
            ep.close()

    # ------------------------------------------------------------------ the end

    def close(self, failure: str = "") -> None:
        """End the job and wait for its threads. ``failure`` "": worker 0 has finished
        (``tessera.finish()``); else why worker 0 stopped. Raises :class:`ClusterFailure`
        when the job failed; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        if _pending.get() is self:
            _pending.set(None)
        if self.session is not None:
            self.session.close()  # its heartbeat stops; its call back here returns at once
        if failure:
            self._depart("worker", failure)
            if self.session is None or self.session.view is None:
                # Worker 0 never registered, so the coordinator ignores its departure and
                # would wait startup_timeout_s for it: fail the job through server 0 once
                # it has registered (it is the only other member).
                deadline = time.monotonic() + 5.0
                while ("server", 0) not in self.coordinator.procs and \
                        self._threads[1].is_alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
                self._depart("server", f"worker 0 stopped before it joined the job: {failure}")
        cl = self.cfg.cluster
        # After a failure the coordinator answers heartbeats for 2 intervals + 1 s, then
        # returns; a server hears within an interval. Generous, for a busy machine.
        limit_s = cl.heartbeat_timeout_s + 4 * cl.heartbeat_interval_s + 5.0
        deadline = time.monotonic() + limit_s
        for thread in self._threads[1:]:  # the server, which hears a failure within seconds
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        # ...then nobody is left to hear it: the coordinator may end at once.
        self.coordinator.members_ended = True
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        # A table's fault-ahead thread is per process, not per job; it ends here too
        # (queued faults are only a head start) and starts again on the next job's use.
        stop_fault_ahead(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            # Leave the context to the daemon threads; the process may still exit.
            self.failures.append(f"{', '.join(stuck)} did not stop within {limit_s:.0f} s")
        else:
            close_context(self.ctx)
        if self.coordinator_code not in (0, None) and not failure:
            self.failures.append(f"the coordinator ended the job with code "
                                 f"{self.coordinator_code}")
        if not failure and not self.failures and not (self.run_dir / "summary.json").exists():
            self.failures.append("the job ended but wrote no summary.json")
        if failure:  # what followed from it (the server hearing it) says nothing new
            self.failures = [failure] + [f for f in self.failures if failure not in f]
        if self.failures:
            raise ClusterFailure("; ".join(self.failures))

    def _at_exit(self) -> None:
        exc = getattr(sys, "last_value", None)  # set by the interpreter for an uncaught one
        # A mistake the script's excepthook already said in one line (tessera.api) is
        # named, not said twice more (here and in the coordinator's line).
        said = getattr(exc, "tessera_reported", False)
        why = "ended without tessera.finish()" if exc is None else \
            f"raised {type(exc).__name__}" + (" (its one line on stderr)" if said else f": {exc}")
        failure = f"worker 0 (this process's main thread) {why}"
        try:
            self.close(failure=failure)
        except ClusterFailure as exc:
            if not (said and str(exc) == failure):
                print(f"tessera: job failed: {exc}", file=sys.stderr, flush=True)


def start(cfg: Optional[JobConfig] = None) -> InProcessJob:
    """Start a job in this process (``cfg`` default: :func:`script_config`); the next
    ``tessera.init()`` joins it as worker 0."""
    if _pending.get() is not None:
        raise UsageError("an in-process job is already running in this process; "
                         "call tessera.finish() before starting another")
    job = InProcessJob(cfg if cfg is not None else script_config())
    job.start()
    _pending.set(job)
    return job


def worker_session() -> Session:
    """Worker 0's session of the in-process job, started with defaults if none is
    (what ``tessera.init()`` calls in a process no launcher started)."""
    return (_pending.get() or start()).session
