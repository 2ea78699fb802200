"""How a parameter server is configured: its options and the hooks into its process.

:class:`ServerOptions` is the typed, frozen configuration of one server, filled by
``tessera.cluster.role.server_main`` from the job config (the one source of truth);
cross-field checks raise ``ValueError`` here, before any socket is opened.
:class:`ServerHooks` are the few callables a server needs from the process around
it (the session in a real job, a test's events in-process), with plain defaults so
that a server runs alone in a test exactly as it does in a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tessera.ps.consistency import MODES


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """How one parameter server behaves (filled from the job config by the role)."""

    #: This server's index in the shard map.
    rank: int
    #: Workers in the job (the sync mean's denominator; async/ssp scale by 1/this).
    num_workers: int
    #: Servers in the job (who backs up whom; table row ownership).
    num_servers: int = 1
    #: Consistency: "sync", "async" or "ssp" (see tessera.ps.consistency).
    mode: str = "sync"
    #: ssp: how many clocks a worker may run ahead of the slowest.
    staleness: int = 0
    #: Loss scaling: answer complete sync clocks with a verdict, apply on commit.
    two_phase: bool = False
    #: Sync: held clocks (loss scaling, clipping) are decided among the servers, from
    #: each other's verdicts (tessera.ps.agreement), not by the workers' commits.
    agree: bool = False
    #: Seconds to wait for a backup's Ack (and for checkpoint writes at the end).
    timeout_s: float = 30.0
    #: Sync: snapshot every this many clocks (0: only when a push asks).
    checkpoint_every: int = 0
    #: Measure each request's CPU by phase (tessera.ps.server_profile.MessageCosts);
    #: ``stats["cpu_us_per_msg"]`` holds it at the end (benchmarks print it).
    cost_breakdown: bool = False
    #: Benchmarks and tests only (TESSERA_SLOW_SERVER): sleep this many ms per partition
    #: a push or pull names and per table a row request names, a server made hot on
    #: purpose (benchmarks/elastic.py); ``slow_rows_only``: row requests only.
    slow_ms: float = 0.0
    slow_rows_only: bool = False
    #: Started mid-job by ``tessera scale``: no table rows hash to it (or they are served
    #: elsewhere): it holds no shard of its own, only those moved to it.
    scaled_in: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"server mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.num_workers < 1 or self.num_servers < 1:
            raise ValueError(f"a job needs at least one worker and one server, got "
                             f"num_workers={self.num_workers}, num_servers={self.num_servers}")
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")


@dataclass(frozen=True)
class ServerHooks:
    """What a server asks of the process around it (the session, or a test)."""

    #: Raises when the cluster has failed.
    check: Callable[[], None] = lambda: None
    should_stop: Callable[[], bool] = lambda: False
    #: The coordinator's latest word: ({worker: incarnation} departed, [dead servers]).
    membership: Callable[[], tuple[dict, list]] = lambda: ({}, [])
    #: The workers that sent their final report (``tessera.finish()``): sync clocks and
    #: ssp's slowest count stop waiting for them (uneven inputs: one ran out first).
    finished: Callable[[], list] = lambda: []
    #: (dead servers, replaced servers -> times, moved partitions -> owner), from one
    #: heartbeat: a replaced server joins again as a backup (Replicator.follow_lives).
    servers: Callable[[], tuple[list, dict, dict]] = lambda: ([], {}, {})
    #: A checkpoint file was written: (clock, file, bytes, the dense partitions in it).
    on_checkpoint: Callable[[int, str, int, list], None] = lambda *a: None
    #: Elastic servers (tessera.ps.elastic): the coordinator's move orders (partition ->
    #: server), and the report that a move is done (target, partitions).
    moves: Callable[[], dict] = lambda: {}
    report_moved: Callable[[int, list], None] = lambda target, pids: None
    #: Elastic servers: server rank -> address, once a server was started mid-job.
    addresses: Callable[[], dict] = lambda: {}
    #: Elastic servers: the ranks scaled away (their processes exit).
    retired: Callable[[], list] = lambda: []
