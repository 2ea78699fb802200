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
from typing import Any, Callable, Optional

import torch

from tessera.cluster.session import Session
from tessera.config.schema import OptimizerConfig
from tessera.data.sampler import ShardSampler
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
        #: made by shard() perhaps before the job's view was known: seeked on distribute().
        self.samplers: list[ShardSampler] = []

    rank = property(lambda self: self.session.rank)
    num_workers = property(lambda self: self.session.num_workers)
    cfg = property(lambda self: self.session.cfg)
    run_dir = property(lambda self: self.session.run_dir)
    view = property(lambda self: self.session.view)
    profiler = property(lambda self: self.session.profiler)

    def distribute(self, model: torch.nn.Module, optimizer: str | OptimizerConfig = "sgd",
                   loss_fn: Optional[Callable] = None, **optimizer_args: Any) -> DistributedModel:
        """Wrap ``model`` for the job's mode (see :func:`distribute`)."""
        from tessera.factory import wrap
        if self.model is not None:
            raise RuntimeError("tessera.distribute() was already called in this process")
        opt = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(
            name=optimizer, **optimizer_args)
        self.model = wrap(self.session, model, opt, loss_fn)
        for sampler in self.samplers:
            _seek(sampler, self.session.view)
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

    def finish(self, **stats: Any) -> None:
        """Report this worker's counters and leave the job cleanly."""
        model = self.model
        if model is not None:
            client = model.client
            stats.setdefault("bytes_pushed", client.bytes_pushed if client else 0)
            stats.setdefault("bytes_pulled", client.bytes_pulled if client else 0)
            stats.setdefault("allreduce_bytes", getattr(model, "allreduce_bytes", 0))
            stats.setdefault("skipped_steps", model.skipped_steps)
            stats.setdefault("pushes_acked", getattr(client, "pushes_acked", 0) if client else 0)
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
        self.model = None
        self.samplers.clear()


_current: contextvars.ContextVar[Optional[Job]] = contextvars.ContextVar("tessera_job",
                                                                          default=None)


def _seek(sampler: ShardSampler, view) -> None:
    if view is not None and view.restore is not None:
        r = view.restore
        sampler.seek(r.clock, r.epoch, r.offset)


def init() -> Job:
    """Join the running job as the worker the launcher started this process as; in a
    process no launcher started, run the whole job here (tessera.cluster.inprocess)."""
    job = _current.get()
    if job is None:
        from tessera.cluster import inprocess
        job = Job(Session.from_env(expect_role="worker") if inprocess.launched()
                  else inprocess.worker_session())
        _current.set(job)
    return job


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


def distribute(model: torch.nn.Module, optimizer: str | OptimizerConfig = "sgd",
               loss_fn: Optional[Callable] = None, **optimizer_args: Any) -> DistributedModel:
    """Wrap ``model`` for the job's mode; returns a
    :class:`~tessera.parallel.protocol.DistributedModel`.

    With parameter servers (``sync``, ``async``, ``ssp``), the parameters move to
    the servers: ``optimizer`` names the update rule they apply (``sgd``,
    ``adam``, ``adamw``, ``adagrad``) with ``torch.optim``'s keyword arguments,
    taken from worker 0 (every worker should pass the same). With pipeline
    stages (``--stages P``), ``model`` must be an ``nn.Sequential`` and
    ``loss_fn(output, target)`` is required; train with
    ``model.forward_backward(inputs, target, loss_fn)`` then ``model.step()``.
    """
    return current().distribute(model, optimizer, loss_fn, **optimizer_args)


def profiler():
    """This process's span recorder (a no-op unless the job runs with --profile)."""
    return current().profiler


def shard(num_samples: int, batch_size: int, seed: Optional[int] = None) -> ShardSampler:
    """This worker's deterministic share of a dataset of ``num_samples`` samples."""
    return current().shard(num_samples, batch_size, seed)


def finish(**stats: Any) -> None:
    """Report this worker's counters and leave the job cleanly."""
    current().finish(**stats)
    _current.set(None)
