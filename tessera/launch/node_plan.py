"""What ``tessera node`` decides before it starts anything: the plan and the addresses.

:func:`node_settings` turns flags and the variables Slurm, Kubernetes and
torchrun set (read through :mod:`tessera.config.env`) into one
:class:`NodeSettings`, or one line naming the flag that is wrong
(:class:`NodeSettingError`, exit code 2). The plan splits ranks in contiguous
blocks: node ``k`` of ``N`` gets servers ``[k*S//N, (k+1)*S//N)`` and workers
``[k*W//N, (k+1)*W//N)`` (:func:`share`), so with fewer servers (or workers) than
nodes the first nodes get none and the last always gets at least one.

The address helpers answer the questions a node asks before it binds: which of
its addresses reaches the coordinator (:func:`route_address`, no packet sent),
whether that is loopback, whether the coordinator's name resolves yet (pod
names appear in DNS a little late) and whether its port answers.

No torch here: ``tessera node`` starts in a fraction of a second.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from tessera.config import env as envvars
from tessera.config.schema import JobConfig
from tessera.launch.process import LaunchError


class NodeSettingError(ValueError):
    """Conflicting or incomplete node settings; one line naming the flag (exit code 2)."""


# ------------------------------------------------------------------ the plan


def share(count: int, nodes: int, rank: int) -> range:
    """Ranks node ``rank`` of ``nodes`` runs, out of ``count``: a contiguous block."""
    return range(rank * count // nodes, (rank + 1) * count // nodes)


def describe_ranks(r: range) -> str:
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
    return envvars.first_int(flag, names, env)


@dataclass(frozen=True)
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
    warnings: tuple[str, ...] = ()

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
    secret = envvars.node_secret(env)
    if not secret:
        raise NodeSettingError(f"no job secret: set {envvars.SECRET} or pass --secret-file PATH, "
                               f"the same on every node (never on the command line)")
    return secret


def node_settings(cfg: JobConfig, *, coordinator: Optional[str], nodes: Optional[int],
                  node_rank: Optional[int], host: Optional[str], secret_file: Optional[str],
                  env: Mapping[str, str]) -> NodeSettings:
    """Check flags and launcher variables; raises :class:`NodeSettingError` (one line)."""
    try:
        return _node_settings(cfg, coordinator=coordinator, nodes=nodes, node_rank=node_rank,
                              host=host, secret_file=secret_file, env=env)
    except envvars.EnvError as exc:
        raise NodeSettingError(str(exc)) from None


def _node_settings(cfg: JobConfig, *, coordinator: Optional[str], nodes: Optional[int],
                   node_rank: Optional[int], host: Optional[str], secret_file: Optional[str],
                   env: Mapping[str, str]) -> NodeSettings:
    if cfg.cluster.backend != "local":
        raise NodeSettingError(
            f"--backend {cfg.cluster.backend} (cluster.backend): tessera node starts this "
            f"node's processes itself; use --backend local here (or `tessera run --backend "
            f"ray` to let Ray place every process)")
    if coordinator is None:
        coordinator = envvars.node_coordinator(env)
    if coordinator is None:
        raise NodeSettingError("--coordinator HOST:PORT is required (node 0 runs the "
                               "coordinator there); or set TESSERA_COORDINATOR, or MASTER_ADDR "
                               "and MASTER_PORT")
    c_host, c_port = parse_host_port(coordinator)
    n, n_from = _int_setting("--nodes", nodes, envvars.NODES, env)
    k, k_from = _int_setting("--node-rank", node_rank, envvars.NODE_RANK, env)
    if n is None:
        raise NodeSettingError(f"--nodes N is required (or set {', '.join(envvars.NODES)})")
    if n < 1:
        raise NodeSettingError(f"{n_from}: the job needs at least 1 node")
    if k is None:
        raise NodeSettingError(f"--node-rank K is required (or set {', '.join(envvars.NODE_RANK)})")
    if not 0 <= k < n:
        raise NodeSettingError(f"{k_from} must be < {n_from} and >= 0: node ranks run "
                               f"0..{n - 1}")
    ck = cfg.checkpoint
    if n > 1 and ck.dir is None and ck.every:
        raise NodeSettingError(
            f"--checkpoint-every {ck.every} on {n} nodes needs --checkpoint-dir PATH_OR_URL "
            f"(checkpoint.dir): every node's servers write their part of each checkpoint, so "
            f"it must be one location all nodes share (a shared filesystem path or an fsspec "
            f"URL such as s3://bucket/checkpoints), not each node's run directory")
    if host is not None:
        if not host.strip() or host.strip() in ("*", "0.0.0.0", "::"):
            raise NodeSettingError(f"--host {host!r}: give this node's own address (other "
                                   f"nodes connect to what its servers bind to)")
    secret = read_secret(secret_file, env)
    cl = cfg.cluster
    s, w = share(cl.servers, n, k), share(cl.workers, n, k)
    warnings = []
    if not s and not w:
        what = "it runs only the coordinator" if k == 0 else "it has nothing to run"
        warnings.append(
            f"node {k} of {n} gets no servers and no workers ({cl.servers} servers and "
            f"{cl.workers} workers are split in contiguous blocks over {n} nodes); {what}")
    if host is None and cl.host != "127.0.0.1":
        warnings.append(f"cluster.host {cl.host!r} in the job file is ignored by "
                        f"tessera node: each node binds to --host (default: its "
                        f"address toward the coordinator)")
    if cfg.profile.enabled and n > 1:
        warnings.append("--profile: each node keeps its processes' profile/*.json in "
                        "its own run directory; node 0 merges only what it finds in "
                        "its own (share the directory, or copy them and run "
                        "`tessera report`)")
    return NodeSettings(nodes=n, rank=k, coordinator_host=c_host, coordinator_port=c_port,
                        secret=secret, servers=s, workers=w, host=host, warnings=tuple(warnings))


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
