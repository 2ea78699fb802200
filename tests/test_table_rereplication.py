"""Table shards are re-replicated after a server death (issue 14 item 8, last part), with
real processes: three servers, ``--replication 2``, a sync job with an embedding table
(tests/scripts/table_job.py). Server 1 is kill -9'd while training runs: server 2 takes
its shard over and, being its only holder, copies it to server 0 (and server 0, whose
backup died, copies its own to server 2). Once the coordinator has that copy reported,
server 2 is kill -9'd too: server 0 takes over the shards of servers 1 and 2 and the job
completes, every acknowledged table push applied exactly once.
"""

from __future__ import annotations

from tests.harness import wait_for
from tests.test_table_faults import finish, kill_mid_training, launch, metric_lines


def test_a_table_shard_survives_the_death_of_its_second_holder(tmp_path):
    out = tmp_path / "run"
    steps = 160
    job = launch(out, "--servers", "3", "--replication", "2", steps=steps, sleep=0.02)
    kill_mid_training(job, out, "server", 1, 4)
    logs = out / "logs"

    def text(name: str) -> str:
        path = logs / name
        return path.read_text() if path.exists() else ""
    wait_for(lambda: "table shards of servers [1] have their second copy on server 0"
             in text("coordinator-0.log") or job.proc.poll() is not None, 60,
             "server 2's copy of shard 1 on server 0, reported")
    assert job.proc.poll() is None, text("coordinator-0.log")
    kill_mid_training(job, out, "server", 2, metric_lines(out) + 2)  # training goes on
    summary = finish(job, out)
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
    logs = out / "logs"

    def text(name: str) -> str:
        path = logs / name
        return path.read_text() if path.exists() else ""
    wait_for(lambda: "table shards of servers [0, 1] have their second copy on server 1"
             in text("coordinator-0.log") or job.proc.poll() is not None, 60,
             "server 0's copy of both table shards on the replacement, reported")
    assert job.proc.poll() is None, text("coordinator-0.log")
    assert "joined the running job" in text("server-1.log")
    kill_mid_training(job, out, "server", 0, metric_lines(out) + 2)
    summary = finish(job, out)
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
