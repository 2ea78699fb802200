"""``tessera node``: one machine's share of a job that spans many (torchrun-style).

The same command runs on every node (a Slurm task, a Kubernetes pod)::

    tessera node JOB.toml --coordinator HOST:PORT --nodes N --node-rank K [--host ADDR]

* Node 0 runs the coordinator, bound to ``HOST:PORT`` (so every node knows where
  it is before it starts); the others wait until that port answers.
* Every node starts its share of servers and workers, in contiguous rank blocks:
  node ``k`` of ``N`` gets servers ``[k*S//N, (k+1)*S//N)`` and workers
  ``[k*W//N, (k+1)*W//N)`` (:func:`share`). With fewer servers (or workers) than
  nodes the first nodes get none; the last node always gets at least one of each.
* Servers bind to ``--host``: by default the address this node uses to reach the
  coordinator (:func:`route_address`; loopback only when the coordinator is).
* Every node must hold the job's secret: ``TESSERA_SECRET`` in the environment or
  ``--secret-file PATH``; it is never put on a command line.
* Each node has its own run directory (``--out``, default ``runs/<name>-node<K>``;
  ``{node}`` in ``--out`` is replaced by K) with its ``config.json``, ``node.json``
  and ``logs/``. Node 0's coordinator writes ``cluster.json`` and ``summary.json``;
  worker 0 (on the first node that has workers) writes ``metrics.jsonl``.
* allreduce/hybrid with ``--max-restarts``: a worker's death re-forms the group on every
  node. The coordinator says ``regroup`` to the node launchers (they ask it every
  :attr:`NodeLauncher.REGROUP_POLL_S`); node 0 starts generation g+1 from the newest
  checkpoint in the shared ``--checkpoint-dir`` with a new coordinator at the same
  address, the other nodes start their share once it answers with generation g+1.

Settings that flags leave out are read from the variables launchers set:
coordinator ``TESSERA_COORDINATOR`` or ``MASTER_ADDR`` + ``MASTER_PORT``; nodes
``NNODES``, ``SLURM_NNODES``, ``WORLD_SIZE`` (counting nodes: one ``tessera node`` per
node); node rank ``NODE_RANK``, ``SLURM_NODEID``, ``JOB_COMPLETION_INDEX`` (an
Indexed Job), ``GROUP_RANK``. The first one set wins, in that order.

This module imports no torch (the launcher must start in a fraction of a second).
"""


from __future__ import annotations

import json
import sys
import time
from typing import Optional

from tessera.config import env as envvars
from tessera.config.env import Identity, gpu_env
from tessera.config.schema import JobConfig
from tessera.launch.launcher import Launcher
from tessera.launch.node_plan import (NodeSettingError, NodeSettings, check_bindable,
                                      describe_ranks, is_loopback, route_address,
                                      wait_reachable, wait_resolve)
from tessera.launch.process import (LaunchError, describe_exit, role_cmd, signals_interrupt,
                                    visible_gpus)


