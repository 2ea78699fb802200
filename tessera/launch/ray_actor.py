"""One Ray actor per Tessera process: what runs inside it, and the driver's record of it.

:mod:`tessera.launch.ray_backend` (the driver) creates one :class:`ProcessActor`
per process of the job. The actor runs the role's unchanged entry point as a
subprocess with the environment the driver gave it, answers the driver's polls,
and starts the process again when asked (a worker with restarts left) or when
Ray restarts the actor itself (``max_restarts``): a restarted actor runs its
constructor again, and first tells the coordinator the old process departed so
the new one is taken as a rejoin. The subprocess dies with its actor
(``PR_SET_PDEATHSIG`` on Linux, plus the heartbeat thread's parent check).

When the job joins a Ray cluster with a loopback ``cluster.host``, the actor
gives its process its node's IP (``TESSERA_HOST``) and the coordinator a free
port there to bind (``TESSERA_COORDINATOR_BIND``).

The driver keeps a :class:`RayChild` per actor (pid, node, incarnation, exit
code, Ray's reason when the actor is gone for good).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import ray

from tessera.config import env as envvars
from tessera.launch.process import describe_exit, spawn, tail

#: Stands for "the actor's own Python" in a command (nodes may install Python elsewhere).
PYTHON = "{python}"


class ProcessActor:
    """One Tessera process: starts the role's entry point as a subprocess and watches it.

    Ray runs this class as an actor (see :data:`ProcessActorRemote`); a restarted
    actor (``max_restarts``) runs the constructor again, which starts the process
    again with the same command and environment.
    """

    def __init__(self, role: str, rank: int, cmd: list[str], env: dict[str, str],
                 log_path: str, cwd: Optional[str] = None, bind_node_ip: bool = False):
        self.role, self.rank = role, rank
        self.cmd = [sys.executable if c == PYTHON else c for c in cmd]
        self.log_path = Path(log_path)
        self.cwd = cwd if cwd and os.path.isdir(cwd) else None
        self.node_ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        env = dict(env)
        if bind_node_ip:
            env[envvars.HOST] = self.node_ip
            if role == "coordinator":
                env[envvars.COORDINATOR_BIND] = f"{self.node_ip}:{_free_port(self.node_ip)}"
        # The actor's environment, less what the driver decides (env carries the
        # driver's OMP_NUM_THREADS when it had one).
        self.env = dict(envvars.actor_base(envvars.process_environ()), **env)
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts this actor
        self.starts = 0
        self.proc: Optional[subprocess.Popen] = None
        if ray.get_runtime_context().was_current_actor_reconstructed:
            why = "its Ray actor died and Ray restarted it"
            self._depart(f"{role} {rank}: {why}")
            self._start(why)
        else:
            self._start("")

    def _depart(self, reason: str) -> None:
        """Tell the coordinator the previous process is gone, before a new one registers.

        The coordinator then takes the new process's registration as a rejoin; left
        to heartbeats, a quick restart could register before the death is noticed.
        """
        me = envvars.Identity.from_env(self.env, required=())
        if not me.coordinator:
            return
        try:
            import zmq

            from tessera.transport import wire
            from tessera.transport.endpoint import ClientEndpoint
            ctx = zmq.Context()
            ep = ClientEndpoint(ctx, me.coordinator, me.secret, "coordinator", sndtimeo_s=2.0)
            try:
                ep.request(wire.Departed(req=ep.new_req(), role=self.role, rank=self.rank,
                                         reason=reason), timeout_s=2.0, what="departure notice")
            finally:
                ep.close()
                ctx.destroy(linger=0)
        except Exception:  # noqa: BLE001  the coordinator still notices by heartbeats
            pass

    def _start(self, why: str) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a" if why else "w") as log:
            if why:
                log.write(f"\n--- tessera: {self.role} {self.rank} started again on "
                          f"{self.node_ip}: {why} ---\n")
                log.flush()
            self.proc = spawn(self.cmd, env=self.env, cwd=self.cwd, stdout=log,
                              stderr=subprocess.STDOUT)
        self.starts += 1

    def info(self) -> dict[str, Any]:
        return {"node_ip": self.node_ip, "node_id": self.node_id, "actor_pid": os.getpid(),
                "pid": self.proc.pid, "incarnation": self.incarnation}

    def poll(self) -> dict[str, Any]:
        return {"incarnation": self.incarnation, "pid": self.proc.pid,
                "code": self.proc.poll(), "node_ip": self.node_ip}

    def restart(self, why: str) -> int:
        """Start the process again (it exited); returns its pid."""
        if self.proc.poll() is None:
            return self.proc.pid
        self._depart(f"{self.role} {self.rank} (pid {self.proc.pid}) "
                     f"{describe_exit(self.proc.returncode)}")
        self._start(why)
        return self.proc.pid

    def tail(self, lines: int = 12) -> str:
        return tail(self.log_path, lines)

    def stop(self, grace_s: float = 3.0) -> Optional[int]:
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return proc.returncode


ProcessActorRemote = ray.remote(ProcessActor)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- seen from the driver


@dataclass
class RayChild:
    """The driver's record of one actor and its process, updated from its polls."""

    role: str
    rank: int
    actor: Any
    name: str  # the named actor's name
    log_path: Path
    pid: int = 0
    node_ip: str = ""
    node_id: str = ""
    incarnation: str = ""
    code: Optional[int] = None
    restarts: int = 0
    pending: Any = field(default=None, repr=False)  # an unanswered poll
    unavailable_since: float = 0.0
    died: str = ""  # Ray's reason, when the actor is gone for good
    survived: bool = False  # a death the job goes on after (a server left to its backup)

    @property
    def label(self) -> str:
        return f"{self.role} {self.rank}"

    @property
    def failed(self) -> bool:
        return not self.survived and (bool(self.died) or self.code not in (None, 0))

    @property
    def done(self) -> bool:
        return self.survived or bool(self.died) or self.code is not None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def death_reason(exc: BaseException) -> str:
    """Ray's own words on why an actor died ("... because it was killed by `ray.kill`")."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith("The actor is dead because"):
            line = line[len("The actor is dead because"):].split(" Worker exit detail:")[0]
            why, _, kind = line.strip().rstrip(".").partition(". Worker exit type: ")
            return f"{why} ({kind})" if kind else why
    return first_line(exc)
