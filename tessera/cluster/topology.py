"""Who is who in a running job: one frozen object, built once per process.

A process learns the job's shape in two steps. Its launcher tells it its role
and rank (:mod:`tessera.config.env`); the coordinator's answer to its
registration (:class:`~tessera.transport.wire.ClusterView`) tells it the rest:
the shard map cut over the servers, every server's address, and with
replication which server backs which up. :class:`Topology` holds all of it, and
:class:`~tessera.cluster.session.Session` builds it right after registration
(``session.topology``). Code below the session takes the narrowest part it
needs (a shard map, a list of addresses), never the session or the config
(STYLE 5; torchtitan's ``ParallelDims`` is the model).

Replication (``ps.replication = 2``, more than one server) is a ring: server
``s`` keeps the backup copy of server ``s - 1``'s partitions and forwards its
own updates to server ``s + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tessera.config.schema import JobConfig
from tessera.ps.sharding import ShardMap
from tessera.transport import wire


@dataclass(frozen=True)
class Topology:
    role: str
    rank: int
    num_workers: int
    num_servers: int
    #: The address this process binds and publishes (``cluster.host``, or its node's).
    host: str
    shard_map: ShardMap
    #: Server ``s``'s address is ``server_addresses[s]``.
    server_addresses: tuple[str, ...]
    #: Every partition has a backup on the next server of the ring.
    replicated: bool
    #: How many times this rank has (re)joined the job: 0 for the first start.
    incarnation: int = 0

    @classmethod
    def from_view(cls, view: wire.ClusterView, *, role: str, rank: int,
                  cfg: JobConfig) -> "Topology":
        cl = cfg.cluster
        servers = sorted((p for p in view.processes if p.role == "server"), key=lambda p: p.rank)
        return cls(role=role, rank=rank, num_workers=cl.workers, num_servers=cl.servers,
                   host=cl.host,
                   shard_map=ShardMap(layout=tuple(view.layout),
                                      partitions=tuple(view.partitions),
                                      num_servers=cl.servers),
                   server_addresses=tuple(p.address for p in servers),
                   replicated=cfg.ps.replication == 2 and cl.servers > 1,
                   incarnation=view.incarnation)

    @property
    def backup_server(self) -> int:
        """The server that keeps the backup of this server's partitions (-1: none)."""
        return (self.rank + 1) % self.num_servers if self.replicated else -1

    @property
    def primary_of_backups(self) -> int:
        """The server whose partitions this server backs up (-1: none)."""
        return (self.rank - 1) % self.num_servers if self.replicated else -1
