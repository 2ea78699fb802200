"""Tier 2: parameter servers on real ZeroMQ sockets, in threads of this process.

Each test starts servers (``ParameterServer.serve`` in a daemon thread, bound to
127.0.0.1 on a port the OS picks) and talks to them with the real client. The
oracle is ``torch.optim`` stepping the unsplit parameters on one process.
"""

from __future__ import annotations

import copy
import threading
import time
import traceback

import pytest
import torch
import torch.nn.functional as F
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from tessera.config.schema import OptimizerConfig
from tessera.ps.optim import spec_from_config
from tessera.parallel.flat import param_layout
from tessera.parallel.ps import PSDataParallel
from tessera.ps.client import PSClient, ServerError
from tessera.ps.optim import ELEMENTWISE, torch_optimizer
from tessera.ps.server import ParameterServer, Replicas, ServerHooks, ServerOptions
from tessera.ps.sharding import ShardMap, plan_shards
from tessera.transport import wire
from tessera.transport.endpoint import (AuthRefused, ClientEndpoint, PeerTimeout, ServerEndpoint,
                                        TransportError, close_context)

SECRET = "test-secret-7f3a"
#: Only failing tests ever wait this long; generous because the machine may be busy.
TIMEOUT_S = 10.0


@pytest.fixture(scope="module", autouse=True)
def _import_torch_optim_once():
    """The first torch.optim optimizer of a process costs ~2 s of lazy imports; pay it
    here, not inside a server thread while a client's timeout runs."""
    p = torch.nn.Parameter(torch.zeros(1))
    for cls in ELEMENTWISE.values():
        p.grad = torch.ones(1)
        cls([p], lr=0.1, foreach=False).step()


class InprocCluster:
    """Parameter servers serving from threads of this process, on loopback."""

    def __init__(self, layout: list[wire.ParamSpec], *, num_servers: int, partition_elems: int,
                 mode: str, num_workers: int, optimizer: OptimizerConfig, agree: bool = False,
                 two_phase: bool = False):
        self.ctx = zmq.Context()
        self.shard_map: ShardMap = plan_shards(layout, num_servers, partition_elems)
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.servers: list[ParameterServer] = []
        self.threads: list[threading.Thread] = []
        self.server_endpoints: list[ServerEndpoint] = []
        self.endpoints: list = []  # client side, closed at teardown
        #: The coordinator's word on dead workers ({worker: incarnation}), as a test sets it.
        self.departed: dict[int, int] = {}
        for rank in range(num_servers):
            ep = ServerEndpoint(self.ctx, "127.0.0.1", SECRET)
            ps = ParameterServer(ServerOptions(rank=rank, num_workers=num_workers,
                                               num_servers=num_servers, mode=mode, agree=agree,
                                               two_phase=two_phase),
                                 endpoint=ep, partitions=self.shard_map.on_server(rank),
                                 optimizer=optimizer,
                                 hooks=ServerHooks(should_stop=self.stop.is_set,
                                                   membership=lambda: (dict(self.departed), [])),
                                 replicas=Replicas(partitions=tuple(self.shard_map.partitions),
                                                   connect=self._peer))
            self.servers.append(ps)
            self.server_endpoints.append(ep)
        for ps in self.servers:
            t = threading.Thread(target=self._serve, args=(ps,), name=f"server-{ps.rank}",
                                 daemon=True)
            t.start()
            self.threads.append(t)

    def _peer(self, rank: int) -> ClientEndpoint:
        """A server's endpoint to server ``rank`` (what the role's connect_server gives)."""
        ep = ClientEndpoint(self.ctx, self.addresses[rank], SECRET, f"server {rank}",
                            sndtimeo_s=TIMEOUT_S)
        ep.wait_connected(TIMEOUT_S, self.check)
        self.endpoints.append(ep)
        return ep

    @property
    def addresses(self) -> list[str]:
        return [ep.address for ep in self.server_endpoints]

    def _serve(self, ps: ParameterServer) -> None:
        try:
            ps.serve()
        except BaseException:  # noqa: BLE001 - reported to the test through check()
            self.failures.append(f"server {ps.rank} crashed:\n{traceback.format_exc()}")

    def check(self) -> None:
        """Passed to clients: a crashed server fails the test at once, not after a timeout."""
        if self.failures:
            raise AssertionError("\n".join(self.failures))

    def client(self, worker: int) -> PSClient:
        c = PSClient(ctx=self.ctx, shard_map=self.shard_map, server_addresses=self.addresses,
                     secret=SECRET, worker=worker, timeout_s=TIMEOUT_S, check=self.check)
        self.endpoints.extend(c.servers)
        c.connect()
        return c

    def raw(self, server: int, secret: str = SECRET) -> ClientEndpoint:
        ep = ClientEndpoint(self.ctx, self.addresses[server], secret, f"server {server}",
                            sndtimeo_s=TIMEOUT_S)
        self.endpoints.append(ep)
        return ep

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)
        alive = [t.name for t in self.threads if t.is_alive()]
        for ep in self.endpoints + self.server_endpoints:
            ep.close()
        close_context(self.ctx)
        assert not alive, f"{alive} did not stop within 5 s of should_stop"
        self.check()


@pytest.fixture
def make_cluster():
    made: list[InprocCluster] = []

    def make(layout, **kwargs) -> InprocCluster:
        cluster = InprocCluster(layout, **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4))  # 103 elements


def flat_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


class Reference:
    """``torch.optim`` on the unsplit parameters, fed flat gradients."""

    def __init__(self, model: nn.Module, cfg: OptimizerConfig):
        self.params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        self.opt = torch_optimizer(cfg, self.params)

    def step(self, flat_grad: torch.Tensor) -> None:
        off = 0
        for p in self.params:
            p.grad = flat_grad[off:off + p.numel()].reshape(p.shape).clone()
            off += p.numel()
        self.opt.step()

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])


def assemble(shard_map: ShardMap, values: dict[int, torch.Tensor]) -> torch.Tensor:
    """The flat vector from ``{partition id: values}`` covering every partition."""
    assert sorted(values) == [p.id for p in shard_map.partitions]
    return torch.cat([values[p.id] for p in shard_map.partitions])


