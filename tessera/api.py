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
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from tessera.amp.policy import make_policy
from tessera.errors import UsageError
from tessera.amp.scaler import LossScaler
from tessera.cluster.session import Session
from tessera.config.schema import OptimizerConfig
from tessera.data.sampler import ShardSampler
from tessera.parallel.embedding import find_tables
from tessera.parallel.ps import PSDataParallel, param_layout
from tessera.ps.client import PSClient

_session: Optional[Session] = None
_model: Optional[PSDataParallel] = None
_samplers: list[ShardSampler] = []


def init() -> Session:
    """Join the running job as the worker the launcher started this process as; in a
    process no launcher started, run the whole job here (tessera.cluster.inprocess)."""
    global _session
    if _session is None:
        from tessera.cluster import inprocess
        _session = (Session.from_env(expect_role="worker") if inprocess.launched()
                    else inprocess.worker_session())
    return _session


def _require() -> Session:
    if _session is None:
        raise RuntimeError("call tessera.init() first")
    return _session


def rank() -> int:
    return _require().rank


def num_workers() -> int:
    return _require().num_workers


def distribute(model: torch.nn.Module, optimizer: str | OptimizerConfig = "sgd",
               loss_fn=None, **optimizer_args: Any) -> PSDataParallel:
    """Move ``model``'s parameters to the parameter servers.

    ``optimizer`` names the update rule the servers apply (``sgd``, ``adam``,
    ``adamw``, ``adagrad``) with ``torch.optim``'s keyword arguments; it is taken
    from worker 0 (every worker should pass the same). With pipeline stages
    (``--stages P``), ``model`` must be an ``nn.Sequential`` and ``loss_fn(output,
    target)`` is required; train with ``model.train_step(inputs, target)``.
    """
    global _model
    session = _require()
    if _model is not None:
        raise RuntimeError("tessera.distribute() was already called in this process")
    opt = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(
        name=optimizer, **optimizer_args)
    cfg = session.cfg
    first = session.rank == 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device_type = device.type
    policy = make_policy(cfg.precision, device_type)
    if policy.note and first:
        print(f"worker 0: {policy.note}", flush=True)
    scaler = LossScaler(init_scale=cfg.amp.init_scale, growth_factor=cfg.amp.growth_factor,
                        backoff_factor=cfg.amp.backoff_factor,
                        growth_interval=cfg.amp.growth_interval, enabled=policy.loss_scaling)
    tables = find_tables(model)
    if cfg.pipeline.stages > 1:
        _model = _distribute_pipeline(session, model, opt, loss_fn, device)
        return _model
    if cfg.ps.mode in ("hybrid", "allreduce"):
        _model = _distribute_hybrid(session, model, opt, tables, policy, scaler, device)
        return _model
    if tables and two_phase(cfg):
        raise UsageError("sharded embedding tables with precision fp16 in sync mode are not "
                         "supported yet; use --precision bf16 (same wire savings, no loss scaling)")
    session.register(layout=param_layout(model) if first else None,
                     optimizer=opt if first else None,
                     tables=[t.spec for t in tables] if first else [])
    client = _connect_client(session, policy)
    view = session.view
    hb = session.heartbeat
    _model = PSDataParallel(model, client, session.shard_map(), is_first=first, policy=policy,
                            scaler=scaler, two_phase=two_phase(cfg),
                            log=lambda line: print(line, flush=True), profiler=session.profiler,
                            tables=tables, device=device, start_clock=view.clock,
                            incarnation=view.incarnation, restored=view.restore is not None,
                            mode=cfg.ps.mode, checkpoint_every=cfg.checkpoint.every,
                            checkpoint_wanted=lambda: hb.checkpoint_requested,
                            on_clock=lambda clock: setattr(hb, "clock", clock))
    for sampler in _samplers:  # made by tessera.shard() before the job's view was known
        _seek(sampler, view)
    return _model


def _seek(sampler: ShardSampler, view) -> None:
    if view is not None and view.restore is not None:
        r = view.restore
        sampler.seek(r.clock, r.epoch, r.offset)


def _connect_client(session: Session, policy) -> PSClient:
    """A client of this job's parameter servers, connected (authenticated) to each."""
    client = PSClient(ctx=session.ctx, shard_map=session.shard_map(),
                      server_addresses=session.server_addresses(), secret=session.secret,
                      worker=session.rank, timeout_s=session.timeout_s,
                      wire_dtype=policy.wire_dtype, check=session.check,
                      profiler=session.profiler, incarnation=session.view.incarnation,
                      dead_servers=lambda: session.heartbeat.dead_servers)
    client.connect()
    return client


