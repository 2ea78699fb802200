"""The dense path's buffers: replies sent without a fresh copy must never show values
newer than the update they answer, even while ZeroMQ still holds them unsent.

Servers run in threads of this process on real loopback sockets
(``tests.test_server_inproc.InprocCluster``); the slow worker is a raw DEALER with a
one-message receive queue and a 4 KiB socket buffer, so the server's replies to it
pile up inside the server's ZeroMQ, unsent, while the server goes on updating.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import zmq

from tessera.config.schema import OptimizerConfig
from tessera.transport import wire
from tessera.ps import kernels
from tessera.transport.frames import frame_to_tensor, tensor_to_frame, torch_dtype
from tests import test_server_inproc as inproc
from tests.harness import ROOT

SECRET = inproc.SECRET
make_cluster = inproc.make_cluster  # the fixture: servers in threads, closed at teardown

#: 4 MiB of fp32 per partition: far above pyzmq's copy threshold, so replies are sent
#: from the server's buffers (zero-copy), and several of them fill the socket buffers.
ELEMS = 1 << 20
LR = 0.5


def _slow_dealer(ctx: zmq.Context, address: str) -> zmq.Socket:
    """A worker that does not read its replies until told: they wait in the server."""
    sock = ctx.socket(zmq.DEALER)
    sock.plain_username, sock.plain_password = b"tessera", SECRET.encode()
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.linger = 0
    sock.connect(address)
    return sock


def _push(sock: zmq.Socket, req: int, worker: int, clock: int, grad: torch.Tensor,
          dtype: str) -> None:
    msg = wire.Push(req=req, worker=worker, seq=req, clock=clock, partitions=[0], dtype=dtype)
    sock.send_multipart([wire.encode(msg), tensor_to_frame(grad)], copy=False)


def _answer(sock: zmq.Socket, dtype: str):
    """The next reply to the slow worker: a Verdict, or (req, values) of a Params."""
    assert sock.poll(20_000), "no reply within 20 s"
    header, *frames = sock.recv_multipart(copy=False)
    msg = wire.decode(header.buffer)
    if isinstance(msg, wire.Verdict):
        return msg
    assert isinstance(msg, wire.Params), msg
    return msg.req, frame_to_tensor(frames[0].buffer, dtype, ELEMS).to(torch.float32)


def _reply(sock: zmq.Socket, dtype: str) -> tuple[int, torch.Tensor]:
    got = _answer(sock, dtype)
    assert not isinstance(got, wire.Verdict), got
    return got


def _sync_pair(make_cluster, two_phase: bool = False):
    """A sync server for 2 workers: (cluster, worker 1's client, worker 0's slow socket);
    worker 0's client has seeded the values (zeros)."""
    cluster = make_cluster([wire.ParamSpec(name="w", shape=[ELEMS], numel=ELEMS)],
                           num_servers=1, partition_elems=ELEMS, mode="sync", num_workers=2,
                           optimizer=OptimizerConfig(name="sgd", lr=LR), two_phase=two_phase)
    fast = cluster.client(1)
    cluster.client(0).init_params(torch.zeros(ELEMS))
    return cluster, fast, _slow_dealer(cluster.ctx, cluster.addresses[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_async_replies_held_by_zeromq_keep_their_values(make_cluster, dtype):
    """Async: every push is applied at once and answered from a reused reply buffer;
    eight replies of 4 MiB to a worker that does not read stay queued in the server's
    ZeroMQ while later pushes update the master. Each must still carry the values right
    after its own update (a buffer reused before its MessageTracker is done would show
    a later one). Half-width pushes take the fused step, which writes the reply into a
    free buffer as it updates (four exist: the last four pushes find none free and take
    torch's passes)."""
    cluster = make_cluster([wire.ParamSpec(name="w", shape=[ELEMS], numel=ELEMS)],
                           num_servers=1, partition_elems=ELEMS, mode="async", num_workers=1,
                           optimizer=OptimizerConfig(name="sgd", lr=LR))
    cluster.client(0).init_params(torch.zeros(ELEMS))
    sock = _slow_dealer(cluster.ctx, cluster.addresses[0])
    try:
        wire_dtype = torch_dtype(dtype)
        grads = [torch.full((ELEMS,), float(k), dtype=wire_dtype) for k in range(1, 9)]
        for k, grad in enumerate(grads, start=1):
            _push(sock, k, 0, k - 1, grad, dtype)
        time.sleep(0.5)  # the server applies all eight while the replies wait unsent
        server = cluster.servers[0]
        deadline = time.monotonic() + 20
        while server.stats["updates"] < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stats["updates"] == 8
        total = 0.0
        for k in range(1, 9):
            req, values = _reply(sock, dtype)
            total += k
            assert req == k
            # SGD from zeros: -lr * (1 + ... + k), exact in fp32 and bf16.
            assert torch.equal(values, torch.full((ELEMS,), -LR * total)), \
                f"reply {k} carries {values[0].item()}, not {-LR * total}"
    finally:
        sock.close(linger=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_sync_zero_copy_reply_waits_for_every_worker(make_cluster, dtype):
    """Sync: the reply is the master itself, zero-copy (docs/architecture.md: the master
    changes only once every worker pushed the next clock, which each does only after
    receiving this reply); on a half-width wire, the one buffer the master is cast into
    at each clock, by the same argument. Worker 0 leaves its clock-0 reply unread in the
    server while worker 1 takes its own and pushes clock 1; the clock-1 update must
    wait, and worker 0's reply, read late, still holds the clock-0 values."""
    cluster, fast, sock = _sync_pair(make_cluster)
    try:
        kind = torch_dtype(dtype)
        g0, g1 = torch.full((ELEMS,), 2.0, dtype=kind), torch.full((ELEMS,), 4.0, dtype=kind)
        _push(sock, 1, 0, 0, g0, dtype)
        after0 = fast.push(0, g1, 0, dtype=dtype).wait()[0].to(torch.float32)
        assert torch.equal(after0, torch.full((ELEMS,), -LR * 3.0))  # mean 3
        h = fast.push(0, g1, 1, dtype=dtype)  # clock 1: must wait for worker 0's push
        time.sleep(0.3)
        assert cluster.servers[0].stats["updates"] == 1
        req, values = _reply(sock, dtype)
        assert req == 1 and torch.equal(values, after0)
        _push(sock, 2, 0, 1, g0, dtype)
        assert torch.equal(h.wait()[0].to(torch.float32), torch.full((ELEMS,), -LR * 6.0))
        assert _reply(sock, dtype)[0] == 2
    finally:
        sock.close(linger=0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_two_phase_clock_replies_without_copies_keep_their_values(make_cluster, dtype):
    """Loss-scaled sync (two-phase: pushes held, answered with verdicts, applied when a
    worker's pull brings the decision) shares the master, or its one half-width copy,
    as one-phase sync does, by the same argument. Worker 0 leaves its pull of clock 1
    unread in the server while worker 1 takes its own and holds clock 1; the clock-1
    update must wait for worker 0's push, and worker 0's reply, read late, still holds
    the values after clock 0."""
    cluster, fast, sock = _sync_pair(make_cluster, two_phase=True)
    try:
        kind = torch_dtype(dtype)
        g0, g1 = torch.full((ELEMS,), 2.0, dtype=kind), torch.full((ELEMS,), 4.0, dtype=kind)
        _push(sock, 1, 0, 0, g0, dtype)
        verdict = fast.push(0, g1, 0, dtype=dtype).wait()
        assert isinstance(verdict, wire.Verdict) and verdict.finite
        after0 = fast.pull(clock=1, commit=True)[0].wait()[0].to(torch.float32)
        assert torch.equal(after0, torch.full((ELEMS,), -LR * 3.0))  # mean 3
        sock.send_multipart([wire.encode(wire.Pull(req=2, worker=0, partitions=[0], clock=1,
                                                   dtype=dtype, commit=True))])
        h = fast.push(0, g1, 1, dtype=dtype)  # clock 1: complete only with worker 0's push
        time.sleep(0.3)
        assert cluster.servers[0].stats["updates"] == 1
        assert isinstance(_answer(sock, dtype), wire.Verdict)  # its clock-0 push
        req, values = _answer(sock, dtype)  # its pull of clock 1, read late
        assert req == 2 and torch.equal(values, after0)
        _push(sock, 3, 0, 1, g0, dtype)
        assert h.wait().finite
        after1 = fast.pull(clock=2, commit=True)[0].wait()[0].to(torch.float32)
        assert torch.equal(after1, torch.full((ELEMS,), -LR * 6.0))
    finally:
        sock.close(linger=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plain_sgd_on_a_half_width_gradient_is_torch_sgd_bit_for_bit(dtype):
    """A bf16/fp16 gradient goes into plain SGD without a cast copy: the same bits as
    casting it to fp32 and stepping torch.optim.SGD; with momentum it is refused (cast)."""
    from tessera.ps.optim import make_rule, spec_from_config
    torch.manual_seed(0)
    w = torch.randn(10_001)
    rule = make_rule(w, spec_from_config(OptimizerConfig(name="sgd", lr=0.03)), 0, w.numel())
    ref = torch.nn.Parameter(w.clone())
    opt = torch.optim.SGD([ref], lr=0.03, foreach=False)
    assert rule.takes_half()
    for _ in range(3):
        g = (torch.randn(w.numel()) * 10).to(dtype)
        rule.apply(g)
        ref.grad = g.to(torch.float32)
        opt.step()
    assert torch.equal(rule.master, ref.detach())
    assert not rule.takes_half([{"lr": 0.03, "momentum": 0.9}])
    momentum = make_rule(w, spec_from_config(OptimizerConfig(name="sgd", lr=0.03, momentum=0.9)),
                         0, w.numel())
    assert not momentum.takes_half()


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


@pytest.mark.skipif(not kernels.ENABLED, reason="numba is not importable here")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fused_half_step_is_torch_bit_for_bit(dtype):
    """The fused kernels (tessera.ps.kernels) against torch's passes. SGD_HALF: cast the
    gradient (a half-width push, or a sync clock's fp32 mean) to fp32, scale it, SGD's
    ``add_``, cast the master back. SCALE_HALF and ADD_HALF: a sync clock's sum (a cast
    and ``mul_``, then mixed-dtype ``add_``). Same bits, for odd lengths, scales that
    round (1/3) and values that overflow the half-width range, are subnormal in it, or
    are NaN and infinities."""
    kind = torch_dtype(dtype)
    kernel = kernels.SGD_HALF[dtype, dtype]
    gen = torch.Generator().manual_seed(3)
    special = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 3.4e38,
                            7e4, 65519.0, 65520.0, 1e-40, 3e-8, 6e-5, -0.0])
    for n, scale in ((1, 1.0), (17, 0.5), (100_003, 1 / 3), (1 << 18, 1.0)):
        master = torch.randn(n, generator=gen) * 1e3
        master[:min(n, len(special))] = special[:min(n, len(special))]
        grad = (torch.randn(n, generator=gen) * 50).to(kind)
        for wide in (False, True):  # the push itself, or an fp32 mean
            g = grad.to(torch.float32)
            if scale != 1.0:
                g.mul_(scale)
            ref, ref_reply = master.clone(), torch.empty(n, dtype=kind)
            ref.add_(g, alpha=-0.0123)
            ref_reply.copy_(ref)
            got, reply = master.clone(), torch.empty(n, dtype=kind)
            if wide:
                kernels.SGD_HALF["float32", dtype](got.numpy(), g.numpy(), np.float32(1),
                                                   np.float32(-0.0123), _bits(reply))
            else:
                kernel(got.numpy(), _bits(grad), np.float32(scale), np.float32(-0.0123),
                       _bits(reply))
            assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), (n, scale, wide)
            assert np.array_equal(_bits(reply), _bits(ref_reply)), (n, scale, wide)
        # A sync clock's sum: the first push scaled, a second added.
        second = (torch.randn(n, generator=gen) * 50).to(kind)
        ref = torch.empty(n).copy_(grad)
        if scale != 1.0:
            ref.mul_(scale)
        ref.add_(second, alpha=scale)
        got = torch.empty(n)
        kernels.SCALE_HALF[dtype](got.numpy(), _bits(grad), np.float32(scale))
        kernels.ADD_HALF[dtype](got.numpy(), _bits(second), np.float32(scale))
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), (n, scale, "sum")
    # Every half-width bit pattern widened (the master 0 minus each gradient), and fp32
    # bit patterns from all over the range rounded back (a zero gradient).
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(kind)
    got, reply = torch.zeros(1 << 16), torch.empty(1 << 16, dtype=kind)
    kernel(got.numpy(), _bits(every), np.float32(1), np.float32(-1), _bits(reply))
    assert torch.equal(got.view(torch.int32), torch.zeros(1 << 16).sub_(every.float()).view(torch.int32))
    wide = torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int32)
    values = torch.cat([wide.view(torch.float32), torch.linspace(-7e4, 7e4, 1 << 16)])
    got, reply = values.clone(), torch.empty(len(values), dtype=kind)
    zero = torch.zeros(len(values), dtype=kind)
    kernel(got.numpy(), _bits(zero), np.float32(1), np.float32(-1), _bits(reply))
    assert np.array_equal(_bits(reply), _bits(values.to(kind)))


