"""The process environment: the one module that writes and reads Tessera's variables.

A launcher tells each process who it is through a handful of ``TESSERA_*``
variables (never its command line, where ``ps`` would show the secret). This
module names them, writes them (:meth:`Identity.child_env`) and reads them
(:meth:`Identity.from_env`); the launchers in :mod:`tessera.launch` and the
process side (:mod:`tessera.cluster.session`, :mod:`tessera.cluster.role`) both
import it, so a variable is spelled once. After ``from_env`` everything is passed
down explicitly (STYLE 4 and 5).

The other variables launchers exchange go through here too: the ones a
multi-node launcher reads from Slurm, Kubernetes or torchrun (``MASTER_ADDR``,
``NNODES``, ``NODE_RANK``, ...), Ray's ``RAY_ADDRESS``, ``OMP_NUM_THREADS`` and
``CUDA_VISIBLE_DEVICES``; and the interface Gloo and NCCL bind to
(``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``), which a worker sets for itself.

It sits at the bottom layer: it imports nothing from Tessera but the errors.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Mapping, Optional

from tessera.errors import TesseraError

PREFIX = "TESSERA_"
ROLE = "TESSERA_ROLE"
RANK = "TESSERA_RANK"
RUN_DIR = "TESSERA_RUN_DIR"
SECRET = "TESSERA_SECRET"
#: ``tcp://HOST:PORT`` of the coordinator; every process but the coordinator has it.
COORDINATOR = "TESSERA_COORDINATOR"
#: A multi-node backend's address of this process's node (bind and publish it).
HOST = "TESSERA_HOST"
#: ``HOST:PORT`` the coordinator must bind (``tessera node``, Ray clusters).
COORDINATOR_BIND = "TESSERA_COORDINATOR_BIND"
#: Set to 1 (tests): every process a launcher starts ends itself on any attempt to
#: unpickle (:mod:`tessera.config.nopickle`); children inherit it.
FORBID_PICKLE = "TESSERA_FORBID_PICKLE"
#: "0": the local launchers start every process afresh, not as forks of a fork server.
FORKSERVER = "TESSERA_FORKSERVER"
#: The Unix socket of a warm pool (:mod:`tessera.launch.warmpool`): the local launchers
#: take their fork server from it, imports done, instead of starting one.
WARM_POOL = "TESSERA_WARM_POOL"
#: How many times the launcher has re-formed the worker group (allreduce/hybrid
#: ``--max-restarts``): 0 for the first start, as torchrun's TORCHELASTIC_RESTART_COUNT.
GENERATION = "TESSERA_GENERATION"
#: Unix time at which the launcher started (or handed a standby) this process: how a
#: restarted worker reports the time its rejoin took.
STARTED_AT = "TESSERA_STARTED_AT"
#: Benchmarks and tests only (benchmarks/elastic.py): ``RANK:MS``, server RANK sleeps MS
#: per partition of every push or pull and per table of every row request (a server made
#: hot on purpose); ``RANK:MS:rows``: row requests only.
SLOW_SERVER = "TESSERA_SLOW_SERVER"
#: ``numpy``: embedding shards run their numpy and torch code, not the compiled row
#: kernels (:mod:`tessera.ps.kernels`); read once, at that module's import.
KERNELS = "TESSERA_KERNELS"
#: What a process that joins a job needs (the coordinator itself has no COORDINATOR).
REQUIRED = (ROLE, RANK, RUN_DIR, COORDINATOR, SECRET)

OMP_NUM_THREADS = "OMP_NUM_THREADS"
#: glibc malloc's tunables, read once at a process's start. Tessera's launched processes
#: keep freed blocks under 32 MiB and up to 512 MiB of free heap for reuse: glibc's own
#: defaults give a freed 4 MiB receive buffer back to the kernel (munmap) and fault the
#: next one in again, page by page, once per partition per step
#: (benchmarks/ps_roundtrip.py ``tessera_glibc``). A value the user set is kept.
MALLOC_DEFAULTS = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                   "MALLOC_TRIM_THRESHOLD_": str(512 << 20)}
RAY_ADDRESS = "RAY_ADDRESS"
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
PYTHONUNBUFFERED = "PYTHONUNBUFFERED"

#: Where ``tessera node`` finds settings its flags leave out; the first one set wins.
#: Coordinator: TESSERA_COORDINATOR, then MASTER_ADDR + MASTER_PORT (torchrun's).
NODE_COORDINATOR = (COORDINATOR,)
MASTER_ADDR, MASTER_PORT = "MASTER_ADDR", "MASTER_PORT"
NODES = ("NNODES", "SLURM_NNODES", "WORLD_SIZE")
NODE_RANK = ("NODE_RANK", "SLURM_NODEID", "JOB_COMPLETION_INDEX", "GROUP_RANK")


class NotLaunched(TesseraError):
    """This process lacks the variables a launcher sets (one line, what to do)."""


class EnvError(ValueError):
    """A launcher variable holds something unusable; the message is one line naming it."""


@dataclass(frozen=True)
class Identity:
    """Who a process is in a job, as its launcher tells it through the environment.

    ``coordinator`` is empty for the coordinator itself (it publishes its own
    address); ``host`` and ``coordinator_bind`` are set by multi-node backends only.
    """

    run_dir: str
    secret: str
    role: str = ""
    rank: int = 0
    coordinator: str = ""
    host: str = ""
    coordinator_bind: str = ""
    generation: int = 0

    def but(self, **changes) -> "Identity":
        """A copy with some fields changed (the coordinator's address, once published)."""
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The variables this identity sets; empty fields are left out."""
        values = {RUN_DIR: self.run_dir, SECRET: self.secret, ROLE: self.role,
                  RANK: str(self.rank) if self.role else "", COORDINATOR: self.coordinator,
                  HOST: self.host, COORDINATOR_BIND: self.coordinator_bind,
                  GENERATION: str(self.generation) if self.generation else ""}
        return {k: v for k, v in values.items() if v}

    def child_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """A child's whole environment: ``base`` (the launcher's own), this identity,
        unbuffered output (logs follow the process) and :data:`MALLOC_DEFAULTS` where
        ``base`` does not set them."""
        env = dict(MALLOC_DEFAULTS)
        env.update(base)
        env.update(self.to_env())
        env[PYTHONUNBUFFERED] = "1"
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, expect_role: Optional[str] = None,
                 required: tuple[str, ...] = REQUIRED) -> "Identity":
        """Read a launched process's identity; :class:`NotLaunched` if it was not."""
        missing = [v for v in required if not environ.get(v)]
        if missing:
            raise NotLaunched(
                "this process was not started by a Tessera launcher (missing "
                f"{', '.join(missing)}); run your script with "
                "`tessera launch --workers 2 --servers 2 your_script.py`")
        role = environ.get(ROLE, "")
        if expect_role and role != expect_role:
            raise NotLaunched(f"this process was launched as a {role}, not a {expect_role}")
        rank, generation = _int_var(environ, RANK), _int_var(environ, GENERATION)
        return cls(run_dir=environ.get(RUN_DIR, ""), secret=environ.get(SECRET, ""), role=role,
                   rank=rank, coordinator=environ.get(COORDINATOR, ""),
                   host=environ.get(HOST, ""), coordinator_bind=environ.get(COORDINATOR_BIND, ""),
                   generation=generation)


