"""Several tables in one message per server (issue 16 item 5): a server holding two
tables, in process with real sockets. Pulls and pushes of both tables in one request
(ids shared by the tables sent once) give exactly what the one-table requests give;
a re-sent batched push is applied once; malformed batches are refused whole."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import zmq

from tessera.config.schema import OptimizerConfig
from tessera.ps.client import ServerError
from tessera.ps.embedding import EmbeddingShard
from tessera.transport import wire
from tessera.transport.endpoint import close_context
from tests import harness

SECRET = "batch-test"
USERS = wire.TableSpec(name="users", dim=4, num_embeddings=None, init_scale=0.1, seed=1,
                       optimizer=OptimizerConfig(name="adagrad", lr=0.3))
BIAS = wire.TableSpec(name="user_bias", dim=1, num_embeddings=None, init_scale=0.1, seed=2,
                      optimizer=OptimizerConfig(name="sgd", lr=0.5))


def start(mode: str, workers: int):
    ctx = zmq.Context()
    stack = contextlib.ExitStack()
    srv, _, clients = stack.enter_context(harness.table_server(
        ctx, [USERS, BIAS], workers=workers, mode=mode, secret=SECRET))

    def close():
        stack.close()
        close_context(ctx)
    return srv, clients, close


def sent_frames(client):
    """Count the frames each request carries (the transport, not the code under test)."""
    counts = []
    ep = client.servers[0]
    send = ep.send

    def counting(msg, frames=()):
        counts.append((type(msg).__name__, len(frames)))
        return send(msg, frames)
    ep.send = counting
    return counts


def test_two_tables_in_one_message_equal_one_table_messages():
    srv, (c0, c1), close = start("sync", 2)
    try:
        seen = sent_frames(c0)
        u0, u1 = np.array([3, 8, 40]), np.array([8, 11])
        # Clock 0: worker 0 sends both tables in one push (ids shared: one ids frame);
        # worker 1 sends them the old way, one message per table.
        gu0, gb0 = torch.randn(3, 4), torch.randn(3, 1)
        gu1, gb1 = torch.randn(2, 4), torch.randn(2, 1)
        h0 = c0.push_tables(0, [("users", u0, gu0), ("user_bias", u0, gb0)], clock=0)
        h1 = [c1.push_rows("users", 0, u1, gu1, clock=0),
              c1.push_rows("user_bias", 0, u1, gb1, clock=0)]
        for h in [h0, *h1]:
            h.wait()
        assert seen == [("PushRows", 3)]  # one ids frame + two gradient frames
        q = np.array([3, 8, 11, 40, 77])
        users, bias = c0.pull_tables(0, [("users", q, 4), ("user_bias", q, 1)],
                                     clock=1).wait()
        assert seen[1] == ("PullRows", 1)  # the shared ids travel once
        # Oracle: plain shards applying the mean of the two workers' gradients once.
        for spec, g0, g1, got in ((USERS, gu0, gu1, users), (BIAS, gb0, gb1, bias)):
            ref = EmbeddingShard(spec, spec.optimizer)
            ref.lookup(np.array([3, 8, 11, 40]), 0)
            summed = {3: g0[0], 8: g0[1] + g1[0], 40: g0[2], 11: g1[1]}
            ids = np.array(sorted(summed))
            ref.apply(ids, torch.stack([summed[i] for i in ids]) / 2, clock=0)
            expected = ref.lookup(q, clock=1)
            assert torch.equal(got.reshape(len(q), spec.dim), expected), spec.name
            # ... and what the one-table pull answers
            alone = c1.pull_rows(spec.name, 0, q, clock=1).wait()
            assert torch.equal(alone, got)
        # Different ids per table: two ids frames.
        users, bias = c0.pull_tables(0, [("users", np.array([3]), 4),
                                         ("user_bias", np.array([8, 40]), 1)], clock=1).wait()
        assert seen[-1] == ("PullRows", 2) and users.numel() == 4 and bias.numel() == 2
    finally:
        close()


def test_a_resent_batched_push_is_applied_once_and_bad_batches_change_nothing():
    srv, (c0,), close = start("async", 1)
    try:
        ids = np.array([5, 6])
        h = c0.push_tables(0, [("users", ids, torch.ones(2, 4)),
                               ("user_bias", ids, torch.ones(2, 1))], clock=0)
        h.wait()
        once = {n: srv.tables.tables[n].shard.state_tensors()["values"].clone()
                for n in ("users", "user_bias")}
        # Send the same (worker, seq) again, as a client does after a failover.
        ep = c0.servers[0]
        req = ep.new_req()
        resent = wire.PushRows(req=req, worker=0, seq=c0.seq, clock=0, table="",
                               tables=["users", "user_bias"], ids_frame=[0, 0])
        ep.send(resent, [ids.tobytes(), torch.ones(2, 4).numpy().tobytes(),
                         torch.ones(2, 1).numpy().tobytes()])
        reply, _ = ep.wait(req, 10, "re-sent push", lambda: None)
        assert isinstance(reply, wire.Ack)
        for n, v in once.items():
            assert torch.equal(srv.tables.tables[n].shard.state_tensors()["values"], v), n
        # A bad batch (a table named twice; a gradient that is not finite in the second
        # table) is refused in one line and changes neither table.
        with pytest.raises(ServerError, match="names each once"):
            c0.push_tables(0, [("users", ids, torch.ones(2, 4)),
                               ("users", ids, torch.ones(2, 4))], clock=1).wait()
        with pytest.raises(ServerError, match="user_bias.*not finite"):
            c0.push_tables(0, [("users", ids, torch.ones(2, 4)),
                               ("user_bias", ids, torch.tensor([[1.0], [float("nan")]]))],
                           clock=1).wait()
        for n, v in once.items():
            assert torch.equal(srv.tables.tables[n].shard.state_tensors()["values"], v), n
    finally:
        close()


def test_model_tables_pull_and_push_in_one_message_each():
    from tessera.parallel.embedding import (ShardedEmbedding, ShardedEmbeddingBag, _Attached,
                                            pull_tables, push_tables)
    srv, (c0,), close = start("async", 1)
    try:
        users = ShardedEmbedding(None, 4, name="users")
        bias = ShardedEmbeddingBag(None, 1, name="user_bias", mode="sum")
        for t in (users, bias):
            t.attach(_Attached(c0, lambda: 0, torch.float32, "cpu"))
        u = torch.tensor([[3, 8], [8, 40]])
        before = c0.pull_rows("users", 0, np.array([3, 8, 40]), 0).wait().reshape(3, 4)
        seen = sent_frames(c0)
        pull_tables([(users, u), (bias, u)])
        out, b = users(u), bias(u)  # served from the rows pulled above
        assert [kind for kind, _ in seen] == ["PullRows"] and seen[0][1] == 1
        assert torch.equal(out.detach(), before[torch.tensor([[0, 1], [1, 2]])])
        (out.sum() + b.sum()).backward()
        push_tables([users, bias], clock=0)[0].wait()
        assert [kind for kind, _ in seen] == ["PullRows", "PushRows"]
        after = c0.pull_rows("users", 0, np.array([3, 8, 40]), 0).wait().reshape(3, 4)
        # Adagrad's first step moves each touched row by lr against its (positive) gradient.
        assert torch.allclose(after, before - USERS.optimizer.lr, atol=1e-6)
        # A table looked up with other ids than it was pulled for pulls as before.
        pull_tables([(users, torch.tensor([1]))])
        users(torch.tensor([2]))
        assert [kind for kind, _ in seen][-2:] == ["PullRows", "PullRows"]
    finally:
        close()
