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

Settings that flags leave out are read from the variables launchers set:
coordinator ``TESSERA_COORDINATOR`` or ``MASTER_ADDR`` + ``MASTER_PORT``; nodes
``NNODES``, ``SLURM_NNODES``, ``WORLD_SIZE`` (counting nodes: one ``tessera node`` per
node); node rank ``NODE_RANK``, ``SLURM_NODEID``, ``JOB_COMPLETION_INDEX`` (an
Indexed Job), ``GROUP_RANK``. The first one set wins, in that order.

This module imports no torch (the launcher must start in a fraction of a second).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from tessera.cluster.launcher import (Launcher, LaunchError, describe_exit, signals_interrupt,
                                      tail)
from tessera.config import config_to_dict
from tessera.config.schema import JobConfig

COORDINATOR_ENV = ("TESSERA_COORDINATOR",)  # then MASTER_ADDR + MASTER_PORT
NODES_ENV = ("NNODES", "SLURM_NNODES", "WORLD_SIZE")
NODE_RANK_ENV = ("NODE_RANK", "SLURM_NODEID", "JOB_COMPLETION_INDEX", "GROUP_RANK")
SECRET_ENV = "TESSERA_SECRET"


class NodeSettingError(ValueError):
    """Conflicting or incomplete node settings; one line naming the flag (exit code 2)."""


# ------------------------------------------------------------------ the plan


