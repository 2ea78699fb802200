"""The dense path's buffers: replies sent without a fresh copy must never show values
newer than the update they answer, even while ZeroMQ still holds them unsent.

Servers run in threads of this process on real loopback sockets
(``tests.test_server_inproc.InprocCluster``); the slow worker is a raw DEALER with a
one-message receive queue and a 4 KiB socket buffer, so the server's replies to it
pile up inside the server's ZeroMQ, unsent, while the server goes on updating.
"""

from __future__ import annotations

import time

import pytest
import torch
import zmq

from tessera.config.schema import OptimizerConfig
from tessera.transport import wire
from tessera.transport.frames import frame_to_tensor, tensor_to_frame
from tests import test_server_inproc as inproc

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


def _reply(sock: zmq.Socket, dtype: str) -> tuple[int, torch.Tensor]:
    assert sock.poll(20_000), "no reply within 20 s"
    header, *frames = sock.recv_multipart(copy=False)
    msg = wire.decode(header.buffer)
    assert isinstance(msg, wire.Params), msg
    return msg.req, frame_to_tensor(frames[0].buffer, dtype, ELEMS).to(torch.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_async_replies_held_by_zeromq_keep_their_values(make_cluster, dtype):
    """Async: every push is applied at once and answered from a reused reply buffer;
    eight replies of 4 MiB to a worker that does not read stay queued in the server's
    ZeroMQ while later pushes update the master. Each must still carry the values right
    after its own update (a buffer reused before its MessageTracker is done would show
    a later one)."""
    cluster = make_cluster([wire.ParamSpec(name="w", shape=[ELEMS], numel=ELEMS)],
                           num_servers=1, partition_elems=ELEMS, mode="async", num_workers=1,
                           optimizer=OptimizerConfig(name="sgd", lr=LR))
    cluster.client(0).init_params(torch.zeros(ELEMS))
    sock = _slow_dealer(cluster.ctx, cluster.addresses[0])
    try:
        wire_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
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


def test_sync_zero_copy_reply_waits_for_every_worker(make_cluster):
    """Sync: the reply is the master itself, zero-copy (docs/architecture.md: the master
    changes only once every worker pushed the next clock, which each does only after
    receiving this reply). Worker 0 leaves its clock-0 reply unread in the server while
    worker 1 takes its own and pushes clock 1; the clock-1 update must wait, and
    worker 0's reply, read late, still holds the clock-0 values."""
    cluster = make_cluster([wire.ParamSpec(name="w", shape=[ELEMS], numel=ELEMS)],
                           num_servers=1, partition_elems=ELEMS, mode="sync", num_workers=2,
                           optimizer=OptimizerConfig(name="sgd", lr=LR))
    fast = cluster.client(1)
    cluster.client(0).init_params(torch.zeros(ELEMS))
    sock = _slow_dealer(cluster.ctx, cluster.addresses[0])
    try:
        g0, g1 = torch.full((ELEMS,), 2.0), torch.full((ELEMS,), 4.0)
        _push(sock, 1, 0, 0, g0, "float32")
        after0 = fast.push(0, g1, 0).wait()[0].clone()
        assert torch.equal(after0, torch.full((ELEMS,), -LR * 3.0))  # mean 3
        h = fast.push(0, g1, 1)  # clock 1: must wait for worker 0's push
        time.sleep(0.3)
        assert cluster.servers[0].stats["updates"] == 1
        req, values = _reply(sock, "float32")
        assert req == 1 and torch.equal(values, after0)
        _push(sock, 2, 0, 1, g0, "float32")
        assert torch.equal(h.wait()[0], torch.full((ELEMS,), -LR * 6.0))
        assert _reply(sock, "float32")[0] == 2
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
