"""Entry points of the processes the launcher starts: coordinator and server.

Workers run :mod:`tessera.train.trainer` (``tessera run``) or the user's own
script (``tessera launch``). Each process turns the failures it expects (a dead
peer, a refused request, bad data) into one line on stderr naming itself and
the peer, and exit code 3; anything else is a bug and keeps its traceback.

The roles themselves, :func:`start_coordinator` and :func:`serve`, take what they
need and never exit the process: :mod:`tessera.cluster.inprocess` runs them as
threads of one process; the ``*_main`` functions only read the environment.

    python -m tessera.cluster.role coordinator|server
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

EXIT_CLUSTER_FAILURE = 3


def run_guarded(fn: Callable[[], None], name: str) -> None:
    from tessera.errors import TesseraError

    from tessera.config import env as envvars
    label = envvars.rank_label(envvars.process_environ(), name)
    # The launcher ends processes with SIGTERM; leave quietly.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    try:
        fn()
    except TesseraError as exc:
        print(f"{label}: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_CLUSTER_FAILURE)
    sys.stdout.flush()
    sys.stderr.flush()
    # Done, everything written and closed by ``fn``: leave without the interpreter's
    # teardown, which in a process that imported torch (and torch._dynamo, with its
    # first optimizer) takes 1-2 s of CPU per process at the end of every job.
    os._exit(0)


def server_mode(cfg) -> str:
    """Hybrid jobs keep only tables on the servers: async, or ssp with a staleness bound."""
    if cfg.ps.mode == "hybrid":
        return "ssp" if cfg.ps.staleness else "async"
    return cfg.ps.mode


def warm_dense_kernels(cfg, optimizer) -> None:
    """Compile the kernels this server's dense partitions will use on the job's
    half-width wire (:func:`tessera.ps.kernels.warm_dense`): the sums of a sync clock
    (more than one worker, or fp16's loss scaling), and plain SGD's fused step unless
    the optimizer is something else (None: not known yet, so compiled)."""
    from tessera.amp.policy import make_policy
    from tessera.ps import kernels
    from tessera.ps.optim import plain_sgd
    sync = server_mode(cfg) == "sync"
    two_phase = cfg.precision == "fp16" and sync
    plain = optimizer is None or (optimizer.name == "SGD" and all(
        g.average or plain_sgd(g.hparams) for g in optimizer.groups))
    kernels.warm_dense(make_policy(cfg.precision, "cpu").wire_dtype, sync=sync,
                       sums=sync and (cfg.cluster.workers > 1 or two_phase),
                       steps=plain and not two_phase)


def ready_to_serve(tables, own_process: bool, dense: bool = True) -> list[str]:
    """What a server does between building its state and serving its first request.

    * The row kernels its ``tables`` (TableSpecs) use are compiled now
      (:func:`tessera.ps.kernels.warm`): numba takes 0.1-0.3 s of CPU a kernel, and a
      table server uses five or six; compiled at the first pull and push instead, they
      stalled every worker's first step by 1-2 s.
    * In a process of its own (not :mod:`tessera.cluster.inprocess`'s threads, whose
      process is the user's), everything start-up made is frozen out of the garbage
      collector (``gc.freeze``): 200-300k objects of torch, numba and the server's
      start, which every full collection walked again. In a table server at 100k ids
      a full collection took up to 0.16 s, twice in 3.5 s of serving (8% of it, and
      each a stall of every request in flight); after the freeze, one of 23 ms
      (benchmarks/HISTORY.md, "Pages and pauses"). The frozen objects live as long as
      the process does, as they would anyway: a server's start-up state is its state.
      Frozen with them: the modules ``torch._dynamo`` brings (sympy among them, about
      800 modules and 120k objects), which torch imports at the first call of a
      function it marks ``torch._disable_dynamo``, ``Optimizer.add_param_group`` among
      them: at a server's first partition, after the freeze. Left unfrozen, every full
      collection walked them again (server_load.py: 35-40 ms each, every 2-3 s). A
      server of table rows alone (``dense`` False: the job has no dense partitions)
      builds no optimizer of torch's and imports nothing.

    Returns the kernels compiled here: none where the fork server compiled them for
    the built-in task's tables before forking this server
    (:func:`tessera.train.standby.compile_ahead`).
    """
    import gc
    import importlib

    from tessera.ps import kernels
    compiled = kernels.warm({t.optimizer.name for t in tables}) if tables else []
    if own_process:
        if dense:  # what torch's first optimizer imports (a table server builds none)
            importlib.import_module("torch._dynamo")
        gc.freeze()
    return compiled


def start_coordinator(cfg, run_dir: Path, secret: str, ctx, *, bind: str = "",
                      generation: int = 0):
    """The job's coordinator, bound and announced in ``coordinator.json``; call its
    ``run()`` (it returns the exit code: 0 once ``summary.json`` is written).

    ``bind``: ``HOST:PORT`` to bind to (``tessera node`` fixes the coordinator's
    address); "" takes a random port on ``cluster.host`` (or an inproc address).
    """
    import zmq

    from tessera.cluster.coordinator import Coordinator, write_json_atomic
    if bind:
        from tessera.transport.endpoint import ServerEndpoint
        host, _, port = bind.rpartition(":")
        cfg.cluster.host = host
    coord = Coordinator(cfg, run_dir, secret, ctx=ctx, generation=generation)
    if bind:  # same socket, at the agreed port (keeping the frame limit the coordinator set)
        limit = coord.endpoint.sock.getsockopt(zmq.MAXMSGSIZE)
        coord.endpoint.close()
        coord.endpoint = ServerEndpoint(ctx, host, secret, max_frame_bytes=limit, port=int(port))
    write_json_atomic(run_dir / "coordinator.json", {"address": coord.address, "pid": os.getpid()})
    return coord


def coordinator_main() -> None:
    import zmq

    from tessera.config import config_from_dict
    from tessera.config import env as envvars
    from tessera.transport.endpoint import close_context

    me = envvars.Identity.from_env(envvars.process_environ(),
                                   required=(envvars.RUN_DIR, envvars.SECRET))
    run_dir = Path(me.run_dir)
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    ctx = zmq.Context()
    coord = start_coordinator(cfg, run_dir, me.secret, ctx, bind=me.coordinator_bind,
                              generation=me.generation)
    code = coord.run()
    # Its last answers (the launcher's checkpoint, a worker's Finished) go out first;
    # answers to peers that are gone are dropped at once (a ROUTER socket's way).
    close_context(ctx, linger_ms=1000)
    sys.stdout.flush()
    os._exit(code)


def serve(session, own_process: bool = False) -> None:
    """Be parameter server ``session.rank`` of the job until the coordinator says
    shutdown: register, serve, report. The session stays open (its owner closes it).
    ``own_process``: the process is this server's alone (:func:`ready_to_serve`)."""
    from tessera.ps.server import ParameterServer, Replicas, ServerHooks, ServerOptions
    from tessera.config.env import process_environ, slow_server_ms
    from tessera.ps.sharding import partition_elems_for
    from tessera.transport.endpoint import ServerEndpoint

    cfg = session.cfg
    # Frames are at most a partition (dense), or a batch's rows (tables): refuse
    # anything larger before it is read into memory.
    max_frame = max(partition_elems_for(cfg.ps.partition_mb) * 4 + (1 << 20), 256 << 20)
    # A replacement (the launcher restarted a dead server, --max-restarts): its
    # predecessor's address, which every peer's socket to this rank reconnects to.
    old_port = replaced_port(session.run_dir, session.rank, cfg.cluster.host)
    try:
        endpoint = ServerEndpoint(session.ctx, cfg.cluster.host, session.secret,
                                  max_frame_bytes=max_frame, port=old_port,
                                  shm=cfg.cluster.shm == "auto")
    except Exception as exc:  # zmq.ZMQError: the port is taken
        # A rank scaled away and started again (tessera scale) may take any port (every
        # process learns its address); a replacement must have its predecessor's (the
        # coordinator refuses it otherwise, naming the port).
        try:
            endpoint = ServerEndpoint(session.ctx, cfg.cluster.host, session.secret,
                                      max_frame_bytes=max_frame, port=0,
                                      shm=cfg.cluster.shm == "auto")
        except Exception:
            from tessera.cluster.health import ClusterFailure
            raise ClusterFailure(f"the replacement of server {session.rank} could not bind "
                                 f"its predecessor's port {old_port}: {exc}") from None
    view = session.register(address=endpoint.address)
    topo = session.topology
    rank, num_servers = topo.rank, topo.num_servers
    scaled_in = view.scaled_in
    if scaled_in:
        print(f"server {rank}: joined the running job at {endpoint.address} (tessera scale); "
              f"it serves the partitions moved here", flush=True)
    replacement = view.server_lives.get(rank, 0) > 0 or scaled_in
    if replacement and not scaled_in:
        print(f"server {rank}: replacement {view.server_lives[rank]} joined the running job "
              f"at {endpoint.address}; it holds nothing until a server copies its partitions "
              f"here (dead servers {view.dead_servers})", flush=True)
    # Replication is a ring (Topology): back up server rank - 1, forward to rank + 1.
    # A replacement starts with neither: it is given copies, and connects to a backup
    # once it owns something (Replicator.follow).
    primary_of_backups = topo.primary_of_backups if not replacement else -1
    backup_peer = None
    if topo.replicated and not replacement and rank < topo.num_servers:
        from tessera.transport.endpoint import ClientEndpoint
        backup = topo.backup_server
        backup_peer = ClientEndpoint(session.ctx, topo.server_addresses[backup], session.secret,
                                     f"server {backup} (backup)", sndtimeo_s=cfg.cluster.timeout_s)

        class BackupGone(Exception):
            pass

        def check() -> None:  # a backup that died at start-up: carry on with one copy
            session.check()
            if backup in session.heartbeat.membership()[1]:
                raise BackupGone()
        try:
            backup_peer.wait_connected(cfg.cluster.timeout_s, check)
        except BackupGone:
            backup_peer.close()
            backup_peer = None
    # Always a store: an interrupted launcher asks for a checkpoint at any time.
    from tessera.ps.checkpoint import CheckpointStore, checkpoint_url
    store = CheckpointStore(checkpoint_url(cfg, session.run_dir),
                            delta_every=cfg.checkpoint.delta_every)

    retired = {"quiet_at": 0.0}

    def stop_now() -> bool:
        """Shutdown, or (tessera scale) this server was scaled away, holds nothing, and
        no request came for a while: it exits 0."""
        if session.heartbeat.shutdown_requested:
            return True
        if rank not in session.heartbeat.elastic_view[1] or server.parts or \
                (server.tables is not None and server.tables.units()):
            return False
        import time
        seen = server.endpoint.messages_in
        if retired.get("seen") != seen:
            retired["seen"], retired["quiet_at"] = seen, time.monotonic()
            return False
        if time.monotonic() - retired["quiet_at"] < 1.0:
            return False
        server.retired = True
        return True

    slow = slow_server_ms(process_environ(), rank)
    server = ParameterServer(
        ServerOptions(rank=rank, num_workers=cfg.cluster.workers, num_servers=num_servers,
                      mode=server_mode(cfg), staleness=cfg.ps.staleness,
                      two_phase=cfg.precision == "fp16", agree=agrees(cfg),
                      timeout_s=cfg.cluster.timeout_s,
                      # hybrid: tables are saved when worker 0 asks (SnapshotTables), at
                      # the dense replica's clock, never on a schedule of their own
                      checkpoint_every=0 if cfg.ps.mode == "hybrid" else cfg.checkpoint.every,
                      slow_ms=slow[0], slow_rows_only=slow[1], scaled_in=scaled_in),
        endpoint=endpoint, partitions=[p for p in view.partitions
                                       if p.server == rank and not replacement],
        optimizer=view.optimizer, tables=view.tables,
        hooks=ServerHooks(check=session.check,
                          should_stop=stop_now,
                          membership=session.heartbeat.membership,
                          finished=lambda: session.heartbeat.finished,
                          servers=session.heartbeat.servers,
                          on_checkpoint=session.report_checkpoint,
                          moves=lambda: session.heartbeat.moves,
                          report_moved=session.report_moved,
                          addresses=lambda: session.heartbeat.elastic_view[0],
                          retired=lambda: session.heartbeat.elastic_view[1]),
        replicas=Replicas(backups=tuple(p for p in view.partitions if p.server == primary_of_backups),
                          peer=backup_peer, primary=primary_of_backups,
                          partitions=tuple(view.partitions),
                          connect=lambda r: connect_server(session, topo, r),
                          report=session.report_replicated,
                          answer_early=answer_early(cfg),
                          dead=tuple(view.dead_servers), lives=tuple(view.server_lives.items())),
        checkpoint_store=store, profiler=session.profiler)
    session.heartbeat.busy_s = lambda: (server.stats["busy_s"], server.stats["table_busy_s"])
    if cfg.precision != "fp32" and cfg.ps.mode != "hybrid":  # dense partitions on a
        warm_dense_kernels(cfg, view.optimizer)  # half-width wire: compiled before step 0
    if view.restore is not None and not replacement:  # a replacement is sent copies
        server.restore(view.restore)
        print(f"server {rank}: restored {len(server.parts)} partitions at clock "
              f"{view.restore.clock} from {view.restore.path}", flush=True)
    t0 = time.monotonic()
    compiled = ready_to_serve(view.tables, own_process, dense=bool(view.partitions))
    if compiled:
        print(f"server {rank}: compiled the row kernels {', '.join(compiled)} in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
    server.serve()
    server.mover.close()
    if server.agreement is not None:
        server.agreement.close()
    if server.retired:
        print(f"server {rank}: scaled away: it holds no partitions and exits "
              f"({server.stats['moved_out']} moved out)", flush=True)
    if server.stats["moved_in"]:
        print(f"server {rank}: served {server.stats['served_moved']} requests for partitions "
              f"moved here ({server.stats['moved_in']} moved in, "
              f"{server.stats['moved_out']} moved out; "
              f"{server.stats.get('served_moved_rows', 0)} of them table row requests)",
              flush=True)
    stats = dict(server.stats, partitions=len(server.parts))
    for pid, st in server.parts.items():
        stats[f"applied.p{pid}"] = st.applied_pushes
    for pid, st in server.backups.items():
        stats[f"backup_applied.p{pid}"] = st.applied_pushes
    if server.tables is not None:
        stats.update(server.tables.table_stats())
    session.finish(stats)
    if backup_peer is not None:
        backup_peer.close()
    endpoint.close()


def replaced_port(run_dir: Path, rank: int, host: str) -> int:
    """The port server ``rank`` had, if this process replaces it (0: a first start).

    ``cluster.json`` exists only once the cluster is up (a run directory is cleared of it
    before the job starts), so a server that finds itself there at start is a replacement."""
    try:
        procs = json.loads((Path(run_dir) / "cluster.json").read_text())["processes"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    from tessera.transport.address import is_inproc, port_of
    for p in procs:
        if p.get("role") == "server" and p.get("rank") == rank:
            address = str(p.get("address", ""))
            if is_inproc(address) or not address.startswith(f"tcp://{host}:"):
                return 0
            return port_of(address)
    return 0


def retain_window(cfg) -> int:
    """How many answered pushes per partition a worker keeps for a failover (0: none;
    :func:`tessera.ps.replication.window` lowers it for large partitions): sync keeps
    the last, async/ssp up to ``replication.WINDOW``, as their servers' answers assume."""
    from tessera.ps.replication import WINDOW
    if not answer_early(cfg):
        return 0
    return 1 if cfg.ps.mode == "sync" else WINDOW


def answer_early(cfg) -> bool:
    """Replication answers a push once the updates before it are on the backup, the
    clients keeping their last answered push (not under sync loss scaling, whose held
    pushes wait for a verdict). The client's ``retain`` follows the same rule."""
    return cfg.ps.replication == 2 and not (cfg.precision == "fp16" and cfg.ps.mode == "sync")


def agrees(cfg) -> bool:
    """Held sync clocks (loss scaling, clipping) are decided among the servers, one round
    trip a step (tessera.ps.agreement), except with replication, whose promoted backup
    would lack the verdicts and inputs sent to the dead primary. The workers' PSComm
    follows the same rule."""
    return cfg.ps.mode == "sync" and cfg.ps.replication == 1


def connect_server(session, topo, rank: int):
    """A connected endpoint to server ``rank`` (a new backup, re-replication); None if
    it is declared dead before the handshake."""
    from tessera.transport.endpoint import ClientEndpoint

    class Gone(Exception):
        pass

    def check() -> None:
        session.check()
        if rank in session.heartbeat.membership()[1]:
            raise Gone()
    address = session.heartbeat.elastic_view[0].get(rank) or topo.server_addresses[rank]
    peer = ClientEndpoint(session.ctx, address, session.secret,
                          f"server {rank} (backup)", sndtimeo_s=session.cfg.cluster.timeout_s)
    try:
        peer.wait_connected(session.cfg.cluster.timeout_s, check)
    except Gone:
        peer.close()
        return None
    return peer


def server_main() -> None:
    import torch

    from tessera.cluster.session import Session

    torch.set_num_threads(1)  # servers sum and step; workers need the cores
    session = Session.from_env(expect_role="server")
    serve(session, own_process=True)
    session.close()


if __name__ == "__main__":
    from tessera.config import env as _env, nopickle as _nopickle
    _nopickle.install_if_asked(_env.process_environ())  # tests: unpickling ends the process
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role == "coordinator":
        run_guarded(coordinator_main, "coordinator")
    elif role == "server":
        run_guarded(server_main, "server")
    else:
        sys.exit(f"usage: python -m tessera.cluster.role coordinator|server (got {role!r})")