def pull_all(client: PSClient, clock: int = 0) -> torch.Tensor:
    values: dict[int, torch.Tensor] = {}
    for h in client.pull(clock=clock):
        values.update(h.wait())
    return assemble(client.shard_map, values)


OPTIMIZERS = {
    "sgd-nesterov": OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True,
                                    weight_decay=1e-3),
    "adam": OptimizerConfig(name="adam", lr=0.01),
    "adamw": OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.01),
    "adagrad": OptimizerConfig(name="adagrad", lr=0.1),
}


def start(make_cluster, *, mode: str, num_workers: int, optimizer: OptimizerConfig,
          num_servers: int = 2, partition_elems: int = 17, seed: int = 0, agree: bool = False,
          two_phase: bool = False):
    model = small_model(seed)
    cluster = make_cluster(param_layout(model), num_servers=num_servers,
                           partition_elems=partition_elems, mode=mode, num_workers=num_workers,
                           optimizer=optimizer, agree=agree, two_phase=two_phase)
    clients = [cluster.client(w) for w in range(num_workers)]
    clients[0].init_params(flat_of(model))
    return model, cluster, clients


# --------------------------------------------------------- a. sync == torch


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sync_updates_equal_torch_optim(make_cluster, name):
    cfg = OPTIMIZERS[name]
    model, cluster, (c0, c1) = start(make_cluster, mode="sync", num_workers=2, optimizer=cfg)
    smap = cluster.shard_map
    # The point of the test: tensors really are cut across partitions and servers.
    assert any(len(ids) > 1 for ids in smap.partitions_of_param())
    assert all(smap.on_server(s) for s in range(2))
    ref = Reference(model, cfg)
    torch.testing.assert_close(pull_all(c1), ref.flat(), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(1)
    for clock in range(5):
        g0 = torch.randn(smap.total_elems, generator=gen)
        g1 = torch.randn(smap.total_elems, generator=gen)
        handles = []
        # Interleave the two workers' pushes partition by partition, in opposite orders.
        for p, q in zip(smap.partitions, reversed(smap.partitions)):
            handles.append(c0.push(p.id, g0[p.start:p.stop], clock))
            handles.append(c1.push(q.id, g1[q.start:q.stop], clock))
        got0, got1 = {}, {}
        for i, h in enumerate(handles):
            (got0 if i % 2 == 0 else got1).update(h.wait())
        ref.step((g0 + g1) / 2)
        expected = ref.flat()
        # Both workers receive the same new values: the update both pushes took part in.
        torch.testing.assert_close(assemble(smap, got0), expected)
        torch.testing.assert_close(assemble(smap, got1), assemble(smap, got0), rtol=0, atol=0)
    torch.testing.assert_close(pull_all(c0, clock=5), ref.flat())
    for ps in cluster.servers:
        assert ps.stats["updates"] == 5 * len(ps.parts)
        assert ps.stats["errors"] == 0
        assert all(part.clock == 5 for part in ps.parts.values())
        # Optimizer state lives on the servers, one flat slice per partition.
        for part in ps.parts.values():
            state = part.rule.state_tensors()
            assert state, f"{name}: no optimizer state on partition {part.info.id}"


def _frames_made_by_servers(cluster: InprocCluster, monkeypatch) -> list:
    """The zero-copy frames the cluster's server threads hand pyzmq's garbage collector
    from now on (each one an entry there and a wake of its thread when ZeroMQ is done)."""
    from zmq.utils.garbage import gc

    servers = set(cluster.threads)
    made = []
    real = gc.store

    def store(obj, event=None):
        if threading.current_thread() in servers:
            made.append(obj)
        return real(obj, event)

    monkeypatch.setattr(gc, "store", store)
    return made


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sync_replies_over_tcp_send_each_master_frame_made_once(make_cluster, monkeypatch,
                                                                dtype):
    """Sync replies are the master, zero-copy. Over TCP each partition's master goes as one
    ``zmq.Frame`` made once and sent again for every reply (pyzmq shares its message),
    not as a new zero-copy frame per reply, which cost an entry in pyzmq's garbage
    collector and a wake of its thread each. The replies still carry every clock's new
    values: the frame is the live master, never a stale copy. On a half-width wire the
    same holds for the one buffer the master is cast into (or the fused step writes)
    at each clock: before, a tracked frame per reply."""
    # 3 partitions of 128 KiB in the wire dtype: above pyzmq's copy size
    part = (1 << 15) if dtype == "float32" else (1 << 16)
    n = 3 * part
    cluster = make_cluster([wire.ParamSpec(name="w", shape=[n], numel=n)], num_servers=1,
                           partition_elems=part, mode="sync", num_workers=1,
                           optimizer=OptimizerConfig(name="sgd", lr=0.5))
    client = cluster.client(0)
    client.init_params(torch.zeros(n))
    made = _frames_made_by_servers(cluster, monkeypatch)
    grad, smap = torch.ones(n), cluster.shard_map
    assert len(smap.partitions) == 3
    for clock in range(6):
        got = {}
        for h in [client.push(p.id, grad[p.start:p.stop], clock, dtype=dtype)
                  for p in smap.partitions]:
            got.update({pid: t.to(torch.float32) for pid, t in h.wait().items()})
            h.release()
        torch.testing.assert_close(assemble(smap, got), torch.full((n,), -0.5 * (clock + 1)),
                                   rtol=0, atol=0)
    assert len(made) == 3, f"{len(made)} zero-copy frames made for 18 replies of 3 partitions"



@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_two_phase_replies_send_each_master_frame_made_once(make_cluster, monkeypatch, dtype):
    """The same under loss scaling (two-phase: held pushes answered with verdicts, the
    values sent to the pull that brings the decision): one frame per partition made
    once, not a tracked frame per reply (which woke pyzmq's collector thread for every
    reply: 4% of a core on each server of precision.py's fp16 CNN job)."""
    part = (1 << 15) if dtype == "float32" else (1 << 16)
    n = 3 * part
    cluster = make_cluster([wire.ParamSpec(name="w", shape=[n], numel=n)], num_servers=1,
                           partition_elems=part, mode="sync", num_workers=1,
                           optimizer=OptimizerConfig(name="sgd", lr=0.5), two_phase=True)
    client = cluster.client(0)
    client.init_params(torch.zeros(n))
    client.wire_dtype = dtype  # pushes and the pulls' replies
    made = _frames_made_by_servers(cluster, monkeypatch)
    grad, smap = torch.ones(n), cluster.shard_map
    for clock in range(6):
        for h in [client.push(p.id, grad[p.start:p.stop], clock, dtype=dtype)
                  for p in smap.partitions]:
            assert h.wait().finite
        got = {}
        for h in client.pull(clock=clock + 1, commit=True):
            got.update({pid: t.to(torch.float32) for pid, t in h.wait().items()})
            h.release()
        torch.testing.assert_close(assemble(smap, got), torch.full((n,), -0.5 * (clock + 1)),
                                   rtol=0, atol=0)
    assert len(made) == 3, f"{len(made)} zero-copy frames made for 6 replies of 3 partitions"

# -------------------------------------------------------- b. async == torch


@pytest.mark.parametrize("name", ["sgd-nesterov", "adam"])
def test_async_applies_each_push_scaled(make_cluster, name):
    cfg = OPTIMIZERS[name]
    model, cluster, clients = start(make_cluster, mode="async", num_workers=2, optimizer=cfg)
    smap = cluster.shard_map
    ref = Reference(model, cfg)
    gen = torch.Generator().manual_seed(2)
    for clock in range(3):
        for client in clients:
            g = torch.randn(smap.total_elems, generator=gen)
            got = {}
            for h in [client.push(p.id, g[p.start:p.stop], clock) for p in smap.partitions]:
                got.update(h.wait())
            # Applied at once, scaled by 1 / num_workers; the reply carries the result.
            ref.step(g / 2)
            torch.testing.assert_close(assemble(smap, got), ref.flat())
    # Async pulls never wait for a clock.
    torch.testing.assert_close(pull_all(clients[1], clock=1000), ref.flat())
    assert sum(ps.stats["updates"] for ps in cluster.servers) == 3 * 2 * len(smap.partitions)


def test_async_out_of_order_clocks_are_applied(make_cluster):
    cfg = OptimizerConfig(name="sgd", lr=0.5)
    model, cluster, (c0, c1) = start(make_cluster, mode="async", num_workers=2, optimizer=cfg,
                                     num_servers=1, partition_elems=1000)
    flat = flat_of(model)
    g = torch.ones(cluster.shard_map.total_elems)
    # A stale worker (clock 0) after a fast one (clock 7): both applied.
    c0.push(0, g, 7).wait()
    got = c1.push(0, g, 0).wait()
    torch.testing.assert_close(got[0], flat - 2 * 0.5 * 0.5 * g)


# ------------------------------------------------------ c. sync pull waits


def test_sync_pull_waits_for_every_worker(make_cluster):
    cfg = OptimizerConfig(name="sgd", lr=0.1)
    model, cluster, (c0, c1) = start(make_cluster, mode="sync", num_workers=2, optimizer=cfg)
    smap = cluster.shard_map
    flat = flat_of(model)
    g0 = torch.full((smap.total_elems,), 1.0)
    g1 = torch.full((smap.total_elems,), 3.0)
    pushes0 = [c0.push(p.id, g0[p.start:p.stop], 0) for p in smap.partitions]
    pulls = c1.pull(clock=1)
    early = c1.pull(clock=0)  # the current clock: answered at once
    torch.testing.assert_close(assemble(smap, {k: v for h in early for k, v in h.wait().items()}),
                               flat, rtol=0, atol=0)
    # Worker 1 has not pushed clock 0: neither the pull for clock 1 nor worker 0's
    # pushes can be answered yet.
    with pytest.raises(PeerTimeout):
        pulls[0].wait(timeout_s=0.3)
    with pytest.raises(PeerTimeout):
        pushes0[0].wait(timeout_s=0.05)
    for p in smap.partitions:
        c1.push(p.id, g1[p.start:p.stop], 0).wait()
    expected = flat - 0.1 * (g0 + g1) / 2
    got = {}
    for h in pulls:
        got.update(h.wait())
    torch.testing.assert_close(assemble(smap, got), expected)
    got = {}
    for h in pushes0:
        got.update(h.wait())
    torch.testing.assert_close(assemble(smap, got), expected)


def test_sync_push_refusals(make_cluster):
    cfg = OptimizerConfig(name="sgd", lr=0.1)
    model, cluster, (c0, c1) = start(make_cluster, mode="sync", num_workers=2, optimizer=cfg,
                                     num_servers=1, partition_elems=1000)
    g = torch.ones(cluster.shard_map.total_elems)
    first = c0.push(0, g, 0)
    with pytest.raises(ServerError, match="already pushed"):
        c0.push(0, g, 0).wait()
    with pytest.raises(ServerError, match="clock 3"):
        c1.push(0, g, 3).wait()
    c1.push(0, g, 0).wait()
    torch.testing.assert_close(first.wait()[0], flat_of(model) - 0.1 * g)


def test_optimizer_state_round_trips_and_a_bad_load_changes_nothing(make_cluster):
    """``optimizer.state_dict()``/``load_state_dict()``'s requests (tessera.ps.optim_state):
    each partition's Adam state comes back as the servers step it, a load sets it on every
    server, and a load with another class's names, a short frame or a partition not held
    is refused in one line with the state left as it was (a server checks all it is sent
    before it loads any: a good partition beside a bad one stays as it was too)."""
    cfg = OptimizerConfig(name="adam", lr=0.01)
    model, cluster, (c0,) = start(make_cluster, mode="sync", num_workers=1, optimizer=cfg)
    n = cluster.shard_map.total_elems
    for clock in range(2):
        g = torch.randn(n)
        for part in cluster.shard_map.partitions:
            c0.push(part.id, g[part.start:part.stop], clock).wait()
    state = c0.optim_state()
    assert set(state) == {p.id for p in cluster.shard_map.partitions}
    assert {p.server for p in cluster.shard_map.partitions} == {0, 1}
    assert all(sorted(s) == ["exp_avg", "exp_avg_sq", "step"] and float(s["step"]) == 2
               for s in state.values())
    pid = min(state)
    numel = state[pid]["exp_avg"].numel()
    owner = {p.id: p.server for p in cluster.shard_map.partitions}
    mate = next(p for p in state if p != pid and owner[p] == owner[pid])  # same server
    bad = [({pid: {"momentum_buffer": torch.zeros(numel)}}, "is not what the servers' Adam keeps"),
           ({pid: {**state[pid], "exp_avg": torch.zeros(numel - 1)}}, "bytes"),
           ({pid: state[pid], mate: {"exp_avg": torch.zeros(1)}}, "is not what the servers")]
    for states, says in bad:
        with pytest.raises(ServerError, match=says):
            c0.load_optim_state(states)
    after = c0.optim_state()
    for p in state:
        for key in state[p]:
            torch.testing.assert_close(after[p][key], state[p][key], rtol=0, atol=0)
    moved = {p: {k: v + 1 for k, v in s.items()} for p, s in state.items()}
    c0.load_optim_state(moved)
    got = c0.optim_state()
    for p in state:
        for key in state[p]:
            torch.testing.assert_close(got[p][key], moved[p][key], rtol=0, atol=0)


# -------------------------------------------------------- d. wrong secret


def settled(cluster, timeout_s: float = TIMEOUT_S) -> list[dict]:
    """Every server's stats and received-message count, once two reads 50 ms apart agree.
    (A server answers a request before it adds the time it took to ``busy_s``: a snapshot
    taken right after the answer arrives can precede that addition.)"""
    def read():
        return [dict(ps.stats, endpoint_messages_in=ps.endpoint.messages_in)
                for ps in cluster.servers]
    deadline = time.monotonic() + timeout_s
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError(f"the servers' stats kept changing for {timeout_s} s: {last}")


def test_wrong_secret_is_refused(make_cluster):
    cfg = OptimizerConfig(name="sgd", lr=0.1)
    model, cluster, (c0,) = start(make_cluster, mode="sync", num_workers=1, optimizer=cfg)
    before = settled(cluster)
    for server in range(2):
        intruder = cluster.raw(server, secret="not-the-secret")
        with pytest.raises(AuthRefused, match=f"server {server}"):
            intruder.wait_connected(TIMEOUT_S)
        # Nothing it sends is ever delivered to the server (ZeroMQ may queue it
        # or refuse it outright; either way the server never sees it).
        try:
            intruder.sock.send_multipart(
                [wire.encode(wire.Pull(req=2, worker=0, partitions=[0]))], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        # No reply: a wait times out, or finds the refused connection closed for good.
        with pytest.raises(TransportError):
            intruder.wait(2, 0.2, "pull")
    assert settled(cluster) == before
    torch.testing.assert_close(pull_all(c0), flat_of(model), rtol=0, atol=0)
    late = cluster.client(0)  # a correct client still connects and is served
    torch.testing.assert_close(pull_all(late), flat_of(model), rtol=0, atol=0)


# --------------------------------------------------- e. malformed requests


NUM_WORKERS = 2


@st.composite
def bad_requests(draw, held: list[wire.PartitionInfo], foreign: list[int]):
    """(frames, req the reply must carry) for a request server 0 must refuse."""
    kind = draw(st.sampled_from(["bytes", "foreign", "empty", "duplicate", "frame_count",
                                 "frame_length", "dtype", "pull_payload", "worker", "clock",
                                 "scale", "wrong_op", "not_a_request"]))
    req = draw(st.integers(1, 2**40))
    ids = draw(st.lists(st.sampled_from([p.id for p in held]), min_size=1, max_size=len(held),
                        unique=True))
    size = {p.id: p.stop - p.start for p in held}

    def good_frames(pids):
        return [b"\x01" * (4 * size[i]) for i in pids]

    if kind == "bytes":
        header = draw(st.binary(max_size=64))
        try:
            msg = wire.decode(header)
        except wire.WireError:
            msg = None
        # Random bytes that happen to form a valid request are not malformed.
        assume(msg is None or isinstance(msg, (wire.Register, wire.Ack, wire.Error, wire.Params,
                                               wire.Heartbeat, wire.HeartbeatAck, wire.Finished,
                                               wire.ClusterView)))
        extra = draw(st.lists(st.binary(max_size=16), max_size=2))
        return [header, *extra], (msg.req if msg is not None else 0)
    if kind == "foreign":
        bad = draw(st.sampled_from(foreign) | st.integers(-5, -1) | st.integers(10_000, 2**62))
        pids = draw(st.permutations(ids + [bad]))
        op = draw(st.sampled_from(["push", "pull", "init"]))
        frames = [b"\x01" * 8 for _ in pids]
        if op == "push":
            msg = wire.Push(req=req, worker=0, seq=draw(st.integers(0, 2**40)), clock=0,
                            partitions=pids)
        elif op == "pull":
            msg, frames = wire.Pull(req=req, worker=0, partitions=pids), []
        else:
            msg = wire.InitParams(req=req, partitions=pids)
        return [wire.encode(msg), *frames], req
    if kind == "empty":
        op = draw(st.sampled_from([wire.Pull(req=req, worker=0, partitions=[]),
                                   wire.Push(req=req, worker=0, seq=5, clock=0, partitions=[]),
                                   wire.InitParams(req=req, partitions=[])]))
        return [wire.encode(op)], req
    if kind == "duplicate":
        pids = ids + [ids[0]]
        msg = draw(st.sampled_from([wire.Pull(req=req, worker=1, partitions=pids),
                                    wire.Push(req=req, worker=1, seq=9, clock=0, partitions=pids)]))
        frames = [] if isinstance(msg, wire.Pull) else good_frames(pids)
        return [wire.encode(msg), *frames], req
    if kind == "frame_count":
        count = draw(st.integers(0, len(ids) + 2).filter(lambda n: n != len(ids)))
        frames = [b"\x01" * (4 * size[ids[0]])] * count
        msg = draw(st.sampled_from([wire.Push(req=req, worker=0, seq=3, clock=0, partitions=ids),
                                    wire.InitParams(req=req, partitions=ids)]))
        return [wire.encode(msg), *frames], req
    if kind == "frame_length":
        dtype = draw(st.sampled_from(wire.WIRE_DTYPES))
        item = 4 if dtype == "float32" else 2
        frames = [b"\x01" * (item * size[i]) for i in ids]
        which = draw(st.integers(0, len(ids) - 1))
        length = draw(st.integers(0, 4 * size[ids[which]] + 8).filter(
            lambda n: n != item * size[ids[which]]))
        frames[which] = b"\x02" * length
        msg = draw(st.sampled_from([
            wire.Push(req=req, worker=1, seq=4, clock=0, partitions=ids, dtype=dtype),
            wire.InitParams(req=req, partitions=ids, dtype=dtype)]))
        return [wire.encode(msg), *frames], req
    if kind == "dtype":
        dtype = draw(st.text(max_size=10).filter(lambda s: s not in wire.WIRE_DTYPES))
        msg = draw(st.sampled_from([
            wire.Push(req=req, worker=0, seq=3, clock=0, partitions=ids, dtype=dtype),
            wire.Pull(req=req, worker=0, partitions=ids, dtype=dtype),
            wire.InitParams(req=req, partitions=ids, dtype=dtype)]))
        frames = [] if isinstance(msg, wire.Pull) else good_frames(ids)
        return [wire.encode(msg), *frames], 0  # refused while decoding: no req known
    if kind == "pull_payload":
        frames = draw(st.lists(st.binary(max_size=8), min_size=1, max_size=3))
        return [wire.encode(wire.Pull(req=req, worker=0, partitions=ids)), *frames], req
    if kind == "worker":
        worker = draw(st.integers(NUM_WORKERS, 2**40) | st.integers(-2**40, -1))
        msg = wire.Push(req=req, worker=worker, seq=draw(st.integers(0, 2**40)), clock=0,
                        partitions=ids)
        return [wire.encode(msg), *good_frames(ids)], req
    if kind == "clock":
        clock = draw(st.integers(-2**40, 2**40).filter(lambda c: c != 0))
        msg = wire.Push(req=req, worker=draw(st.integers(0, NUM_WORKERS - 1)),
                        seq=draw(st.integers(0, 2**40)), clock=clock, partitions=ids)
        return [wire.encode(msg), *good_frames(ids)], req
    if kind == "scale":
        # Everything right (worker, clock, frames, a fresh seq) but the loss scale.
        scale = draw(st.sampled_from([0.0, -0.0, -1.0, float("nan"), float("-inf")])
                     | st.floats(max_value=0.0))
        msg = wire.Push(req=req, worker=draw(st.integers(0, NUM_WORKERS - 1)),
                        seq=draw(st.integers(0, 2**40)), clock=0, partitions=ids, scale=scale)
        return [wire.encode(msg), *good_frames(ids)], req
    if kind == "wrong_op":
        msg = draw(st.sampled_from([
            wire.Register(req=req, role="worker", rank=0, host="127.0.0.1", pid=1,
                          layout=[wire.ParamSpec("w", [2], 2)], optimizer=spec_from_config(OptimizerConfig())),
            wire.Heartbeat(req=req, role="worker", rank=0),
            wire.Finished(req=req, role="worker", rank=0, stats={"x": 1}),
            wire.ClusterView(req=req, processes=[], partitions=[], layout=[],
                             optimizer=spec_from_config(OptimizerConfig()))]))
        return [wire.encode(msg)], req
    msg = draw(st.sampled_from([wire.Ack(req=req), wire.Error(req=req, message="hi"),
                                wire.HeartbeatAck(req=req, state="running"),
                                wire.Params(req=req, partitions=ids, clock=0)]))
    frames = good_frames(ids) if isinstance(msg, wire.Params) else []
    return [wire.encode(msg), *frames], req


def test_malformed_requests_are_refused_and_change_nothing(make_cluster):
    cfg = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9)
    model, cluster, (c0, c1) = start(make_cluster, mode="sync", num_workers=NUM_WORKERS,
                                     optimizer=cfg)
    smap = cluster.shard_map
    held = smap.on_server(0)
    foreign = [p.id for p in smap.on_server(1)]
    ep = cluster.raw(0)
    ep.wait_connected(TIMEOUT_S, cluster.check)

    def refused(frames: list, req: int) -> None:
        ep.sock.send_multipart(frames, copy=True)
        if req == 0:  # unreadable: the endpoint names the server's Error req 0 at once
            with pytest.raises(TransportError, match="could not read a message of ours: "
                                                     "server 0: "):
                ep.wait(req, TIMEOUT_S, "an Error reply", cluster.check)
            return
        reply, payload = ep.wait(req, TIMEOUT_S, "an Error reply", cluster.check)
        assert isinstance(reply, wire.Error), f"{frames[0][:60]!r} was answered with {reply}"
        assert reply.message.startswith("server 0: ") and payload == []

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=bad_requests(held, foreign))
    def check(case):
        refused(*case)

    check()
    # Deterministic cases hypothesis would rarely build.
    refused([b"\x80" * (wire.MAX_HEADER_BYTES + 1)], 0)  # oversized header
    refused([b""], 0)
    refused([wire.encode(wire.Push(req=77, worker=0, seq=1, clock=0,
                                   partitions=[held[0].id], dtype="float64")),
             b"\x00" * 8 * (held[0].stop - held[0].start)], 0)
    n0 = held[0].stop - held[0].start
    for unused in ([[3, 1]], [[0, n0 + 1]], [[0, 1, 2]], [[0, 1], [2, 3]]):  # Push.unused
        refused([wire.encode(wire.Push(req=78, worker=0, seq=1, clock=0,
                                       partitions=[held[0].id], unused=unused)),
                 b"\x00" * 4 * n0], 78)
    # A re-sent init is acknowledged but changes nothing: first writer wins.
    ack, _ = ep.request(wire.InitParams(req=99, partitions=[p.id for p in held]),
                        [b"\x00" * 4 * (p.stop - p.start) for p in held], timeout_s=TIMEOUT_S)
    assert isinstance(ack, wire.Ack)

    ps0 = cluster.servers[0]
    assert ps0.stats["updates"] == 0 and ps0.stats["pushes"] == 0
    assert ps0.stats["errors"] >= 200
    assert all(not st.last_seq for st in ps0.parts.values())
    for st_ in ps0.parts.values():
        assert st_.clock == 0 and st_.accum is None and not st_.pushed_by and not st_.waiters
    # The server kept serving, with the values worker 0 gave it...
    ref = Reference(model, cfg)
    torch.testing.assert_close(pull_all(c1), ref.flat(), rtol=0, atol=0)
    # ...and a real step afterwards equals torch.optim: nothing half-applied lingers.
    g0 = torch.randn(smap.total_elems, generator=torch.Generator().manual_seed(3))
    g1 = torch.randn(smap.total_elems, generator=torch.Generator().manual_seed(4))
    handles = [c.push(p.id, g[p.start:p.stop], 0) for p in smap.partitions
               for c, g in ((c0, g0), (c1, g1))]
    for h in handles:
        h.wait()
    ref.step((g0 + g1) / 2)
    torch.testing.assert_close(pull_all(c0, clock=1), ref.flat())


