"""Tier 3: a replacement server joins a running job (issue 14 item 8, second half).

Two servers, ``--replication 2 --max-restarts 1``: server 1 is killed while training
runs; server 0 takes over its partitions (one copy of everything), the launcher starts
a new server 1, which registers, is sent a full copy of every partition and becomes
server 0's backup. Then server 0, which held the only copy after the first death, is
killed too: the replacement takes over and the job completes with every acknowledged
push applied once, on the copy that survived.
"""

from __future__ import annotations

import json

import pytest

from tests.harness import Job, wait_for
from tests.test_faults import DIGITS, finish, kill_after, metric_lines


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_replacement_server_joins_then_the_survivor_dies(tmp_path, mode):
    out = tmp_path / "run"
    job = Job(["run", DIGITS, "--out", out, "--quiet", "--mode", mode, "--servers", "2",
               "--replication", "2", "--max-restarts", "1", "--epochs", "40"], timeout_s=240)
    kill_after(job, out, "server", 1, 2)
    logs = out / "logs"

    def text(name: str) -> str:
        path = logs / name
        return path.read_text() if path.exists() else ""
    # The replacement registers (the coordinator says so), and server 0 copies it all.
    wait_for(lambda: "copied to server 1" in text("server-0.log")
             or job.proc.poll() is not None, 60, "server 0's copy onto the replacement")
    assert "server 1 replaced" in text("coordinator-0.log"), text("coordinator-0.log")
    assert "joined the running job" in text("server-1.log")
    lines = metric_lines(out)
    kill_after(job, out, "server", 0, lines + 2)  # training goes on in between
    output = finish(job)
    summary = json.loads((out / "summary.json").read_text())
    # --max-restarts 1 replaces server 0 too: it may join before the job ends.
    replaced = summary["servers_replaced"]
    assert replaced.get("1") == 1 and summary["dead_servers"] == ([] if "0" in replaced
                                                                   else [0]), output
    expected = summary["steps"] * summary["workers"] * summary["partitions"]
    assert summary["pushes_applied"] == summary["pushes_acked"] == expected, summary
    assert summary["eval_accuracy"] >= 0.93, summary
    assert "promoted to primary" in text("server-1.log")