class NodeLauncher(Launcher):
    """A :class:`Launcher` that starts one node's share and, on node 0, the coordinator
    at the agreed address. Watching, stopping and reporting are the Launcher's."""

    #: allreduce/hybrid re-forms span every node: the coordinator (node 0) tells every
    #: node launcher (``regroup``), each stops its processes and starts the next generation.
    GROUP_RESTARTS = True
    #: How often a node launcher asks the coordinator whether a re-form has begun (group
    #: modes with --max-restarts).
    REGROUP_POLL_S = 0.2

    def __init__(self, cfg: JobConfig, settings: NodeSettings, *,
                 worker_cmd: Optional[list[str]] = None, quiet: bool = False):
        if cfg.out is None:
            cfg.out = f"runs/{cfg.name}-node{settings.rank}"
        cfg.out = cfg.out.replace("{node}", str(settings.rank))
        super().__init__(cfg, worker_cmd=worker_cmd, quiet=quiet)
        self.settings = settings
        self.worker_gpu: dict[int, dict[str, str]] = {}  # rank -> CUDA_VISIBLE_DEVICES
        self._coordinator_ip = ""
        self._next_poll = 0.0
        # The job's secret is shared by every node (the Launcher drew a fresh one).
        self.secret = ("curve:" if cfg.cluster.encrypt else "") + settings.secret

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def start(self) -> None:
        cfg, st = self.cfg, self.settings
        deadline = time.monotonic() + cfg.cluster.startup_timeout_s
        ip = wait_resolve(st.coordinator_host, deadline)
        try:
            host = st.host or route_address(ip, st.coordinator_port)
        except OSError as exc:
            raise NodeSettingError(f"--coordinator {st.coordinator}: this node has no route "
                                   f"to {ip} ({exc.strerror or exc})") from None
        if st.nodes > 1 and is_loopback(host) and not is_loopback(ip):
            raise NodeSettingError(
                f"--host {host} is a loopback address but the coordinator ({st.coordinator}) "
                f"is not: other nodes could not reach this node's processes; give this node's "
                f"own address")
        if st.rank == 0:
            if st.nodes > 1 and is_loopback(ip) and not is_loopback(st.coordinator_host) \
                    and st.coordinator_host != "localhost":
                print(f"tessera: warning: --coordinator {st.coordinator} resolves to {ip} "
                      f"(loopback) on node 0: nodes on other machines cannot reach that; pass "
                      f"node 0's network address instead", file=sys.stderr, flush=True)
            check_bindable(ip, st.coordinator_port, st.coordinator)
            if self._why_no_checkpoint() and cfg.cluster.servers:
                print(f"tessera: warning: no --checkpoint-dir: a job on {st.nodes} nodes "
                      f"checkpoints only into one location all nodes share, so an interrupt "
                      f"(SIGTERM) will end it without a checkpoint", file=sys.stderr, flush=True)
        cfg.cluster.host = host
        self._prepare_run_dir()
        (self.run_dir / "node.json").write_text(json.dumps({
            "node_rank": st.rank, "nodes": st.nodes, "coordinator": st.coordinator,
            "coordinator_ip": ip, "host": host, "servers": list(st.servers),
            "workers": list(st.workers)}, indent=2))
        self._say(f"tessera node {st.rank} of {st.nodes}: servers {describe_ranks(st.servers)}, "
                  f"workers {describe_ranks(st.workers)}"
                  f"{', the coordinator' if st.rank == 0 else ''}; binding to {host}; "
                  f"run directory {self.run_dir}")
        self._coordinator_ip = ip
        gpus = visible_gpus() if cfg.train.device == "cuda" else []
        if cfg.train.device == "cuda" and not gpus and st.workers:
            print(f"tessera: warning: train.device is 'cuda' but node {st.rank} shows no GPU "
                  f"(CUDA_VISIBLE_DEVICES, nvidia-smi -L)", file=sys.stderr, flush=True)
        self.worker_gpu = {rank: gpu_env(local, gpus) for local, rank in enumerate(st.workers)}
        if st.rank != 0 and (st.servers or st.workers):
            self._say(f"tessera node {st.rank}: waiting for the coordinator at {st.coordinator}")
        self._start_processes(deadline=deadline)

    def _start_processes(self, append: bool = False, deadline: Optional[float] = None) -> None:
        """This node's share (and on node 0 the coordinator, at the agreed address), as
        generation ``self.generation`` (``append``: to the logs, in a re-form)."""
        cfg, st, ip = self.cfg, self.settings, self._coordinator_ip
        if deadline is None:
            deadline = time.monotonic() + cfg.cluster.startup_timeout_s
        self.identity = Identity(run_dir=str(self.run_dir), secret=self.secret,
                                 generation=self.generation)
        env = self.identity.child_env(envvars.without(envvars.process_environ(),
                                                      envvars.COORDINATOR_BIND))
        if st.rank == 0:
            bind = self.identity.but(coordinator_bind=f"{ip}:{st.coordinator_port}")
            coord = self._spawn("coordinator", 0, role_cmd(sys.executable, "coordinator"),
                                bind.child_env(env), append=append)
            self._wait_published(coord, deadline, cfg.cluster.startup_timeout_s)
        elif st.servers or st.workers:
            wait_reachable(ip, st.coordinator_port, deadline, st.coordinator)
        self.identity = self.identity.but(coordinator=f"tcp://{ip}:{st.coordinator_port}")
        # The Launcher's restarts and coordinator requests use these.
        env = self._env = self.identity.child_env(env)
        for rank in st.servers:
            self._spawn("server", rank, role_cmd(sys.executable, "server"), env, append=append)
        for rank in st.workers:
            self._spawn("worker", rank, self.worker_cmd, env, append=append)

    # ------------------------------------- allreduce/hybrid: re-form across nodes

    def _regroups_on(self, c) -> bool:
        # Exit code 3 here may be the coordinator's "re-forming": ask it (_restart_group).
        return c.role == "worker" or (c.proc.returncode == 3 and self._regroup_allowed())

    def _group_up(self) -> bool:
        # Only node 0 has cluster.json; elsewhere the next standbys start at once.
        return self.settings.rank != 0 or super()._group_up()

    def _regroup_allowed(self) -> bool:
        return self._group_mode() and self.group_restarts_left > 0

    def _restart_group(self, c) -> bool:
        """A process of this node died: a worker killed tells the coordinator, which
        begins the re-form (or fails the job); then this node follows it."""
        if not self._regroup_allowed():
            return False
        if c.proc.returncode != 3 and c.role == "worker":
            self._departed(c)
        print(f"tessera node {self.settings.rank}: {c.name} (pid {c.proc.pid}) "
              f"{describe_exit(c.proc.returncode)}; asking the coordinator whether the worker "
              f"group is re-formed", flush=True)
        return self._follow_regroup(time.monotonic() + self.cfg.cluster.startup_timeout_s)

    def _regroup_elsewhere(self) -> bool:
        if not self._regroup_allowed() or self.identity is None \
                or not self.identity.coordinator or time.monotonic() < self._next_poll:
            return False
        self._next_poll = time.monotonic() + self.REGROUP_POLL_S
        ack = self._ask_state(1.0)
        if ack is None or not (ack.state == "regroup" or ack.generation > self.generation):
            return False
        return self._follow_regroup(time.monotonic() + self.cfg.cluster.startup_timeout_s, ack)

    def _ask_state(self, timeout_s: float):
        """The coordinator's HeartbeatAck to this launcher, or None (no answer)."""
        from tessera.transport import wire
        reply = self._tell(lambda req: wire.Heartbeat(req=req, role="launcher",
                                                      rank=self.settings.rank, clock=-1),
                           timeout_s, "re-form check")
        if isinstance(reply, wire.HeartbeatAck):
            return reply
        self._drop_coordinator()  # a new coordinator may come up at the same address
        return None

    def _drop_coordinator(self) -> None:
        if self._coord_ep is not None:
            self._coord_ep.close()
            self._ctx.destroy(linger=0)
            self._coord_ep = None

    def _follow_regroup(self, deadline: float, ack=None) -> bool:
        """Take part in a re-form: node 0 once the coordinator says ``regroup`` stops its
        processes (the coordinator too) and starts generation + 1 with a new coordinator
        at the same address; another node stops its processes and starts them again once
        a coordinator of a higher generation answers. False: the job failed instead
        (the coordinator says so, or nothing came within ``deadline``, or the coordinator
        went silent without having said ``regroup``: node 0 failed)."""
        st, cl = self.settings, self.cfg.cluster
        stopped = False
        silent_since: Optional[float] = None
        while time.monotonic() < deadline:
            if ack is None:
                ack = self._ask_state(1.0)
            if ack is not None:
                silent_since = None
            elif silent_since is None:
                silent_since = time.monotonic()
            elif not stopped and time.monotonic() - silent_since > 2 * cl.heartbeat_timeout_s + 5:
                return False
            if ack is not None and st.rank != 0 and ack.generation > self.generation:
                if not stopped:
                    self._stop_group()
                self.group_restarts_left -= ack.generation - self.generation
                self.generation = ack.generation
                print(f"tessera node {st.rank}: starting generation {self.generation} of the "
                      f"worker group", flush=True)
                self._start_processes(append=True)
                self._end_unused_standbys()
                return True
            if ack is not None and ack.state == "regroup":
                if st.rank == 0:
                    self.group_restarts_left -= 1
                    self.generation += 1
                    print(f"tessera: {ack.reason}: re-forming the worker group on every node "
                          f"(restart {self.generation} of {self.cfg.cluster.max_restarts})",
                          flush=True)
                    self._stop_group()
                    self._resume_from_newest()
                    self._start_processes(append=True)
                    self._end_unused_standbys()
                    return True
                if not stopped:
                    print(f"tessera node {st.rank}: the coordinator re-forms the worker group; "
                          f"stopping this node's processes until generation "
                          f"{self.generation + 1} starts", flush=True)
                    self._stop_group()
                    stopped = True
            elif ack is not None and ack.state in ("failed", "shutdown") \
                    and ack.generation == self.generation:
                return False
            ack = None
            time.sleep(0.05)
        return False

    def _why_no_checkpoint(self) -> Optional[str]:
        st = self.settings
        if st is not None and st.nodes > 1 and self.cfg.checkpoint.dir is None:
            return (f"a job on {st.nodes} nodes checkpoints only into --checkpoint-dir (one "
                    f"location all nodes share); without it each node's servers would write "
                    f"their part into their own run directory")
        return None

    def _local_place(self, rank: int):
        workers = list(self.settings.workers) if self.settings is not None else []
        return (workers.index(rank), len(workers)) if rank in workers else None

    def _spawn(self, role: str, rank: int, cmd: list[str], env: dict, *args, **kwargs):
        # Every start of a worker, restarts included, gets that worker's GPU.
        if role == "worker":
            env = dict(env, **self.worker_gpu.get(rank, {}))
        return super()._spawn(role, rank, cmd, env, *args, **kwargs)

    def run(self) -> int:
        """Node 0 ends as ``tessera run`` does (progress, summary.json, the table); other
        nodes report their own processes. 0: clean; 1: a process failed; 2: settings."""
        from tessera.launch.console import print_failure
        try:
            if self.settings.rank == 0:
                return super().run()
            return self._run_follower(print_failure)
        except NodeSettingError as exc:  # raised before anything was started
            self.stop_all()
            print(f"tessera: {exc}", file=sys.stderr, flush=True)
            return 2

    def _run_follower(self, print_failure) -> int:
        with signals_interrupt():
            code, failure = self._start_and_follow(print_failure)
        if code is not None:
            return code
        self.stop_all()
        if failure:
            print_failure(failure, self.run_dir)
            return 1
        self._say(f"tessera node {self.settings.rank}: {len(self.children)} processes finished "
                  f"cleanly; the job's summary.json is on node 0")
        return 0

    def _start_and_follow(self, print_failure) -> tuple[Optional[int], Optional[str]]:
        """(exit code, None) when interrupted or the start failed; else (None, failure)."""
        try:
            self.start()
            failure = self.watch()
        except KeyboardInterrupt:
            self._let_node0_finish()
            self.stop_all()
            print_failure("interrupted: every process of this node was stopped", self.run_dir)
            return 130, None
        except LaunchError as exc:
            self.stop_all()
            print_failure(str(exc), self.run_dir)
            return 1, None
        return None, failure

    def _let_node0_finish(self) -> None:
        """Slurm and Kubernetes signal every node at once; node 0 then checkpoints the job,
        which needs this node's servers, and ends it. Give it that long (the processes end
        on their own when the coordinator goes); a second interrupt stops at once."""
        grace_s = min(self.cfg.cluster.timeout_s, 25.0)
        if not any(c.proc.poll() is None for c in self.children):
            return
        print(f"tessera node {self.settings.rank}: interrupted; leaving node 0 up to "
              f"{grace_s:.0f} s to end the job (interrupt again to stop now)",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + grace_s
        try:
            while time.monotonic() < deadline and any(c.proc.poll() is None
                                                      for c in self.children):
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass
