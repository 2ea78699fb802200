"""The Python API: a plain PyTorch script becomes a Tessera worker in a few lines.

    import tessera
    tessera.init()                                   # join the job the launcher started
    model = tessera.distribute(model, optimizer="sgd", lr=0.1, momentum=0.9)
    sampler = tessera.shard(len(train_x), batch_size=32)
    for step in range(steps):
        idx = sampler.indices(step)
        loss = loss_fn(model(train_x[idx]), train_y[idx])
        model.scale_loss(loss).backward()            # gradients pushed while backward runs
        model.step()                                 # servers applied the optimizer; fresh params
    tessera.finish()

Run it with ``tessera launch --workers 2 --servers 2 script.py``.

State. ``tessera.init()`` returns a :class:`Job`: this process's session, its
wrapped model and the samplers made for it. The module-level functions
(``distribute``, ``shard``, ``finish``, ``rank``, ...) act on the *current* job,
held in a :class:`contextvars.ContextVar` rather than a module global, because:

- a script that never calls ``init`` pays nothing and sees a clear error;
- a test (or a notebook) can run jobs one after another, or side by side in
  separate contexts (``contextvars.copy_context().run(...)``, asyncio tasks),
  without one job's leftovers leaking into the next;
- code that prefers explicit objects uses the returned :class:`Job` directly
  (``job.distribute(...)``, ``job.finish()``) and never touches the variable.

A thread started by the script begins with an empty context (Python's rule),
so it should be handed the :class:`Job` rather than call ``tessera.rank()``.
"""

from __future__ import annotations

import contextvars
import sys
from typing import Any, Callable, Optional

import torch

from tessera.cluster.lives import CursorMap
from tessera.cluster.metrics import MetricsLog
from tessera.cluster.session import Session
from tessera.config.schema import OptimizerConfig
from tessera.data.distributed import ResumableSampler
from tessera.data.sampler import ShardSampler
from tessera.errors import TesseraError, UsageError
from tessera.parallel.export import export_final
from tessera.parallel.protocol import DistributedModel


