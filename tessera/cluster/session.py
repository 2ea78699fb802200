"""A process's membership in a running job, and the user-facing ``tessera.init()``.

The launcher starts every process with its identity in a handful of
``TESSERA_*`` environment variables; :meth:`Session.from_env` is the only code
that reads them (STYLE: only the launcher reads the environment). Everything
after that is passed down explicitly.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Optional

import zmq

from tessera.cluster.health import ClusterFailure, Heartbeat
from tessera.config import config_from_dict
from tessera.config.schema import JobConfig, OptimizerConfig
from tessera.errors import TesseraError
from tessera.profiler.recorder import OFF, SpanRecorder, estimate_offset
from tessera.ps.sharding import ShardMap
from tessera.transport import wire
from tessera.transport.endpoint import ClientEndpoint

ENV_VARS = ("TESSERA_ROLE", "TESSERA_RANK", "TESSERA_RUN_DIR", "TESSERA_COORDINATOR",
            "TESSERA_SECRET")


class NotLaunched(TesseraError):
    pass


class Session:
    """Who this process is, how to reach the coordinator, and the job's config."""

    def __init__(self, *, role: str, rank: int, cfg: JobConfig, run_dir: Path, coordinator: str,
                 secret: str, ctx: Optional[zmq.Context] = None):
        self.role, self.rank, self.cfg, self.run_dir = role, rank, cfg, Path(run_dir)
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
        self.view: Optional[wire.ClusterView] = None
        #: Worker 0: training samples, sent at registration for checkpoints' data positions.
        self.data_samples = 0
        self.profiler: SpanRecorder = OFF
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
        missing = [v for v in ENV_VARS if not os.environ.get(v)]
        if missing:
            raise NotLaunched(
                "this process was not started by a Tessera launcher (missing "
                f"{', '.join(missing)}); run your script with "
                "`tessera launch --workers 2 --servers 2 your_script.py`")
        role = os.environ["TESSERA_ROLE"]
        if expect_role and role != expect_role:
            raise NotLaunched(f"this process was launched as a {role}, not a {expect_role}")
        run_dir = Path(os.environ["TESSERA_RUN_DIR"])
        import json
        cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
        if os.environ.get("TESSERA_HOST"):  # a multi-node backend: this node's address
            cfg.cluster.host = os.environ["TESSERA_HOST"]
        return cls(role=role, rank=int(os.environ["TESSERA_RANK"]), cfg=cfg, run_dir=run_dir,
                   coordinator=os.environ["TESSERA_COORDINATOR"],
                   secret=os.environ["TESSERA_SECRET"])

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
                 tables: Optional[list] = None) -> wire.ClusterView:
        """Join the job; returns once everyone has joined (the cluster view)."""
        req = self._coord.new_req()
        msg, _ = self._coord.request(
            wire.Register(req=req, role=self.role, rank=self.rank, host=socket.gethostname(),
                          pid=os.getpid(), address=address, layout=layout, optimizer=optimizer,
                          tables=tables or [], samples=self.data_samples),
            timeout_s=self.cfg.cluster.startup_timeout_s, what="registration",
            check=self.heartbeat.check)
        if isinstance(msg, wire.Error):
            raise ClusterFailure(msg.message)
        if not isinstance(msg, wire.ClusterView):
            raise ClusterFailure(f"coordinator answered registration with {type(msg).__name__}")
        self.view = msg
        return msg

    def shard_map(self) -> ShardMap:
        assert self.view is not None, "register() first"
        return ShardMap(layout=tuple(self.view.layout), partitions=tuple(self.view.partitions),
                        num_servers=self.num_servers)

    def server_addresses(self) -> list[str]:
        assert self.view is not None, "register() first"
        servers = sorted((p for p in self.view.processes if p.role == "server"),
                         key=lambda p: p.rank)
        return [p.address for p in servers]

    def report_checkpoint(self, clock: int, name: str, nbytes: int) -> None:
        """A server tells the coordinator its file of the checkpoint at ``clock`` is written."""
        self._coord.request(wire.CheckpointSaved(req=self._coord.new_req(), rank=self.rank,
                                                 clock=clock, file=name, nbytes=nbytes),
                            timeout_s=self.timeout_s, what="checkpoint report",
                            check=self.heartbeat.check)

    def finish(self, stats: dict[str, Any]) -> None:
        """Report this process's counters; the coordinator folds them into summary.json."""
        self.profiler.dump(self.run_dir / "profile" / f"{self.role}-{self.rank}.json")
        req = self._coord.new_req()
        clean = {k: v for k, v in stats.items() if isinstance(v, (int, float, str)) or v is None}
        self._coord.request(wire.Finished(req=req, role=self.role, rank=self.rank, stats=clean),
                            timeout_s=self.timeout_s, what="final report")

    def close(self) -> None:
        self.heartbeat.stop()
        self._coord.close()
        if self._owns_ctx:
            self.ctx.destroy(linger=0)