def share(count: int, nodes: int, rank: int) -> range:
    """Ranks node ``rank`` of ``nodes`` runs, out of ``count``: a contiguous block."""
    return range(rank * count // nodes, (rank + 1) * count // nodes)


def _ranks(r: range) -> str:
    if not r:
        return "none"
    return f"{r.start}" if len(r) == 1 else f"{r.start}..{r.stop - 1}"


def parse_host_port(text: str, flag: str = "--coordinator") -> tuple[str, int]:
    """``HOST:PORT`` (``tcp://`` and ``[v6]`` brackets allowed) -> (host, port)."""
    raw = text.strip()
    raw = raw.removeprefix("tcp://")
    host, sep, port = raw.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NodeSettingError(f"{flag} {text!r}: expected HOST:PORT, e.g. node0.cluster:29500 "
                               f"(a port in 1..65535)")
    return host, int(port)


def _int_setting(flag: str, value: Optional[int], names: tuple[str, ...],
                 env: Mapping[str, str]) -> tuple[Optional[int], str]:
    """A flag's value, else the first environment variable set; with how to name it."""
    if value is not None:
        return value, f"{flag} {value}"
    for name in names:
        text = env.get(name, "").strip()
        if text:
            try:
                return int(text), f"{flag} ({name}={text})"
            except ValueError:
                raise NodeSettingError(f"{flag}: {name}={text!r} in the environment is not an "
                                       f"integer") from None
    return None, flag


@dataclass
class NodeSettings:
    """Everything ``tessera node`` decided before it starts anything."""

    nodes: int
    rank: int
    coordinator_host: str
    coordinator_port: int
    secret: str
    servers: range
    workers: range
    host: Optional[str] = None  # --host; None: the route toward the coordinator
    warnings: list[str] = field(default_factory=list)

    @property
    def coordinator(self) -> str:
        return f"{self.coordinator_host}:{self.coordinator_port}"


def read_secret(secret_file: Optional[str], env: Mapping[str, str]) -> str:
    if secret_file:
        try:
            secret = Path(secret_file).read_text().strip()
        except OSError as exc:
            raise NodeSettingError(f"--secret-file {secret_file!r} cannot be read: "
                                   f"{exc.strerror}") from None
        if not secret:
            raise NodeSettingError(f"--secret-file {secret_file!r} is empty; put the job's "
                                   f"secret in it (e.g. openssl rand -hex 32 > {secret_file})")
        return secret
    secret = env.get(SECRET_ENV, "").strip()
    if not secret:
        raise NodeSettingError(f"no job secret: set {SECRET_ENV} or pass --secret-file PATH, "
                               f"the same on every node (never on the command line)")
    return secret


def node_settings(cfg: JobConfig, *, coordinator: Optional[str], nodes: Optional[int],
                  node_rank: Optional[int], host: Optional[str], secret_file: Optional[str],
                  env: Mapping[str, str] = os.environ) -> NodeSettings:
    """Check flags and launcher variables; raises :class:`NodeSettingError` (one line)."""
    if cfg.cluster.backend != "local":
        raise NodeSettingError(
            f"--backend {cfg.cluster.backend} (cluster.backend): tessera node starts this "
            f"node's processes itself; use --backend local here (or `tessera run --backend "
            f"ray` to let Ray place every process)")
    if coordinator is None:
        coordinator = next((env[n] for n in COORDINATOR_ENV if env.get(n, "").strip()), None)
    if coordinator is None:
        addr, port = env.get("MASTER_ADDR", "").strip(), env.get("MASTER_PORT", "").strip()
        if addr and port:
            coordinator = f"{addr}:{port}"
        elif addr or port:
            missing = "MASTER_PORT" if addr else "MASTER_ADDR"
            raise NodeSettingError(f"--coordinator: MASTER_ADDR and MASTER_PORT go together; "
                                   f"{missing} is not set (or pass --coordinator HOST:PORT)")
    if coordinator is None:
        raise NodeSettingError("--coordinator HOST:PORT is required (node 0 runs the "
                               "coordinator there); or set TESSERA_COORDINATOR, or MASTER_ADDR "
                               "and MASTER_PORT")
    c_host, c_port = parse_host_port(coordinator)
    n, n_from = _int_setting("--nodes", nodes, NODES_ENV, env)
    k, k_from = _int_setting("--node-rank", node_rank, NODE_RANK_ENV, env)
    if n is None:
        raise NodeSettingError(f"--nodes N is required (or set {', '.join(NODES_ENV)})")
    if n < 1:
        raise NodeSettingError(f"{n_from}: the job needs at least 1 node")
    if k is None:
        raise NodeSettingError(f"--node-rank K is required (or set {', '.join(NODE_RANK_ENV)})")
    if not 0 <= k < n:
        raise NodeSettingError(f"{k_from} must be < {n_from} and >= 0: node ranks run "
                               f"0..{n - 1}")
    if host is not None:
        if not host.strip() or host.strip() in ("*", "0.0.0.0", "::"):
            raise NodeSettingError(f"--host {host!r}: give this node's own address (other "
                                   f"nodes connect to what its servers bind to)")
    secret = read_secret(secret_file, env)
    cl = cfg.cluster
    s, w = share(cl.servers, n, k), share(cl.workers, n, k)
    settings = NodeSettings(nodes=n, rank=k, coordinator_host=c_host, coordinator_port=c_port,
                            secret=secret, servers=s, workers=w, host=host)
    if not s and not w:
        what = "it runs only the coordinator" if k == 0 else "it has nothing to run"
        settings.warnings.append(
            f"node {k} of {n} gets no servers and no workers ({cl.servers} servers and "
            f"{cl.workers} workers are split in contiguous blocks over {n} nodes); {what}")
    if host is None and cl.host != "127.0.0.1":
        settings.warnings.append(f"cluster.host {cl.host!r} in the job file is ignored by "
                                 f"tessera node: each node binds to --host (default: its "
                                 f"address toward the coordinator)")
    if cfg.profile.enabled and n > 1:
        settings.warnings.append("--profile: each node keeps its processes' profile/*.json in "
                                 "its own run directory; node 0 merges only what it finds in "
                                 "its own (share the directory, or copy them and run "
                                 "`tessera report`)")
    return settings


# ------------------------------------------------------------------ addresses


def resolve(host: str) -> str:
    """An IPv4 address for ``host`` (a name or a literal); raises OSError."""
    infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    return infos[0][4][0]


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def route_address(ip: str, port: int) -> str:
    """The local address the kernel would use to reach ``ip`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((ip, port))
        return s.getsockname()[0]


def wait_resolve(host: str, deadline: float) -> str:
    """Names of pods and nodes may appear in DNS a little after the node starts."""
    while True:
        try:
            return resolve(host)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise LaunchError(f"--coordinator host {host!r} does not resolve: {exc}") from None
            time.sleep(1.0)


def wait_reachable(ip: str, port: int, deadline: float, what: str) -> None:
    while True:
        try:
            socket.create_connection((ip, port), timeout=2.0).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise LaunchError(f"the coordinator at {what} did not answer ({exc.strerror or exc}); "
                                  f"is node 0 running, and is the port open between the "
                                  f"nodes?") from None
            time.sleep(0.2)


def check_bindable(ip: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as exc:
            raise NodeSettingError(
                f"--coordinator {what}: node 0 runs the coordinator there but cannot bind "
                f"{ip}:{port} ({exc.strerror}); start node 0 on the machine that address "
                f"names, or pick a free port") from None


# ------------------------------------------------------------------ GPUs


def visible_gpus(env: Optional[Mapping[str, str]] = None) -> list[str]:
    """This node's GPUs, without importing torch: the ``CUDA_VISIBLE_DEVICES`` list when
    set (empty: none), else one entry per ``GPU`` line of ``nvidia-smi -L``."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        listed = [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        if any(d.startswith("-") for d in listed):  # "-1": CUDA's way to say none
            return []
        return listed
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [str(i) for i, _ in enumerate(
        line for line in out.stdout.splitlines() if line.startswith("GPU "))]


def gpu_env(local_index: int, gpus: list[str]) -> dict[str, str]:
    """Environment giving this node's ``local_index``-th worker one GPU (round robin)."""
    if not gpus:
        return {}
    return {"CUDA_VISIBLE_DEVICES": gpus[local_index % len(gpus)]}


# ------------------------------------------------------------------ the launcher


class NodeLauncher(Launcher):
    """A :class:`Launcher` that starts one node's share and, on node 0, the coordinator
    at the agreed address. Watching, stopping and reporting are the Launcher's."""

    def __init__(self, cfg: JobConfig, settings: NodeSettings, *,
                 worker_cmd: Optional[list[str]] = None, quiet: bool = False):
        if cfg.out is None:
            cfg.out = f"runs/{cfg.name}-node{settings.rank}"
        cfg.out = cfg.out.replace("{node}", str(settings.rank))
        super().__init__(cfg, worker_cmd=worker_cmd, quiet=quiet)
        self.settings = settings
        self.worker_gpu: dict[int, dict[str, str]] = {}  # rank -> CUDA_VISIBLE_DEVICES
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
        cfg.cluster.host = host
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        for stale in ("coordinator.json", "cluster.json", "summary.json", "metrics.jsonl"):
            (self.run_dir / stale).unlink(missing_ok=True)
        (self.run_dir / "node.json").write_text(json.dumps({
            "node_rank": st.rank, "nodes": st.nodes, "coordinator": st.coordinator,
            "coordinator_ip": ip, "host": host, "servers": list(st.servers),
            "workers": list(st.workers)}, indent=2))
        self._say(f"tessera node {st.rank} of {st.nodes}: servers {_ranks(st.servers)}, "
                  f"workers {_ranks(st.workers)}"
                  f"{', the coordinator' if st.rank == 0 else ''}; binding to {host}; "
                  f"run directory {self.run_dir}")
        env = dict(os.environ, TESSERA_RUN_DIR=str(self.run_dir), TESSERA_SECRET=self.secret,
                   PYTHONUNBUFFERED="1")
        env.pop("TESSERA_COORDINATOR_BIND", None)
        if st.rank == 0:
            coord = self._spawn("coordinator", 0, [sys.executable, "-m", "tessera.cluster.role",
                                                   "coordinator"],
                                dict(env, TESSERA_COORDINATOR_BIND=f"{ip}:{st.coordinator_port}"))
            addr_file = self.run_dir / "coordinator.json"
            while not addr_file.exists():
                if coord.proc.poll() is not None:
                    raise LaunchError(f"the coordinator {describe_exit(coord.proc.returncode)} "
                                      f"before it was up:\n{tail(coord.log_path)}")
                if time.monotonic() > deadline:
                    raise LaunchError("the coordinator did not publish its address within "
                                      f"{cfg.cluster.startup_timeout_s:.0f} s")
                time.sleep(0.02)
        elif st.servers or st.workers:
            self._say(f"tessera node {st.rank}: waiting for the coordinator at {st.coordinator}")
            wait_reachable(ip, st.coordinator_port, deadline, st.coordinator)
        env["TESSERA_COORDINATOR"] = f"tcp://{ip}:{st.coordinator_port}"
        self._env = env  # the Launcher's restarts and coordinator requests use it
        for rank in st.servers:
            self._spawn("server", rank, [sys.executable, "-m", "tessera.cluster.role", "server"],
                        env)
        gpus = visible_gpus() if cfg.train.device == "cuda" else []
        if cfg.train.device == "cuda" and not gpus and st.workers:
            print(f"tessera: warning: train.device is 'cuda' but node {st.rank} shows no GPU "
                  f"(CUDA_VISIBLE_DEVICES, nvidia-smi -L)", file=sys.stderr, flush=True)
        self.worker_gpu = {rank: gpu_env(local, gpus) for local, rank in enumerate(st.workers)}
        for rank in st.workers:
            self._spawn("worker", rank, self.worker_cmd, env)

    def _spawn(self, role: str, rank: int, cmd: list[str], env: dict, *args, **kwargs):
        # Every start of a worker, restarts included, gets that worker's GPU.
        if role == "worker":
            env = dict(env, **self.worker_gpu.get(rank, {}))
        return super()._spawn(role, rank, cmd, env, *args, **kwargs)

    def run(self) -> int:
        """Node 0 ends as ``tessera run`` does (progress, summary.json, the table); other
        nodes report their own processes. 0: clean; 1: a process failed; 2: settings."""
        from tessera.cluster.console import print_failure
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
