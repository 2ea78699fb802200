"""``--backend ray``: the same jobs with every process a Ray actor (tessera/launch/ray_backend.py).

Each job goes through tests/harness.py like every other cluster test. The first
starts its own local Ray instance (no ``--address``); the restart test joins a
Ray instance this module starts (so it can find and kill a worker's actor from
here, a second driver on the same cluster).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess

import pytest

ray = pytest.importorskip("ray", reason="--backend ray needs Ray: pip install 'tessera[ray]'")

from tests.harness import ROOT, TESSERA, Job, alive, run_job, wait_for  # noqa: E402

DIGITS = str(ROOT / "examples" / "digits.toml")
NAMESPACE = "tessera"  # tessera.launch.ray_backend.NAMESPACE


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the tests that join a cluster (--address)."""
    ctx = ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
                   namespace=NAMESPACE, logging_level=logging.ERROR)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


def test_digits_on_ray_reaches_095(tmp_path):
    out = tmp_path / "run"
    summary = run_job(DIGITS, out, "--backend", "ray", "--workers", 2, "--servers", 2,
                      timeout_s=240)
    assert summary["eval_accuracy"] >= 0.95, summary
    assert summary["workers"] == 2 and summary["servers"] == 2
    # The processes that registered are the ones the actors started.
    placed = json.loads((out / "ray.json").read_text())
    assert placed["placement"] == "SPREAD" and placed["namespace"] == NAMESPACE
    cluster = json.loads((out / "cluster.json").read_text())
    registered = {f"{p['role']} {p['rank']}": p["pid"] for p in cluster["processes"]}
    assert registered == {label: a["pid"] for label, a in placed["actors"].items()}
    assert sorted(p.name for p in (out / "logs").iterdir()) == [
        "coordinator-0.log", "server-0.log", "server-1.log", "worker-0.log", "worker-1.log"]
    assert not any(alive(pid) for pid in registered.values())


def test_killed_worker_actor_is_restarted_and_rejoins(tmp_path, ray_address):
    out = tmp_path / "run"
    job = Job(["run", DIGITS, "--out", out, "--quiet", "--backend", "ray", "--address",
               ray_address, "--mode", "async", "--max-restarts", 1,
               "--steps", 400], timeout_s=240)
    try:
        metrics = out / "metrics.jsonl"

        def step() -> int:
            try:
                lines = metrics.read_text().splitlines()
                return json.loads(lines[-1])["step"] if lines else 0
            except (OSError, ValueError, KeyError):
                return 0

        wait_for(lambda: step() >= 20 and (out / "ray.json").exists(), 150, "training")
        worker = json.loads((out / "ray.json").read_text())["actors"]["worker 1"]
        ray.kill(ray.get_actor(worker["name"], namespace=NAMESPACE), no_restart=False)
        killed_at = step()
        code, output = job.wait()
    finally:
        if job.proc.poll() is None:
            job.kill()
    assert killed_at < 400, "the job ended before the worker's actor was killed"
    assert code == 0, f"tessera run failed (exit {code}):\n{output}"
    assert "Ray restarted it" in output, output
    assert not alive(worker["pid"]), "the worker process outlived its actor"
    assert "started again" in (out / "logs" / "worker-1.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    # The actor told the coordinator before the new process registered: one
    # departure, one rejoin (not a second registration).
    assert summary["departures"] == 1 and summary["restarts"] == 1, summary


def test_backend_ray_without_ray_is_one_line(tmp_path):
    fake = tmp_path / "noray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    proc = subprocess.run(TESSERA + ["run", DIGITS, "--backend", "ray", "--out",
                                     str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    assert proc.stderr.strip() == "tessera: --backend ray needs Ray: pip install 'tessera[ray]'"
    assert not (tmp_path / "run").exists()