class Job:
    """This process's membership of a running job, as a worker.

    Attributes a script reads: ``rank``, ``num_workers``, ``cfg``, ``run_dir``,
    ``view``, ``profiler`` (as on the :class:`Session`, which is ``session``),
    and ``model``, the wrapper :meth:`distribute` made.
    """

    def __init__(self, session: Session):
        self.session = session
        self.model: Optional[DistributedModel] = None
        self.metrics: Optional[MetricsLog] = None
        #: tessera.DistributedSamplers whose position each step records (restarts).
        self.tracked: list[ResumableSampler] = []
        #: made by shard() perhaps before the job's view was known: seeked on distribute().
        self.samplers: list[ShardSampler] = []
        self._settled = False
        #: Where the tracked samplers' positions go after each step (made once the
        #: job's view says whether this worker is a replacement: it reads it then).
        self._cursors: Optional[CursorMap] = None

    rank = property(lambda self: self.session.rank)
    num_workers = property(lambda self: self.session.num_workers)
    cfg = property(lambda self: self.session.cfg)
    run_dir = property(lambda self: self.session.run_dir)
    view = property(lambda self: self.session.view)
    profiler = property(lambda self: self.session.profiler)

    def distribute(self, model: torch.nn.Module,
                   optimizer: str | OptimizerConfig | torch.optim.Optimizer = "sgd",
                   loss_fn: Optional[Callable] = None, *, find_unused_parameters: bool = False,
                   **optimizer_args: Any):
        """Wrap ``model`` for the job's mode (see :func:`distribute`)."""
        from tessera.factory import wrap
        if self.model is not None:
            raise UsageError(
                "tessera.distribute() was already called in this process: a job trains one "
                "model with one optimizer (a second model with its own optimizer, as a GAN's "
                "discriminator, is not supported yet); put modules trained together into one "
                "nn.Module with one optimizer")
        if isinstance(optimizer, torch.optim.Optimizer):
            if optimizer_args:
                raise UsageError(f"tessera.distribute(model, optimizer) takes the optimizer's "
                                 f"settings from it; drop {', '.join(sorted(optimizer_args))}")
            opt = optimizer
        elif isinstance(optimizer, OptimizerConfig):
            opt = optimizer
        else:
            opt = _named_optimizer(optimizer, optimizer_args)
        self.model = wrap(self.session, model, opt, loss_fn,
                          find_unused_parameters=find_unused_parameters)
        for sampler in self.samplers:
            _seek(sampler, self.session.view)
        if hasattr(self.model, "on_clock"):  # PS and allreduce/hybrid: positions per step
            after_step = self.model.on_clock
            self.model.on_clock = lambda clock: (after_step(clock), self._save_cursor(clock),
                                                 self._count_step())
            self._count_step(completed=False)  # the first step's pushes may go out next
        self._resume_tracked()
        if isinstance(optimizer, torch.optim.Optimizer):
            return self.model, self.model.optimizer_handle
        return self.model

    def shard(self, num_samples: int, batch_size: int,
              seed: Optional[int] = None) -> ShardSampler:
        """This worker's deterministic share of a dataset of ``num_samples`` samples."""
        session = self.session
        session.data_samples = num_samples
        sampler = ShardSampler(num_samples, batch_size=batch_size,
                               num_workers=session.num_workers, rank=session.rank,
                               seed=session.cfg.train.seed if seed is None else seed)
        _seek(sampler, session.view)
        self.samplers.append(sampler)
        return sampler

    # -------------------------------------------------- data position (restarts)

    def track(self, sampler: ResumableSampler) -> None:
        """Keep ``sampler``'s position with every step, so that a replacement of this
        worker (``--max-restarts``) continues its share where the last applied step left
        it: ``<run dir>/cursors/worker-<rank>.cursor``, a memory map written after each
        step (:class:`~tessera.cluster.lives.CursorMap`; the replacement runs on the
        same node, under the same launcher)."""
        self.tracked.append(sampler)
        self._resume_tracked()

    def _cursor_map(self) -> CursorMap:
        if self._cursors is None:
            self._cursors = CursorMap(self.run_dir / "cursors" / f"worker-{self.rank}.cursor",
                                      fresh=not self.session.view.incarnation)
        return self._cursors

    def _resume_tracked(self) -> None:
        view = self.session.view
        if view is None or not self.tracked:
            return  # not known yet (before distribute)
        if view.restore is not None:
            self._resume_from_checkpoint(view.restore)
        if not view.incarnation:
            return  # not a replacement
        saved = self._cursor_map().load()
        if saved is None:
            return  # the predecessor completed no step
        for sampler, (epoch, taken) in zip(self.tracked, saved[1]):
            if not sampler.resumed:
                sampler.skip_own(epoch, taken)
                sampler.resumed = True
                print(f"worker {self.rank}: the data continues at epoch {epoch}, "
                      f"after {taken} samples of this worker's share", flush=True)

    def _resume_from_checkpoint(self, restore) -> None:
        """``--resume``: every worker's position at the checkpoint's clock, as one offset
        into the epoch (the workers of a sync job each took the same count, dealt
        round-robin, so together they took the first ``sum`` positions), re-dealt over
        this job's workers (another worker count is fine)."""
        from tessera.ps.checkpoint import read_cursors
        saved = read_cursors(restore.path, restore.clock)
        for index, sampler in enumerate(self.tracked):
            if sampler.resumed:
                continue
            cursors = [c["samplers"][index] for c in saved if index < len(c["samplers"])]
            if not cursors:
                print(f"worker {self.rank}: the checkpoint at clock {restore.clock} holds no "
                      f"sampler position; the data restarts its epoch", flush=True)
                continue
            epoch = max(c["epoch"] for c in cursors)
            offset = sum(c["taken"] for c in cursors if c["epoch"] == epoch)
            sampler.seek(epoch, offset)
            sampler.resumed = True
            if self.rank == 0:
                print(f"worker 0: the data continues at epoch {epoch}, {offset} samples in",
                      flush=True)

    def _save_cursor(self, clock: int) -> None:
        if not self.tracked:
            return
        every = self.cfg.checkpoint.every
        if every and clock % every == 0:  # the clocks servers checkpoint at
            from tessera.ps.checkpoint import checkpoint_url, write_cursor
            write_cursor(checkpoint_url(self.cfg, self.run_dir), clock, self.rank, {
                "samplers": [{"epoch": s.epoch, "taken": s.taken} for s in self.tracked]})
        self._cursor_map().save(clock, [(s.epoch, s.taken) for s in self.tracked])

    def _count_step(self, completed: bool = True) -> None:
        """Keep this worker's acknowledged pushes where a replacement finds them, and how
        many the next step sends: a kill before its end leaves up to that many applied
        without their answer having been counted (every partition, and every table's
        row push to every server: ``pushes_unanswered`` bounds ``applied - acked``)."""
        tally, client = self.session.tally, getattr(self.model, "client", None)
        if tally is None or client is None:
            return
        if completed:
            tally.step(acked=client.pushes_acked)
        tables = getattr(self.model, "tables", ())
        tally.open_step(len(client.parts) + len(tables) * client.num_shards
                        + self.model.pushes_in_flight)

    def log(self, values: dict[str, Any], step: Optional[int] = None) -> None:
        """Worker 0: one record of ``values`` in metrics.jsonl (and TensorBoard), at
        ``step`` (default: the model's step count); other workers' calls are dropped."""
        if self.metrics is None:
            self.metrics = MetricsLog(self.run_dir, lead=self.rank == 0,
                                      tensorboard=self.cfg.train.tensorboard)
        if step is None and self.model is not None:
            step = getattr(self.model, "clock", None)
        self.metrics.log(values, step)

    def settle(self) -> None:
        """Worker 0, async/ssp: wait until every other worker has finished (its last
        pushes applied), then take the servers' values, so that what worker 0 evaluates
        and exports comes after every update (sync: the last step's values already are)."""
        model = self.model
        if (self._settled or model is None or self.rank != 0
                or getattr(model, "mode", "sync") not in ("async", "ssp")
                or getattr(model, "client", None) is None):
            return
        self._settled = True
        limit = self.cfg.cluster.startup_timeout_s  # a restarted worker may still be coming
        if not self.session.wait_workers_finished(limit):
            print(f"worker 0: not every worker finished within {limit:.0f} s; evaluating "
                  f"the servers' values as they are", flush=True)
        model.final_values()

    def finish(self, **stats: Any) -> None:
        """Write the trained model (worker 0: ``final.safetensors``), report this worker's
        counters and leave the job cleanly."""
        model = self.model
        if model is not None:
            model.wait_pushes()  # answered, and counted below
        self.settle()
        if model is not None and self.rank == 0:
            export_final(model, self.run_dir / "final.safetensors")
        if self.metrics is not None:
            self.metrics.close()
        if model is not None:
            client = model.client
            stats.setdefault("bytes_pushed", client.bytes_pushed if client else 0)
            stats.setdefault("bytes_pulled", client.bytes_pulled if client else 0)
            stats.setdefault("allreduce_bytes", getattr(model, "allreduce_bytes", 0))
            stats.setdefault("skipped_steps", model.skipped_steps)
            acked = getattr(client, "pushes_acked", 0) if client else 0
            tally = self.session.tally
            # Every life's acknowledged pushes: a dead predecessor's too (--max-restarts).
            stats.setdefault("pushes_acked", tally.total_acked(acked) if tally else acked)
            stats.setdefault("pushes_unanswered", tally.unanswered if tally else 0)
            stats.setdefault("loss_scale", model.loss_scale)
            if model.overflows:
                first = model.overflows[0]
                stats.setdefault("first_overflow", f"step {first['step']} {first['where']}")
            if client is not None:
                client.close()
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.session.finish(stats)
        self.session.close()
        if self._cursors is not None:
            self._cursors.close()
            self._cursors = None
        self.model = None
        self.samplers.clear()


