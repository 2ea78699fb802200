"""The coordinator: rendezvous, the shard map, liveness, and the job's end.

One per job. Its life:

1. **Rendezvous.** Servers register with their address, workers with their pid;
   worker 0 also sends the model's parameter layout and the optimizer. Replies
   are held until everyone expected has registered (or ``startup_timeout_s``
   passes, which fails the job naming who is missing). Workers of the collective
   modes (allreduce, hybrid, pipeline) then rendezvous their torch.distributed
   group through the store the coordinator keeps (:mod:`tessera.cluster.store`).
2. **Shard map.** The coordinator cuts the flat parameter vector into partitions
   (:func:`tessera.ps.sharding.plan_shards`), writes ``cluster.json`` and
   answers every held registration with the same :class:`ClusterView`.
3. **Liveness.** Every process heartbeats; a registered process silent for
   ``heartbeat_timeout_s`` is declared dead, and every heartbeat reply from then
   on says ``failed`` with the reason, so all processes stop with an error that
   names the dead one.
   With ``--max-restarts`` a dead worker is *departed* instead: heartbeat replies
   carry ``departed`` so servers stop waiting for it, and when it registers again
   it gets the view at once (with a new incarnation and the clock it last reported).
   With ``--replication 2`` a dead server is added to ``dead_servers`` so clients
   re-route to its backup; only losing both copies of a partition fails the job.
   The coordinator keeps where each partition is (``owner``) and where its
   acknowledged second copy is (``copy_at``): servers re-replicate after a death and
   report it (:class:`Replicated`), so a later death is survived too.
   With ``--max-restarts`` too, a new process for a dead server's rank registers at
   its predecessor's address and joins as a backup (``server_lives``; heartbeat replies
   carry it and ``owners``, where moved partitions are, which clients route by).
4. **Checkpoints.** Servers report each file they write (:class:`CheckpointSaved`);
   once every live server has reported a clock, the coordinator writes that
   checkpoint's ``manifest.json`` last (atomically), with the shard map, layout,
   config and each worker's data position, and prunes old checkpoints
   (:mod:`tessera.cluster.checkpoint_rounds`), both on a writer thread: a slow
   object store never delays a heartbeat reply. The launcher asks for one on
   SIGINT/SIGTERM (:class:`CheckpointNow`, answered when complete).
5. **End.** When every worker has sent :class:`Finished`, heartbeats answer
   ``shutdown``; servers send their own reports and exit; the coordinator writes
   ``summary.json`` and exits.

It imports no torch: it starts in a fraction of a second.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import msgspec
import zmq

from tessera.cluster.checkpoint_rounds import CheckpointRounds
from tessera.cluster.elastic import Elastic, scale_problem, shard_elems
from tessera.cluster.store import RendezvousStore
from tessera.config.schema import JobConfig, OptimizerConfig
from tessera.profiler.recorder import OFF, SpanRecorder
from tessera.ps.sharding import ShardMap, partition_elems_for, plan_shards
from tessera.transport import wire
from tessera.transport.endpoint import ServerEndpoint


def strict_json(obj):
    """``obj`` with every NaN or infinite float as None: strict JSON, which any parser
    reads (``json.dumps`` would write ``NaN``, which is not JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(strict_json(obj), indent=2, allow_nan=False))
    os.replace(tmp, path)


