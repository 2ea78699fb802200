"""Tier 2: bf16 on the wire with fp32 masters equals fp32 training, within the
bound that rounding the gradient to bf16 implies.

bf16 keeps 8 significant bits, so round-to-nearest changes a value by at most
2^-8 of its magnitude (unit roundoff u = 2^-8). With plain SGD the master after
T steps is w0 - lr * sum_t g_t; rounding each pushed g_t to bf16 moves it by at
most lr * sum_t |g_t| * u, elementwise. The pulled values are bf16 again: each is
within |master| * u of the fp32 master. The test holds both bounds.
"""

from __future__ import annotations

import threading

import torch
import zmq

from tessera.config.schema import OptimizerConfig
from tessera.ps.client import PSClient
from tessera.ps.server import ParameterServer, ServerHooks, ServerOptions
from tessera.ps.sharding import plan_shards
from tessera.transport.endpoint import ServerEndpoint, close_context
from tessera.transport.wire import ParamSpec

U_BF16 = 2.0 ** -8
SECRET = "amp-wire-test"


def _cluster(n: int, wire_dtype: str, lr: float):
    ctx = zmq.Context()
    shard_map = plan_shards([ParamSpec(name="w", shape=[n], numel=n)], 2, n // 3 + 1)
    stop = threading.Event()
    threads, endpoints = [], []
    for rank in range(2):
        ep = ServerEndpoint(ctx, "127.0.0.1", SECRET)
        endpoints.append(ep)
        server = ParameterServer(ServerOptions(rank=rank, num_workers=1, mode="sync"),
                                 endpoint=ep, partitions=shard_map.on_server(rank),
                                 optimizer=OptimizerConfig(name="sgd", lr=lr),
                                 hooks=ServerHooks(should_stop=stop.is_set))
        t = threading.Thread(target=server.serve, daemon=True)
        t.start()
        threads.append((t, server))
    client = PSClient(ctx=ctx, shard_map=shard_map, server_addresses=[e.address for e in endpoints],
                      secret=SECRET, worker=0, timeout_s=10, wire_dtype=wire_dtype)
    client.connect()
    return ctx, shard_map, client, threads, stop, endpoints


def _train(wire_dtype: str, w0: torch.Tensor, grads: list[torch.Tensor], lr: float):
    ctx, shard_map, client, threads, stop, endpoints = _cluster(w0.numel(), wire_dtype, lr)
    try:
        client.init_params(w0)
        pulled = torch.empty_like(w0)
        for clock, g in enumerate(grads):
            handles = [client.push(p.id, g[p.start:p.stop], clock) for p in shard_map.partitions]
            for p, h in zip(shard_map.partitions, handles):
                pulled[p.start:p.stop] = h.wait()[p.id].float()
        masters = torch.empty_like(w0)
        for _, server in threads:
            for st in server.parts.values():
                masters[st.info.start:st.info.stop] = st.rule.master
        return masters, pulled, client.bytes_pushed
    finally:
        stop.set()
        for t, _ in threads:
            t.join(timeout=5)
        client.close()
        for ep in endpoints:
            ep.close()
        close_context(ctx)


def test_bf16_wire_with_fp32_master_equals_fp32_within_rounding_bound():
    torch.manual_seed(0)
    n, lr, steps = 10_000, 0.1, 8
    w0 = torch.randn(n)
    grads = [torch.randn(n) * 10 ** torch.empty(n).uniform_(-3, 1) for _ in range(steps)]
    master32, pulled32, bytes32 = _train("float32", w0, grads, lr)
    master16, pulled16, bytes16 = _train("bfloat16", w0, grads, lr)

    # fp32 path is plain SGD, exactly.
    torch.testing.assert_close(master32, w0 - lr * torch.stack(grads).sum(0), rtol=1e-6, atol=1e-6)
    # Masters stay fp32 and differ only by the gradient rounding bound.
    assert master16.dtype == torch.float32
    bound = lr * torch.stack(grads).abs().sum(0) * U_BF16 + 1e-6
    assert bool(((master16 - master32).abs() <= bound).all())
    # ...and the bound is not vacuous: the difference is real but small.
    assert (master16 - master32).abs().max() > 0
    # Pulled bf16 values are the masters rounded once.
    assert bool(((pulled16 - master16).abs() <= master16.abs() * U_BF16 + 1e-30).all())
    assert bytes16 * 2 == bytes32