def _named_optimizer(optimizer: Any, args: dict) -> OptimizerConfig:
    """The string form's optimizer, checked: a mistake is one line naming it."""
    import msgspec
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        raise UsageError(f"tessera.distribute(model, optimizer): pass an optimizer object, "
                         f"e.g. torch.optim.{optimizer.__name__}(model.parameters(), lr=0.1), "
                         f"not the class {optimizer.__name__}")
    if not isinstance(optimizer, str):
        raise UsageError(f"tessera.distribute(model, optimizer): optimizer must be a "
                         f"torch.optim optimizer object or a name ('sgd', 'adam', 'adamw', "
                         f"'adagrad'), got {type(optimizer).__name__}")
    try:
        return msgspec.convert({"name": optimizer, **args}, OptimizerConfig)
    except (msgspec.ValidationError, ValueError, TypeError) as exc:
        raise UsageError(f"tessera.distribute(model, {optimizer!r}, ...): {exc}") from None


_current: contextvars.ContextVar[Optional[Job]] = contextvars.ContextVar("tessera_job",
                                                                          default=None)


def _seek(sampler: ShardSampler, view) -> None:
    if view is not None and view.restore is not None:
        r = view.restore
        epoch, offset = r.epoch, r.offset
        if not r.samples and r.global_batch and sampler.num_samples:
            # Counted as an endless stream (the size came after registration): the same
            # steps over this dataset's epochs.
            from tessera.data.sampler import advance_cursor
            steps, rest = divmod(offset, r.global_batch)
            epoch, offset = advance_cursor(epoch, rest, steps, r.global_batch,
                                           sampler.num_samples)
        sampler.seek(r.clock, epoch, offset)


