"""The Ray launcher: the same job, with every process a Ray actor (``--backend ray``).

``tessera run JOB.toml --backend ray [--address RAY_ADDRESS]`` runs exactly the
processes the local launcher runs (coordinator, servers, workers: the unchanged
entry points, as subprocesses), but each one is started by a Ray actor, and the
actors are placed by a placement group: one bundle per process, strategy
``SPREAD`` (``cluster.placement = "spread"``) or ``PACK`` (``"pack"``).

Contract: :class:`RayLauncher` is a :class:`~tessera.launch.launcher.Launcher`
whose ``start``, ``watch`` and ``stop_all`` work through actors; ``run`` is the
local launcher's (``config.json`` in the run directory, progress bar, summary
table, one paragraph naming the failed process, a checkpoint on SIGINT/SIGTERM,
exit codes 0 / 1 / 130), inside a Ray connection.

What this needs from the Ray cluster:

* **Shared storage.** The run directory (``--out``) must be a path every Ray
  node and the driver see (NFS or similar): ``config.json`` is written by the
  driver and read by every process, ``coordinator.json`` is written by the
  coordinator, logs and ``metrics.jsonl`` by the processes, ``summary.json`` read
  by the driver.
* **Tessera installed on every node**, importable by Ray's Python (the actors run
  ``python -m tessera.cluster.role ...`` with the actor's own interpreter).
* **Reachable addresses.** On a local instance every process binds
  ``cluster.host`` (loopback), as with the local launcher. When joining a cluster
  (``--address`` or ``RAY_ADDRESS``) with a loopback or wildcard ``cluster.host``,
  the coordinator binds the IP of its actor's node (``TESSERA_COORDINATOR_BIND``)
  and every process is given its node's IP as ``TESSERA_HOST``, which
  ``Session.from_env`` uses as ``cluster.host``: servers (and hybrid mode's worker
  0) bind and publish their own node's address.

Failures: each actor watches its subprocess; the driver polls the actors. Worker
actors are created with ``max_restarts = cluster.max_restarts``: when a worker's
actor dies (its node went away, ``ray.kill``), Ray restarts the actor and its
constructor starts the worker again with the same rank, as the original was
started; when only the worker process died and restarts are left, the driver
asks the live actor to start it again. Either way it counts against the
worker's ``max_restarts``. Before the new process starts, the actor tells the
coordinator the old one departed (``wire.Departed``, as the local launcher does),
so the coordinator takes the new process as a rejoin, never as a second
registration. With ``ps.replication = 2`` a dead server is left to its backup.
Any other failure (coordinator or server, or a worker with no restarts
left) fails the job like the local launcher: named, others given time to stop,
then everything stopped. A subprocess dies with its actor (``PR_SET_PDEATHSIG``
on Linux, plus the heartbeat thread's parent check).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
)
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tessera.cluster.role import EXIT_CLUSTER_FAILURE
from tessera.config import env as envvars
from tessera.config.env import Identity
from tessera.config.schema import JobConfig
from tessera.launch.launcher import Launcher
from tessera.launch.process import LaunchError, describe_exit, role_cmd, tail
from tessera.launch.ray_actor import (PYTHON, ProcessActorRemote, RayChild, death_reason,
                                      first_line)

#: The namespace of Tessera's named actors: ``tessera-<run dir name>-<role>-<rank>``.
NAMESPACE = "tessera"
#: CPU each actor (and its bundle) asks for: placement, not a share of the machine.
ACTOR_CPUS = 0.01
_LOOPBACK = ("127.", "localhost", "0.0.0.0", "::", "::1", "*")


def actor_name(run_dir: Path, role: str, rank: int) -> str:
    return f"tessera-{Path(run_dir).name}-{role}-{rank}"


class RayLauncher(Launcher):
    """The local launcher's run (progress, interrupts, checkpoint, summary), on Ray actors."""

    GROUP_RESTARTS = False  # Ray restarts actors one by one (see above)

    def __init__(self, cfg: JobConfig, *, worker_cmd: Optional[list[str]] = None,
                 quiet: bool = False):
        super().__init__(cfg, worker_cmd=worker_cmd, quiet=quiet)
        # The actor's own Python stands in for the driver's (nodes may differ), and a
        # script named relative to here is named absolutely (an actor's cwd may differ).
        cmd = [PYTHON if c == sys.executable else c for c in self.worker_cmd]
        if len(cmd) > 1 and cmd[0] == PYTHON and os.path.isfile(cmd[1]):
            cmd[1] = os.path.abspath(cmd[1])
        self.worker_cmd = cmd
        self.children: list[RayChild] = []  # type: ignore[assignment]
        self.pg = None
        self.connected = False
        self._stopped = False
        #: Joining a cluster (--address or RAY_ADDRESS), not a local instance of our own.
        self.joined = bool(cfg.cluster.address or envvars.ray_address(envvars.process_environ()))

    # ------------------------------------------------------------ Ray itself

    def connect(self) -> None:
        address = self.cfg.cluster.address
        kwargs: dict[str, Any] = dict(namespace=NAMESPACE, log_to_driver=False,
                                      logging_level=logging.ERROR)
        if not self.joined:
            # A local instance for this job: the actors only ask for a sliver of CPU.
            kwargs.update(num_cpus=1, include_dashboard=False)
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # ConnectionError, ValueError, RuntimeError, ...
            where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
            raise LaunchError(f"could not connect to {where}: {exc}") from exc
        self.connected = True

    def disconnect(self) -> None:
        if self.connected:
            ray.shutdown()
            self.connected = False

    def _note(self, text: str) -> None:
        print(f"tessera: {text}", flush=True)  # as the local launcher's restart notes

    # --------------------------------------------------------------- phases

    def _spawn(self, role: str, rank: int, cmd: list[str], env: dict, bundle: int,
               max_restarts: int = 0) -> RayChild:
        log_path = self.run_dir / "logs" / f"{role}-{rank}.log"
        name = actor_name(self.run_dir, role, rank)
        cl = self.cfg.cluster
        bind_node_ip = self.joined and cl.host.startswith(_LOOPBACK)
        try:
            actor = ProcessActorRemote.options(
                name=name, num_cpus=ACTOR_CPUS, max_restarts=max_restarts, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=bundle),
            ).remote(role, rank, cmd, dict(env, **envvars.role_env(role, rank, cl.workers)),
                     str(log_path), os.getcwd(), bind_node_ip)
        except ValueError as exc:  # the name is taken: the same run directory is running
            raise LaunchError(f"could not create the Ray actor {name!r} in namespace "
                              f"{NAMESPACE!r}: {exc}") from exc
        child = RayChild(role, rank, actor, name, log_path)
        self.children.append(child)
        return child

    def _info(self, child: RayChild) -> None:
        try:
            info = ray.get(child.actor.info.remote(), timeout=self.cfg.cluster.startup_timeout_s)
        except GetTimeoutError:
            raise LaunchError(f"the Ray actor of {child.label} did not start within "
                              f"{self.cfg.cluster.startup_timeout_s:.0f} s") from None
        except RayActorError as exc:
            raise LaunchError(f"the Ray actor of {child.label} could not start the process: "
                              f"{first_line(exc)}") from None
        child.pid, child.node_ip, child.node_id, child.incarnation = \
            info["pid"], info["node_ip"], info["node_id"], info["incarnation"]

    def start(self) -> None:
        try:
            self._start_actors()
        except ray.exceptions.RayError as exc:
            raise LaunchError(f"Ray failed while starting the job: {first_line(exc)}") from None

    def _start_actors(self) -> None:
        cl = self.cfg.cluster
        self._prepare_run_dir("ray.json")
        count = 1 + cl.servers + cl.workers
        strategy = "PACK" if cl.placement == "pack" else "SPREAD"
        self.pg = placement_group([{"CPU": ACTOR_CPUS}] * count, strategy=strategy,
                                  name=f"tessera-{self.run_dir.name}")
        try:
            ray.get(self.pg.ready(), timeout=cl.startup_timeout_s)
        except GetTimeoutError:
            raise LaunchError(f"the Ray cluster could not place {count} processes "
                              f"({strategy} placement group) within "
                              f"{cl.startup_timeout_s:.0f} s") from None

        # Not the driver's whole environment: each actor starts from its node's own.
        self.identity = Identity(run_dir=str(self.run_dir), secret=self.secret, host=cl.host)
        env = self.identity.child_env(envvars.passed_through(envvars.process_environ()))
        coord = self._spawn("coordinator", 0, role_cmd(PYTHON, "coordinator"), env, bundle=0)
        self._info(coord)
        addr_file = self.run_dir / "coordinator.json"
        deadline = time.monotonic() + 60
        while not addr_file.exists():
            try:
                code = ray.get(coord.actor.poll.remote(), timeout=30)["code"]
            except (RayActorError, GetTimeoutError) as exc:
                raise LaunchError(f"the coordinator's Ray actor failed before the coordinator "
                                  f"was up: {first_line(exc)}") from None
            if code is not None:
                raise LaunchError(f"the coordinator {describe_exit(code)} before it was up:\n"
                                  f"{self._tail(coord)}")
            if time.monotonic() > deadline:
                raise LaunchError("the coordinator did not publish its address within 60 s "
                                  f"(is the run directory {self.run_dir} on storage every Ray "
                                  f"node shares?)")
            time.sleep(0.05)
        self.identity = self.identity.but(
            coordinator=json.loads(addr_file.read_text())["address"])
        # Launcher.checkpoint_now and _tell reach the coordinator with it.
        env = self._env = self.identity.child_env(env)
        for rank in range(cl.servers):
            self._spawn("server", rank, role_cmd(PYTHON, "server"), env,
                        bundle=1 + rank)
        for rank in range(cl.workers):
            self._spawn("worker", rank, self.worker_cmd, env, bundle=1 + cl.servers + rank,
                        max_restarts=cl.max_restarts)
        for child in self.children[1:]:
            self._info(child)
        nodes = sorted({c.node_id for c in self.children})
        (self.run_dir / "ray.json").write_text(json.dumps({
            "namespace": NAMESPACE, "placement": strategy,
            "actors": {c.label: {"name": c.name, "node_ip": c.node_ip, "node_id": c.node_id,
                                 "pid": c.pid} for c in self.children}}, indent=2))
        if not self.quiet:
            self._note(f"on Ray: {count} processes on {len(nodes)} node(s) "
                       f"({strategy.lower()}), actors in namespace {NAMESPACE!r}")

    def _tail(self, child: RayChild) -> str:
        """The process's last log lines, read by its actor (the log is on its node)."""
        try:
            return ray.get(child.actor.tail.remote(), timeout=5)
        except Exception:  # the actor is gone: the shared run directory may still have it
            return tail(child.log_path)

    def stop_all(self, grace_s: float = 3.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._coord_ep is not None:
            self._coord_ep.close()
            self._ctx.destroy(linger=0)
            self._coord_ep = None
        if not self.connected:
            return
        refs = {}
        for c in self.children:
            if not c.died:
                refs[c.actor.stop.remote(grace_s)] = c
        if refs:
            ray.wait(list(refs), num_returns=len(refs), timeout=grace_s + 6)
        for c in self.children:
            try:
                ray.kill(c.actor, no_restart=True)
            except Exception:
                pass
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None

    # ---------------------------------------------------------------- watch

    def _poll_all(self) -> None:
        now = time.monotonic()
        for c in self.children:
            if c.died or c.survived or c.code == 0:
                continue
            if c.pending is None:
                c.pending = c.actor.poll.remote()
        pending = [c.pending for c in self.children if c.pending is not None]
        if not pending:
            return
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        ready = set(ready)
        for c in self.children:
            if c.pending is None or c.pending not in ready:
                if c.pending is not None and not c.unavailable_since:
                    c.unavailable_since = now  # a restarting actor answers once it is back
                continue
            ref, c.pending = c.pending, None
            try:
                state = ray.get(ref)
            except ActorUnavailableError:  # the actor died and Ray is restarting it
                c.unavailable_since = c.unavailable_since or now
                continue
            except (ActorDiedError, RayActorError) as exc:  # gone for good
                c.died = death_reason(exc)
                continue
            c.unavailable_since = 0.0
            if state["incarnation"] != c.incarnation:
                self._actor_restarted(c, state)
            c.pid, c.node_ip, c.code = state["pid"], state["node_ip"], state["code"]

    def _actor_restarted(self, c: RayChild, state: dict) -> None:
        c.incarnation = state["incarnation"]
        c.restarts += 1
        self._note(f"{c.label} (pid {c.pid}): its Ray actor died and Ray restarted it; the "
                   f"{c.role} started again as pid {state['pid']} on {state['node_ip']} "
                   f"(restart {c.restarts} of {self.cfg.cluster.max_restarts})")
        if c.restarts > self.cfg.cluster.max_restarts:
            c.died = (f"its Ray actor died and was restarted more than "
                      f"cluster.max_restarts = {self.cfg.cluster.max_restarts} times")

    def _restart_process(self, c: RayChild) -> bool:
        """A worker process died but its actor lives: start it again if restarts are left.

        Not when it exited with EXIT_CLUSTER_FAILURE: it stopped because it heard the
        job failed elsewhere, and another start would only hide that cause.
        """
        if c.role != "worker" or c.restarts >= self.cfg.cluster.max_restarts or \
                c.code == EXIT_CLUSTER_FAILURE:
            return False
        c.restarts += 1
        why = f"the previous process (pid {c.pid}) {describe_exit(c.code)}"
        try:
            pid = ray.get(c.actor.restart.remote(why), timeout=30)
        except (RayActorError, GetTimeoutError):
            # The actor went too: Ray restarts it (a new incarnation, counted when it
            # answers) or it is gone for good; the next polls tell which.
            c.restarts -= 1
            c.code = None
            c.unavailable_since = c.unavailable_since or time.monotonic()
            return True
        self._note(f"{c.label} (pid {c.pid}) {describe_exit(c.code)}; started it again as "
                   f"pid {pid} (restart {c.restarts} of {self.cfg.cluster.max_restarts})")
        c.pid, c.code = pid, None
        return True

    def _survivable(self, c: RayChild) -> bool:  # type: ignore[override]
        """A death the job goes on after; counts and starts again where it should."""
        if c.role == "worker" and c.code not in (None, 0) and not c.died:
            return self._restart_process(c)
        if c.role == "server" and self.cfg.ps.replication == 2:
            how = f"died with its Ray actor: {c.died}" if c.died else describe_exit(c.code)
            self._note(f"server {c.rank} (pid {c.pid}) {how}; its backup takes over")
            from tessera.transport import wire
            reason = f"server {c.rank} (pid {c.pid}) {how}"
            self._tell(lambda req: wire.Departed(req=req, role="server", rank=c.rank,
                                                 reason=reason), 2.0, "departure notice")
            c.survived = True
            return True
        return False

    def watch(self, progress=None) -> Optional[str]:
        """Wait for the job; returns None on success, else the failure (one paragraph)."""
        cl = self.cfg.cluster
        first: Optional[RayChild] = None
        failed_at = 0.0
        # After the first failure, the others get this long to stop on their own.
        settle_s = min(10.0, cl.heartbeat_timeout_s + 2.0)
        while True:
            if progress:
                progress()
            try:
                self._poll_all()
            except ray.exceptions.RayError as exc:
                raise LaunchError(f"Ray failed while watching the job: {first_line(exc)}") \
                    from None
            now = time.monotonic()
            if first is None:
                for c in self.children:
                    if not c.failed and c.unavailable_since and \
                            now - c.unavailable_since > cl.startup_timeout_s:
                        c.died = (f"its Ray actor did not answer for "
                                  f"{now - c.unavailable_since:.0f} s")
                    if c.failed and not self._survivable(c):
                        first, failed_at = c, now
                        break
            if all(c.done for c in self.children):
                break
            if first and now - failed_at > settle_s:
                break
            time.sleep(0.1)
        if progress:
            progress()
        if first is None:
            return None
        log = self._tail(first)
        self.stop_all()
        where = f" on {first.node_ip}" if first.node_ip else ""
        if first.died:
            what = f"died with its Ray actor: {first.died}"
            if first.role == "worker" and first.restarts >= cl.max_restarts:
                what += f"; no restarts left (cluster.max_restarts = {cl.max_restarts})"
        else:
            what = describe_exit(first.code)
        return (f"{first.label} (pid {first.pid}{where}) {what}; the job was stopped. "
                f"Last lines of {first.log_path}:\n{log}")

    def run(self) -> int:
        """Connect to Ray, then the local launcher's run (start, watch, report), then leave."""
        from tessera.launch.console import print_failure
        try:
            self.connect()  # before run() installs its signal handlers: ray.init sets one
        except LaunchError as exc:
            print_failure(str(exc), self.run_dir)
            return 1
        except KeyboardInterrupt:
            print_failure("interrupted while connecting to Ray", self.run_dir)
            return 130
        try:
            return super().run()
        finally:
            self.stop_all()
            self.disconnect()