def test_refused_push_leaves_no_trace(make_cluster):
    """A push refused for its loss scale must not record its seq: the worker's next
    real push (with a smaller seq) would be taken for a retry and silently dropped."""
    cfg = OptimizerConfig(name="sgd", lr=0.1)
    model, cluster, (c0, c1) = start(make_cluster, mode="sync", num_workers=2, optimizer=cfg,
                                     num_servers=1, partition_elems=1000)
    n = cluster.shard_map.total_elems
    ep = cluster.raw(0)
    reply, _ = ep.request(wire.Push(req=5, worker=0, seq=10**6, clock=0, partitions=[0],
                                    scale=0.0), [b"\x00" * 4 * n], timeout_s=TIMEOUT_S)
    assert isinstance(reply, wire.Error) and "scale" in reply.message
    ps = cluster.servers[0]
    assert all(not st.last_seq for st in ps.parts.values()) and ps.stats["pushes"] == 0, \
        f"a refused push changed the server state: stats={ps.stats}"
    g0, g1 = torch.full((n,), 1.0), torch.full((n,), 2.0)
    h0 = c0.push(0, g0, 0)  # seq 1 < 10**6
    h1 = c1.push(0, g1, 0)
    expected = flat_of(model) - 0.1 * (g0 + g1) / 2
    torch.testing.assert_close(h0.wait()[0], expected)
    torch.testing.assert_close(h1.wait()[0], expected)