#: torchrun's variables, which scripts (and libraries) read for their place in the job.
TORCHRUN_RANK, WORLD_SIZE = "RANK", "WORLD_SIZE"
LOCAL_RANK, LOCAL_WORLD_SIZE = "LOCAL_RANK", "LOCAL_WORLD_SIZE"


def local_rank(environ: Optional[Mapping[str, str]] = None) -> int:
    """This worker's index among its node's workers (``LOCAL_RANK``, which every launcher
    sets, as torchrun does); 0 outside a launcher."""
    environ = process_environ() if environ is None else environ
    value = environ.get(LOCAL_RANK, "").strip() or "0"
    try:
        index = int(value)
    except ValueError:
        index = -1
    if index < 0:
        raise TesseraError(f"{LOCAL_RANK}={environ.get(LOCAL_RANK)!r} is not a worker's index "
                           f"on its node (0, 1, ...): unset it, or let the launcher set it")
    return index


def role_env(role: str, rank: int, num_workers: int = 0,
             local: Optional[tuple[int, int]] = None) -> dict[str, str]:
    """What tells one child of a launcher its role and rank. A worker also gets
    torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``
    (``local``: its index among this node's workers, and their count; default: one
    node)."""
    env = {ROLE: role, RANK: str(rank)}
    if role == "worker" and num_workers:
        local_rank, local_world = local if local is not None else (rank, num_workers)
        env.update({TORCHRUN_RANK: str(rank), WORLD_SIZE: str(num_workers),
                    LOCAL_RANK: str(local_rank), LOCAL_WORLD_SIZE: str(local_world)})
    return env


