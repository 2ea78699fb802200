"""The coordinator: rendezvous, the shard map, liveness, and the job's end.

One per job. Its life:

1. **Rendezvous.** Servers register with their address, workers with their pid;
   worker 0 also sends the model's parameter layout and the optimizer. Replies
   are held until everyone expected has registered (or ``startup_timeout_s``
   passes, which fails the job naming who is missing).
2. **Shard map.** The coordinator cuts the flat parameter vector into partitions
   (:func:`tessera.ps.sharding.plan_shards`), writes ``cluster.json`` and
   answers every held registration with the same :class:`ClusterView`.
3. **Liveness.** Every process heartbeats; a registered process silent for
   ``heartbeat_timeout_s`` is declared dead, and every heartbeat reply from then
   on says ``failed`` with the reason, so all processes stop with an error that
   names the dead one.
4. **End.** When every worker has sent :class:`Finished`, heartbeats answer
   ``shutdown``; servers send their own reports and exit; the coordinator writes
   ``summary.json`` and exits.

It imports no torch: it starts in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import msgspec
import zmq

from tessera.config.schema import JobConfig, OptimizerConfig
from tessera.profiler.recorder import OFF, SpanRecorder
from tessera.ps.sharding import ShardMap, partition_elems_for, plan_shards
from tessera.transport import wire
from tessera.transport.endpoint import ServerEndpoint


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class Coordinator:
    def __init__(self, cfg: JobConfig, run_dir: Path, secret: str, *, ctx: zmq.Context):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        cl = cfg.cluster
        self.expected = {("server", r) for r in range(cl.servers)} | \
                        {("worker", r) for r in range(cl.workers)}
        self.endpoint = ServerEndpoint(ctx, cl.host, secret)
        self.procs: dict[tuple[str, int], wire.ProcessInfo] = {}
        self.held: list[tuple[bytes, int]] = []
        self.layout: Optional[list[wire.ParamSpec]] = None
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
        self.profiler: SpanRecorder = (SpanRecorder("coordinator", 0) if cfg.profile.enabled
                                       else OFF)

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
            if self.state == "starting" and now - self.started > cl.startup_timeout_s:
                missing = sorted(self.expected - set(self.procs))
                self._fail(f"the cluster did not come up within {cl.startup_timeout_s:.0f} s: "
                           f"still waiting for {', '.join(f'{r} {k}' for r, k in missing)} "
                           f"to register (see its log in {self.run_dir / 'logs'})")
            if self.state in ("starting", "running", "shutdown"):
                for key, seen in self.last_seen.items():
                    if key in self.finished:
                        continue
                    if now - seen > cl.heartbeat_timeout_s:
                        info = self.procs.get(key)
                        where = f" (pid {info.pid} on {info.host})" if info else ""
                        self._fail(f"{key[0]} {key[1]}{where} sent no heartbeat for "
                                   f"{now - seen:.1f} s: it died or hangs")
                        break
            if self.state == "shutdown" and all(k in self.finished for k in self.expected):
                self._write_summary()
                return 0
            # After a failure keep answering heartbeats long enough that every
            # process hears about it, then exit non-zero.
            if self.state == "failed" and now - self.failed_at > 2 * cl.heartbeat_interval_s + 1:
                return 3

    def _fail(self, reason: str) -> None:
        if self.state != "failed":
            self.state, self.reason, self.failed_at = "failed", reason, time.monotonic()
            print(f"coordinator: job failed: {reason}", flush=True)

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
            if key in self.procs:
                self.last_seen[key] = time.monotonic()
            self.endpoint.send(got.peer, wire.HeartbeatAck(req=msg.req, state=(
                "running" if self.state == "starting" else self.state), reason=self.reason))
        elif isinstance(msg, wire.Register):
            self._on_register(got.peer, msg)
        elif isinstance(msg, wire.Finished):
            self.finished[(msg.role, msg.rank)] = dict(msg.stats)
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
        if key not in self.expected:
            roles = f"servers 0..{self.cfg.cluster.servers - 1}, workers 0..{self.cfg.cluster.workers - 1}"
            self.endpoint.send(peer, wire.Error(req=msg.req, message=(
                f"coordinator: {msg.role} {msg.rank} is not part of this job ({roles})")))
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
            self.layout, self.optimizer, self.tables = msg.layout, msg.optimizer, msg.tables
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
        me = wire.ProcessInfo(role="coordinator", rank=0, host=cfg.cluster.host, pid=os.getpid(),
                              address=self.address)
        write_json_atomic(self.run_dir / "cluster.json", {
            "processes": [{"role": p.role, "rank": p.rank, "host": p.host, "pid": p.pid,
                           "address": p.address} for p in [me, *procs]],
            "partitions": [{"id": p.id, "start": p.start, "stop": p.stop, "server": p.server}
                           for p in self.shard_map.partitions],
        })
        for peer, req in self.held:
            self.endpoint.send(peer, wire.ClusterView(
                req=req, processes=procs, partitions=list(self.shard_map.partitions),
                layout=self.layout, optimizer=self.optimizer, tables=self.tables))
        self.held.clear()
        self.state = "running"
        self.profiler.instant("cluster up", "membership",
                              partitions=len(self.shard_map.partitions))
        loads = self.shard_map.server_bytes()
        print(f"coordinator: cluster up: {len(procs)} processes, {len(self.shard_map.partitions)} "
              f"partitions, bytes per server {loads}", flush=True)

    # ---------------------------------------------------------------- summary

    def _write_summary(self) -> None:
        cfg = self.cfg
        workers = [self.finished[("worker", r)] for r in range(cfg.cluster.workers)]
        servers = [self.finished[("server", r)] for r in range(cfg.cluster.servers)]
        # The worker that evaluated (worker 0, or replica 0's last pipeline stage).
        lead = next((w for w in workers if "eval_loss" in w), workers[0])
        summary = {k: v for k, v in lead.items() if k.startswith("eval_") or k in (
            "wall_s", "eval_s", "samples_per_s", "steps", "final_loss", "skipped_steps", "loss_scale",
            "first_overflow", "reference_auc")}
        tables = sorted({k.split(".", 1)[1] for s in servers for k in s if k.startswith("rows.")})
        if tables:
            summary["rows_per_server"] = {t: [int(s.get(f"rows.{t}", 0)) for s in servers]
                                          for t in tables}
            summary["table_bytes_per_server"] = {
                t: [int(s.get(f"table_bytes.{t}", 0)) for s in servers] for t in tables}
            summary["rows_pulled"] = sum(int(s.get("rows_pulled", 0)) for s in servers)
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
            "config": msgspec.to_builtins(cfg),
        })
        write_json_atomic(self.run_dir / "summary.json", summary)
        if self.cfg.profile.enabled:
            self._write_profile()

    def _write_profile(self) -> None:
        from tessera.profiler.report import write_report
        from tessera.profiler.trace import load_profiles, write_trace
        self.profiler.dump(self.run_dir / "profile" / "coordinator-0.json")
        docs = load_profiles(self.run_dir)
        write_trace(self.run_dir, docs)
        report = write_report(self.run_dir, docs)
        print(f"coordinator: profile written; bottleneck: {report['bottleneck']}", flush=True)
