"""Bounded staleness (ssp) on real clusters: the bound holds with a straggler, and
the quality bar is met."""

from __future__ import annotations

import json

import pytest

from tests.harness import ROOT, run_cli, run_job

DIGITS = str(ROOT / "examples" / "digits.toml")


def test_digits_ssp_staleness_2_reaches_095(tmp_path):
    # 20 epochs, not the file's 8: stale momentum makes ssp's accuracy vary from run to
    # run (measured: 0.950-0.972 at 8 epochs, 0.955-0.981 at 12, 0.981-0.986 at 20), and
    # the bar must hold on every run, not most.
    summary = run_job(DIGITS, tmp_path / "run", "--mode", "ssp", "--staleness", 2,
                      "--epochs", 20)
    assert summary["mode"] == "ssp" and summary["staleness"] == 2
    assert summary["eval_accuracy"] >= 0.95, summary
    assert summary["max_clock_gap"] <= 2


@pytest.mark.parametrize("staleness", [0, 2])
def test_no_worker_runs_more_than_k_clocks_ahead_of_a_delayed_one(tmp_path, staleness):
    # Worker 1's forward sleeps 12 ms a step (tests/scripts/straggler.py), so worker 0
    # would race ahead without the bound. Every server records, each time it lets a
    # worker start a clock, how far that clock is ahead of the slowest worker's.
    out = tmp_path / "run"
    code, output = run_cli(["launch", "--workers", 2, "--servers", 2, "--mode", "ssp",
                            "--staleness", staleness, "--out", out, "--quiet",
                            ROOT / "tests" / "scripts" / "straggler.py", 30], timeout_s=180)
    assert code == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["max_clock_gap"] <= staleness
    # The bound was actually exercised: the fast worker did run the full K ahead.
    assert summary["max_clock_gap"] == staleness