def rank_label(environ: Mapping[str, str], name: str) -> str:
    """``server 1`` from the environment, without requiring the rest (error labels)."""
    return f"{name} {environ.get(RANK, '')}".strip()


def without(environ: Mapping[str, str], *names: str) -> dict[str, str]:
    """A copy of ``environ`` less ``names``."""
    return {k: v for k, v in environ.items() if k not in names}


def actor_base(environ: Mapping[str, str]) -> dict[str, str]:
    """A Ray actor's own environment less what the driver decides: Ray sets
    ``OMP_NUM_THREADS=1`` in actors (children get the driver's choice), and
    ``TESSERA_*`` comes only from the driver."""
    return {k: v for k, v in environ.items()
            if k != OMP_NUM_THREADS and not k.startswith(PREFIX)}


def passed_through(environ: Mapping[str, str]) -> dict[str, str]:
    """Variables the driver forwards to children it does not start itself (Ray actors)."""
    return {OMP_NUM_THREADS: environ[OMP_NUM_THREADS]} if OMP_NUM_THREADS in environ else {}


def ray_address(environ: Mapping[str, str]) -> str:
    """The Ray cluster ``ray.init`` would join on its own (``RAY_ADDRESS``), or ''."""
    return environ.get(RAY_ADDRESS, "")


# ------------------------------------------------------------------ GPUs


def cuda_visible_devices(environ: Mapping[str, str]) -> Optional[list[str]]:
    """The ``CUDA_VISIBLE_DEVICES`` list (``[]``: none, as ``-1`` says), or None if unset."""
    if CUDA_VISIBLE_DEVICES not in environ:
        return None
    listed = [d.strip() for d in environ[CUDA_VISIBLE_DEVICES].split(",") if d.strip()]
    if any(d.startswith("-") for d in listed):  # "-1": CUDA's way to say none
        return []
    return listed


def gpu_env(local_index: int, gpus: list[str]) -> dict[str, str]:
    """Environment giving this node's ``local_index``-th worker one GPU (round robin)."""
    if not gpus:
        return {}
    return {CUDA_VISIBLE_DEVICES: gpus[local_index % len(gpus)]}


# ------------------------------------------------------------------ collectives

#: The network interface Gloo binds its listener to and advertises (a comma list).
GLOO_SOCKET_IFNAME = "GLOO_SOCKET_IFNAME"
#: NCCL's bootstrap and socket transport interface (``=name``: that name exactly).
NCCL_SOCKET_IFNAME = "NCCL_SOCKET_IFNAME"


def pin_collectives(interface: str) -> dict[str, str]:
    """Make this process's Gloo and NCCL groups bind and connect on ``interface`` only
    (the one holding the node's address: see :mod:`tessera.parallel.rendezvous`).
    Returns the values it replaced that named something else (for the log)."""
    want = {GLOO_SOCKET_IFNAME: interface, NCCL_SOCKET_IFNAME: f"={interface}"}
    environ = os.environ
    replaced = {k: environ[k] for k, v in want.items() if environ.get(k, v) != v}
    environ.update(want)
    return replaced


# ------------------------------------------------------------------ tessera node