class Coordinator:
    def __init__(self, cfg: JobConfig, run_dir: Path, secret: str, *, ctx: zmq.Context,
                 generation: int = 0):
        self.cfg = cfg
        #: Times the launcher re-formed the worker group before this start (allreduce/hybrid).
        self.generation = generation
        self.run_dir = Path(run_dir)
        cl = cfg.cluster
        self.expected = {("server", r) for r in range(cl.servers)} | \
                        {("worker", r) for r in range(cl.workers)}
        # Coordinator messages are headers only (the largest: worker 0's layout).
        self.endpoint = ServerEndpoint(ctx, cl.host, secret,
                                       max_frame_bytes=wire.MAX_HEADER_BYTES + 4096)
        self.procs: dict[tuple[str, int], wire.ProcessInfo] = {}
        self.held: list[tuple[bytes, int]] = []
        self.layout: Optional[list[wire.ParamSpec]] = None
        #: The first worker's frozen parameters' digests (rank, name -> digest).
        self.frozen: Optional[tuple[int, dict[str, str]]] = None
        self.optimizer: Optional[OptimizerConfig] = None
        self.tables: list[wire.TableSpec] = []
        self.view: Optional[wire.ClusterView] = None
        self.shard_map: Optional[ShardMap] = None
        self.last_seen: dict[tuple[str, int], float] = {}
        self.finished: dict[tuple[str, int], dict] = {}
        self.state = "starting"
        self.reason = ""
        self.started = time.monotonic()
        self.failed_at = 0.0
        #: An in-process job's close(): its other threads have ended, so nobody is left to
        #: hear a failure (the coordinator ends at once, not 2 intervals and a second later).
        self.members_ended = False
        self.profiler: SpanRecorder = (SpanRecorder("coordinator", 0) if cfg.profile.enabled
                                       else OFF)
        # Membership under failures.
        self.incarnation: dict[int, int] = {}
        self.departed: dict[int, int] = {}
        self.lost_at: dict[tuple[str, int], float] = {}
        self.dead_servers: set[int] = set()
        #: Servers the launcher replaced (rank -> times): the new process joins as a backup.
        self.server_lives: dict[int, int] = {}
        #: Partition -> the server that owns it now, and the one holding its acknowledged
        #: second copy (replication; a primary re-replicating has none until it reports).
        self.owner: dict[int, int] = {}
        self.copy_at: dict[int, int] = {}
        #: The same for table shards (the rows hashed to server s): s -> the server serving
        #: them now, and the one holding their acknowledged copy (replication).
        self.shard_owner: dict[int, int] = {}
        self.shard_copy: dict[int, int] = {}
        self.worker_clock: dict[int, int] = {}
        self.departures = 0
        # Checkpoints.
        self.rounds = CheckpointRounds(cfg, self.run_dir)
        self.checkpoint_waiters: list[tuple[bytes, int]] = []
        self.samples = 0
        # torch.distributed's rendezvous (allreduce, hybrid, pipeline modes).
        self.store = RendezvousStore()
        #: Elastic servers: tessera scale, [ps] rebalance (tessera.cluster.elastic).
        self.elastic = Elastic(cfg)

    @property
    def address(self) -> str:
        return self.endpoint.address

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        """Serve until the job ends; returns the process exit code."""
        cl = self.cfg.cluster
        parent = os.getppid()
        while True:
            if os.getppid() != parent:
                return 3  # the launcher is gone: nobody is watching this job
            if self.endpoint.poll(0.1):
                for _ in range(64):
                    self._handle(self.endpoint.recv())
                    if not self.endpoint.poll(0):
                        break
            now = time.monotonic()
            self._reply_all(self.store.expire(now))
            if self.state == "starting" and now - self.started > cl.startup_timeout_s:
                missing = sorted(self.expected - set(self.procs))
                self._fail(f"the cluster did not come up within {cl.startup_timeout_s:.0f} s: "
                           f"still waiting for {', '.join(f'{r} {k}' for r, k in missing)} "
                           f"to register (see its log in {self.run_dir / 'logs'})")
            if self.state in ("starting", "running", "shutdown"):
                for key, seen in list(self.last_seen.items()):
                    if key in self.finished:
                        continue
                    if now - seen > cl.heartbeat_timeout_s:
                        info = self.procs.get(key)
                        where = f" (pid {info.pid} on {info.host})" if info else ""
                        self._lost(key, f"{key[0]} {key[1]}{where} sent no heartbeat for "
                                        f"{now - seen:.1f} s: it died or hangs")
                        if self.state == "failed":
                            break
                for key, since in list(self.lost_at.items()):
                    if now - since > cl.startup_timeout_s:
                        self._fail(f"{key[0]} {key[1]} died and did not come back within "
                                   f"{cl.startup_timeout_s:.0f} s")
            if self.state == "running" and self.cfg.ps.rebalance:
                self.elastic.tick(self.owner, self.shard_owner)
            if self.state == "running" and self.elastic.running != self.elastic.active:
                # A server still holding table rows is not empty either.
                self.elastic.retire({**self.owner,
                                     **{-k - 1: s for k, s in self.shard_owner.items()}})
                self.elastic.join_overdue(cl.startup_timeout_s)
            if self.rounds.reports:  # manifests handed to (and back from) the writer thread
                self._maybe_manifest()
            needed = {k for k in self.expected
                      if not (k[0] == "server" and k[1] in self.dead_servers)}
            if self.state == "shutdown" and all(k in self.finished for k in needed):
                self._write_summary()
                if self.state != "failed":  # else: the failure's answers go out first
                    self._answer_checkpoint_at_end()
                    return 0
            # After a failure keep answering heartbeats long enough that every
            # process hears about it (or none is left), then exit non-zero.
            if self.state == "failed" and (now - self.failed_at > 2 * cl.heartbeat_interval_s + 1
                                           or self.members_ended):
                return 3
            # A re-form: node 0's launcher ends this process; if it does not, leave.
            if self.state == "regroup" and now - self.failed_at > cl.startup_timeout_s:
                return 3

    def _lost(self, key: tuple[str, int], reason: str) -> None:
        """A process died: go on without it where the job allows, else fail."""
        role, rank = key
        cl = self.cfg.cluster
        if key in self.lost_at or self.state in ("failed", "regroup"):
            return
        if self.state in ("starting", "running") and role == "worker" \
                and self.cfg.ps.mode in ("allreduce", "hybrid") \
                and self.generation < cl.max_restarts:
            # The group cannot lose a member: the node launchers stop every process and
            # start generation + 1 from the newest checkpoint (node 0 starts a new
            # coordinator at this address). Processes hear "failed"; launchers "regroup".
            self.state, self.failed_at = "regroup", time.monotonic()
            self.reason = f"{reason}; the worker group is re-formed from the newest checkpoint"
            print(f"coordinator: {self.reason} (generation {self.generation + 1})", flush=True)
            self._reply_all(self.store.fail(self.reason))
            return
        if role == "server" and rank in self.dead_servers:  # told twice (Departed, then
            self.last_seen.pop(key, None)                  # silence), or a replacement
            return                                         # that never joined
        if self.state == "running" and role == "worker" and cl.max_restarts > 0:
            self.departed[rank] = self.incarnation.get(rank, 0)
            self.departures += 1
            self.last_seen.pop(key, None)
            self.lost_at[key] = time.monotonic()
            self.profiler.instant(f"departed worker {rank}", "membership")
            print(f"coordinator: {reason}; worker {rank} left the job, waiting for it to "
                  f"rejoin", flush=True)
            return
        if self.state == "running" and role == "server" and self.cfg.ps.replication == 2:
            self.dead_servers.add(rank)
            self.last_seen.pop(key, None)
            # Its partitions move to the server holding their acknowledged copy; copies
            # it held are gone (their primaries re-replicate and report: Replicated).
            lost = sorted(pid for pid, s in self.owner.items()
                          if s == rank and self.copy_at.get(pid, -1) in self.dead_servers | {-1})
            if lost:
                self._fail(f"{reason}; partitions {lost} had their other copy on it or on a "
                           f"server dead before (re-replication had not finished): no copy left")
                return
            lost = sorted(k for k, s in self.shard_owner.items()
                          if s == rank and self.shard_copy.get(k, -1) in self.dead_servers | {-1})
            if lost:
                self._fail(f"{reason}; the table rows of servers {lost} had their other copy "
                           f"on it or on a server dead before (re-replication had not "
                           f"finished): no copy left")
                return
            for k, s in list(self.shard_owner.items()):
                if s == rank:
                    self.shard_owner[k] = self.shard_copy.pop(k)
            for k, s in list(self.shard_copy.items()):
                if s == rank:
                    del self.shard_copy[k]
            heirs = sorted({self.copy_at[pid] for pid, s in self.owner.items() if s == rank})
            for pid, s in list(self.owner.items()):
                if s == rank:
                    self.owner[pid] = self.copy_at.pop(pid)
            for pid, s in list(self.copy_at.items()):
                if s == rank:
                    del self.copy_at[pid]
            print(f"coordinator: {reason}; server(s) {heirs or '-'} take over its partitions; "
                  f"re-replicating", flush=True)
            self.profiler.instant(f"server {rank} dead, backup promoted", "membership")
            self._maybe_manifest()
            return
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        if self.state not in ("failed", "regroup"):  # a re-form ends this generation anyway
            self.state, self.reason, self.failed_at = "failed", reason, time.monotonic()
            print(f"coordinator: job failed: {reason}", flush=True)
            self._reply_all(self.store.fail(reason))

    def _reply_all(self, replies) -> None:
        for peer, reply in replies:
            self.endpoint.send(peer, reply)

    # -------------------------------------------------------------- handlers

    def _handle(self, got) -> None:
        msg = got.msg
        if msg is None:
            self.endpoint.send(got.peer, wire.Error(req=0, message=f"coordinator: {got.error}"))
            return
        if isinstance(msg, wire.TimeSync):
            self.endpoint.send(got.peer, wire.TimeSyncAck(req=msg.req, t1_ns=time.time_ns()))
        elif isinstance(msg, wire.Heartbeat):
            key = (msg.role, msg.rank)
            if key in self.procs and key not in self.lost_at:
                self.last_seen[key] = time.monotonic()
                if msg.role == "worker" and msg.clock >= 0:
                    self.worker_clock[msg.rank] = msg.clock
                if msg.role == "server":
                    self.elastic.load(msg.rank, msg.busy_s, msg.table_busy_s)
            state = "running" if self.state == "starting" else self.state
            if state == "regroup" and msg.role != "launcher":
                state = "failed"
            self.endpoint.send(got.peer, wire.HeartbeatAck(
                req=msg.req, state=state, generation=self.generation,
                reason=self.reason, checkpoint=bool(self.checkpoint_waiters),
                departed=self.departed, dead_servers=sorted(self.dead_servers),
                server_lives=self.server_lives, owners=self._moved(),
                moves=self.elastic.orders if msg.role == "server" else {},
                addresses=self._server_addresses(), retired=sorted(self.elastic.retired),
                finished=sorted(r for role, r in self.finished if role == "worker")))
        elif isinstance(msg, wire.Departed):
            key = (msg.role, msg.rank)
            if key in self.finished:  # it had reported: nothing to replace
                self.endpoint.send(got.peer, wire.Error(req=msg.req, message=(
                    f"coordinator: {msg.role} {msg.rank} had finished")))
                return
            self.endpoint.send(got.peer, wire.Ack(req=msg.req))
            if key in self.procs and key not in self.finished:
                self._lost(key, msg.reason)
            elif msg.final and key in self.expected and self.state == "starting":
                # It never registered and will not be started again: the cluster cannot
                # come up (the others would wait for it until the start-up timeout).
                self._fail(f"{msg.reason} before it registered")
        elif isinstance(msg, (wire.CheckpointSaved, wire.Finished)) \
                and (msg.role, msg.rank) not in self.procs:
            # Only from this coordinator's members: after a re-form across nodes, a process
            # of the generation before may still be ending when the new coordinator is up.
            self.endpoint.send(got.peer, wire.Error(req=msg.req, message=(
                f"coordinator: {msg.role} {msg.rank} has not registered with generation "
                f"{self.generation}")))
        elif isinstance(msg, wire.CheckpointSaved):
            refused = self.rounds.report(msg)
            if not refused and msg.role == "server":
                self.elastic.saved(msg.clock, msg.rank, msg.partitions)
            self.endpoint.send(got.peer, wire.Error(req=msg.req, message=f"coordinator: {refused}")
                               if refused else wire.Ack(req=msg.req))
            self._maybe_manifest()
        elif isinstance(msg, wire.Replicated):
            self.endpoint.send(got.peer, wire.Ack(req=msg.req))
            if msg.backup not in self.dead_servers:
                moved = [pid for pid in msg.partitions if self.owner.get(pid) == msg.rank]
                for pid in moved:
                    self.copy_at[pid] = msg.backup
                # Table shard s comes as -(s + 1) (tessera.ps.replication.shard_key).
                shards = sorted(-pid - 1 for pid in msg.partitions
                                if pid < 0 and self.shard_owner.get(-pid - 1) == msg.rank)
                for k in shards:
                    self.shard_copy[k] = msg.backup
                what = (f"partitions {moved}" if moved or not shards else "") + \
                    (" and " if moved and shards else "") + \
                    (f"table shards of servers {shards}" if shards else "")
                print(f"coordinator: server {msg.rank}'s {what} have their second "
                      f"copy on server {msg.backup} again", flush=True)
        elif isinstance(msg, wire.Scale):
            problem = self.elastic.scale(
                msg.servers, self.owner,
                {p.id: p.stop - p.start for p in self.shard_map.partitions}
                if self.shard_map else {}, self.state, scale_problem(self.cfg, self.tables),
                self.shard_owner)
            self.endpoint.send(got.peer, wire.Error(req=msg.req, message=problem) if problem
                               else wire.Ack(req=msg.req))
        elif isinstance(msg, wire.Moved):
            self.endpoint.send(got.peer, wire.Ack(req=msg.req))
            taken = self.elastic.done(msg.rank, msg.target, msg.partitions, self.owner,
                                      self.shard_owner)
            if taken:
                parts = [p for p in taken if p >= 0]  # table shard k as -(k + 1)
                shards = sorted(-p - 1 for p in taken if p < 0)
                what = " and ".join(([f"partitions {parts}"] if parts else []) +
                                    ([f"table shards of servers {shards}"] if shards else []))
                print(f"coordinator: server {msg.rank} moved {what} to server {msg.target}",
                      flush=True)
                self.profiler.instant(f"server {msg.rank} moved {len(taken)} partitions",
                                      "membership")
                self._write_cluster_json()
        elif isinstance(msg, wire.CheckpointNow):
            if self.state != "running" or not self.rounds.on_request:
                self.endpoint.send(got.peer, wire.Error(req=msg.req, message=(
                    f"coordinator: no checkpoint possible now (job {self.state})")))
            else:
                self.checkpoint_waiters.append((got.peer, msg.req))
        elif isinstance(msg, wire.Register):
            self._on_register(got.peer, msg)
        elif isinstance(msg, wire.StoreOp):
            if self.state in ("failed", "regroup"):
                self.endpoint.send(got.peer, wire.Error(
                    req=msg.req, message=f"coordinator: job failed: {self.reason}"))
            else:
                self._reply_all(self.store.handle(got.peer, msg, time.monotonic()))
        elif isinstance(msg, wire.Finished):
            self.finished[(msg.role, msg.rank)] = dict(msg.stats)
            if msg.role == "server" and msg.rank in self.elastic.retired:
                self.elastic.exited(msg.rank)
                print(f"coordinator: server {msg.rank} stopped (scaled away)", flush=True)
            self.profiler.instant(f"finished {msg.role} {msg.rank}", "membership")
            self.endpoint.send(got.peer, wire.Ack(req=msg.req))
            if all(("worker", r) in self.finished for r in range(self.cfg.cluster.workers)) \
                    and self.state == "running":
                self.state = "shutdown"
                self.profiler.instant("shutdown", "membership")
        else:
            self.endpoint.send(got.peer, wire.Error(
                req=getattr(msg, "req", 0),
                message=f"coordinator does not serve {type(msg).__name__} requests"))

    def _on_register(self, peer: bytes, msg: wire.Register) -> None:
        key = (msg.role, msg.rank)
        if msg.role == "server" and msg.rank in self.elastic.joining:
            if self.state == "running":
                self._join_server(peer, msg)
            else:
                self.endpoint.send(peer, wire.Error(req=msg.req, message=(
                    f"coordinator: the job is {self.state}: server {msg.rank} does not join")))
            return
        if key not in self.expected:
            roles = f"servers 0..{self.cfg.cluster.servers - 1}, workers 0..{self.cfg.cluster.workers - 1}"
            self.endpoint.send(peer, wire.Error(req=msg.req, message=(
                f"coordinator: {msg.role} {msg.rank} is not part of this job ({roles})")))
            return
        problem = self._frozen_problem(msg)
        if problem:
            self.endpoint.send(peer, wire.Error(req=msg.req, message=f"coordinator: {problem}"))
            self._fail(problem)
            return
        if key in self.lost_at and self.state == "running" and msg.role == "worker":
            self._rejoin(peer, msg)
            return
        if key in self.procs and self.state != "starting" and msg.role == "server" \
                and msg.rank in self.dead_servers:
            if self.state == "running":
                self._replace_server(peer, msg)
            else:
                self.endpoint.send(peer, wire.Error(req=msg.req, message=(
                    f"coordinator: the job is {self.state}: the replacement of server "
                    f"{msg.rank} does not join")))
            return
        if key in self.procs and self.state != "starting":
            self.endpoint.send(peer, wire.Error(req=msg.req, message=(
                f"coordinator: {msg.role} {msg.rank} registered twice")))
            return
        if msg.role == "worker" and msg.rank == 0:
            if msg.layout is None or msg.optimizer is None or not (
                    msg.layout or msg.tables or self.cfg.ps.mode == "allreduce"):
                self.endpoint.send(peer, wire.Error(req=msg.req, message=(
                    "coordinator: worker 0 must send the model layout and the optimizer")))
                return
            problem = self.rounds.mismatch(msg)
            if not problem and self.cfg.ps.replication == 2 and msg.tables:
                from tessera.ps.table_replication import replication_problem
                problem = replication_problem(msg.tables)
            if problem:
                self.endpoint.send(peer, wire.Error(req=msg.req, message=f"coordinator: {problem}"))
                self._fail(problem)
                return
            self.layout, self.optimizer, self.tables = msg.layout, msg.optimizer, msg.tables
            self.samples = msg.samples
        self.procs[key] = wire.ProcessInfo(role=msg.role, rank=msg.rank, host=msg.host,
                                           pid=msg.pid, address=msg.address)
        self.profiler.instant(f"registered {msg.role} {msg.rank}", "membership", pid=msg.pid)
        self.last_seen[key] = time.monotonic()
        self.held.append((peer, msg.req))
        if set(self.procs) == self.expected and self.layout is not None and self.state == "starting":
            self._start()

    def _start(self) -> None:
        cfg = self.cfg
        if sum(p.numel for p in self.layout) and cfg.cluster.servers:
            self.shard_map = plan_shards(self.layout, cfg.cluster.servers,
                                         partition_elems_for(cfg.ps.partition_mb),
                                         cfg.ps.server_weights)
        else:  # only sharded tables: no dense partitions
            self.shard_map = ShardMap(layout=tuple(self.layout), partitions=(),
                                      num_servers=cfg.cluster.servers)
        procs = sorted(self.procs.values(), key=lambda p: (p.role != "server", p.role, p.rank))
        self.procs_sorted = procs
        self._write_cluster_json()
        servers = cfg.cluster.servers
        self.owner = {p.id: p.server for p in self.shard_map.partitions}
        if cfg.ps.replication == 2 and servers > 1:  # the ring: server s + 1 backs up s
            self.copy_at = {p.id: (p.server + 1) % servers for p in self.shard_map.partitions}
        if self.tables:
            self.shard_owner = {s: s for s in range(servers)}
            self.elastic.shard_elems = shard_elems(self.tables, servers)
            if cfg.ps.replication == 2 and servers > 1:
                self.shard_copy = {s: (s + 1) % servers for s in range(servers)}
        for peer, req in self.held:
            self.endpoint.send(peer, self._view(req))
        self.held.clear()
        self.state = "running"
        self.profiler.instant("cluster up", "membership",
                              partitions=len(self.shard_map.partitions))
        loads = self.shard_map.server_bytes()
        print(f"coordinator: cluster up: {len(procs)} processes, {len(self.shard_map.partitions)} "
              f"partitions, bytes per server {loads}", flush=True)

    def _write_cluster_json(self) -> None:
        cfg = self.cfg
        me = wire.ProcessInfo(role="coordinator", rank=0, host=cfg.cluster.host, pid=os.getpid(),
                              address=self.address)
        write_json_atomic(self.run_dir / "cluster.json", {
            "processes": [{"role": p.role, "rank": p.rank, "host": p.host, "pid": p.pid,
                           "address": p.address} for p in [me, *self.procs_sorted]],
            "partitions": [{"id": p.id, "start": p.start, "stop": p.stop,
                            "server": self.owner.get(p.id, p.server)}
                           for p in self.shard_map.partitions],
        })

    def _view(self, req: int, rank: int = -1) -> wire.ClusterView:
        restore = self.rounds.restore()
        clock = restore.clock if restore else 0
        if rank >= 0:  # a restarted worker: where it got to (the servers may be further)
            clock = max(clock, self.worker_clock.get(rank, clock))
        return wire.ClusterView(
            req=req, processes=self.procs_sorted, partitions=list(self.shard_map.partitions),
            layout=self.layout, optimizer=self.optimizer, tables=self.tables, restore=restore,
            clock=clock, incarnation=self.incarnation.get(rank, 0) if rank >= 0 else 0)

    def _moved(self) -> dict[int, int]:
        """Every partition's owner once a server died (clients route by it; a partition
        back on its shard-map server, a replacement, is in it too), else nothing."""
        if not self.dead_servers and not self.server_lives and not self.elastic.moved:
            return {}
        # Table shard s as -(s + 1) (tessera.ps.replication.shard_key): where its rows are.
        return {**self.owner, **{-k - 1: s for k, s in self.shard_owner.items()}}

    def _replace_server(self, peer: bytes, msg: wire.Register) -> None:
        """A new process for a dead server's rank: it holds nothing yet and joins the
        ring as a backup (servers without a backup copy their partitions and table shards
        to it and report :class:`Replicated`). It binds its predecessor's address, so every socket already
        connected to that rank reaches it."""
        key = (msg.role, msg.rank)
        old = self.procs[key].address
        if msg.address != old:
            self.endpoint.send(peer, wire.Error(req=msg.req, message=(
                f"coordinator: the replacement of server {msg.rank} must bind its "
                f"predecessor's address {old} (it bound {msg.address})")))
            return
        self.dead_servers.discard(msg.rank)
        self.server_lives[msg.rank] = self.server_lives.get(msg.rank, 0) + 1
        self.procs[key] = wire.ProcessInfo(role=msg.role, rank=msg.rank, host=msg.host,
                                           pid=msg.pid, address=msg.address)
        self.procs_sorted = [self.procs[(p.role, p.rank)] for p in self.procs_sorted]
        self._write_cluster_json()  # the new pid (the address is the old one)
        self.last_seen[key] = time.monotonic()
        self.profiler.instant(f"server {msg.rank} replaced", "membership", pid=msg.pid)
        print(f"coordinator: server {msg.rank} replaced (pid {msg.pid}, replacement "
              f"{self.server_lives[msg.rank]}): it joins as a backup", flush=True)
        view = self._view(msg.req)
        self.endpoint.send(peer, msgspec.structs.replace(
            view, dead_servers=sorted(self.dead_servers), server_lives=dict(self.server_lives)))

    def _server_addresses(self) -> dict[int, str]:
        """Every server's address, once tessera scale started one mid-job (else nothing:
        the processes know the addresses of the start)."""
        if not self.elastic.started_any:
            return {}
        return {p.rank: p.address for p in self.procs_sorted if p.role == "server"}

    def _join_server(self, peer: bytes, msg: wire.Register) -> None:
        """A server the launcher started for ``tessera scale``: it holds nothing; every
        process learns its address from the heartbeat replies, then partitions move to it
        (tessera.cluster.elastic)."""
        key = (msg.role, msg.rank)
        self.finished.pop(key, None)  # a rank scaled away before, started again
        self.expected.add(key)
        self.procs[key] = wire.ProcessInfo(role=msg.role, rank=msg.rank, host=msg.host,
                                           pid=msg.pid, address=msg.address)
        self.procs_sorted = sorted(self.procs.values(),
                                   key=lambda p: (p.role != "server", p.role, p.rank))
        self.last_seen[key] = time.monotonic()
        self.elastic.started_any = True
        self._write_cluster_json()
        self.profiler.instant(f"server {msg.rank} joined (scale)", "membership", pid=msg.pid)
        print(f"coordinator: server {msg.rank} joined the running job (pid {msg.pid}, "
              f"{msg.address})", flush=True)
        view = self._view(msg.req)
        self.endpoint.send(peer, msgspec.structs.replace(view, restore=None, scaled_in=True))
        self.elastic.joined(msg.rank, self.owner, self.shard_owner)

    def _frozen_problem(self, msg: wire.Register) -> str:
        """Why a worker's frozen parameters differ from the first worker's ("" if not):
        the servers hold only trainable ones, so a frozen one is each worker's own."""
        if msg.role != "worker":
            return ""
        if self.frozen is None:
            self.frozen = (msg.rank, dict(msg.frozen))
            return ""
        rank, want = self.frozen
        if msg.frozen == want:
            return ""
        name = next((n for n in [*want, *msg.frozen] if want.get(n) != msg.frozen.get(n)))
        return (f"worker {msg.rank}'s frozen parameter {name!r} (requires_grad=False) differs "
                f"from worker {rank}'s; the servers hold only trainable parameters, so build "
                f"frozen ones alike on every worker (torch.manual_seed before building the "
                f"model, or load the same weights)")

    def _rejoin(self, peer: bytes, msg: wire.Register) -> None:
        key = (msg.role, msg.rank)
        self.incarnation[msg.rank] = self.incarnation.get(msg.rank, 0) + 1
        del self.lost_at[key]
        self.procs[key] = wire.ProcessInfo(role=msg.role, rank=msg.rank, host=msg.host,
                                           pid=msg.pid, address=msg.address)
        self.last_seen[key] = time.monotonic()
        self.profiler.instant(f"rejoined worker {msg.rank}", "membership", pid=msg.pid)
        print(f"coordinator: worker {msg.rank} rejoined (pid {msg.pid}, incarnation "
              f"{self.incarnation[msg.rank]})", flush=True)
        self.endpoint.send(peer, self._view(msg.req, rank=msg.rank))

    # ------------------------------------------------------------ checkpoints

    def _maybe_manifest(self) -> None:
        """Write the manifest of every clock all live servers have reported, last."""
        from tessera.ps.checkpoint import CheckpointError
        # A replacement that owns nothing yet (it holds copies only) writes no file.
        owners = set(self.owner.values()) | set(self.shard_owner.values())
        live = {r for r in range(self.cfg.cluster.servers) if r not in self.dead_servers
                and (r not in self.server_lives or r in owners)}
        try:
            # Scaled servers: a clock is complete once its files hold every partition
            # (a server emptied by tessera scale writes none while it holds nothing).
            ready = None
            if self.elastic.moved and (self.owner or self.shard_owner):
                pids = set(self.owner) | {-k - 1 for k in self.shard_owner}
                ready = lambda clock, files: self.elastic.files_complete(clock, files, pids)  # noqa: E731
            self.rounds.complete(live, self._manifest, self._checkpoint_done, ready)
        except CheckpointError as exc:  # a checkpoint split over several locations
            self._fail(str(exc))

    def _manifest(self, clock: int, files: dict[int, tuple[str, int]]) -> dict:
        return self.rounds.manifest(clock, files, shard_map=self.shard_map, layout=self.layout,
                                    tables=self.tables, optimizer=self.optimizer,
                                    samples=self.samples, dead_servers=self.dead_servers,
                                    owners=self.elastic.file_owners(clock, self.owner))

    def _answer_checkpoint_at_end(self) -> None:
        """The launcher asked for a checkpoint, and the job ended first (a followed stream:
        the workers stop waiting for shards when asked, at the clock they completed).
        Every server wrote its final state before it finished, unless a checkpoint at
        that clock was complete already: the newest one is the job's end either way."""
        if not self.checkpoint_waiters:
            return
        if self.rounds.completed or self.rounds.store.latest():
            self._checkpoint_done()
            return
        for peer, req in self.checkpoint_waiters:
            self.endpoint.send(peer, wire.Error(req=req, message=(
                "coordinator: the job ended before any checkpoint was complete")))
        self.checkpoint_waiters.clear()

    def _checkpoint_done(self) -> None:
        for peer, req in self.checkpoint_waiters:
            self.endpoint.send(peer, wire.Ack(req=req))
        self.checkpoint_waiters.clear()

    # ---------------------------------------------------------------- summary

    def _write_summary(self) -> None:
        cfg = self.cfg
        self._maybe_manifest()
        from tessera.ps.checkpoint import CheckpointError
        try:
            self.rounds.flush(cfg.cluster.timeout_s, self._checkpoint_done)
        except CheckpointError as exc:  # the last round's files are not all there
            self._fail(str(exc))
        if self.state == "failed":
            return
        workers = [self.finished[("worker", r)] for r in range(cfg.cluster.workers)]
        ranks = max([cfg.cluster.servers] + [r + 1 for role, r in self.procs if role == "server"])
        servers = [self.finished.get(("server", r), {}) for r in range(ranks)]
        # The worker that evaluated (worker 0, or replica 0's last pipeline stage).
        lead = next((w for w in workers if "eval_loss" in w), workers[0])
        summary = {k: v for k, v in lead.items() if k.startswith("eval_") or k in (
            "wall_s", "eval_s", "samples_per_s", "steps", "final_loss", "skipped_steps", "loss_scale",
            "first_overflow", "reference_auc")}
        if all("own_samples" in w for w in workers):
            # Every worker's samples over the job's training time (the slowest worker's),
            # not the lead's rate times the worker count. Evaluation is not training time:
            # where every step waits for every worker (sync, allreduce, hybrid's dense
            # all-reduce, pipeline stages), the others stood still while the lead evaluated,
            # so the lead's evaluation comes off every worker's wall; in async and ssp they
            # train on meanwhile (ssp: up to K clocks), and only their own comes off.
            lockstep = cfg.ps.mode in ("sync", "allreduce", "hybrid")
            lead_eval = float(lead.get("eval_s", 0.0))
            busy = max(float(w.get("wall_s", 0.0))
                       - (lead_eval if lockstep else float(w.get("eval_s", 0.0)))
                       for w in workers)
            summary["samples_per_s"] = sum(int(w["own_samples"]) for w in workers) / max(busy, 1e-9)
        if all("loop_cpu_s" in w for w in workers):  # CPU per step (profiler_overhead.py)
            summary["worker_loop_cpu_s"] = [float(w["loop_cpu_s"]) for w in workers]
            summary["worker_loop_steps"] = [int(w["loop_steps"]) for w in workers]
        if any("balance_samples" in w for w in workers):  # train.balance: each worker's share
            summary["balance"] = [{k: v for k, v in w.items() if k.startswith("balance_")}
                                  for w in workers]
        tables = sorted({k.split(".", 1)[1] for s in servers for k in s if k.startswith("rows.")})
        if tables:
            summary["rows_per_server"] = {t: [int(s.get(f"rows.{t}", 0)) for s in servers]
                                          for t in tables}
            summary["table_bytes_per_server"] = {
                t: [int(s.get(f"table_bytes.{t}", 0)) for s in servers] for t in tables}
            summary["rows_pulled"] = sum(int(s.get("rows_pulled", 0)) for s in servers)
            for key in ("table_capacity", "table_evictions"):  # model.table_memory_mb
                if any(k.startswith(key + ".") for s in servers for k in s):
                    summary[key + "_per_server"] = {
                        t: [int(s.get(f"{key}.{t}", 0)) for s in servers] for t in tables}
        summary.update({
            "bytes_pushed": sum(int(w.get("bytes_pushed", 0)) for w in workers),
            "bytes_pulled": sum(int(w.get("bytes_pulled", 0)) for w in workers),
            "allreduce_bytes": sum(int(w.get("allreduce_bytes", 0)) for w in workers),
            "mode": cfg.ps.mode,
            "precision": cfg.precision,
            "workers": cfg.cluster.workers,
            "servers": cfg.cluster.servers,
            "partitions": len(self.shard_map.partitions) if self.shard_map else 0,
            "server_updates": [int(s.get("updates", 0)) for s in servers],
            "server_skipped": [int(s.get("skipped", 0)) for s in servers],
            "staleness": cfg.ps.staleness,
            "max_clock_gap": max((int(s.get("max_clock_gap", 0)) for s in servers), default=0),
            "server_bytes_received": [int(s.get("bytes_received", 0)) for s in servers],
            "server_messages": [int(s.get("messages_in", 0)) for s in servers],
            "pushes_acked": sum(int(w.get("pushes_acked", 0)) for w in workers),
            "pushes_applied": self._applied(servers),
            # Pushes a killed worker sent in its last step and never saw answered: the
            # servers may have applied them (pushes_acked <= pushes_applied <= acked + this).
            "pushes_unanswered": sum(int(w.get("pushes_unanswered", 0)) for w in workers),
            "restarts": sum(self.incarnation.values()) + self.generation,
            "group_restarts": self.generation,
            "worker_first_steps": [int(w.get("first_step", 0) or 0) for w in workers],
            # A restarted worker: seconds from its restart to its joining (None: never).
            "worker_rejoin_s": [w.get("rejoin_s") for w in workers],
            "worker_rejoined_at_unix": [w.get("rejoined_at_unix") for w in workers],
            "departures": self.departures,
            "short_clocks": [int(s.get("short_clocks", 0)) for s in servers],
            # fp16 sync: pushes that left during backward (Push.pending), and per server
            # the clocks it completed without a worker's word (the worker died first).
            "pending_pushes": sum(int(s.get("pending_pushes", 0)) for s in servers),
            "words_lost": [int(s.get("words_lost", 0)) for s in servers],
            "dead_servers": sorted(self.dead_servers),
            "servers_replaced": {str(r): n for r, n in sorted(self.server_lives.items())},
            "checkpoints": self.rounds.completed,
            "elastic": self.elastic.summary(),
            "owners": {str(k): v for k, v in sorted(self.owner.items())},
            "resumed_from": self.rounds.resumed_from,
            "config": msgspec.to_builtins(cfg),
        })
        write_json_atomic(self.run_dir / "summary.json", summary)
        if self.cfg.profile.enabled:
            self._write_profile()

    def _applied(self, servers: list[dict]) -> int:
        """Worker pushes applied, counted on the copy of each partition that survived."""
        total = 0
        for p in self.shard_map.partitions if self.shard_map else ():
            total += int(servers[self.owner.get(p.id, p.server)].get(f"applied.p{p.id}", 0))
        # Table row pushes, per shard (the rows hashed to server s), on the surviving copy:
        # the server serving the shard now (its own, or where its copy was).
        n = self.cfg.cluster.servers
        for shard in range(n):
            gone = shard in self.dead_servers or shard in self.server_lives
            owner = self.shard_owner.get(shard, (shard + 1) % n if gone else shard)
            suffix = f".s{shard}"
            total += sum(int(v) for k, v in servers[owner].items()
                         if k.startswith("table_applied.") and k.endswith(suffix))
        return total

    def _write_profile(self) -> None:
        from tessera.profiler.report import write_report
        from tessera.profiler.trace import load_profiles, write_trace
        self.profiler.dump(self.run_dir / "profile" / "coordinator-0.json")
        docs = load_profiles(self.run_dir)
        write_trace(self.run_dir, docs)
        report = write_report(self.run_dir, docs)
        print(f"coordinator: profile written; bottleneck: {report['bottleneck']}", flush=True)
