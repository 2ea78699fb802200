"""Liveness: every process heartbeats the coordinator; failures become exceptions.

A :class:`Heartbeat` thread owns its own socket to the coordinator. Every
``interval`` it says "alive"; the coordinator answers with the job's state:
``running``, ``shutdown`` (work done: exit cleanly) or ``failed`` with the
reason (which process died, and how it was noticed). Silence from the
coordinator for ``timeout`` seconds is itself a failure.

Code that waits (a server's loop, a worker waiting for a push reply) calls
:meth:`Heartbeat.check` between 100 ms slices: a failure anywhere in the
cluster surfaces as :class:`ClusterFailure` within about ``timeout`` seconds
instead of a hang (pytorch/pytorch#46874 is what we avoid).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import zmq

from tessera.errors import TesseraError
from tessera.transport import wire
from tessera.transport.endpoint import ClientEndpoint, TransportError


class ClusterFailure(TesseraError):
    """Another process of the job failed; the message names it."""


class Heartbeat:
    def __init__(self, ctx: zmq.Context, coordinator: str, secret: str, role: str, rank: int,
                 *, interval_s: float, timeout_s: float):
        self._ep = ClientEndpoint(ctx, coordinator, secret, "coordinator", sndtimeo_s=timeout_s)
        self.role, self.rank = role, rank
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self._failure = ""
        #: What this process reports: a worker's completed clock, a server's lowest.
        self.clock = -1
        #: Servers: seconds spent serving so far, and the part of them serving table
        #: rows, read once a heartbeat (the coordinator's rebalancing uses them).
        self.busy_s: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0)
        #: Elastic servers: partitions this server is to move (partition -> server).
        self.moves: dict[int, int] = {}
        #: Elastic servers: (server rank -> address, servers told to exit), one heartbeat's.
        self.elastic_view: tuple[dict[int, str], list[int]] = ({}, [])
        #: The coordinator's latest word on membership and checkpoints.
        self.departed: dict[int, int] = {}
        self.dead_servers: list[int] = []
        #: (dead servers, replaced servers -> times, moved partitions -> owner): one
        #: tuple, replaced at once, so a reader never mixes two heartbeats' word.
        self.server_view: tuple[list[int], dict[int, int], dict[int, int]] = ([], {}, {})
        #: Workers that have sent their final report.
        self.finished: list[int] = []
        self.checkpoint_requested = False
        self._shutdown = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{role}{rank}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_ack = time.monotonic()
        parent = os.getppid()
        try:
            while not self._stop.is_set():
                if os.getppid() != parent:
                    # The launcher died (even by SIGKILL): nobody will clean up after us.
                    self._failure = f"the launcher (pid {parent}) is gone"
                    return
                req = self._ep.new_req()
                busy_s, table_busy_s = self.busy_s()
                try:
                    self._ep.send(wire.Heartbeat(req=req, role=self.role, rank=self.rank,
                                                 clock=self.clock, busy_s=busy_s,
                                                 table_busy_s=table_busy_s))
                    msg, _ = self._ep.wait(req, self.interval_s * 2, "heartbeat")
                except TransportError:
                    if time.monotonic() - last_ack > self.timeout_s:
                        self._failure = (f"the coordinator ({self._ep.address}) has not answered "
                                         f"heartbeats for {time.monotonic() - last_ack:.1f} s")
                        return
                    continue
                last_ack = time.monotonic()
                if isinstance(msg, wire.HeartbeatAck):
                    self.departed = msg.departed
                    self.server_view = (msg.dead_servers, msg.server_lives, msg.owners)
                    self.dead_servers = msg.dead_servers
                    self.moves = msg.moves
                    self.elastic_view = (msg.addresses, msg.retired)
                    self.finished = msg.finished
                    self.checkpoint_requested = msg.checkpoint
                    if msg.state == "failed":
                        self._failure = msg.reason or "the coordinator declared the job failed"
                        return
                    if msg.state == "shutdown":
                        self._shutdown.set()
                self._stop.wait(self.interval_s)
        finally:
            self._ep.close()

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown.is_set()

    def membership(self) -> tuple[dict[int, int], list[int]]:
        """(departed workers -> incarnation, dead servers), as last heard (the dead servers
        of :meth:`servers`: a server that came back is never read as dead again)."""
        return self.departed, self.server_view[0]

    def servers(self) -> tuple[list[int], dict[int, int], dict[int, int]]:
        """(dead servers, replaced servers -> times, moved partitions -> owner), as last
        heard, from one heartbeat."""
        return self.server_view

    def check(self) -> None:
        """Raise :class:`ClusterFailure` if the cluster has failed."""
        if self._failure:
            raise ClusterFailure(self._failure)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s * 4 + 1)