@pytest.mark.skipif(not kernels.ENABLED, reason="numba is not importable here")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_async_half_width_pushes_fused_or_not_give_the_same_bits(make_cluster, monkeypatch, dtype):
    """A real server, async with three workers (each push scaled by 1/3), half-width
    pushes to partitions of several sizes: the replies and the final master are the
    same bits with the fused step (kernels on) and with torch's passes (kernels off),
    and the fused step is the one that ran when the kernels are on."""
    sizes = [40_000, 70_001, 1 << 18]
    layout = [wire.ParamSpec(name=f"w{i}", shape=[n], numel=n) for i, n in enumerate(sizes)]
    calls = []
    fused = kernels.SGD_HALF[dtype, dtype]
    monkeypatch.setitem(kernels.SGD_HALF, (dtype, dtype), lambda *a: (calls.append(1), fused(*a)))
    kind = torch_dtype(dtype)
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", on)
        cluster = make_cluster(layout, num_servers=1, partition_elems=100_000, mode="async",
                               num_workers=3, optimizer=OptimizerConfig(name="sgd", lr=0.05))
        clients = [cluster.client(w) for w in range(3)]
        parts = cluster.shard_map.partitions
        gen = torch.Generator().manual_seed(11)
        clients[0].init_params(torch.randn(sum(sizes), generator=gen))
        replies = []
        for clock in range(3):
            for c in clients:
                for p in parts:
                    grad = (torch.randn(p.stop - p.start, generator=gen) * 4).to(kind)
                    values = c.push(p.id, grad, clock, dtype=dtype).wait()[p.id]
                    replies.append(values.to(torch.float32).clone())
        final = inproc.pull_all(clients[0], 3)
        runs[on] = (replies, final, len(calls))
        calls.clear()
    (on_replies, on_final, on_calls), (off_replies, off_final, off_calls) = runs[True], runs[False]
    assert on_calls == 3 * 3 * len(cluster.shard_map.partitions) and off_calls == 0
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
               for a, b in zip(on_replies, off_replies))
    assert torch.equal(on_final.view(torch.int32), off_final.view(torch.int32))