def init() -> Job:
    """Join the running job as the worker the launcher started this process as; in a
    process no launcher started, run the whole job here (tessera.cluster.inprocess)."""
    job = _current.get()
    if job is None:
        from tessera.cluster import inprocess
        from tessera.config import env as envvars, nopickle
        nopickle.install_if_asked(envvars.process_environ())  # tests; once more, after imports
        _report_mistakes_in_one_line()
        job = Job(Session.from_env(expect_role="worker") if inprocess.launched()
                  else inprocess.worker_session())
        _current.set(job)
    return job


def _report_mistakes_in_one_line() -> None:
    """A script's uncaught TesseraError (a mistake Tessera names: a refused optimizer, a
    second backward, a dead peer) ends it with its one line, not a traceback; anything
    else keeps Python's report."""
    previous = sys.excepthook
    if getattr(previous, "tessera", False):
        return

    def hook(kind, exc, tb):
        line = str(exc) if issubclass(kind, TesseraError) else _lost_to_a_finished_worker(exc)
        if not line:
            previous(kind, exc, tb)
            return
        print(f"tessera: {line}", file=sys.stderr, flush=True)
        try:  # an in-process job's end (at exit, after this) names it, not repeats it
            exc.tessera_reported = True
        except AttributeError:
            pass

    hook.tessera = True
    sys.excepthook = hook


def _collective_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's failure: torch's ``DistError`` kin, or the plain
    RuntimeError Gloo raises when a peer's connection closed. A script's own RuntimeError
    (a shape mismatch, a failed save) is not: its traceback is shown at once, as ever,
    and never put down to a worker that finished."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset",
                                  "broken pipe"))


def _lost_to_a_finished_worker(exc: BaseException) -> str:
    """Allreduce/hybrid: a collective that failed because another worker finished with
    fewer steps (uneven inputs; its process ended, and Gloo says the peer closed): the one
    line saying so, else "". The coordinator's word that it finished comes with this
    worker's next heartbeat: waited for, a heartbeat interval or two."""
    import time
    job = _current.get()
    session = getattr(job, "session", None)
    if not _collective_failed(exc) or session is None \
            or session.cfg.ps.mode not in ("allreduce", "hybrid"):
        return ""
    heartbeat, me = session.heartbeat, session.rank
    deadline = time.monotonic() + 3 * session.cfg.cluster.heartbeat_interval_s + 0.5
    done: list = []
    while heartbeat is not None and time.monotonic() < deadline:
        done = sorted(set(heartbeat.finished) - {me})
        if done:
            break
        time.sleep(0.05)
    if not done:
        return ""
    who = ", ".join(str(w) for w in done)
    said = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
    return (f"worker {me}: an all-reduce failed ({said}) after worker{'s' if len(done) > 1 else ''}"
            f" {who} finished (tessera.finish()) with fewer steps than this one: in --mode "
            f"{session.cfg.ps.mode} every worker runs every step, as under DDP; give every "
            f"worker the same number of batches (tessera.DistributedSampler does), or train in "
            f"a server mode (sync, async, ssp), where the others go on without a worker that "
            f"finished")


def current() -> Job:
    """The job ``tessera.init()`` joined in this context."""
    job = _current.get()
    if job is None:
        raise RuntimeError("call tessera.init() first")
    return job


def rank() -> int:
    return current().rank


def num_workers() -> int:
    return current().num_workers


