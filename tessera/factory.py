"""The one factory that turns a model into this job's :class:`DistributedModel`.

``wrap(session, model, optimizer, loss_fn)`` reads the job's configuration once,
picks the wrapper (pipeline stages, all-reduce/hybrid over DDP, or data
parallelism over the parameter servers), registers this worker with the
coordinator in the way that wrapper needs, and hands the wrapper only the narrow
things it uses: a client, a shard map, and small frozen groups of settings
(:class:`~tessera.parallel.protocol.Amp`, :class:`~tessera.parallel.protocol.Hooks`,
:class:`~tessera.parallel.ps.PSComm`, :class:`~tessera.parallel.ps.Start`).

It sits in the api layer: it needs the session (cluster) and every wrapper (parallel).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from tessera.amp.policy import make_policy
from tessera.amp.scaler import LossScaler
from tessera.cluster.role import agrees, retain_window
from tessera.cluster.session import Session
from tessera.config import env as envvars
from tessera.config.schema import OptimizerConfig
from tessera.errors import UsageError
from tessera.parallel.embedding import find_tables
from tessera.parallel.prefetch import configure_caches
from tessera.parallel.optimizer import DistributedOptimizer, describe, spec_from_optimizer
from tessera.parallel.protocol import Amp, DistributedModel, Hooks
from tessera.ps.optim import spec_from_config, with_buffers
from tessera.ps.client import PSClient


def _log(line: str) -> None:
    print(line, flush=True)


def two_phase(cfg) -> bool:
    """Loss-scaled sync training decides skips cluster-wide (see tessera.amp.scaler)."""
    return cfg.precision == "fp16" and cfg.ps.mode == "sync"


def wrap(session: Session, model: torch.nn.Module,
         opt: Union[OptimizerConfig, torch.optim.Optimizer],
         loss_fn: Optional[Callable] = None, *,
         find_unused_parameters: bool = False) -> DistributedModel:
    """This worker's wrapper of ``model``, for the job's mode (see the module docstring).

    ``opt`` is the script's own ``torch.optim`` optimizer (the wrapper's ``optimizer``
    attribute is then its :class:`DistributedOptimizer`) or the string form's config."""
    cfg = session.cfg
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    policy = make_policy(cfg.precision, device.type, cfg.amp.cpu_bf16)
    # Worker 0, and the first worker of every other host: each host decides from its
    # own CPU (bf16 compute or wire-only), so each says what it chose.
    if policy.note and (session.rank == 0 or envvars.local_rank() == 0):
        print(f"worker {session.rank}: {policy.note}", flush=True)
    a = cfg.amp
    amp = Amp(policy, LossScaler(init_scale=a.init_scale, growth_factor=a.growth_factor,
                                 backoff_factor=a.backoff_factor,
                                 growth_interval=a.growth_interval, enabled=policy.loss_scaling))
    tables = find_tables(model)
    _check_tables(tables)
    configure_caches(tables, cfg.model, cfg.ps)  # [model] cache_rows, cache_staleness
    if cfg.pipeline.stages > 1:
        if isinstance(opt, torch.optim.Optimizer):
            raise UsageError("pipeline stages build one optimizer per stage from its own "
                             "parameters: pass the optimizer by name, tessera.distribute(model, "
                             "\"adam\", lr=..., loss_fn=...)")
        return _pipeline(session, model, opt, loss_fn, tables, device)
    if cfg.ps.mode in ("hybrid", "allreduce"):
        wrapped = _dense_replicas(session, model, opt, tables, amp, device,
                                  find_unused_parameters)
        local = True
    else:
        wrapped = _parameter_servers(session, model, opt, tables, amp, device,
                                     find_unused_parameters)
        local = False
    if isinstance(opt, torch.optim.Optimizer):
        wrapped.optimizer_handle = DistributedOptimizer(opt, wrapped.step, wrapped.zero_grad,
                                                        local=local, tables=bool(tables))
        if not local:
            wrapped.hparams_source = wrapped.optimizer_handle.changed_hparams
            handle = wrapped.optimizer_handle
            handle.remote = _server_state(session, wrapped, model)
            if any(opt.state.values()):  # loaded before distribute: the servers take it
                handle.remote.send(opt.state, handle.all_params(), handle.check_state_names)
    return wrapped