def test_push_before_init_is_refused(make_cluster):
    model = small_model()
    cluster = make_cluster(param_layout(model), num_servers=1, partition_elems=1000, mode="sync",
                           num_workers=1, optimizer=spec_from_config(OptimizerConfig()))
    c = cluster.client(0)
    with pytest.raises(ServerError, match="not been initialised"):
        c.push(0, torch.zeros(cluster.shard_map.total_elems), 0).wait()
    # A pull before init waits for the initial values instead of failing.
    pending = c.pull()
    with pytest.raises(PeerTimeout):
        pending[0].wait(timeout_s=0.2)
    c.init_params(flat_of(model))
    torch.testing.assert_close(pending[0].wait()[0], flat_of(model), rtol=0, atol=0)


# ------------------------------------------- f. PSDataParallel end to end


@pytest.mark.parametrize("partition_elems", [23, 10_000])
def test_ps_data_parallel_equals_plain_sgd(make_cluster, partition_elems):
    cfg = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), **cfg.torch_kwargs())
    cluster = make_cluster(param_layout(model), num_servers=1, partition_elems=partition_elems,
                           mode="sync", num_workers=1, optimizer=cfg)
    client = cluster.client(0)
    ddp = PSDataParallel(model, client, cluster.shard_map, is_first=True)
    gen = torch.Generator().manual_seed(5)
    for step in range(4):
        x = torch.randn(16, 5, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        if step % 2:
            ddp.module.zero_grad(set_to_none=True)  # the hook folds fresh grads back in
        else:
            ddp.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        ddp.step()
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
        torch.testing.assert_close(list(ddp.module.parameters()), list(ref.parameters()))
    assert ddp.clock == 4
    assert cluster.servers[0].stats["updates"] == 4 * len(cluster.shard_map.partitions)
    # What the server holds is what the worker trains on.
    torch.testing.assert_close(pull_all(client, clock=4), ddp.flat, rtol=0, atol=0)


class _Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(5, 3), nn.Linear(5, 3), False

    def forward(self, x):
        return self.body(x) + self.head(x) if self.aux else self.body(x)


def _step_alike(ddp, ref, opt, x) -> None:
    """One step of the wrapped model and of torch's own optimizer on ``ref``, alike."""
    ddp.zero_grad()
    ddp(x).pow(2).mean().backward()
    ddp.step()
    opt.zero_grad(set_to_none=True)
    ref(x).pow(2).mean().backward()
    opt.step()


def _held_steps(ddp, cluster) -> list[int]:
    """Each parameter's Adam step count as the servers hold it (``optimizer.state_dict()``'s
    view, :class:`~tessera.parallel.optim_state.ServerState`)."""
    params = list(ddp.module.parameters())
    held = _server_state(ddp, cluster).fetch(params, frozenset({"step"}))
    return [int(held[p]["step"]) for p in params]


def _server_state(ddp, cluster):
    from tessera.parallel.optim_state import ServerState
    from tessera.parallel.optimizer import flat_offsets
    return ServerState(ddp.client, cluster.shard_map.partitions, flat_offsets(ddp.module),
                       may_send=lambda: None, log=print)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_ps_data_parallel_leaves_a_branch_not_taken_alone_as_torch(make_cluster, mode):
    """``find_unused_parameters``: a head forward uses every third step only. Its pushes
    name its ranges unused at the other steps (the wire's ``Push.unused``) and the server
    skips it there as torch skips a parameter whose ``.grad`` is None (Adam's moments and
    step count untouched): equal to torch at every step, where stepping it with a zero
    gradient moves it (the last assertion)."""
    from tessera.parallel.ps import PSComm
    cfg = OptimizerConfig(name="adam", lr=0.05)
    torch.manual_seed(0)
    model = _Branch()
    ref, zeros = copy.deepcopy(model), copy.deepcopy(model)
    opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    opt_zeros = torch.optim.Adam(zeros.parameters(), lr=0.05)
    # Partitions of 12 elements: the middle one holds body.weight's end, body.bias and
    # head.weight's start, so a step leaves part of a partition alone.
    cluster = make_cluster(param_layout(model), num_servers=1, partition_elems=12,
                           mode=mode, num_workers=1, optimizer=cfg)
    assert [(p.start, p.stop) for p in cluster.shard_map.partitions] == [(0, 12), (12, 24),
                                                                        (24, 36)]
    ddp = PSDataParallel(model, cluster.client(0), cluster.shard_map, is_first=True,
                         comm=PSComm(mode=mode, find_unused=True))
    gen = torch.Generator().manual_seed(5)
    for step in range(7):
        x = torch.randn(16, 5, generator=gen)
        ddp.module.aux = ref.aux = zeros.aux = step % 3 == 0
        ddp.zero_grad()
        ddp(x).pow(2).mean().backward()
        ddp.step()
        for m, o in ((ref, opt), (zeros, opt_zeros)):
            o.zero_grad(set_to_none=True)
            m(x).pow(2).mean().backward()
            if m is zeros:
                for p in m.parameters():
                    p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            o.step()
        torch.testing.assert_close(list(ddp.module.parameters()), list(ref.parameters()),
                                   msg=lambda m: f"step {step}: {m}")
    assert not torch.allclose(zeros.head.weight, ref.head.weight)

    # The script's own checkpoint (optimizer.state_dict() / load_state_dict()): each
    # parameter's own step count, out and back in. The middle partition holds body and head
    # parameters (7 and 3 steps), so a load must send its `step` per element.
    params, refs = list(ddp.module.parameters()), list(ref.parameters())
    assert _held_steps(ddp, cluster) == [int(opt.state[q]["step"]) for q in refs]
    for q, step in zip(refs, (2, 2, 5, 5)):  # a state saved elsewhere: other counts
        opt.state[q]["step"] = torch.tensor(float(step))
    _server_state(ddp, cluster).send({p: opt.state[q] for p, q in zip(params, refs)}, params)
    assert _held_steps(ddp, cluster) == [2, 2, 5, 5]
    for step in range(2):  # continued: Adam's bias correction reads each count
        ddp.module.aux = ref.aux = step == 0
        _step_alike(ddp, ref, opt, torch.randn(16, 5, generator=gen))
        torch.testing.assert_close(params, refs, msg=lambda m: f"after the load: {m}")


def test_a_parameter_frozen_since_distribute_is_refused_without_find_unused(make_cluster):
    """Without ``find_unused_parameters`` a parameter without a gradient is pushed zeros (a
    branch not taken: the README's documented cost), but one frozen since (a fine-tuning
    recipe's ``requires_grad_(False)`` mid-training) means to stay still, which a zero step
    of Adam would not leave it: refused at the step, in one line naming it and the flag."""
    from tessera.errors import UsageError
    torch.manual_seed(0)
    model = _Branch()
    cluster = make_cluster(param_layout(model), num_servers=1, partition_elems=12,
                           mode="sync", num_workers=1, optimizer=OptimizerConfig(name="adam"))
    ddp = PSDataParallel(model, cluster.client(0), cluster.shard_map, is_first=True)
    x = torch.randn(4, 5)
    for aux in (True, False):  # used, then not used: pushed zeros, as before
        ddp.module.aux = aux
        ddp.zero_grad()
        ddp(x).pow(2).mean().backward()
        ddp.step()
    ddp.module.aux = True
    ddp.module.head.requires_grad_(False)
    ddp.zero_grad()
    ddp(x).pow(2).mean().backward()
    with pytest.raises(UsageError, match=r"parameter 'head.weight' was trainable at "
                                         r"tessera.distribute and is frozen now .* pass "
                                         r"find_unused_parameters=True"):
        ddp.step()


def test_gradual_unfreezing_with_find_unused_parameters_is_torch(make_cluster):
    """A fine-tuning recipe's gradual unfreezing: the head stays trainable at distribute
    (with ``find_unused_parameters``), is frozen just after and unfrozen at step 3. The
    servers leave it alone meanwhile, so Adam starts its state and step count for it when
    unfrozen, as one process does: equal at every step, step counts {body 5, head 2}."""
    from tessera.parallel.ps import PSComm
    torch.manual_seed(0)
    model = _Branch()
    model.aux = True
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    cluster = make_cluster(param_layout(model), num_servers=1, partition_elems=12,
                           mode="sync", num_workers=1, optimizer=OptimizerConfig(name="adam",
                                                                                 lr=0.05))
    ddp = PSDataParallel(model, cluster.client(0), cluster.shard_map, is_first=True,
                         comm=PSComm(mode="sync", find_unused=True))
    ddp.module.head.requires_grad_(False)
    ref.head.requires_grad_(False)
    gen = torch.Generator().manual_seed(5)
    for step in range(5):
        if step == 3:
            ddp.module.head.requires_grad_(True)
            ref.head.requires_grad_(True)
        _step_alike(ddp, ref, opt, torch.randn(16, 5, generator=gen))
        torch.testing.assert_close(list(ddp.module.parameters()), list(ref.parameters()),
                                   msg=lambda m: f"step {step}: {m}")
    assert _held_steps(ddp, cluster) == [5, 5, 2, 2]


@pytest.mark.parametrize("workers, folded", [(4, True), (3, False)])
def test_async_plain_sgd_scale_folded_or_not_is_torch_bit_for_bit(make_cluster, monkeypatch,
                                                                   workers, folded):
    """Async plain SGD: each push's 1/workers goes into the learning rate (one ``add_``,
    ``TorchOptimRule.apply_folded``) where it is a power of two, else the gradient is
    scaled first; either way the replies are torch.optim's SGD on ``g / workers``, bit
    for bit, and the folded step ran exactly where it may."""
    from tessera.ps.optim import TorchOptimRule
    calls = []
    real = TorchOptimRule.apply_folded
    monkeypatch.setattr(TorchOptimRule, "apply_folded",
                        lambda self, grad, scale: (calls.append(scale), real(self, grad, scale)))
    cfg = OptimizerConfig(name="sgd", lr=0.05)
    model, cluster, clients = start(make_cluster, mode="async", num_workers=workers,
                                    optimizer=cfg)
    smap = cluster.shard_map
    ref = Reference(model, cfg)
    gen = torch.Generator().manual_seed(5)
    for clock in range(2):
        for client in clients:
            g = torch.randn(smap.total_elems, generator=gen) * 3
            got = {}
            for h in [client.push(p.id, g[p.start:p.stop], clock) for p in smap.partitions]:
                got.update(h.wait())
            ref.step(torch.mul(g, 1.0 / workers))
            assert torch.equal(assemble(smap, got).view(torch.int32), ref.flat().view(torch.int32))
    pushes = 2 * workers * len(smap.partitions)
    assert calls == ([1.0 / workers] * pushes if folded else [])


# ------------------------------------------------- batched pushes (issue 15)


def test_a_resent_batch_is_applied_only_where_it_was_not(make_cluster):
    """A batch (one Push, several partitions) sent again after a failover may find some of
    its partitions updated already (the backup had those updates): it is applied to the
    others only, and answered with all. Also: plain SGD's one add_ and the async scale
    taken with numpy give torch.optim's SGD bit for bit."""
    cfg = OptimizerConfig(name="sgd", lr=0.05)
    model, cluster, (c0, c1) = start(make_cluster, mode="async", num_workers=2, optimizer=cfg)
    smap = cluster.shard_map
    p, q = [part.id for part in smap.on_server(0)][:2]
    ref = Reference(model, cfg)
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(smap.total_elems, generator=gen)
    info = {part.id: part for part in smap.partitions}

    def sliced(pid):
        return g[info[pid].start:info[pid].stop]

    seq = c0.seq
    c0.push(p, sliced(p), 0).wait()  # the batch's first partition, applied alone
    c0.seq = seq  # the batch below carries the same sequence number: a re-sent one
    c0.batch_bytes = 1 << 20
    h_p, h_q = c0.push(p, sliced(p), 0), c0.push(q, sliced(q), 0)
    assert h_p._batch is h_q._batch  # one message
    got = {**h_p.wait(), **h_q.wait()}
    mask = torch.zeros(smap.total_elems)
    for pid in (p, q):
        mask[info[pid].start:info[pid].stop] = 1
    ref.step(g * mask / 2)  # each partition's gradient applied once, scaled by 1/workers
    expected = ref.flat()
    for pid in (p, q):
        torch.testing.assert_close(got[pid], expected[info[pid].start:info[pid].stop],
                                   rtol=0, atol=0)
    ps = cluster.servers[0]
    assert ps.parts[p].applied_pushes == 1 and ps.parts[q].applied_pushes == 1
    assert ps.stats["errors"] == 0


def test_a_servers_batch_leaves_with_its_last_partition_during_backward(make_cluster):
    """Pushes of small partitions batched per server (``[ps] batch_kib``) leave as soon as
    backward has produced the last partition of their server, not at step(): the servers
    apply the clock before the worker calls step() (before, a batch waited for step()'s
    first wait, so its round trip no longer overlapped the rest of backward: a bf16 wire
    halves a partition and puts it under the batching threshold). Still one message per
    server and step, and still torch's SGD."""
    cfg = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))  # 75 elements
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), **cfg.torch_kwargs())
    cluster = make_cluster(param_layout(model), num_servers=2, partition_elems=10,
                           mode="sync", num_workers=1, optimizer=cfg)
    client = cluster.client(0)
    client.batch_bytes = 256 << 10  # the default [ps] batch_kib
    ddp = PSDataParallel(model, client, cluster.shard_map, is_first=True)
    parts = [len(cluster.shard_map.on_server(s)) for s in range(2)]
    assert min(parts) >= 3, parts
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        x = torch.randn(16, 5, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        ddp.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        assert not client._batches, "a batch still waits for step()"
        # (The first step's pushes wait for step() anyway: it finds out whether backward
        # runs more than once a step.)
        deadline = time.monotonic() + TIMEOUT_S
        while step and any(ps.stats["updates"] < (step + 1) * n
                           for ps, n in zip(cluster.servers, parts)):
            assert time.monotonic() < deadline, \
                [ps.stats["updates"] for ps in cluster.servers]  # nothing left before step()
            time.sleep(0.002)
        ddp.step()
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
        torch.testing.assert_close(list(ddp.module.parameters()), list(ref.parameters()))
        if step == 0:
            first = [ps.stats["pushes"] for ps in cluster.servers]
    # steps 1 and 2: one message a step to each server, all its partitions
    assert [ps.stats["pushes"] - n for ps, n in zip(cluster.servers, first)] == [2, 2]


# ------------------------------------------------- g. replies held while draining


def test_held_replies_go_in_order_with_the_values_they_were_sent_with():
    """ServerEndpoint.hold: small replies wait for release(), or go before a large one,
    in the order given, each with its payload as it was when sent; without hold a reply
    goes at once."""
    import numpy as np

    ctx = zmq.Context()
    server = ServerEndpoint(ctx, "127.0.0.1", SECRET)
    client = ClientEndpoint(ctx, server.address, SECRET, "server", sndtimeo_s=TIMEOUT_S)

    def params(req):
        return wire.Params(req=req, partitions=[0], clock=req, dtype="float32")

    def replies(n):
        got = []
        for _ in range(n):
            assert client.sock.poll(int(TIMEOUT_S * 1000)), f"{len(got)} of {n} replies came"
            parts = client.sock.recv_multipart()
            got.append((wire.decode(parts[0]).req,
                        [np.frombuffer(p, np.float32).copy() for p in parts[1:]]))
        return got

    try:
        client.wait_connected(TIMEOUT_S)
        client.send(wire.Pull(req=1, worker=0, partitions=[0]))
        assert server.poll(TIMEOUT_S)
        peer = server.recv().peer
        values = np.arange(16, dtype=np.float32)
        large = np.full(1 << 15, 3.0, dtype=np.float32)  # 128 KiB: above zmq.COPY_THRESHOLD
        server.hold()
        assert server.send(peer, params(1), [values])
        values[:] = -1  # after it was sent: not what reply 1 carries
        assert server.send(peer, params(2), [memoryview(values).cast("B")])
        assert not client.sock.poll(200), "a held reply went before release"
        server.send(peer, params(3), [large])  # a large reply: the held ones go first
        (r1, v1), (r2, v2), (r3, v3) = replies(3)
        assert (r1, r2, r3) == (1, 2, 3)
        assert np.array_equal(v1[0], np.arange(16, dtype=np.float32))
        assert np.array_equal(v2[0], np.full(16, -1.0, dtype=np.float32))
        assert np.array_equal(v3[0], large)
        server.hold()
        server.send(peer, wire.Ack(req=4))
        assert not client.sock.poll(200), "a held reply went before release"
        server.release()
        assert [r for r, _ in replies(1)] == [4]
        server.send(peer, wire.Ack(req=5))  # not holding: at once
        assert [r for r, _ in replies(1)] == [5]
    finally:
        client.close()
        server.close()
        close_context(ctx)