def node_coordinator(environ: Mapping[str, str]) -> Optional[str]:
    """``tessera node``'s coordinator from the environment: TESSERA_COORDINATOR, else
    MASTER_ADDR:MASTER_PORT; None when neither is set."""
    found = next((environ[n] for n in NODE_COORDINATOR if environ.get(n, "").strip()), None)
    if found is not None:
        return found
    addr, port = environ.get(MASTER_ADDR, "").strip(), environ.get(MASTER_PORT, "").strip()
    if addr and port:
        return f"{addr}:{port}"
    if addr or port:
        missing = MASTER_PORT if addr else MASTER_ADDR
        raise EnvError(f"--coordinator: {MASTER_ADDR} and {MASTER_PORT} go together; "
                       f"{missing} is not set (or pass --coordinator HOST:PORT)")
    return None


def first_int(flag: str, names: tuple[str, ...],
              environ: Mapping[str, str]) -> tuple[Optional[int], str]:
    """The first of ``names`` set, as an int, with how to name it in an error
    (``--nodes (SLURM_NNODES=4)``); (None, flag) when none is set."""
    for name in names:
        text = environ.get(name, "").strip()
        if text:
            try:
                return int(text), f"{flag} ({name}={text})"
            except ValueError:
                raise EnvError(f"{flag}: {name}={text!r} in the environment is not an "
                               f"integer") from None
    return None, flag


def node_secret(environ: Mapping[str, str]) -> str:
    """The job's secret every node holds in TESSERA_SECRET; '' when unset."""
    return environ.get(SECRET, "").strip()


def launched(environ: Mapping[str, str]) -> bool:
    """Whether a launcher started this process: any of its identity variables is set
    (part of them set is a broken launch, which :meth:`Identity.from_env` names)."""
    return any(environ.get(v) for v in REQUIRED)


def use_forkserver(environ: Mapping[str, str]) -> bool:
    """Whether a local launcher starts its processes as forks of one fork server
    (:mod:`tessera.launch.forkserver`; ``TESSERA_FORKSERVER=0`` starts each afresh)."""
    return environ.get(FORKSERVER, "1").strip().lower() not in ("0", "false", "no")


def forbid_pickle(environ: Mapping[str, str]) -> bool:
    """Whether this process must run under the no-pickle guard (``TESSERA_FORBID_PICKLE``
    set to anything but '', 0, false or no)."""
    return environ.get(FORBID_PICKLE, "").strip().lower() not in ("", "0", "false", "no")


def started_at(environ: Mapping[str, str]) -> float:
    """When the launcher started this process (unix time), or 0.0 if it did not say."""
    try:
        return float(environ.get(STARTED_AT, "") or 0.0)
    except ValueError:
        return 0.0


def adopt(environ: Mapping[str, str]) -> None:
    """A standby worker process becomes the worker it is handed: its whole environment
    is replaced by ``environ`` (as if it had been started with it)."""
    os.environ.clear()
    os.environ.update(environ)


def _int_var(environ: Mapping[str, str], name: str) -> int:
    """An integer variable a launcher sets (0 when unset); NotLaunched naming it otherwise."""
    text = environ.get(name, "0") or "0"
    try:
        return int(text)
    except ValueError:
        raise NotLaunched(f"{name}={text!r} is not an integer; start this process with a "
                          f"Tessera launcher") from None


def slow_server_ms(environ: Mapping[str, str], rank: int) -> tuple[float, bool]:
    """The delay TESSERA_SLOW_SERVER gives server ``rank`` (0: none), and whether it
    delays only table row requests (``RANK:MS:rows``)."""
    text = environ.get(SLOW_SERVER, "").strip()
    if not text:
        return 0.0, False
    who, _, rest = text.partition(":")
    ms, _, what = rest.partition(":")
    try:
        if what not in ("", "rows"):
            raise ValueError(what)
        return (float(ms) if int(who) == rank else 0.0), what == "rows"
    except ValueError:
        raise EnvError(f"{SLOW_SERVER}={text!r} must be RANK:MS (server RANK sleeps MS "
                       f"per partition or table of each request) or RANK:MS:rows (only "
                       f"table row requests)") from None


def process_environ() -> Mapping[str, str]:
    """This process's environment: the only place Tessera touches ``os.environ``."""
    return os.environ