def _join_process_group(session, device, *, layout=None, opt=None, tables=()):
    """Register (worker 0 hosting the torch.distributed rendezvous) and init the group."""
    import datetime
    import socket as _socket

    import torch.distributed as dist
    cfg = session.cfg
    first = session.rank == 0
    address = ""
    if first:  # worker 0 hosts the rendezvous on a port the OS picks
        with _socket.socket() as s:
            s.bind((cfg.cluster.host, 0))
            address = f"tcp://{cfg.cluster.host}:{s.getsockname()[1]}"
    view = session.register(address=address, layout=(layout or []) if first else None,
                            optimizer=opt if first else None,
                            tables=[t.spec for t in tables] if first else [])
    rendezvous = next(p.address for p in view.processes if p.role == "worker" and p.rank == 0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=rendezvous,
                            rank=session.rank, world_size=session.num_workers,
                            timeout=datetime.timedelta(seconds=cfg.cluster.timeout_s * 2))


def _distribute_pipeline(session, model, opt, loss_fn, device):
    from tessera.parallel.pipeline import PipelineParallel
    cfg = session.cfg
    if loss_fn is None:
        raise UsageError("pipeline stages need tessera.distribute(model, ..., loss_fn=...): the "
                         "last stage computes the loss of each micro-batch")
    if find_tables(model):
        raise UsageError("sharded embedding tables cannot be pipelined yet; drop --stages")
    _join_process_group(session, device, opt=opt)
    pp = cfg.pipeline
    return PipelineParallel(model, rank=session.rank, num_workers=session.num_workers,
                            num_stages=pp.stages, microbatches=pp.microbatches,
                            schedule=pp.schedule, optimizer=opt, loss_fn=loss_fn,
                            split_points=pp.split_points, device=device,
                            profiler=session.profiler)


def _distribute_hybrid(session, model, opt, tables, policy, scaler, device):
    from tessera.parallel.hybrid import HybridParallel
    cfg = session.cfg
    allreduce = cfg.ps.mode == "allreduce"
    if not tables and not allreduce:
        raise UsageError("--mode hybrid keeps sharded embedding tables on the servers, but this "
                         "model has none (tessera.nn.ShardedEmbedding); use --mode allreduce")
    if tables and allreduce:
        raise UsageError("--mode allreduce has no parameter servers for the model's sharded "
                         "embedding tables; use --mode hybrid")
    if policy.loss_scaling and tables:
        raise UsageError("--mode hybrid does not support precision fp16 yet; use bf16")
    _join_process_group(session, device, opt=opt, tables=tables)
    client = _connect_client(session, policy) if session.num_servers else None
    return HybridParallel(model, client, optimizer=opt, tables=tables, policy=policy,
                          scaler=scaler, profiler=session.profiler, device=device,
                          log=lambda line: print(line, flush=True))


def two_phase(cfg) -> bool:
    """Loss-scaled sync training decides skips cluster-wide (see tessera.amp.scaler)."""
    return cfg.precision == "fp16" and cfg.ps.mode == "sync"


def profiler():
    """This process's span recorder (a no-op unless the job runs with --profile)."""
    return _require().profiler


def shard(num_samples: int, batch_size: int, seed: Optional[int] = None) -> ShardSampler:
    """This worker's deterministic share of a dataset of ``num_samples`` samples."""
    session = _require()
    session.data_samples = num_samples
    sampler = ShardSampler(num_samples, batch_size=batch_size, num_workers=session.num_workers,
                           rank=session.rank, seed=session.cfg.train.seed if seed is None else seed)
    _seek(sampler, session.view)
    _samplers.append(sampler)
    return sampler


def finish(**stats: Any) -> None:
    """Report this worker's counters and leave the job cleanly."""
    global _session, _model
    session = _require()
    if _model is not None:
        client = _model.client
        stats.setdefault("bytes_pushed", client.bytes_pushed if client else 0)
        stats.setdefault("bytes_pulled", client.bytes_pulled if client else 0)
        stats.setdefault("allreduce_bytes", getattr(_model, "allreduce_bytes", 0))
        stats.setdefault("skipped_steps", _model.skipped_steps)
        stats.setdefault("pushes_acked", getattr(client, "pushes_acked", 0) if client else 0)
        stats.setdefault("loss_scale", _model.loss_scale)
        if _model.overflows:
            first = _model.overflows[0]
            stats.setdefault("first_overflow", f"step {first['step']} {first['where']}")
        if client is not None:
            client.close()
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    session.finish(stats)
    session.close()
    _session, _model = None, None
    _samplers.clear()
