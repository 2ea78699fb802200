"""The local launcher: starts a whole job on this machine and watches it.

Phases:

1. Make the run directory, write the resolved ``config.json``, draw the job's
   secret (32 random bytes, handed to children in their environment, never on
   a command line where ``ps`` would show it).
2. Start the coordinator; wait for it to publish its address.
3. Start the servers and workers, each its own process, logs in ``logs/``.
4. Watch: the progress bar follows ``metrics.jsonl``. A worker that dies while
   ``--max-restarts`` allows is started again (same rank; it rejoins), and with
   ``--replication 2`` a dead server is left to its backup; either way the
   coordinator hears it at once (:class:`~tessera.transport.wire.Departed`); with
   ``--max-restarts`` too, a new server process for that rank joins as a backup. Any
   other death fails the job: the launcher names the process, gives the others a
   moment to notice through their heartbeats, then ends them.
5. On SIGINT/SIGTERM, ask the coordinator for a checkpoint and wait for it to be
   complete (a second signal stops at once), then end every process.
6. On success, print the summary table from ``summary.json``.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from typing import Optional

from tessera.config import env as envvars
from tessera.config import nopickle
from tessera.config.env import Identity, gpu_env
from tessera.config.schema import JobConfig
from tessera.cluster.rundir import default_run_dir, prepare_run_dir
from tessera.launch import warmpool
from tessera.launch.forkserver import ForkedProcess, ForkServer
from tessera.launch.process import (STANDBY_MODULE, WORKER_MODULE, Child, LaunchError,
                                    describe_exit, role_cmd, signals_interrupt, spawn,
                                    standby_runs, tail, visible_gpus)

__all__ = ["Launcher", "LaunchError"]


def _scaled_away(log_path) -> bool:
    """Whether a server's log, since its last start, says it was scaled away."""
    text = tail(log_path, 40)
    return "scaled away" in text.rsplit("===== restarted", 1)[-1]