@pytest.mark.skipif(not kernels.ENABLED, reason="numba is not importable here")
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sync_half_width_clocks_fused_or_not_give_the_same_bits(make_cluster, monkeypatch,
                                                                dtype, workers):
    """Sync: a clock's half-width pushes summed in fp32 (SCALE_HALF, ADD_HALF; with one
    worker the push is the mean itself) and its mean applied with the reply cast as it
    goes (SGD_HALF). Replies and the final master are the same bits with the kernels on
    and off, and the fused step is the one that applied each clock with them on. The
    workers push one after another (the server has taken one's pushes before the next
    pushes): a sum's rounding depends on its order, which concurrent pushes leave open."""
    sizes = [50_000, 1 << 17]
    layout = [wire.ParamSpec(name=f"w{i}", shape=[n], numel=n) for i, n in enumerate(sizes)]
    calls = []
    key = (dtype if workers == 1 else "float32", dtype)
    fused = kernels.SGD_HALF[key]
    monkeypatch.setitem(kernels.SGD_HALF, key, lambda *a: (calls.append(1), fused(*a)))
    kind = torch_dtype(dtype)
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", on)
        cluster = make_cluster(layout, num_servers=1, partition_elems=100_000, mode="sync",
                               num_workers=workers,
                               optimizer=OptimizerConfig(name="sgd", lr=0.05))
        clients = [cluster.client(w) for w in range(workers)]
        parts = cluster.shard_map.partitions
        gen = torch.Generator().manual_seed(5)
        clients[0].init_params(torch.randn(sum(sizes), generator=gen))
        replies = []
        server = cluster.servers[0]
        for clock in range(3):
            handles = []
            for w, c in enumerate(clients):  # in turn: a sum's order sets its rounding
                handles += [(p, c.push(p.id, (torch.randn(p.stop - p.start, generator=gen) * 4)
                                       .to(kind), clock, dtype=dtype)) for p in parts]
                deadline = time.monotonic() + 20
                while w < workers - 1 and time.monotonic() < deadline and not all(
                        w in server.parts[p.id].pushed_by for p in parts):
                    time.sleep(0.002)
                assert time.monotonic() < deadline, f"worker {w}'s pushes not taken in 20 s"
            replies += [h.wait()[p.id].to(torch.float32).clone() for p, h in handles]
        runs[on] = (replies, inproc.pull_all(clients[0], 3), len(calls))
        calls.clear()
    (on_replies, on_final, on_calls), (off_replies, off_final, off_calls) = runs[True], runs[False]
    assert on_calls == 3 * len(parts) and off_calls == 0
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
               for a, b in zip(on_replies, off_replies))
    assert torch.equal(on_final.view(torch.int32), off_final.view(torch.int32))