def _check_fp32(model, mode: str) -> None:
    """The servers keep fp32 masters and the workers' parameters live in fp32 buffers: a
    model cast to another dtype is refused in one line (it failed in the first forward,
    its inputs in that dtype against fp32 weights, or trained in fp32 unasked)."""
    from tessera.parallel.flat import shared_buffers
    named = [("parameter", n, p) for n, p in model.named_parameters() if p.requires_grad]
    named += [("buffer", n, b) for n, b in shared_buffers(model)]
    other = next(((kind, n, t.dtype) for kind, n, t in named if t.dtype != torch.float32), None)
    if other is None:
        return
    kind, name, dtype = other
    instead = ""
    if dtype in (torch.bfloat16, torch.float16):
        instead = (f"keep the model in float32 and train in {str(dtype)[6:]} with --precision "
                   f"{'bf16' if dtype == torch.bfloat16 else 'fp16'} (autocast on the "
                   f"workers, a half-width wire, fp32 masters on the servers), or ")
    raise UsageError(f"{kind} {name!r} is {str(dtype)[6:]}, but in --mode {mode} the "
                     f"servers keep float32 masters and the workers float32 parameters: "
                     f"{instead}use --mode allreduce, where DDP trains the model in its own "
                     f"dtype")


def _server_state(session, wrapped, model):
    """The servers' optimizer state for ``optimizer.state_dict()``/``load_state_dict()``
    (:mod:`tessera.parallel.optim_state`): only worker 0's load of a fresh job is sent."""
    from tessera.parallel.optim_state import ServerState
    from tessera.parallel.optimizer import flat_offsets
    offsets = flat_offsets(model)
    at = max((b for _, b in offsets.values()), default=0)
    view, first_clock = session.view, wrapped.clock
    said = []

    def may_send():
        if session.rank != 0:
            return ""  # every worker loads the same file; worker 0's is sent
        if (view.restore is not None or view.incarnation) and wrapped.clock == first_clock:
            if said:
                return ""
            said.append(True)
            how = "a restarted worker" if view.incarnation else "a resumed job"
            return (f"worker 0: optimizer.load_state_dict(): this is {how}, so the servers "
                    f"keep the job's optimizer state (as they keep its values); the loaded "
                    f"state was not sent")
        if session.cfg.ps.replication > 1:
            raise UsageError("optimizer.load_state_dict(): a job with --replication 2 cannot "
                             "load optimizer state yet (the backups would keep the old "
                             "state); continue it with --resume, or run without replication")
        return None

    parts = [p for p in session.shard_map().partitions if p.stop <= at]
    return ServerState(wrapped.client, parts, offsets, may_send, _log)


def _check_tables(tables) -> None:
    """A table the servers could not hold (an optimizer without a sparse form, a byte cap
    too small for one row) fails here, in one line naming it, before any server is asked
    to build it."""
    from tessera.ps.embedding import Capacity
    from tessera.ps.embedding_optim import STATE_NAMES, check_sparse_optimizer
    for t in tables:
        try:
            check_sparse_optimizer(t.spec.name, t.spec.optimizer)
            if t.spec.memory_bytes:
                Capacity(t.spec, len(STATE_NAMES[t.spec.optimizer.name]))
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def _parameter_servers(session, model, opt, tables, amp, device, find_unused_parameters):
    from tessera.parallel.flat import frozen_digests, param_layout
    from tessera.parallel.ps import PSComm, PSDataParallel, Start
    cfg = session.cfg
    first = session.rank == 0
    if tables and two_phase(cfg):
        raise UsageError("sharded embedding tables with precision fp16 in sync mode are not "
                         "supported yet; use --precision bf16 (same wire savings, no loss scaling)")
    sync_bn = next((n for n, m in model.named_modules()
                    if isinstance(m, torch.nn.SyncBatchNorm)), None)
    if sync_bn is not None:
        raise UsageError(
            f"nn.SyncBatchNorm {sync_bn!r}: in --mode {cfg.ps.mode} the workers' "
            f"torch.distributed group carries metrics, not a collective in every forward; "
            f"use nn.BatchNorm (the servers average its running statistics over the workers "
            f"every step) or --mode allreduce")
    _check_fp32(model, cfg.ps.mode)
    layout = param_layout(model)
    spec = (spec_from_optimizer(opt, model) if isinstance(opt, torch.optim.Optimizer)
            else spec_from_config(opt))
    params = sum(p.numel for p in layout if not p.buffer)
    spec = with_buffers(spec, params, sum(p.numel for p in layout))
    session.register(layout=layout if first else None,
                     optimizer=spec if first else None,
                     tables=[t.spec for t in tables] if first else [],
                     frozen=frozen_digests(model))
    _join_store_group(session)
    client = _connect_client(session, amp.policy)
    view, hb = session.view, session.heartbeat
    hooks = Hooks(log=_log, profiler=session.profiler,
                  checkpoint_wanted=lambda: hb.checkpoint_requested,
                  on_clock=lambda clock: setattr(hb, "clock", clock))
    comm = PSComm(mode=cfg.ps.mode, two_phase=two_phase(cfg),
                  checkpoint_every=cfg.checkpoint.every, agree=agrees(cfg),
                  find_unused=find_unused_parameters)
    start = Start(clock=view.clock, incarnation=view.incarnation,
                  restored=view.restore is not None)
    return PSDataParallel(model, client, session.shard_map(), is_first=first, comm=comm,
                          amp=amp, hooks=hooks, start=start, tables=tables, device=device)


