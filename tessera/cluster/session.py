"""A process's membership in a running job, and the user-facing ``tessera.init()``.

The launcher starts every process with its identity in a handful of
``TESSERA_*`` environment variables, which :mod:`tessera.config.env` alone
spells, writes and reads; :meth:`Session.from_env` asks it for this process's
:class:`~tessera.config.env.Identity`. Everything after that is passed down
explicitly.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

import zmq

from tessera.cluster.health import ClusterFailure, Heartbeat
from tessera.cluster.latency import apply_for_role
from tessera.cluster.lives import LifeTally
from tessera.cluster.topology import Topology
from tessera.config import config_from_dict
from tessera.config import env as envvars
from tessera.config.env import NotLaunched
from tessera.config.schema import JobConfig, OptimizerConfig
from tessera.profiler.recorder import OFF, SpanRecorder, estimate_offset
from tessera.ps.sharding import ShardMap
from tessera.transport import wire
from tessera.transport.endpoint import ClientEndpoint, close_context

__all__ = ["Session", "NotLaunched"]


class Session:
    """Who this process is, how to reach the coordinator, and the job's config."""

    def __init__(self, *, role: str, rank: int, cfg: JobConfig, run_dir: Path, coordinator: str,
                 secret: str, ctx: Optional[zmq.Context] = None, generation: int = 0):
        self.role, self.rank, self.cfg, self.run_dir = role, rank, cfg, Path(run_dir)
        #: allreduce/hybrid: how many times the launcher re-formed the worker group.
        self.generation = generation
        self.coordinator, self.secret = coordinator, secret
        # A given context is shared with the rest of an in-process job (inproc
        # addresses reach only sockets of one context): its owner destroys it.
        self._owns_ctx = ctx is None
        self.ctx = zmq.Context() if ctx is None else ctx
        cl = cfg.cluster
        self.heartbeat = Heartbeat(self.ctx, coordinator, secret, role, rank,
                                   interval_s=cl.heartbeat_interval_s,
                                   timeout_s=cl.heartbeat_timeout_s)
        self._coord = ClientEndpoint(self.ctx, coordinator, secret, "coordinator",
                                     sndtimeo_s=cl.timeout_s)
        self._coord.wait_connected(cl.timeout_s, self.heartbeat.check)
        if self._owns_ctx and cl.slice_us:  # (a process of its own: not an in-process job)
            apply_for_role(role, cl.slice_us)  # (a worker's ZeroMQ threads)
        self.view: Optional[wire.ClusterView] = None
        #: Who is who in the job; set by :meth:`register`.
        self.topology: Optional[Topology] = None
        #: Worker 0: training samples, sent at registration for checkpoints' data positions.
        self.data_samples = 0
        #: The collective modes' rendezvous store (tessera.parallel.rendezvous): held here
        #: because torch's group calls its Python methods for as long as the group lives.
        self.collective_store: Any = None
        self.profiler: SpanRecorder = OFF
        #: A worker's totals over its lives (restarts); set by :meth:`register`.
        self.tally: Optional[LifeTally] = None
        if cfg.profile.enabled:
            offset, error = estimate_offset(self._time_exchange)
            self.profiler = SpanRecorder(role, rank, offset, error)

    def _time_exchange(self, t0_ns: int) -> int:
        msg, _ = self._coord.request(wire.TimeSync(req=self._coord.new_req(), t0_ns=t0_ns),
                                     timeout_s=self.cfg.cluster.timeout_s, what="clock sync",
                                     check=self.heartbeat.check)
        if not isinstance(msg, wire.TimeSyncAck):
            raise ClusterFailure(f"coordinator answered clock sync with {type(msg).__name__}")
        return msg.t1_ns

    @classmethod
    def from_env(cls, expect_role: Optional[str] = None) -> "Session":
        """The session of a launched process; :class:`NotLaunched` if it was not."""
        me = envvars.Identity.from_env(envvars.process_environ(), expect_role=expect_role)
        run_dir = Path(me.run_dir)
        cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
        if me.host:  # a multi-node backend: this node's address
            cfg.cluster.host = me.host
        return cls(role=me.role, rank=me.rank, cfg=cfg, run_dir=run_dir,
                   coordinator=me.coordinator, secret=me.secret, generation=me.generation)

    @property
    def num_workers(self) -> int:
        return self.cfg.cluster.workers

    @property
    def num_servers(self) -> int:
        return self.cfg.cluster.servers

    @property
    def timeout_s(self) -> float:
        return self.cfg.cluster.timeout_s

    def check(self) -> None:
        self.heartbeat.check()

    def register(self, *, address: str = "", layout=None,
                 optimizer: Optional[OptimizerConfig] = None,
                 tables: Optional[list] = None,
                 frozen: Optional[dict] = None) -> wire.ClusterView:
        """Join the job; returns once everyone has joined (the cluster view)."""
        req = self._coord.new_req()
        msg, _ = self._coord.request(
            wire.Register(req=req, role=self.role, rank=self.rank, host=socket.gethostname(),
                          pid=os.getpid(), address=address, layout=layout, optimizer=optimizer,
                          tables=tables or [], samples=self.data_samples, frozen=frozen or {}),
            timeout_s=self.cfg.cluster.startup_timeout_s, what="registration",
            check=self.heartbeat.check)
        if isinstance(msg, wire.Error):
            raise ClusterFailure(msg.message)
        if not isinstance(msg, wire.ClusterView):
            raise ClusterFailure(f"coordinator answered registration with {type(msg).__name__}")
        self.view = msg
        self.topology = Topology.from_view(msg, role=self.role, rank=self.rank, cfg=self.cfg)
        if self.role == "worker":
            self.tally = LifeTally(self.run_dir / "cursors" / f"worker-{self.rank}.tally",
                                   fresh=not msg.incarnation)
        return msg

    def _registered(self) -> Topology:
        if self.topology is None:
            raise RuntimeError(f"{self.role} {self.rank}: register() with the coordinator "
                               f"before asking for the cluster's topology")
        return self.topology

    def shard_map(self) -> ShardMap:
        """``session.topology.shard_map`` (kept for callers written before Topology)."""
        return self._registered().shard_map

    def server_addresses(self) -> list[str]:
        """``session.topology.server_addresses`` as a list (kept for older callers)."""
        return list(self._registered().server_addresses)

    def report_checkpoint(self, clock: int, name: str, nbytes: int, partitions=()) -> None:
        """A server (or worker 0 in allreduce/hybrid mode, with the dense replica) tells the
        coordinator its file of the checkpoint at ``clock`` is written."""
        self._coord.request(wire.CheckpointSaved(req=self._coord.new_req(), rank=self.rank,
                                                 clock=clock, file=name, nbytes=nbytes,
                                                 role=self.role, partitions=list(partitions)),
                            timeout_s=self.timeout_s, what="checkpoint report",
                            check=self.heartbeat.check)

    def wait_workers_finished(self, timeout_s: float) -> bool:
        """Wait until every other worker has sent its final report (its last pushes were
        answered, so applied); False if ``timeout_s`` passed first."""
        others = set(range(self.num_workers)) - {self.rank}
        deadline = time.monotonic() + timeout_s
        while not others <= set(self.heartbeat.finished):
            self.heartbeat.check()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def report_replicated(self, backup: int, partitions: list[int]) -> None:
        """A server tells the coordinator a full copy of its partitions is on ``backup``."""
        self._coord.request(wire.Replicated(req=self._coord.new_req(), rank=self.rank,
                                            backup=backup, partitions=partitions),
                            timeout_s=self.timeout_s, what="re-replication report",
                            check=self.heartbeat.check)

    def report_moved(self, target: int, partitions: list[int]) -> None:
        """A server tells the coordinator ``partitions`` are on server ``target`` now."""
        self._coord.request(wire.Moved(req=self._coord.new_req(), rank=self.rank,
                                       target=target, partitions=partitions),
                            timeout_s=self.timeout_s, what="move report",
                            check=self.heartbeat.check)

    def finish(self, stats: dict[str, Any]) -> None:
        """Report this process's counters; the coordinator folds them into summary.json."""
        self.profiler.dump(self.run_dir / "profile" / f"{self.role}-{self.rank}.json")
        req = self._coord.new_req()
        clean = {k: v for k, v in stats.items() if isinstance(v, (int, float, str)) or v is None}
        self._coord.request(wire.Finished(req=req, role=self.role, rank=self.rank, stats=clean),
                            timeout_s=self.timeout_s, what="final report")

    def close(self) -> None:
        if self.tally is not None:
            self.tally.close()
        self.heartbeat.stop()
        self._coord.close()
        if self._owns_ctx:
            close_context(self.ctx)
