"""Embedding tables inside fault tolerance, with real processes: a worker kill -9'd in a
sync job with a table is restarted and the job completes; a server kill -9'd under
``--replication 2`` (small partitions batched per server, rows prefetched) loses no
acknowledged table push, and a sync job ends with the model of a run without the kill,
bit for bit; a checkpoint holds the table at the dense partitions' clock and
``--resume`` restores its rows exactly; a huge row pull is refused by the server, split
by the client, and never stores rows beyond the budget.

The jobs run tests/scripts/table_job.py (digits + a 200-row ShardedEmbedding) through
``tessera launch`` (tests/harness.py); processes are killed by the pids in cluster.json.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tessera.ps.checkpoint import CheckpointStore
from tests import harness
from tests.harness import ROOT, Job, wait_for

SCRIPT = str(ROOT / "tests" / "scripts" / "table_job.py")


#: 1 KiB partitions: 21 of the table job's MLP, pushed to a server in one batch a step.
SMALL = ["--partition-mb", "0.001"]


def launch(out: Path, *flags, steps: int, sleep: float = 0.0, prefetch: bool = True) -> Job:
    """``flags`` may override ``--mode sync``. The script names each next batch to
    ``model.prefetch`` (its rows pulled ahead, with the step's pushes) unless not
    ``prefetch``."""
    return Job(["launch", "--workers", "2", "--servers", "2", "--mode", "sync", "--out", out,
                "--quiet", *flags, SCRIPT, "--steps", str(steps), "--sleep", str(sleep),
                *(["--prefetch"] if prefetch else [])], timeout_s=240)


def metric_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_mid_training(job: Job, out: Path, role: str, rank: int, lines: int) -> None:
    """SIGKILL ``role rank`` once metrics.jsonl has ``lines`` lines (5 steps each)."""
    wait_for(lambda: metric_lines(out) >= lines or job.proc.poll() is not None, 150,
             f"{lines} metrics lines in {out}")
    assert job.proc.poll() is None, "the job ended before the kill"
    procs = json.loads((out / "cluster.json").read_text())["processes"]
    os.kill(next(p["pid"] for p in procs if p["role"] == role and p["rank"] == rank),
            signal.SIGKILL)


def finish(job: Job, out: Path) -> dict:
    code, output = job.wait()
    assert code == 0, f"exit {code}:\n{output}"
    return json.loads((out / "summary.json").read_text())


def test_killed_worker_in_a_sync_job_with_tables_rejoins(tmp_path):
    out = tmp_path / "run"
    steps = 160
    job = launch(out, "--max-restarts", "1", steps=steps, sleep=0.03)
    kill_mid_training(job, out, "worker", 1, 4)
    summary = finish(job, out)
    log = (out / "logs" / "worker-1.log").read_text()
    assert summary["restarts"] == 1 and "rejoined at clock" in log, log[-2000:]
    # The table's clocks completed without the dead worker (no stall), and its
    # replacement's table pushes were taken (the job reached its last step).
    first = summary["worker_first_steps"][1]
    assert 0 < first < steps, summary
    assert min(summary["short_clocks"]) > 0, summary
    assert summary["steps"] == steps and summary["eval_accuracy"] >= 0.8, summary
    # Every acknowledgement of both lives counted, table row pushes included; what the
    # servers applied beyond them is bounded by the pushes of the step the kill cut
    # (partitions plus each table's push to each server).
    acked, applied = summary["pushes_acked"], summary["pushes_applied"]
    assert acked <= applied <= acked + summary["pushes_unanswered"], summary


@pytest.mark.parametrize("mode", ["sync", "hybrid"])
def test_killed_server_with_replication_loses_no_acknowledged_table_push(tmp_path, mode):
    """Small partitions (batched per server) and prefetched rows, server 1 kill -9'd
    while training runs. Sync: beside it the same job with no replication, no kill, no
    batching and no prefetch; both end with the same model, bit for bit."""
    out = tmp_path / "run"
    steps = 160
    # sync: --max-restarts too; a replacement server may join before the end (it is given
    # copies and serves nothing: tests/test_table_rereplication.py).
    ckpt = ["--checkpoint-every", "80", "--max-restarts", "1"] if mode == "sync" else []
    job = launch(out, "--replication", "2", "--mode", mode, *SMALL, *ckpt, steps=steps,
                 sleep=0.02)
    plain = launch(tmp_path / "plain", *SMALL, "--batch-kib", "0", steps=steps,
                   prefetch=False) if mode == "sync" else None
    kill_mid_training(job, out, "server", 1, 4)
    summary = finish(job, out)
    replaced = summary["servers_replaced"]
    assert summary["dead_servers"] == ([] if replaced.get("1") == 1 else [1]), summary
    # Every push a worker saw acknowledged (dense partitions and each table shard) was
    # applied once on the surviving copy: per step and worker, one push per partition
    # and one per table per server (hybrid: the servers hold only the table).
    expected = steps * 2 * (summary["partitions"] + 2)
    assert summary["pushes_acked"] == summary["pushes_applied"] == expected, summary
    survivor = (out / "logs" / "server-0.log").read_text()
    assert "promoted to primary of the table shards of server 1" in survivor, survivor[-2000:]
    assert sum(summary["rows_per_server"]["users"]) == 200, summary
    assert summary["eval_accuracy"] >= 0.8, summary
    if mode == "sync":  # the survivor saves the shard it took over, at the same clock
        saved = table_tensors(str(out / "checkpoints"), steps)
        assert {int(v) for k, v in saved.items() if k.endswith("/steps")} == {steps}, saved.keys()
        ids = torch.cat([v for k, v in saved.items() if k.endswith("/ids")])
        assert any("t/users@s1/" in k for k in saved) and sorted(ids.tolist()) == list(range(200))
    if plain is None:
        return
    reference = finish(plain, tmp_path / "plain")
    # Batches were in use: from the kill (step ~20) on, server 0 held every partition, so
    # one push per partition would have brought it more than steps x workers x partitions
    # / 2 messages; it took (off its socket, counted by the endpoint) under that, its
    # rows, pulls and its backup's replication messages included.
    assert summary["partitions"] >= 16, summary
    assert 2 * summary["server_messages"][0] < steps * 2 * summary["partitions"], \
        (summary["server_messages"], reference["server_messages"])
    # Nothing acknowledged lost or applied twice, across the failover: the same model.
    got, want = (load_file(str(d / "final.safetensors")) for d in (out, tmp_path / "plain"))
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def table_tensors(url: str, clock: int) -> dict:
    store = CheckpointStore(url)
    manifest = store.manifest(clock)
    out = {}
    for name in manifest["files"].values():
        f = store.open_shard(clock, name)
        assert f.meta["clock"] == clock
        for key in f.keys():
            if key.startswith("t/"):
                out[f"{name}:{key}"] = f.get(key)
    return out


def test_tables_are_checkpointed_at_the_cluster_clock_and_resume_restores_them(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # (30 steps of 2 x 16 samples stay in the first epoch of the script's 1,500.)
    code, output = Job(["launch", "--workers", "2", "--servers", "2", "--mode", "sync",
                        "--out", a, "--quiet", "--checkpoint-every", "10", "--batch-size", "16", SCRIPT,
                        "--steps", "30", "--batch", "16"], timeout_s=180).wait()
    assert code == 0, output
    store = CheckpointStore(str(a / "checkpoints"))
    assert store.clocks()[0][-1] == 30
    saved = table_tensors(str(a / "checkpoints"), 20)
    # One clock for everything: every server's shard of the table has had exactly one
    # update per clock (sync), so its step count is the checkpoint's clock.
    steps = [v for k, v in saved.items() if k.endswith("/steps")]
    assert len(steps) == 2 and all(int(s) == 20 for s in steps), saved.keys()
    ids = torch.cat([v for k, v in saved.items() if k.endswith("t/users/ids")])
    assert len(set(ids.tolist())) == len(ids) > 150  # each touched row once, on its owner
    # Resume at clock 30 on one server, no further step: the state the resumed job holds
    # (written as its own first checkpoint) has the same rows and optimizer state.
    code, output = Job(["launch", "--workers", "2", "--servers", "1", "--mode", "sync",
                        "--out", b, "--quiet", "--resume", str(a), "--checkpoint-every", "10",
                        "--batch-size", "16",
                        SCRIPT, "--steps", "30", "--batch", "16"], timeout_s=180).wait()
    assert code == 0, output
    before, after = table_tensors(str(a / "checkpoints"), 30), table_tensors(
        str(b / "checkpoints"), 30)

    def merged(tensors: dict) -> dict:
        ids = torch.cat([v for k, v in tensors.items() if k.endswith("t/users/ids")])
        order = torch.argsort(ids)
        out = {"ids": ids[order]}
        for what in ("values", "state.sum"):
            out[what] = torch.cat([v for k, v in tensors.items()
                                   if k.endswith(f"t/users/{what}")])[order]
        return out

    m_before, m_after = merged(before), merged(after)
    for key in m_before:
        torch.testing.assert_close(m_after[key], m_before[key], rtol=0, atol=0)


# ---------------------------------------------------------------- bounded row pulls


@pytest.fixture
def table_server(ctx, monkeypatch):
    """One server (real sockets, in this process) with a 4-wide table capped at 100 rows
    per server, and a reply limit of 64 rows so that the test's pulls are small."""
    from tessera.config.schema import OptimizerConfig
    from tessera.ps import table_server as ts
    from tessera.transport import wire

    monkeypatch.setattr(ts, "MAX_ROWS_REPLY_BYTES", 64 * 4 * 4)
    spec = wire.TableSpec(name="items", dim=4, num_embeddings=None, init_scale=0.1, seed=3,
                          max_rows=100, optimizer=OptimizerConfig(name="sgd", lr=0.5))
    with harness.table_server(ctx, [spec]) as (srv, _, (client,)):
        yield srv, client


def test_a_huge_row_pull_is_refused_split_and_bounded(table_server):
    from tessera.ps.client import ServerError
    from tessera.ps.embedding_ids import initial_rows
    srv, client = table_server
    ids = np.arange(1000, 1300, dtype=np.int64)  # 300 ids: 5 replies' worth
    # One request over the reply limit: refused in one line naming the limit.
    with pytest.raises(ServerError, match=r"1024-byte reply limit; pull at most 64 ids"):
        client.pull_rows("items", 0, ids, clock=0).wait()
    # The client splits a pull that knows the row width into requests under the limit.
    t0 = time.monotonic()
    rows = client.pull_rows("items", 0, ids, clock=0, dim=4).wait().reshape(300, 4)
    assert time.monotonic() - t0 < 10
    torch.testing.assert_close(rows, initial_rows(ids, 4, 3, 0.1))
    # Pulls answered rows beyond the budget without storing them.
    assert srv.tables.tables["items"].shard.num_rows == 100
    # An update still works and keeps the budget (the least recently touched go).
    client.push_rows("items", 0, ids[-2:], torch.ones(2, 4), clock=0).wait()
    assert srv.tables.tables["items"].shard.num_rows == 100
    got = client.pull_rows("items", 0, ids[-2:], clock=1, dim=4).wait().reshape(2, 4)
    torch.testing.assert_close(got, initial_rows(ids[-2:], 4, 3, 0.1) - 0.5)


def test_replication_refuses_tables_whose_rows_depend_on_lookups():
    from tests.harness import run_cli
    # clicks caps each server's rows (max_rows_per_server): the backup, which replays
    # updates and not lookups, would keep other rows. One line, before anything starts.
    code, output = run_cli(["run", str(ROOT / "examples" / "clicks.toml"), "--replication", "2"],
                           timeout_s=60)
    assert code == 2 and "--replication" in output and "max_rows_per_server" in output, output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output


def test_table_shards_route_to_their_one_backup_and_stop_when_both_copies_died(ctx):
    """Without the coordinator's word on where table shards are (``owners``), a client
    routes shard s to its first copy, server s + 1. After server 1 dies its rows go to
    server 2; after server 2 dies too, shard 2's rows go to server 0 and shard 1's have no
    known copy left: a row request for them stops in one line naming them (no hang, no
    wrong server). With the coordinator's word, re-replicated shards are followed:
    tests/test_table_rereplication.py."""
    from tessera.ps.client import PSClient, ServerError
    from tessera.ps.sharding import ShardMap
    from tessera.transport.endpoint import ServerEndpoint
    eps = [ServerEndpoint(ctx, "127.0.0.1", "secret") for _ in range(3)]
    dead: list = []
    client = PSClient(ctx=ctx, shard_map=ShardMap(layout=(), partitions=(), num_servers=3),
                      server_addresses=[ep.address for ep in eps], secret="secret", worker=0,
                      timeout_s=5, dead_servers=lambda: list(dead))
    try:
        dead.append(1)
        assert client.row_servers() == [0, 2] and client.shard_owner == [0, 2, 2]
        dead.append(2)
        client._route()
        assert client.shard_owner == [0, -1, 0]
        with pytest.raises(ServerError, match="table rows of server 1 have no copy left"):
            client.push_rows("items", 1, np.array([4]), torch.ones(1, 4), clock=0)
        with pytest.raises(ServerError, match="table rows of server 1 have no copy left"):
            client.row_servers()
    finally:
        client.close()
        for ep in eps:
            ep.close()
