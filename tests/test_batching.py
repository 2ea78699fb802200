"""Small partitions batched per server (issue 15, item 2): real processes over real sockets.

digits with 4 KiB partitions (17 of them over 2 servers): each worker's pushes to a server
go as one message per step (``[ps] batch_kib``, default 256) instead of one per partition.
The servers count the messages they take off their sockets (``summary.json``
``server_messages``, counted in the endpoint's receive, not by the batching code), and the
training result must be the same as unbatched (``--batch-kib 0``).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import Job
from tests.test_faults import DIGITS, finish, kill_after

SMALL = ["--partition-mb", "0.004"]  # 1,024 fp32 elements: 17 partitions of digits' MLP


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_batched_sync_gives_the_unbatched_result_in_fewer_messages(tmp_path):
    """Sync, 2 workers: the clock's mean of two pushes is the same sum either way, so the
    run is bit for bit the unbatched one; the servers take far fewer messages."""
    outs = {k: tmp_path / k for k in ("batched", "unbatched")}
    jobs = {k: Job(["run", DIGITS, "--out", out, "--quiet", *SMALL, "--steps", "20",
                    *(["--batch-kib", "0"] if k == "unbatched" else [])], timeout_s=180)
            for k, out in outs.items()}  # side by side: one wait for both
    for job in jobs.values():
        finish(job)
    got = {k: _summary(out) for k, out in outs.items()}
    b, u = got["batched"], got["unbatched"]
    assert b["partitions"] >= 10, b
    for key in ("final_loss", "eval_loss", "eval_accuracy"):
        assert b[key] == u[key], (key, b[key], u[key])
    expected = b["steps"] * b["workers"] * b["partitions"]
    for s in (b, u):
        assert s["pushes_acked"] == s["pushes_applied"] == expected, s
    # Unbatched: a push per partition per worker per step (>= 17 * 2 * 20 = 680 over the
    # servers); batched: one per server per worker per step, plus pulls and start-up.
    assert sum(u["server_messages"]) >= expected, u["server_messages"]
    assert sum(b["server_messages"]) * 4 < sum(u["server_messages"]), \
        (b["server_messages"], u["server_messages"])


def test_batched_async_failover_and_ssp_lose_nothing(tmp_path):
    """Async with --replication 2 and server 1 killed mid-run: its backup applies the
    batches it had not, and a re-sent batch only where it was not applied (nothing twice:
    every acknowledged push applied exactly once). SSP batched beside it."""
    out, ssp_out = tmp_path / "async", tmp_path / "ssp"
    job = Job(["run", DIGITS, "--out", out, "--quiet", *SMALL, "--mode", "async",
               "--replication", "2", "--epochs", "10"], timeout_s=240)
    ssp = Job(["run", DIGITS, "--out", ssp_out, "--quiet", *SMALL, "--mode", "ssp",
               "--staleness", "1", "--steps", "30"], timeout_s=240)
    kill_after(job, out, "server", 1, 3)
    output = finish(job)
    finish(ssp)
    s = _summary(out)
    assert s["dead_servers"] == [1], output
    expected = s["steps"] * s["workers"] * s["partitions"]
    assert s["pushes_applied"] == s["pushes_acked"] == expected, s
    # (10 epochs: at 6, one run of 2026-12-01 ended at 0.844: async order varies.)
    assert s["eval_accuracy"] >= 0.85, s
    # Server 0 took far fewer messages than one per partition pushed to it.
    assert s["server_messages"][0] * 3 < expected, s["server_messages"]
    p = _summary(ssp_out)
    expected = p["steps"] * p["workers"] * p["partitions"]
    assert p["pushes_applied"] == p["pushes_acked"] == expected, p
    assert sum(p["server_messages"]) * 3 < expected, p["server_messages"]


def test_launched_processes_get_the_malloc_thresholds_unless_set():
    from tessera.config.env import MALLOC_DEFAULTS, Identity

    ident = Identity(run_dir="/tmp/x", secret="s")
    env = ident.child_env({"PATH": "/bin"})
    assert all(env[k] == v for k, v in MALLOC_DEFAULTS.items()), env
    assert ident.child_env(env) == env  # the launcher builds on its first one
    mine = ident.child_env({"MALLOC_TRIM_THRESHOLD_": "0"})  # the user's own value wins
    assert mine["MALLOC_TRIM_THRESHOLD_"] == "0"