_WARMED = """
import sys
from tessera.cluster.role import warm_dense_kernels
from tessera.config.load import load_config
from tessera.ps import kernels
from tessera.ps.optim import spec_from_config
cfg = load_config(sys.argv[1], {"precision": "bf16", "ps.mode": sys.argv[2],
                                "optimizer.momentum": float(sys.argv[3])})
warm_dense_kernels(cfg, spec_from_config(cfg.optimizer))
print(sorted(f"{n}:{k}" for n, d in (("step", kernels.SGD_HALF), ("sum", kernels.SCALE_HALF))
             for k, v in d.items() if v.signatures))
"""


@pytest.mark.skipif(not kernels.ENABLED, reason="numba is not importable here")
@pytest.mark.parametrize("mode, momentum, compiled", [
    ("async", 0.0, ["step:('bfloat16', 'bfloat16')"]),
    ("sync", 0.0, ["step:('float32', 'bfloat16')", "sum:bfloat16"]),
    ("sync", 0.9, ["sum:bfloat16"]),
    ("async", 0.9, []),
])
def test_a_server_compiles_at_start_up_the_kernels_its_job_uses(mode, momentum, compiled):
    """A server's start-up (role.warm_dense_kernels) compiles what its job will run, so
    the first clock does not wait for numba: plain SGD's fused step (for the push itself
    in async, a sync clock's fp32 mean in sync), the sync sums, nothing for momentum in
    async. Each case in a fresh process: compiled kernels are per process."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _WARMED, str(ROOT / "examples" / "mnist.toml"),
                          mode, str(momentum)], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == repr(compiled)