def _dense_replicas(session, model, opt, tables, amp, device, find_unused_parameters):
    from tessera.parallel.hybrid import HybridParallel
    cfg = session.cfg
    allreduce = cfg.ps.mode == "allreduce"
    if not tables and not allreduce:
        raise UsageError("--mode hybrid keeps sharded embedding tables on the servers, but this "
                         "model has none (tessera.nn.ShardedEmbedding); use --mode allreduce")
    if tables and allreduce:
        raise UsageError("--mode allreduce has no parameter servers for the model's sharded "
                         "embedding tables; use --mode hybrid")
    if amp.policy.loss_scaling and tables:
        raise UsageError("--mode hybrid does not support precision fp16 yet; use bf16")
    _join_process_group(session, device, opt=opt, tables=tables)
    client = _connect_client(session, amp.policy) if session.num_servers else None
    wrapped = HybridParallel(model, client, optimizer=opt, tables=tables, amp=amp,
                             hooks=Hooks(log=_log, profiler=session.profiler), device=device,
                             checkpoints=_dense_checkpoints(session),
                             find_unused_parameters=find_unused_parameters,
                             push_ahead=bool(tables) and not cfg.ps.staleness
                             and cfg.ps.replication == 1)
    restore = session.view.restore
    if restore is not None:  # --resume, or the group re-formed after a worker died
        from tessera.ps.checkpoint import CheckpointStore
        manifest = CheckpointStore(restore.path).manifest(restore.clock)
        wrapped.restore(restore.path, restore.clock, manifest)
        if session.rank == 0:
            _log(f"worker 0: dense replica restored from {restore.path} clock {restore.clock}")
    return wrapped


def _dense_checkpoints(session):
    """Worker 0 writes the dense replica into the job's checkpoint location and reports it
    to the coordinator, which writes the manifest once the round is complete."""
    from tessera.parallel.dense_checkpoint import DENSE_FILE, DenseCheckpoints
    from tessera.ps.checkpoint import CheckpointStore, checkpoint_url
    cfg = session.cfg
    if session.rank != 0:
        return DenseCheckpoints(every=cfg.checkpoint.every)
    store = CheckpointStore(checkpoint_url(cfg, session.run_dir))

    def save(clock: int, tensors: dict, meta: dict) -> None:
        name, nbytes = store.write_file(clock, DENSE_FILE, tensors, meta)
        session.report_checkpoint(clock, name, nbytes)

    hb = session.heartbeat
    return DenseCheckpoints(every=cfg.checkpoint.every, save=save,
                            wanted=lambda: hb.checkpoint_requested)


def _pipeline(session, model, opt, loss_fn, tables, device):
    from tessera.parallel.pipeline import PipelineParallel
    if loss_fn is None:
        raise UsageError("pipeline stages need tessera.distribute(model, ..., loss_fn=...): the "
                         "last stage computes the loss of each micro-batch")
    if tables:
        raise UsageError("sharded embedding tables cannot be pipelined yet; drop --stages")
    _join_process_group(session, device, opt=opt, p2p=True)
    wrapped = PipelineParallel(model, rank=session.rank, num_workers=session.num_workers,
                               plan=session.cfg.pipeline, optimizer=opt, loss_fn=loss_fn,
                               device=device, profiler=session.profiler,
                               checkpoints=_stage_checkpoints(session))
    restore = session.view.restore
    if restore is not None:  # --resume, or the group re-formed after a worker died
        from tessera.ps.checkpoint import CheckpointStore
        manifest = CheckpointStore(restore.path).manifest(restore.clock)
        wrapped.restore(restore.path, restore.clock, manifest)
        if session.rank == session.cfg.pipeline.stages - 1:
            _log(f"worker {session.rank}: pipeline stages restored from {restore.path} clock "
                 f"{restore.clock}")
    return wrapped


#: Pipeline stages agree every this many steps whether the launcher asked for a checkpoint
#: (one all-reduce of one number over every worker; the checkpoint lands within as many).
STAGE_AGREE_EVERY = 4


