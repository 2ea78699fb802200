"""Tier 2: a parameter server holding an embedding table, in process with real
sockets: sync merging of row-sparse pushes from two workers equals the mean
gradient applied once; bad ids and wrong dtypes are refused and change nothing."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import zmq

from tessera.config.schema import OptimizerConfig
from tessera.ps.client import ServerError
from tessera.ps.embedding import EmbeddingShard
from tessera.ps.embedding_ids import initial_rows
from tessera.transport import wire
from tessera.transport.endpoint import close_context
from tests.harness import table_server

SECRET = "table-test"
SPEC = wire.TableSpec(name="items", dim=4, num_embeddings=100, init_scale=0.1, seed=5,
                      optimizer=OptimizerConfig(name="sgd", lr=0.5))


@pytest.fixture
def server():
    ctx = zmq.Context()
    with table_server(ctx, [SPEC], workers=2, secret=SECRET) as (srv, _, clients):
        yield srv, clients
    close_context(ctx)


def test_sync_row_pushes_merge_to_the_mean_applied_once(server):
    srv, (c0, c1) = server
    ids0, ids1 = np.array([1, 5, 7]), np.array([5, 9])
    g0, g1 = torch.randn(3, 4), torch.randn(2, 4)
    # Sync: a push is answered once its clock is applied, i.e. after both are in.
    h0 = c0.push_rows("items", 0, ids0, g0, clock=0)
    c1.push_rows("items", 0, ids1, g1, clock=0).wait()
    h0.wait()
    got = c0.pull_rows("items", 0, np.array([1, 5, 7, 9, 11]), clock=1).wait().reshape(5, 4)
    # Oracle: a plain shard applying the mean of the two workers' gradients once.
    ref = EmbeddingShard(SPEC, SPEC.optimizer)
    summed = {1: g0[0], 5: g0[1] + g1[0], 7: g0[2], 9: g1[1]}
    ids = np.array(sorted(summed))
    ref.apply(ids, torch.stack([summed[i] for i in ids]) / 2, clock=0)
    expected = ref.lookup(np.array([1, 5, 7, 9, 11]), clock=1)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got[4], initial_rows(np.array([11]), 4, 5, 0.1)[0])


@pytest.mark.parametrize("bad", [np.array([-1, 3]), np.array([3, 100])], ids=["negative", "range"])
def test_bad_ids_are_refused_and_change_nothing(server, bad):
    srv, (c0, c1) = server
    before = srv.tables.tables["items"].shard.state_tensors()
    with pytest.raises(ServerError, match="items"):
        c0.pull_rows("items", 0, bad, clock=0).wait()
    with pytest.raises(ServerError, match="items"):
        c0.push_rows("items", 0, bad, torch.zeros(2, 4), clock=0).wait()
    after = srv.tables.tables["items"].shard.state_tensors()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(before[k], after[k])
    # The server still serves, and the clock was not consumed by the refused push.
    h0 = c0.push_rows("items", 0, np.array([2]), torch.ones(1, 4), clock=0)
    c1.push_rows("items", 0, np.array([], dtype=np.int64), torch.zeros(0, 4), clock=0).wait()
    h0.wait()
    row = c0.pull_rows("items", 0, np.array([2]), clock=1).wait()
    torch.testing.assert_close(row, initial_rows(np.array([2]), 4, 5, 0.1)[0] - 0.5 * 0.5)


def test_module_rejects_wrong_dtype_and_range_before_sending():
    from tessera.nn import ShardedEmbedding
    emb = ShardedEmbedding(10, 4, name="t")
    with pytest.raises(ValueError, match="int64 or int32"):
        emb._check(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="out of range"):
        emb._check(torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=">= 0"):
        emb._check(torch.tensor([-2]))
    with pytest.raises(RuntimeError, match="tessera.distribute"):
        emb(torch.tensor([1]))


def test_embedding_bag_module_matches_torch_and_pushes_row_grads(server):
    """ShardedEmbeddingBag against nn.EmbeddingBag over the same initial rows."""
    import torch.nn.functional as F

    from tessera.nn import ShardedEmbeddingBag
    from tessera.parallel.embedding import _Attached
    srv, (c0, c1) = server
    bag = ShardedEmbeddingBag(100, 4, name="items", mode="mean")
    bag.spec = SPEC  # the table the fixture's server holds
    clock = {"c": 0}
    bag.attach(_Attached(c0, lambda: clock["c"], torch.float32, torch.device("cpu")))
    ids = torch.tensor([3, 8, 3, 50, 8, 8])
    offsets = torch.tensor([0, 2, 4])
    out = bag(ids, offsets)
    table = initial_rows(np.arange(100), 4, 5, 0.1)
    ref_weight = table.clone().requires_grad_()
    ref = F.embedding_bag(ids, ref_weight, offsets, mode="mean")
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    handles = bag.push(clock=0)
    c1.push_rows("items", 0, np.array([], dtype=np.int64), torch.zeros(0, 4), clock=0).wait()
    for h in handles:
        h.wait()
    got = c0.pull_rows("items", 0, np.array([3, 8, 50]), clock=1).wait().reshape(3, 4)
    # sgd lr 0.5 on the mean of the two workers' pushes (worker 1 pushed nothing).
    expected = table[[3, 8, 50]] - 0.5 * ref_weight.grad[[3, 8, 50]] / 2
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("shape", ["offsets", "empty_bag", "2d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bag_backward_equals_torchs(mode, shape, dtype):
    """ShardedEmbeddingBag's own backward (one index_add_ per step) gives the row
    gradients torch's embedding_bag gives, for every bag layout the module accepts."""
    import torch.nn.functional as F

    from tessera.parallel.embedding import _BagOfRows
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(7, 5, generator=gen).to(dtype)
    if shape == "2d":
        inverse, offsets = torch.randint(0, 7, (4, 3), generator=gen), None
    else:
        inverse = torch.randint(0, 7, (9,), generator=gen)
        offsets = torch.tensor([0, 2, 2, 6] if shape == "empty_bag" else [0, 4, 5, 8])
    mine, ref = rows.clone().requires_grad_(), rows.clone().requires_grad_()
    out = _BagOfRows.apply(inverse, mine, offsets, mode)
    expected = F.embedding_bag(inverse, ref, offsets, mode=mode)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    weights = torch.randn(out.shape, generator=gen).to(dtype)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    assert mine.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(mine.grad, ref.grad, rtol=tol, atol=tol)


