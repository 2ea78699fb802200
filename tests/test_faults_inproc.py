"""Tier 2: fault handling of the parameter servers on real sockets, in threads.

Retried pushes applied exactly once, sync clocks that go on without a departed
worker and take a restarted one back at a future clock, and replication: the
backup's copy stays bit-identical to the primary's, and after the primary stops
the clients fail over and training continues with nothing lost. The oracle is
``torch.optim`` on the unsplit parameters (``Reference``).
"""

from __future__ import annotations

import threading
import traceback

import pytest
import torch
import zmq

from tessera.config.schema import OptimizerConfig
from tessera.parallel.flat import param_layout
from tessera.ps.client import PSClient
from tessera.ps.server import ParameterServer, Replicas, ServerHooks, ServerOptions
from tessera.ps.sharding import plan_shards
from tessera.transport import wire
from tessera.transport.endpoint import PeerTimeout, ServerEndpoint, close_context
from tests.test_server_inproc import (SECRET, TIMEOUT_S, Reference, assemble, flat_of,
                                      small_model)


class Membership:
    """What the coordinator's heartbeat replies would say, set by the test."""

    def __init__(self):
        self.departed: dict[int, int] = {}
        self.dead: list[int] = []

    def __call__(self):
        return dict(self.departed), list(self.dead)


class Cluster:
    def __init__(self, *, mode: str, num_workers: int, optimizer: OptimizerConfig,
                 num_servers: int = 2, partition_elems: int = 26, replication: int = 1):
        self.model = small_model(0)
        self.ctx = zmq.Context()
        self.shard_map = plan_shards(param_layout(self.model), num_servers, partition_elems)
        self.membership = Membership()
        self.failures: list[str] = []
        self.stops = [threading.Event() for _ in range(num_servers)]
        self.endpoints = [ServerEndpoint(self.ctx, "127.0.0.1", SECRET) for _ in range(num_servers)]
        self.peers = []
        self.servers = []
        for rank in range(num_servers):
            backup_peer, primary = None, -1
            backups = []
            if replication == 2:
                from tessera.transport.endpoint import ClientEndpoint
                nxt = (rank + 1) % num_servers
                backup_peer = ClientEndpoint(self.ctx, self.endpoints[nxt].address, SECRET,
                                             f"server {nxt}", sndtimeo_s=TIMEOUT_S)
                self.peers.append(backup_peer)
                primary = (rank - 1) % num_servers
                backups = self.shard_map.on_server(primary)
            self.servers.append(ParameterServer(
                ServerOptions(rank=rank, num_workers=num_workers, num_servers=num_servers,
                              mode=mode, timeout_s=TIMEOUT_S),
                endpoint=self.endpoints[rank], partitions=self.shard_map.on_server(rank),
                optimizer=optimizer,
                hooks=ServerHooks(should_stop=self.stops[rank].is_set, membership=self.membership),
                replicas=Replicas(backups=tuple(backups), peer=backup_peer, primary=primary)))
        self.threads = [threading.Thread(target=self._serve, args=(ps,), daemon=True)
                        for ps in self.servers]
        for t in self.threads:
            t.start()
        self.clients = [self._client(w) for w in range(num_workers)]
        self.clients[0].init_params(flat_of(self.model))

    def _serve(self, ps):
        try:
            ps.serve()
        except BaseException:  # noqa: BLE001 - reported through check()
            self.failures.append(f"server {ps.rank} crashed:\n{traceback.format_exc()}")

    def check(self):
        if self.failures:
            raise AssertionError("\n".join(self.failures))

    def _client(self, worker: int, incarnation: int = 0) -> PSClient:
        c = PSClient(ctx=self.ctx, shard_map=self.shard_map,
                     server_addresses=[ep.address for ep in self.endpoints], secret=SECRET,
                     worker=worker, timeout_s=TIMEOUT_S, check=self.check,
                     incarnation=incarnation, dead_servers=lambda: self.membership.dead)
        c.connect()
        return c

    def push_all(self, client: PSClient, grad: torch.Tensor, clock: int):
        return [client.push(p.id, grad[p.start:p.stop], clock) for p in self.shard_map.partitions]

    def close(self):
        for s in self.stops:
            s.set()
        for t in self.threads:
            t.join(timeout=5)
        for c in self.clients:
            c.close()
        for ep in self.peers + self.endpoints:
            ep.close()
        close_context(self.ctx)
        self.check()