def _stage_checkpoints(session):
    """Replica 0's stage s (worker s) writes worker-<s>.safetensors into the job's checkpoint
    location and reports it; the coordinator writes the manifest once every stage has."""
    from tessera.parallel.dense_checkpoint import DenseCheckpoints
    from tessera.ps.checkpoint import CheckpointStore, checkpoint_url, stage_file
    cfg = session.cfg
    hb = session.heartbeat
    # Every worker takes part in agreeing on the launcher's request (SIGINT/SIGTERM).
    agree = dict(wanted=lambda: hb.checkpoint_requested, agree_every=STAGE_AGREE_EVERY)
    if session.rank >= cfg.pipeline.stages:
        return DenseCheckpoints(every=cfg.checkpoint.every, **agree)
    store = CheckpointStore(checkpoint_url(cfg, session.run_dir))

    def save(clock: int, tensors: dict, meta: dict) -> None:
        name, nbytes = store.write_file(clock, stage_file(session.rank), tensors, meta)
        session.report_checkpoint(clock, name, nbytes)

    return DenseCheckpoints(every=cfg.checkpoint.every, save=save, **agree)


def _connect_client(session: Session, policy) -> PSClient:
    """A client of this job's parameter servers, connected (authenticated) to each."""
    client = PSClient(ctx=session.ctx, shard_map=session.shard_map(),
                      server_addresses=session.server_addresses(), secret=session.secret,
                      worker=session.rank, timeout_s=session.timeout_s,
                      wire_dtype=policy.wire_dtype, check=session.check,
                      profiler=session.profiler, incarnation=session.view.incarnation,
                      dead_servers=lambda: session.heartbeat.membership()[1],
                      servers=session.heartbeat.servers,
                      retain=retain_window(session.cfg),
                      batch_bytes=_batch_bytes(session.cfg),
                      elastic=lambda: session.heartbeat.elastic_view)
    client.connect()
    return client


def _batch_bytes(cfg) -> int:
    """[ps] batch_kib in bytes, in every mode: with --replication 2 a batch re-sent after
    a failover goes one push per partition (PSClient.reroute), each clock-checked and
    deduplicated on its own by its partition's new owner."""
    return int(cfg.ps.batch_kib * 1024)


def _join_store_group(session) -> None:
    """The server modes' ``torch.distributed`` group: the workers, their collectives
    through the coordinator's authenticated store (:mod:`tessera.parallel.collectives`),
    so a recipe's ``dist.get_rank()`` and metric ``all_reduce`` work as under DDP. A wait
    lasts as long as Gloo's default (a worker may be far ahead in async mode) and ends at
    once when the job fails."""
    import torch.distributed as dist
    from tessera.parallel import collectives
    if not dist.is_available() or dist.is_initialized():
        return  # the script made its own group
    wait_s = max(2 * session.cfg.cluster.timeout_s, collectives.WAIT_S)
    if session.num_workers == 1:
        store = dist.HashStore()  # one worker: every collective is its own
    else:
        from tessera.parallel.rendezvous import CoordinatorStore
        store = CoordinatorStore(session.ctx, session.coordinator, session.secret,
                                 timeout_s=wait_s, check=session.check)
        session.collective_store = store
    collectives.join(store, rank=session.rank, world_size=session.num_workers,
                     timeout_s=wait_s)


def _join_process_group(session, device, *, opt=None, tables=(), p2p=False):
    """Register, then init the torch.distributed group: rendezvous through the
    coordinator's authenticated store, Gloo pinned to this node's address
    (:mod:`tessera.parallel.rendezvous`)."""
    import torch.distributed as dist

    from tessera.parallel.rendezvous import join_process_group
    if dist.is_available() and dist.is_initialized():
        cfg = session.cfg
        where = (f"--stages {cfg.pipeline.stages}" if cfg.pipeline.stages > 1
                 else f"--mode {cfg.ps.mode}")
        raise UsageError(
            f"the script called torch.distributed.init_process_group before "
            f"tessera.distribute, but with {where} Tessera forms the workers' "
            f"group itself (through the coordinator, and again when a worker is replaced): "
            f"drop that call; dist.get_rank(), dist.all_reduce and the rest work after "
            f"tessera.distribute")
    first = session.rank == 0
    spec = describe(opt) if isinstance(opt, torch.optim.Optimizer) else spec_from_config(opt)
    session.register(layout=[] if first else None, optimizer=spec if first else None,
                     tables=[t.spec for t in tables] if first else [])
    session.collective_store = join_process_group(
        session.ctx, session.coordinator, session.secret,
        host=session.cfg.cluster.host, rank=session.rank, world_size=session.num_workers,
        cuda_device=device if device.type == "cuda" else None, p2p=p2p,
        generation=session.generation, timeout_s=session.cfg.cluster.timeout_s * 2,
        check=session.check, log=_log)
