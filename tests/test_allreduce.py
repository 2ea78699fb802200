"""All-reduce data parallelism on real processes: quality, and equality with sync PS."""

from __future__ import annotations

import pytest

from tests.harness import ROOT, run_job
from tests.test_cluster import rel, write_job

DIGITS = str(ROOT / "examples" / "digits.toml")


def test_digits_allreduce_reaches_095(tmp_path):
    summary = run_job(DIGITS, tmp_path / "run", "--mode", "allreduce", "--workers", 2,
                      "--servers", 0)
    assert summary["mode"] == "allreduce" and summary["servers"] == 0
    assert summary["eval_accuracy"] >= 0.95, summary
    assert summary["bytes_pushed"] == 0 and summary["allreduce_bytes"] > 0


@pytest.mark.parametrize("optimizer", ['name = "sgd"\nlr = 0.1\nmomentum = 0.9',
                                       'name = "adam"\nlr = 0.003'], ids=["sgd", "adam"])
def test_allreduce_equals_sync_parameter_servers_after_20_steps(tmp_path, optimizer):
    job = write_job(tmp_path, "same", optimizer)
    ps = run_job(job, tmp_path / "ps", "--mode", "sync", "--workers", 2, "--servers", 2,
                 "--steps", 20)
    ar = run_job(job, tmp_path / "ar", "--mode", "allreduce", "--workers", 2, "--servers", 0,
                 "--steps", 20)
    assert rel(ar["eval_loss"], ps["eval_loss"]) <= 1e-4, (ar["eval_loss"], ps["eval_loss"])


def test_servers_zero_needs_allreduce(tmp_path):
    from tests.harness import run_cli
    code, output = run_cli(["run", DIGITS, "--servers", 0, "--out", tmp_path / "r"], timeout_s=30)
    assert code == 2 and "allreduce" in output and "Traceback" not in output