@pytest.fixture
def cluster():
    made = []

    def make(**kwargs):
        made.append(Cluster(**kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


def values_of(handles) -> dict:
    out = {}
    for h in handles:
        out.update(h.wait())
    return out


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_retried_push_is_applied_exactly_once(cluster, mode):
    c = cluster(mode=mode, num_workers=1, optimizer=OptimizerConfig(name="sgd", lr=0.1,
                                                                    momentum=0.9))
    ref = Reference(c.model, OptimizerConfig(name="sgd", lr=0.1, momentum=0.9))
    client = c.clients[0]
    g = torch.linspace(-1, 1, c.shard_map.total_elems)
    first = values_of(c.push_all(client, g, 0))
    ref.step(g)
    # The same pushes again, same (worker, seq), as a client retrying after a lost reply.
    ep = client.servers[0]
    part = c.shard_map.on_server(0)[0]
    retry = wire.Push(req=ep.new_req(), worker=0, seq=1, clock=0, partitions=[part.id])
    from tessera.transport.frames import tensor_to_frame
    reply, frames = ep.request(retry, [tensor_to_frame(g[part.start:part.stop].contiguous())],
                               timeout_s=TIMEOUT_S)
    assert isinstance(reply, wire.Params), reply
    updates = sum(ps.stats["updates"] for ps in c.servers)
    assert updates == len(c.shard_map.partitions)  # one update per partition, not two
    torch.testing.assert_close(assemble(c.shard_map, first), ref.flat())
    after = {}
    for h in client.pull(clock=1 if mode == "sync" else 0):
        after.update(h.wait())
    torch.testing.assert_close(assemble(c.shard_map, after), ref.flat(), rtol=0, atol=0)


def test_sync_goes_on_without_a_departed_worker_and_takes_it_back(cluster):
    cfg = OptimizerConfig(name="sgd", lr=0.1)
    c = cluster(mode="sync", num_workers=2, optimizer=cfg)
    ref = Reference(c.model, cfg)
    w0, w1 = c.clients
    n = c.shard_map.total_elems
    g0, g1 = torch.full((n,), 1.0), torch.full((n,), 3.0)
    # Clock 0 with both workers.
    h0, h1 = c.push_all(w0, g0, 0), c.push_all(w1, g1, 0)
    values_of(h0), values_of(h1)
    ref.step((g0 + g1) / 2)
    # Clock 1: worker 0 pushed, worker 1 dies before pushing; the clock waits ...
    pending = c.push_all(w0, g0, 1)
    with pytest.raises(PeerTimeout):
        pending[0].wait(timeout_s=0.3)
    # ... until the coordinator declares it departed: then it completes with worker 0 alone.
    c.membership.departed = {1: 0}
    got = values_of(pending)
    ref.step(g0)
    torch.testing.assert_close(assemble(c.shard_map, got), ref.flat())
    assert sum(ps.stats["short_clocks"] for ps in c.servers) == len(c.shard_map.partitions)
    # Worker 1 restarts (incarnation 1) and joins at clock 3: the answer waits for clock 3.
    new = c._client(1, incarnation=1)
    c.clients.append(new)
    joins = new.join(3, incarnation=1)
    with pytest.raises(PeerTimeout):
        joins[0].wait(timeout_s=0.3)
    values_of(c.push_all(w0, g0, 2))  # clock 2: worker 0 alone (not yet counted)
    ref.step(g0)
    joined = values_of(joins)
    torch.testing.assert_close(assemble(c.shard_map, joined), ref.flat())
    # Clock 3 waits for both again; sequence numbers of the new life start above the old.
    assert new.seq >= 1 << 40
    pending = c.push_all(w0, g0, 3)
    with pytest.raises(PeerTimeout):
        pending[0].wait(timeout_s=0.3)
    values_of(c.push_all(new, g1, 3))
    got = values_of(pending)
    ref.step((g0 + g1) / 2)
    torch.testing.assert_close(assemble(c.shard_map, got), ref.flat())
    # A join at a clock already passed is refused, naming the clock.
    from tessera.ps.client import ServerError
    with pytest.raises(ServerError, match="too late"):
        values_of(new.join(1, incarnation=1))


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("opt", [OptimizerConfig(name="sgd", lr=0.1, momentum=0.9),
                                 OptimizerConfig(name="adam", lr=0.01)], ids=["sgd", "adam"])
def test_replicas_stay_identical_and_failover_loses_nothing(cluster, mode, opt):
    c = cluster(mode=mode, num_workers=2, optimizer=opt, replication=2)
    ref = Reference(c.model, opt)
    gen = torch.Generator().manual_seed(3)
    n = c.shard_map.total_elems
    acked = 0

    def step(clock: int) -> dict:
        nonlocal acked
        grads = [torch.randn(n, generator=gen) for _ in c.clients]
        got = {}
        if mode == "sync":  # both in flight: the clock needs both
            handles = [c.push_all(w, g, clock) for w, g in zip(c.clients, grads)]
        else:  # one after the other, so the order of updates is the reference's
            handles = []
            for w, g in zip(c.clients, grads):
                handles.append(c.push_all(w, g, clock))
                got.update(values_of(handles[-1]))
        for hs in handles:
            got.update(values_of(hs))
            acked += len(hs)
        if mode == "sync":
            ref.step(sum(grads) / len(grads))
        else:
            for g in grads:
                ref.step(g / len(grads))
        return got

    for clock in range(3):
        step(clock)
    # Every partition's backup copy is bit-identical to its primary (values and state),
    # once the backups acked what was forwarded (an async push is answered once the
    # updates before its own are acked).
    from tests.harness import wait_for
    wait_for(lambda: not any(ps.replication.pending() for ps in c.servers), TIMEOUT_S,
             "the backups' acks")
    for rank, ps in enumerate(c.servers):
        backup = c.servers[(rank + 1) % 2].backups
        for pid, st in ps.parts.items():
            torch.testing.assert_close(backup[pid].rule.master, st.rule.master, rtol=0, atol=0)
            for k, v in st.rule.state_tensors().items():
                torch.testing.assert_close(backup[pid].rule.state_tensors()[k], v, rtol=0, atol=0)
    # Server 0 stops serving; the coordinator declares it dead; clients fail over.
    c.stops[0].set()
    c.threads[0].join(timeout=5)
    c.membership.dead = [0]
    for clock in range(3, 6):
        got = step(clock)
    torch.testing.assert_close(assemble(c.shard_map, got), ref.flat(), rtol=1e-6, atol=1e-6)
    survivor = c.servers[1]
    assert sorted(survivor.parts) == [p.id for p in c.shard_map.partitions]
    applied = sum(st.applied_pushes for st in survivor.parts.values())
    assert applied == acked == 6 * 2 * len(c.shard_map.partitions)
