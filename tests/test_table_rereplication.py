"""Table shards are re-replicated after a server death (issue 14 item 8, last part), with
real processes: three servers, ``--replication 2``, a sync job with an embedding table
(tests/scripts/table_job.py). Server 1 is kill -9'd while training runs: server 2 takes
its shard over and, being its only holder, copies it to server 0 (and server 0, whose
backup died, copies its own to server 2). Once the coordinator has that copy reported,
server 2 is kill -9'd too: server 0 takes over the shards of servers 1 and 2 and the job
completes, every acknowledged table push applied exactly once.
"""

from __future__ import annotations

import pytest

from tests.harness import wait_for
from tests.test_table_faults import finish, kill_mid_training, launch, metric_lines


def log_text(out, name: str) -> str:
    path = out / "logs" / name
    return path.read_text() if path.exists() else ""


def kill_once_copied(job, out, copied: str, what: str, victim: int, check=None) -> None:
    """Wait until the coordinator logs ``copied`` (a second copy reported), run ``check``,
    then kill -9 server ``victim`` while training goes on."""
    wait_for(lambda: copied in log_text(out, "coordinator-0.log")
             or job.proc.poll() is not None, 60, what)
    assert job.proc.poll() is None, log_text(out, "coordinator-0.log")
    if check is not None:
        check()
    kill_mid_training(job, out, "server", victim, metric_lines(out) + 2)



def test_a_table_shard_survives_the_death_of_its_second_holder(tmp_path):
    out = tmp_path / "run"
    steps = 160
    job = launch(out, "--servers", "3", "--replication", "2", steps=steps, sleep=0.02)
    kill_mid_training(job, out, "server", 1, 4)
    kill_once_copied(job, out, "table shards of servers [1] have their second copy on server 0",
                     "server 2's copy of shard 1 on server 0, reported", victim=2)
    summary = finish(job, out)

    def text(name: str) -> str:
        return log_text(out, name)
    assert sorted(summary["dead_servers"]) == [1, 2], summary
    # Per step and worker: one push per partition and one per table per shard (3).
    expected = steps * 2 * (summary["partitions"] + 3)
    assert summary["pushes_acked"] == summary["pushes_applied"] == expected, summary
    survivor = text("server-0.log")
    for shard in (1, 2):
        assert f"promoted to primary of the table shards of server {shard}" in survivor, \
            survivor[-2000:]
    assert "partitions [1] and table shards of servers [1] copied to server 0" in \
        text("server-2.log"), text("server-2.log")[-2000:]
    assert sum(summary["rows_per_server"]["users"]) == 200, summary
    assert summary["eval_accuracy"] >= 0.8, summary


def test_a_replacement_server_is_given_the_table_shards(tmp_path):
    """Two servers, ``--max-restarts 1``: server 1 dies, server 0 serves both shards; the
    launcher's new server 1 joins, server 0 copies it both (and the dense partitions).
    Then server 0 dies too: the replacement takes everything over and the job completes."""
    out = tmp_path / "run"
    steps = 240  # a replacement process starts (seconds) while training runs
    job = launch(out, "--replication", "2", "--max-restarts", "1", steps=steps, sleep=0.02)
    kill_mid_training(job, out, "server", 1, 4)
    def joined() -> None:
        assert "joined the running job" in log_text(out, "server-1.log")
    kill_once_copied(job, out, "table shards of servers [0, 1] have their second copy on "
                     "server 1", "server 0's copy of both table shards on the replacement, "
                     "reported", victim=0, check=joined)
    summary = finish(job, out)

    def text(name: str) -> str:
        return log_text(out, name)
    replaced = summary["servers_replaced"]  # server 0's replacement may join before the end
    assert replaced.get("1") == 1 and summary["dead_servers"] == ([] if "0" in replaced
                                                                   else [0]), summary
    expected = steps * 2 * (summary["partitions"] + 2)
    assert summary["pushes_acked"] == summary["pushes_applied"] == expected, summary
    for shard in (0, 1):
        assert f"promoted to primary of the table shards of server {shard}" in \
            text("server-1.log"), text("server-1.log")[-2000:]
    assert sum(summary["rows_per_server"]["users"]) == 200, summary
    assert summary["eval_accuracy"] >= 0.8, summary


def test_a_table_copy_is_bit_identical_and_dedups_as_its_primary():
    """One piece, in-process: a shard copied whole (its wire message and frames) answers
    and updates exactly as the primary it came from, and a row update the copy already
    holds (same worker and sequence) is not applied twice."""
    import msgspec
    import numpy as np
    import torch

    from tessera.config.schema import OptimizerConfig
    from tessera.ps.consistency import make_consistency
    from tessera.ps.table_server import TableService
    from tessera.transport import wire
    from tessera.transport.frames import tensor_to_frame

    spec = wire.TableSpec(name="users", dim=4, init_scale=0.1, seed=5,
                          optimizer=OptimizerConfig(name="adagrad", lr=0.1))
    sent: list = []

    def service(rank: int) -> TableService:
        stats = dict(bytes_sent=0, bytes_received=0, retries=0, short_clocks=0, updates=0,
                     promoted=0)
        return TableService(rank=rank, tables=[spec], policy=make_consistency("async", 2),
                            send=lambda *a: sent.append(a), stats=stats)
    primary, backup = service(0), service(1)
    st = primary.tables["users"]
    gen = torch.Generator().manual_seed(0)
    for seq in range(3):
        ids = np.array([seq, 7, 40 + seq], dtype=np.int64)
        st.shard.apply(ids, torch.randn(3, 4, generator=gen), st.clock)
        st.last_seq[1] = seq
        st.applied_pushes += 1
    msg, tensors = primary.copy_message(st, req=9, source=0, members={0: 0, 1: 0})
    msg = msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=wire.Replicate)
    backup.on_copy(b"p", msg, [bytes(tensor_to_frame(t)) for t in tensors])
    copy = backup.copies[0]["users"]
    for key, value in st.shard.export_state().items():
        assert torch.equal(copy.shard.export_state()[key], value), key
    assert (copy.clock, copy.applied_pushes, copy.last_seq) == (st.clock, 3, {1: 2})
    # An update forwarded again after the copy (same worker, seq): acked, not applied.
    again = wire.Replicate(req=10, kind="rows", partitions=[0], clock=st.clock, pushes=1,
                           worker=1, seq=2, table="users")
    ids, grads = np.array([7], dtype=np.int64), torch.ones(1, 4)
    backup.on_replicate(b"p", again, [ids.tobytes(), bytes(tensor_to_frame(grads))])
    assert copy.applied_pushes == 3 and torch.equal(
        copy.shard.export_state()["values"], st.shard.export_state()["values"])
    # The next one is applied, identically on both.
    nxt = msgspec.structs.replace(again, req=11, seq=3)
    backup.on_replicate(b"p", nxt, [ids.tobytes(), bytes(tensor_to_frame(grads))])
    st.shard.apply(ids, grads.clone(), st.clock)
    for key, value in st.shard.export_state().items():
        assert torch.equal(copy.shard.export_state()[key], value), key
    # Taken over once its source dies; a copy of a shard served here is refused.
    backup.follow_servers({0})
    assert backup.served() == [0, 1] and not backup.copies
    from tessera.ps.consistency import RequestError
    with pytest.raises(RequestError, match="this server serves them"):
        backup.on_copy(b"p", msg, [bytes(tensor_to_frame(t)) for t in tensors])