def device() -> torch.device:
    """The device this worker should train on (as Accelerate's ``accelerator.device`` and
    Ray Train's ``get_device()`` give it): where GPUs are visible, its own one,
    ``cuda:LOCAL_RANK`` modulo their count (the launchers set ``LOCAL_RANK`` per node, as
    torchrun does; with ``[train] device = "cuda"`` each worker sees only its own GPU, so
    that is ``cuda:0``); else the CPU. ``CUDA_VISIBLE_DEVICES=""`` keeps a job on the CPU.
    Workers that end up sharing a GPU still train: their collectives go over Gloo."""
    from tessera.config import env as envvars
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", envvars.local_rank() % torch.cuda.device_count())


def distribute(model: torch.nn.Module,
               optimizer: str | OptimizerConfig | torch.optim.Optimizer = "sgd",
               loss_fn: Optional[Callable] = None, *, find_unused_parameters: bool = False,
               **optimizer_args: Any):
    """Wrap ``model`` for the job's mode (joining the job first if ``init()`` was not
    called): ``model, optimizer = tessera.distribute(model, optimizer)``.

    ``optimizer`` is the script's own ``torch.optim`` optimizer, with its param
    groups; the call then returns the wrapped model and a
    :class:`~tessera.parallel.optimizer.DistributedOptimizer` to step, schedule and
    zero. With parameter servers (``sync``, ``async``, ``ssp``) the servers run that
    class with those groups (element-wise optimizers: SGD, Adam, AdamW, Adagrad,
    Adadelta, RMSprop, Adamax, NAdam, RAdam, ASGD, Rprop); with all-reduce the
    script's optimizer steps each replica. The string form (``"sgd"``, ``"adam"``,
    ``"adamw"``, ``"adagrad"`` with ``torch.optim``'s keyword arguments) returns the
    model only. With pipeline stages (``--stages P``), ``model`` must be an
    ``nn.Sequential``, the optimizer is named, and ``loss_fn(output, target)`` is
    required; train with ``model.forward_backward(inputs, target, loss_fn)`` then
    ``model.step()``.

    ``find_unused_parameters`` is DDP's: in allreduce and hybrid modes a model with
    parameters that a step's forward may leave unused (a branch not taken, a head not
    called) needs it, as under DDP, and then steps as one process does (such a
    parameter's ``.grad`` stays None on every worker, and torch skips it); without it such
    a step is refused in one line naming the parameters. In the server modes, with the
    flag, each push names the parameters the step gave no gradient and the servers leave
    alone those no worker used (values, state and step count, as torch); without it such a
    parameter is stepped with a zero gradient (README).
    """
    return init().distribute(model, optimizer, loss_fn,
                             find_unused_parameters=find_unused_parameters, **optimizer_args)


class DistributedSampler(ResumableSampler):
    """``torch.utils.data.DistributedSampler``, drop-in, for a Tessera job: the same
    order, with ``num_replicas`` and ``rank`` this worker's place in the job (joining
    it if ``tessera.init()`` was not called), and able to continue mid-epoch
    (:class:`~tessera.data.distributed.ResumableSampler`)."""

    def __init__(self, dataset, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        job = init()
        num_replicas = job.num_workers if num_replicas is None else num_replicas
        rank = job.rank if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        job.track(self)


def profiler():
    """This process's span recorder (a no-op unless the job runs with --profile)."""
    return current().profiler


def shard(num_samples: int, batch_size: int, seed: Optional[int] = None) -> ShardSampler:
    """This worker's deterministic share of a dataset of ``num_samples`` samples."""
    return current().shard(num_samples, batch_size, seed)


def log(values: dict[str, Any], step: Optional[int] = None) -> None:
    """Log a script's own metrics: ``tessera.log({"loss": ..., "acc": ...}, step=N)``.

    Worker 0's records go to ``metrics.jsonl`` (so the launcher's progress bar shows
    them) and, with ``--tensorboard``, to TensorBoard; other workers' are dropped."""
    init().log(values, step)


def finish(**stats: Any) -> None:
    """Report this worker's counters and leave the job cleanly."""
    current().finish(**stats)
    _current.set(None)


def forget_job() -> None:
    """Drop this context's job, whatever became of it: an in-process run that ended
    without ``finish()`` (its worker raised) must not hand its closed job, and the model
    distributed in it, to the next ``tessera.init()`` of the same thread, nor the
    workers' torch.distributed group it formed (tessera.parallel.collectives)."""
    job = _current.get()
    _current.set(None)
    if job is not None:
        from tessera.parallel.collectives import leave
        leave()