class Launcher:
    """Starts one job's processes on this machine, watches them, and reports.

    :class:`~tessera.launch.node.NodeLauncher` (one node's share) and
    :class:`~tessera.launch.ray_backend.RayLauncher` (Ray actors) override how
    processes start and are watched; the run, its interrupts and its report stay here.
    """

    def __init__(self, cfg: JobConfig, *, worker_cmd: Optional[list[str]] = None,
                 quiet: bool = False):
        self.cfg = cfg
        self.run_dir = default_run_dir(cfg).resolve()
        self.worker_cmd = worker_cmd or [sys.executable, "-m", WORKER_MODULE]
        self.quiet = quiet
        self.children: list[Child] = []
        self.restarts_left = {r: cfg.cluster.max_restarts for r in range(cfg.cluster.workers)}
        #: --replication 2: replacements left per server rank (a new process joins as a backup).
        self.server_restarts_left = {r: cfg.cluster.max_restarts if cfg.ps.replication == 2
                                     else 0 for r in range(cfg.cluster.servers)}
        #: allreduce/hybrid: re-formings of the whole worker group left, and done.
        self.group_restarts_left = cfg.cluster.max_restarts
        self.generation = 0
        if self._group_mode() and cfg.cluster.max_restarts and not self.GROUP_RESTARTS:
            from tessera.errors import UsageError
            raise UsageError(f"--max-restarts in mode {cfg.ps.mode!r} re-forms the whole worker "
                             f"group, which only `tessera run` and `tessera launch` on one "
                             f"machine do yet; drop --max-restarts (or use sync, async or ssp)")
        self._coord_ep = None
        self._tell_failure = ""  # why the last _tell got no answer
        self._ctx = None
        self._env: dict = {}
        #: A worker process with its imports done, waiting to replace a dead worker
        #: (``--max-restarts``; :mod:`tessera.train.standby`), and its log.
        self.standby: Optional[subprocess.Popen] = None
        #: ``--replication 2 --max-restarts``: a standby server for the next replacement.
        self.server_standby: Optional[subprocess.Popen] = None
        self._standby_log = None
        #: allreduce/hybrid: the next generation's processes, imports done (one standby per
        #: process of this launcher's share: (role, rank) -> process), waiting for a re-form.
        self.next_generation: dict[tuple[str, int], subprocess.Popen] = {}
        #: train.device cuda: each worker's GPU (its CUDA_VISIBLE_DEVICES), kept for its
        #: standby, which must never see another GPU (CUDA reads it once, at its first use).
        self.gpu_of: dict[int, dict[str, str]] = {}
        #: The job's fork server (its processes start as its forks: imports paid once).
        self.forkserver: Optional[ForkServer] = None
        self._forkserver_log = None
        #: What every child is told (role and rank per child); the coordinator's
        #: address is added once it has published it.
        self.identity: Optional[Identity] = None
        # "curve:" asks every endpoint for CURVE encryption; keys derive from the secret.
        self.secret = ("curve:" if cfg.cluster.encrypt else "") + secrets.token_hex(32)

    #: Whether this launcher can re-form an allreduce/hybrid worker group (it must stop
    #: and start every process of the job; multi-node and Ray launchers cannot yet).
    GROUP_RESTARTS = True

    # --------------------------------------------------------------- phases

    def _spawn(self, role: str, rank: int, cmd: list[str], env: dict, append: bool = False
               ) -> Child:
        log_path = self.run_dir / "logs" / f"{role}-{rank}.log"
        log = open(log_path, "a" if append else "w")
        if append:
            log.write(f"\n===== restarted by the launcher at {time.strftime('%H:%M:%S')} =====\n")
            log.flush()
        child_env = dict(env, **envvars.role_env(role, rank, self.cfg.cluster.workers,
                                                 self._local_place(rank)),
                         **{envvars.STARTED_AT: repr(time.time())})
        if role == "worker" and self.cfg.train.device == "cuda":
            # One GPU per worker, round robin over the visible ones (as torchrun users
            # set LOCAL_RANK devices): NCCL needs a distinct device per rank.
            self.gpu_of[rank] = gpu_env(rank, visible_gpus(child_env))
            child_env.update(self.gpu_of[rank])
        if not append:
            proc = None
        elif self._group_mode():
            proc = self._hand_over(self.next_generation.pop((role, rank), None), cmd,
                                   child_env, log_path)
        elif role == "server":
            proc, self.server_standby = self.server_standby, None
            proc = self._hand_over(proc, cmd, child_env, log_path)
        else:
            proc = self._from_standby(cmd, child_env, log_path) if role == "worker" else None
        if proc is None:
            proc = self._fork(cmd, child_env, log_path)
        if proc is None:
            cmd = nopickle.wrap_command(cmd, child_env)  # tests: unpickling ends the child
            proc = spawn(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT)
        child = Child(role, rank, proc, log_path, log)
        self.children.append(child)
        return child

    def _fork(self, cmd: list[str], env: dict, log_path) -> Optional[ForkedProcess]:
        """``cmd`` started as a fork of the job's fork server (started at the first call:
        :mod:`tessera.launch.forkserver`); None where it cannot be (the caller spawns)."""
        if self.forkserver is None:
            if not envvars.use_forkserver(env):
                return None
            roles = ("worker", "server", "coordinator") if self._group_mode() else \
                ("", "server", "coordinator")
            self._forkserver_log = open(self.run_dir / "logs" / "forkserver.log", "a")
            self.forkserver = ForkServer(env, self._forkserver_log, roles,
                                         proc=warmpool.fork_server(env, self._forkserver_log,
                                                                   roles))
        return self.forkserver.start(cmd, env, log_path)

    def _forks(self) -> bool:
        """Whether restarts fork from the fork server: then no standby is kept (a fork is
        a standby that costs nothing until it is needed, with the data loaded too)."""
        return self.forkserver is not None and self.forkserver.alive

    def _stop_forkserver(self) -> None:
        if self.forkserver is not None:
            self.forkserver.close()
            self._forkserver_log.close()
            self.forkserver = None

    # ------------------------------------------------------------- standby

    def _wants_standby(self) -> bool:
        """A standby is kept while a worker may still be restarted. It starts with the job:
        its imports then overlap the workers' own, and it is ready before the first kill
        (started once the job trains, it was still importing torch under the job's load
        for the first 5 s or so)."""
        return (self.standby is None and bool(self._env) and not self._forks()
                and not self._group_mode()
                and any(n > 0 for n in self.restarts_left.values())
                and standby_runs(self.worker_cmd, sys.executable)
                and (self.run_dir / "config.json").exists())

    def _wants_server_standby(self) -> bool:
        """A standby server is kept while a dead server may still be replaced: a fresh
        process spent seconds importing torch, and a death late in a run left the job
        without its second copy until the end."""
        return (self.server_standby is None and bool(self._env) and not self._forks()
                and not self._group_mode() and self.cfg.ps.replication == 2
                and any(n > 0 for n in self.server_restarts_left.values())
                and (self.run_dir / "config.json").exists())

    def _start_standby(self, role: str = "", rank: int = -1) -> subprocess.Popen:
        """A standby process (``role`` ``rank``: the process it will be in a re-formed
        group; "": a restarted worker of the PS modes, kept as ``self.standby``)."""
        if self._standby_log is None:
            self._standby_log = open(self.run_dir / "logs" / "standby.log", "a")
        cmd = nopickle.wrap_command([sys.executable, "-m", STANDBY_MODULE,
                                     *([role] if role else [])], self._env)
        env = dict(self._env, **(self.gpu_of.get(rank, {}) if role == "worker" else {}))
        proc = spawn(cmd, env=env, stdin=subprocess.PIPE,
                     stdout=self._standby_log, stderr=subprocess.STDOUT, text=True)
        if not role:
            self.standby = proc
        return proc

    def _from_standby(self, cmd: list[str], env: dict, log_path) -> Optional[subprocess.Popen]:
        """Hand a dead worker's place to the standby; None when there is none to take it."""
        proc, self.standby = self.standby, None
        return self._hand_over(proc, cmd, env, log_path)

    @staticmethod
    def _hand_over(proc: Optional[subprocess.Popen], cmd: list[str], env: dict, log_path
                   ) -> Optional[subprocess.Popen]:
        """Tell a standby to become the process ``cmd`` starts; None when it cannot."""
        if proc is None or proc.poll() is not None:
            return None
        if not standby_runs(cmd, sys.executable):
            proc.kill()
            proc.wait(timeout=5)
            return None
        try:
            proc.stdin.write(json.dumps({"env": env, "cmd": cmd, "log": str(log_path)}) + "\n")
            proc.stdin.close()
        except OSError:
            return None
        return proc

    def _stop_standby(self) -> None:
        procs = [self.standby, self.server_standby, *self.next_generation.values()]
        self.standby, self.server_standby, self.next_generation = None, None, {}
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.stdin.close()  # end of input: it exits
        deadline = time.monotonic() + 2.0  # one grace for all (each may still be importing)
        for proc in procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._standby_log is not None:
            self._standby_log.close()
            self._standby_log = None

    def start(self) -> None:
        self._prepare_run_dir()
        self._start_processes()

    def _start_processes(self, append: bool = False) -> None:
        """The coordinator, then the servers and workers (``append``: to their logs, when
        the launcher re-forms an allreduce/hybrid group)."""
        cfg = self.cfg
        self.identity = Identity(run_dir=str(self.run_dir), secret=self.secret,
                                 generation=self.generation)
        env = self.identity.child_env(envvars.process_environ())
        coord = self._spawn("coordinator", 0, role_cmd(sys.executable, "coordinator"), env,
                            append=append)
        address = self._wait_published(coord, time.monotonic() + 60, 60)
        self.identity = self.identity.but(coordinator=address)
        env = self._env = self.identity.child_env(env)
        for rank in range(cfg.cluster.servers):
            self._spawn("server", rank, role_cmd(sys.executable, "server"), env, append=append)
        for rank in range(cfg.cluster.workers):
            self._spawn("worker", rank, self.worker_cmd, env, append=append)

    def _local_place(self, rank: int) -> Optional[tuple[int, int]]:
        """A worker's (index, count) among the workers of this machine (all, here)."""
        return None

    def _why_no_checkpoint(self) -> Optional[str]:
        """Why an interrupt must not checkpoint this job (None: it may)."""
        return None

    def _prepare_run_dir(self, *stale: str) -> None:
        prepare_run_dir(self.run_dir, self.cfg, *stale)

    def _wait_published(self, coord: Child, deadline: float, timeout_s: float) -> str:
        """The coordinator's address, once it has written ``coordinator.json``
        (``timeout_s``: how the error names the wait that ends at ``deadline``)."""
        addr_file = self.run_dir / "coordinator.json"
        while not addr_file.exists():
            if coord.proc.poll() is not None:
                raise LaunchError(f"the coordinator {describe_exit(coord.proc.returncode)} "
                                  f"before it was up:\n{tail(coord.log_path)}")
            if time.monotonic() > deadline:
                raise LaunchError("the coordinator did not publish its address within "
                                  f"{timeout_s:.0f} s")
            time.sleep(0.02)
        return json.loads(addr_file.read_text())["address"]

    def stop_all(self, grace_s: float = 3.0) -> None:
        self._stop_standby()
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in self.children:
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(timeout=5)
        self._stop_forkserver()
        for c in self.children:
            if c.log:
                c.log.close()
        if self._coord_ep is not None:
            self._coord_ep.close()
            self._ctx.destroy(linger=0)
            self._coord_ep = None

    # ------------------------------------------------------- talking to the job

    def _coordinator(self):
        """A client endpoint to the coordinator (for Departed and CheckpointNow)."""
        if self._coord_ep is None:
            import zmq

            from tessera.transport.endpoint import ClientEndpoint
            self._ctx = zmq.Context()
            self._coord_ep = ClientEndpoint(self._ctx, self.identity.coordinator,
                                            self.secret, "coordinator", sndtimeo_s=2.0)
        return self._coord_ep

    def _tell(self, msg_factory, timeout_s: float, what: str):
        """Send a request to the coordinator; None if it does not answer in time."""
        from tessera.transport.endpoint import TransportError
        self._tell_failure = ""
        if self.identity is None or not self.identity.coordinator:
            return None
        ep = self._coordinator()
        ours = [c for c in self.children if c.role == "coordinator"]

        def check() -> None:  # a coordinator of ours that ended answers nothing: stop now
            if ours and all(c.proc.poll() is not None for c in ours):
                codes = ", ".join(describe_exit(c.proc.returncode) for c in ours)
                raise TransportError(f"the coordinator {codes} before answering the {what}")
        try:
            reply, _ = ep.request(msg_factory(ep.new_req()), timeout_s=timeout_s, what=what,
                                  check=check)
        except TransportError as exc:
            self._tell_failure = str(exc)  # (read by checkpoint_now: the user is told why)
            return None
        return reply

    def _forward_scale_requests(self) -> None:
        """``tessera scale``: its request files in the run directory go to the coordinator
        (tessera.cluster.elastic); the answer goes back the same way."""
        from tessera.cluster.elastic import answer_request, pending_requests
        from tessera.transport import wire
        for path, servers in pending_requests(self.run_dir):
            if servers is None:
                answer_request(path, False, f"malformed request {path.name}")
                continue
            reply = self._tell(lambda req: wire.Scale(req=req, servers=servers), 5.0,
                               "scale request")
            if reply is None:
                answer_request(path, False, "the coordinator did not answer")
            elif isinstance(reply, wire.Error):
                answer_request(path, False, reply.message)
            else:
                started = self._start_scaled_servers(servers)
                answer_request(path, True, f"moving partitions onto {servers} server"
                                           f"{'s' * (servers != 1)}" +
                               (f" (started server{'s' * (len(started) != 1)} "
                                f"{', '.join(map(str, started))})" if started else ""))

    def _start_scaled_servers(self, servers: int) -> list[int]:
        """A scale up the coordinator took: start server ranks 0..servers-1 that have no
        process (beyond those launched, or scaled away before); they join the running job.
        A rank scaled away that is still exiting gets a few seconds to finish first."""
        started = []
        for rank in range(servers):
            mine = [c for c in self.children if c.role == "server" and c.rank == rank]
            # Only a rank that said it was scaled away is waited for (it is exiting); a
            # live one still serving is left at once (waiting cost 5 s per server).
            alive = [c for c in mine if c.proc.poll() is None and _scaled_away(c.log_path)]
            for c in alive:
                try:
                    c.proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    pass
            if any(c.proc.poll() is None for c in mine):
                continue
            for c in mine:
                if c.log:
                    c.log.close()
                self.children.remove(c)
            self._spawn("server", rank, role_cmd(sys.executable, "server"), self._env,
                        append=bool(mine))
            started.append(rank)
        return started

    def _departed(self, c: Child, final: bool = False) -> bool:
        """Tell the coordinator (``final``: it is not restarted); False when it says the
        process had already finished."""
        from tessera.transport import wire
        reason = f"{c.name} (pid {c.proc.pid}) {describe_exit(c.proc.returncode)}"
        reply = self._tell(lambda req: wire.Departed(req=req, role=c.role, rank=c.rank,
                                                     reason=reason, final=final),
                           2.0, "departure notice")
        return not (isinstance(reply, wire.Error) and reply.message.endswith("had finished"))

    def _survivable(self, c: Child) -> bool:
        """A death the job goes on after: restart the worker, or leave it to the backup."""
        # Exit code 3 means the job already failed elsewhere: a restart would hide why.
        if c.role == "worker" and self.restarts_left.get(c.rank, 0) > 0 \
                and c.proc.returncode != 3:
            if not self._departed(c):
                print(f"tessera: worker {c.rank} (pid {c.proc.pid}) "
                      f"{describe_exit(c.proc.returncode)} after its final report; not "
                      f"restarted", flush=True)
                return True
            self.restarts_left[c.rank] -= 1
            left = self.restarts_left[c.rank]
            print(f"tessera: worker {c.rank} (pid {c.proc.pid}) {describe_exit(c.proc.returncode)}"
                  f"; restarting it ({left} restart{'s' if left != 1 else ''} left for it)",
                  flush=True)
            if c.log:
                c.log.close()
            self.children.remove(c)
            self._spawn("worker", c.rank, self.worker_cmd, self._env, append=True)
            return True
        if c.role == "server" and self.cfg.ps.replication == 2:
            left = self.server_restarts_left.get(c.rank, 0)
            replace = left > 0 and c.proc.returncode != 3
            if c.proc.returncode == 3 and left < self.cfg.cluster.max_restarts \
                    and "joined the running job" not in \
                    tail(c.log_path, 40).rsplit("restarted by the launcher", 1)[-1]:
                last = (tail(c.log_path).strip().splitlines() or [""])[-1]
                print(f"tessera: the replacement of server {c.rank} did not join: {last}",
                      flush=True)
                return True  # never a member: nothing to tell the coordinator
            print(f"tessera: server {c.rank} (pid {c.proc.pid}) {describe_exit(c.proc.returncode)}"
                  f"; its backup takes over" + (f"; starting a replacement, which joins as a "
                                                f"backup ({left - 1} left for it)" if replace
                                                else ""), flush=True)
            self._departed(c)  # answered once the coordinator counts it dead
            if replace:
                self.server_restarts_left[c.rank] = left - 1
                if c.log:
                    c.log.close()
                self.children.remove(c)
                self._spawn("server", c.rank, role_cmd(sys.executable, "server"), self._env,
                            append=True)
            return True
        return False

    # ------------------------------------------- allreduce/hybrid: re-form the group

    def _group_mode(self) -> bool:
        """allreduce/hybrid: the workers form one torch.distributed group, which cannot
        lose a member: a worker's death re-forms the whole group from the newest
        checkpoint (as torchrun does), instead of restarting that worker alone."""
        return self.cfg.ps.mode in ("allreduce", "hybrid")

    def _keep_next_generation(self) -> None:
        """While a re-form is allowed, keep a standby (imports done, the worker's data
        loaded) for each process of this launcher's share, so that a re-form starts no
        interpreter: it costs the stop, the registration, the restore and the rendezvous.
        They start with the job (their imports overlap the job's own, and they are ready
        for an early death) and again after each re-form, for the next one, once the new
        generation is up (:meth:`_group_up`: not competing with its start)."""
        if (self.next_generation or not self._env or not self._group_mode() or self._forks()
                or self.group_restarts_left <= 0
                or not standby_runs(self.worker_cmd, sys.executable)
                or not (self.run_dir / "config.json").exists()
                or (self.generation and not self._group_up())):
            return
        for c in self.children:
            self.next_generation[(c.role, c.rank)] = self._start_standby(c.role, c.rank)

    def _group_up(self) -> bool:
        """Every process of the current generation has registered (``cluster.json``)."""
        return (self.run_dir / "cluster.json").exists()

    def _restart_group(self, c: Child) -> bool:
        """Stop every process of the job and start them all again from the newest complete
        checkpoint, as generation ``self.generation + 1``; False when no restart is left."""
        # Exit code 3 means the job already failed elsewhere: a restart would hide why.
        if self.group_restarts_left <= 0 or c.proc.returncode == 3:
            return False
        self.group_restarts_left -= 1
        self.generation += 1
        print(f"tessera: worker {c.rank} (pid {c.proc.pid}) {describe_exit(c.proc.returncode)}; "
              f"re-forming the worker group from the newest checkpoint (restart "
              f"{self.generation} of {self.cfg.cluster.max_restarts})", flush=True)
        t0 = time.monotonic()
        self._stop_group()
        t1 = time.monotonic()
        self._resume_from_newest()
        self._start_processes(append=True)
        self._end_unused_standbys()
        print(f"tessera: generation {self.generation} started ({t1 - t0:.2f} s to stop the old "
              f"one, {time.monotonic() - t1:.2f} s to start the new one)", flush=True)
        return True

    def _end_unused_standbys(self) -> None:
        """After a re-form: standbys no process took (they are started again, fresh)."""
        for proc in self.next_generation.values():
            if proc.poll() is None:
                proc.stdin.close()
        self.next_generation = {}

    def _regroups_on(self, c: Child) -> bool:
        """Whether ``c``'s death is one :meth:`_restart_group` handles (group modes)."""
        return c.role == "worker"

    def _regroup_elsewhere(self) -> bool:
        """Whether another launcher began a re-form, which this one has now joined (its
        processes are the next generation's); here, one machine, never."""
        return False

    def _stop_group(self) -> None:
        """End every process at once: survivors may be blocked inside a collective,
        where SIGTERM waits (a checkpoint half written has no manifest and is ignored)."""
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGKILL if c.role == "worker" else signal.SIGTERM)
        for c in self.children:
            try:
                c.proc.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(timeout=5)
            if c.log:
                c.log.close()
        self.children = []
        if self._coord_ep is not None:
            self._coord_ep.close()
            self._ctx.destroy(linger=0)
            self._coord_ep = None

    def _resume_from_newest(self) -> None:
        """Point the job at its own newest complete checkpoint (kept as it was when there
        is none yet: from the start, or from the run it resumed) and clear what the
        stopped generation published."""
        import msgspec

        from tessera.config import config_to_dict
        from tessera.ps.checkpoint import CheckpointStore, checkpoint_url
        store = CheckpointStore(checkpoint_url(self.cfg, self.run_dir))
        latest = store.latest()
        if latest is not None:
            self.cfg = msgspec.structs.replace(self.cfg, resume=store.url)
            print(f"tessera: resuming at clock {latest['clock']} from {store.url}", flush=True)
        else:
            print("tessera: no complete checkpoint yet; starting again from the beginning",
                  flush=True)
        (self.run_dir / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2))
        for name in ("coordinator.json", "cluster.json", "summary.json"):
            (self.run_dir / name).unlink(missing_ok=True)

    def _job_complete(self) -> bool:
        """The coordinator has ended cleanly (it exits 0 once summary.json is written)."""
        return any(c.role == "coordinator" and c.proc.poll() == 0 for c in self.children)

    def checkpoint_now(self, timeout_s: float) -> str:
        """Ask for a checkpoint and wait until it is complete: "" once it is, else why not
        (:meth:`latest_checkpoint` names it)."""
        from tessera.transport import wire
        reply = self._tell(lambda req: wire.CheckpointNow(req=req), timeout_s, "checkpoint")
        if reply is None:
            return self._tell_failure or "the coordinator is not reachable"
        if isinstance(reply, wire.Error):
            return reply.message
        if not isinstance(reply, wire.Ack):
            return f"the coordinator answered {type(reply).__name__}"
        return ""

    def latest_checkpoint(self) -> tuple[Optional[str], str]:
        """The newest complete checkpoint, the one ``--resume`` takes: (where, "") or
        (None, why)."""
        from tessera.ps.checkpoint import CheckpointStore, checkpoint_url
        store = CheckpointStore(checkpoint_url(self.cfg, self.run_dir))
        latest = store.latest()
        if not latest:
            return None, f"the coordinator acknowledged it, but {store.url} holds no complete one"
        return f"clock {latest['clock']} in {store.url}", ""

    def watch(self, progress=None) -> Optional[str]:
        """Wait for the job; returns None on success, else the failure (one paragraph)."""
        first_failure: Optional[Child] = None
        failed_at, unjoined = 0.0, False
        handled: set[int] = set()  # pids of deaths the job survived
        # After the first failure, the others get this long to stop on their own
        # (they learn from heartbeats within heartbeat_timeout_s).
        settle_s = min(10.0, self.cfg.cluster.heartbeat_timeout_s + 2.0)
        while True:
            if progress:
                progress()
            if self._wants_standby():
                self._start_standby()
            if self._wants_server_standby():
                self.server_standby = self._start_standby("server")
            self._keep_next_generation()
            if first_failure is None:
                self._forward_scale_requests()
            if first_failure is None and self._regroup_elsewhere():
                continue  # every process of this node is new: look again
            for c in list(self.children):
                code = c.proc.poll()
                if code == 0 and self._left_before_joining(c) and first_failure is None:
                    # A script that ended without joining (an unmodified DDP script?):
                    # the others would wait for it until the start-up timeout.
                    first_failure, failed_at, unjoined = c, time.monotonic(), True
                    self._departed(c, final=True)
                    continue
                if code in (None, 0) or c.proc.pid in handled or first_failure is not None:
                    continue
                if self._job_complete():
                    # summary.json is written: every worker had reported. A process that
                    # dies now (killed while leaving) takes nothing from the job.
                    handled.add(c.proc.pid)
                    continue
                if self._group_mode() and self._regroups_on(c):
                    if self._restart_group(c):
                        break  # every process is new: look again
                elif self._survivable(c):
                    handled.add(c.proc.pid)
                    continue
                first_failure, failed_at = c, time.monotonic()
                if not self._group_mode() or self.group_restarts_left <= 0:
                    # The coordinator fails the job now: the others hear it in their next
                    # heartbeat reply, not after their heartbeat timeout (5 s).
                    self._departed(c, final=True)
            running = [c for c in self.children if c.proc.poll() is None]
            if not running:
                break
            if first_failure and time.monotonic() - failed_at > settle_s:
                break
            time.sleep(0.1)
        if progress:
            progress()
        if first_failure is None:
            return None
        self.stop_all()
        c = first_failure
        how = describe_exit(c.proc.returncode)
        if unjoined:
            how = (f"{how} before it joined the job: the script ended without calling "
                   f"tessera.distribute() or tessera.init() (README: 'Your own script'), and "
                   f"the others would have waited for it")
        return (f"{c.name} (pid {c.proc.pid}) {how}; "
                f"the job was stopped. Last lines of {c.log_path}:\n{tail(c.log_path)}")

    def _left_before_joining(self, c) -> bool:
        """Worker ``c`` ended before the cluster was up: the coordinator writes
        ``cluster.json`` once every process has registered (the run directory is cleared of
        it at the start). On the other nodes of a job (``tessera node``) the coordinator's
        run directory is another one: there the worker's own life tally tells, which its
        session writes under this run directory when its registration returns
        (``cursors/worker-<rank>.tally``; a replacement finds its predecessor's, and is
        then left to the start-up timeout, as before)."""
        if c.role != "worker":
            return False
        if any(o.role == "coordinator" for o in self.children):
            return not (self.run_dir / "cluster.json").exists()
        return not (self.run_dir / "cursors" / f"worker-{c.rank}.tally").exists()

    def run(self) -> int:
        """Start, watch, report. Returns the exit code for the CLI."""
        from tessera.launch.console import ProgressView, print_failure, print_summary
        view = None if self.quiet else ProgressView(self.run_dir, self.cfg)
        with signals_interrupt():
            code, failure = self._start_and_watch(view, print_failure)
        if code is not None:
            return code
        if view:
            view.stop()
        self.stop_all()
        if failure:
            print_failure(failure, self.run_dir)
            return 1
        summary_path = self.run_dir / "summary.json"
        if not summary_path.exists():
            print_failure("every process exited cleanly but no summary.json was written",
                          self.run_dir)
            return 1
        print_summary(json.loads(summary_path.read_text()), self.run_dir, quiet=self.quiet)
        return 0

    def _start_and_watch(self, view, print_failure) -> tuple[Optional[int], Optional[str]]:
        """(exit code, None) when interrupted or the start failed; else (None, failure)."""
        try:
            self.start()
            if view:
                view.start()
            failure = self.watch(view.update if view else None)
        except KeyboardInterrupt:
            if view:
                view.stop()
            where, why, acked = None, "", False
            checkpointable = self._env and (self.cfg.cluster.servers
                                            or self.cfg.ps.mode == "allreduce")
            refused = self._why_no_checkpoint() if checkpointable else None
            if refused:
                print(f"tessera: interrupted; no checkpoint: {refused}", flush=True)
            elif checkpointable:
                print("tessera: interrupted; writing a checkpoint (interrupt again to stop now)",
                      flush=True)
                try:
                    why = self.checkpoint_now(timeout_s=self.cfg.cluster.timeout_s * 2)
                    acked = not why
                except KeyboardInterrupt:
                    why = "interrupted again"
            self.stop_all()
            if acked:
                # Read once every process has ended: the job trained on until then, and a
                # scheduled checkpoint may have completed meanwhile; --resume takes that one.
                where, why = self.latest_checkpoint()
            resume = self.cfg.checkpoint.dir or self.run_dir
            note = (f"; checkpoint at {where}: continue with --resume {resume}" if where
                    else f"; no checkpoint was completed ({why})" if why
                    else "; no checkpoint was completed")
            print_failure(f"interrupted: every process of the job was stopped{note}",
                          self.run_dir)
            return 130, None
        except LaunchError as exc:
            if view:
                view.stop()
            self.stop_all()
            print_failure(str(exc), self.run_dir)
            return 1, None
        return None, failure