def test_export_comes_in_pages_below_the_reply_limit(server, monkeypatch):
    """A DumpRows reply holds at most MAX_ROWS_REPLY_BYTES of rows (the client's frame
    limit would otherwise break its connection on a big shard): the client asks page
    after page and gets every row, in id order (here 3 rows a page, 10 rows)."""
    import tessera.ps.table_server as ts
    srv, (c0, c1) = server
    monkeypatch.setattr(ts, "MAX_ROWS_REPLY_BYTES", 3 * SPEC.dim * 4)
    touched = np.array([2, 3, 11, 17, 19, 23, 40, 41, 77, 99])
    got_rows = c0.pull_rows("items", 0, touched, clock=0, dim=SPEC.dim).wait()
    sent = []
    ep = c0.servers[0]
    real_send = ep.send
    monkeypatch.setattr(ep, "send", lambda msg, *a, **k: (sent.append(msg), real_send(msg, *a, **k))[1])
    ids, rows = c0.dump_rows("items", 0)
    assert ids.tolist() == touched.tolist()
    torch.testing.assert_close(rows, got_rows.reshape(len(touched), SPEC.dim))
    assert [m.start for m in sent] == [0, 3, 6, 9]  # four pages, none over the limit


def test_rows_pulled_through_shared_memory_are_the_tables_and_pushes_step_them():
    """A client on the server's host: its row pulls of 64 KiB and more come through the
    shared-memory segment, gathered there by the server (tessera.transport.shm's
    ``reserve``: no copy), and equal a shard in this process stepped with the same
    pushes, bit for bit: rows the pull creates, and rows pulled again after their steps."""
    spec = wire.TableSpec(name="big", dim=64, num_embeddings=None, init_scale=0.1, seed=3,
                          optimizer=OptimizerConfig(name="adagrad", lr=0.05))
    ctx = zmq.Context()
    ref = EmbeddingShard(spec, spec.optimizer)
    rng = np.random.default_rng(2)
    try:
        with table_server(ctx, [spec], mode="async", secret=SECRET, shm=True) as \
                (_, ep, (client,)):
            for clock in range(8):
                ids = np.unique(rng.integers(0, 20_000, size=3000))  # ~700 KB of rows
                got = client.pull_rows("big", 0, ids, clock).wait().reshape(len(ids), 64)
                assert torch.equal(got, ref.lookup(ids, clock)), clock
                del got  # the reply's place in the segment is let go of
                g = torch.from_numpy(rng.standard_normal((len(ids), 64), dtype=np.float32))
                client.push_rows("big", 0, ids, g, clock).wait()
                ref.apply(ids, g, clock)
            assert client.servers[0].shm_bytes_in >= 3 * 2500 * 64 * 4  # rows came that way
            assert ep.shm_bytes_out == client.servers[0].shm_bytes_in
    finally:
        close_context(ctx)
