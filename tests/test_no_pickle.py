"""Nothing is unpickled, checked at run time (issue 14, item 3).

With ``TESSERA_FORBID_PICKLE=1`` every process a launcher starts (coordinator,
servers, workers, user scripts) installs :mod:`tessera.config.nopickle` before
anything else runs: any attempt to unpickle ends it (exit 86), so the job fails.
Short jobs in every mode must complete under it: async, ssp, hybrid (tables),
allreduce, pipeline (2 stages: its shapes are static, torch exchanges no
metadata objects), a user script under ``tessera launch``, and sync with
``--replication 2`` and ``--checkpoint-every``, then ``--resume`` of it. Two
jobs that do unpickle (``pickle.loads``; torch's ``recv_object_list``, the call
pipeline shape inference made) must fail, naming the guard: it can fail.

The jobs start together (the module's fixture) and each test waits for its own.
Ray mode is the exception the README names: Ray serializes with pickle by design.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tessera.config import env as envvars
from tessera.config import nopickle
from tests.harness import ROOT, Job

DIGITS = str(ROOT / "examples" / "digits.toml")
QUICK = ["--steps", "3", "--quiet"]

#: name -> tessera arguments (the run directory is added).
JOBS = {
    "async": ["run", DIGITS, *QUICK, "--mode", "async", "--workers", "1", "--servers", "1"],
    "ssp": ["run", DIGITS, *QUICK, "--mode", "ssp", "--staleness", "1", "--workers", "2",
            "--servers", "1"],
    "hybrid": ["run", str(ROOT / "examples" / "movielens.toml"), *QUICK, "--mode", "hybrid",
               "--workers", "2", "--servers", "1"],
    "allreduce": ["run", DIGITS, *QUICK, "--mode", "allreduce", "--workers", "2",
                  "--servers", "0"],
    "pipeline": ["run", str(ROOT / "examples" / "shakespeare.toml"), *QUICK, "--stages", "2",
                 "--workers", "2", "--batch-size", "8", "--microbatches", "2"],
    "script": ["launch", "--workers", "2", "--servers", "1", "--quiet",
               str(ROOT / "examples" / "train_script.py"), "--steps", "3"],
    "sync_replicated": ["run", DIGITS, "--steps", "4", "--quiet", "--mode", "sync",
                        "--workers", "2", "--servers", "2", "--replication", "2",
                        "--checkpoint-every", "2"],
    "unpickles_loads": ["launch", "--workers", "1", "--servers", "1", "--quiet",
                        str(ROOT / "tests" / "scripts" / "unpickles.py"), "loads"],
    "unpickles_objects": ["launch", "--workers", "2", "--servers", "0", "--mode", "allreduce",
                          "--quiet", str(ROOT / "tests" / "scripts" / "unpickles.py"),
                          "objects"],
}
TIMEOUT_S = 240


def _out_flag(args: list[str], out) -> list[str]:
    if args[0] == "launch":  # the script and its arguments come last
        return [args[0], "--out", str(out), *args[1:]]
    return [*args, "--out", str(out)]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Every job above, started at once under the guard: name -> (Job, run dir)."""
    root = tmp_path_factory.mktemp("nopickle")
    started = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(envvars.FORBID_PICKLE, "1")  # children inherit it; this process is unguarded
        for name, args in JOBS.items():
            out = root / name
            started[name] = (Job(_out_flag(args, out), timeout_s=TIMEOUT_S), out)
    yield started
    for job, _ in started.values():
        if job.proc.poll() is None:
            job.kill()


def _completes(jobs, name) -> dict:
    job, out = jobs[name]
    code, output = job.wait()
    assert code == 0, f"{name} under {envvars.FORBID_PICKLE}=1 failed (exit {code}):\n{output}"
    assert "unpickle" not in output
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("name", ["async", "ssp", "hybrid", "allreduce", "pipeline", "script"])
def test_every_mode_runs_under_the_guard(jobs, name):
    summary = _completes(jobs, name)
    assert summary.get("steps", 3) == 3, summary
    if name == "pipeline":  # evaluated along the stages, receives sized from the local batch
        assert summary["eval_loss"] > 0, summary


def test_replicated_checkpointed_run_and_its_resume_run_under_the_guard(jobs, tmp_path,
                                                                        monkeypatch):
    summary = _completes(jobs, "sync_replicated")
    first = jobs["sync_replicated"][1]
    assert summary["pushes_acked"] == summary["pushes_applied"] > 0, summary
    assert list((first / "checkpoints").glob("clock-*/manifest.json")), "no checkpoint"
    monkeypatch.setenv(envvars.FORBID_PICKLE, "1")
    resumed = Job(["run", DIGITS, "--steps", "6", "--quiet", "--workers", "2", "--servers", "2",
                   "--replication", "2", "--resume", str(first), "--out", str(tmp_path / "r")],
                  timeout_s=TIMEOUT_S)
    code, output = resumed.wait()
    assert code == 0, f"--resume under the guard failed (exit {code}):\n{output}"
    again = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert again["resumed_from"] and again["worker_first_steps"] == [4, 4], again


@pytest.mark.parametrize("name,who", [("unpickles_loads", "worker 0"),
                                      ("unpickles_objects", "worker 1")])
def test_a_process_that_unpickles_fails_the_job(jobs, name, who):
    job, out = jobs[name]
    code, output = job.wait()
    assert code != 0, output
    assert who in output and f"exited with code {nopickle.EXIT_CODE}" in output, output
    assert f"{envvars.FORBID_PICKLE} is set and this process tried to unpickle" in output
    assert not (out / f"done-{who.split()[-1]}").exists()


def _guarded(snippet: str) -> subprocess.CompletedProcess:
    code = f"from tessera.config import nopickle\nnopickle.install()\n{snippet}\nprint('ran')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.loads(pickle.dumps(1))",
    "import _pickle\n_pickle.loads(b'K\\x01.')",
    "import io, pickle\npickle.Unpickler(io.BytesIO(pickle.dumps(1))).load()",
])
def test_the_guard_ends_the_process_on_each_way_to_unpickle(snippet):
    done = _guarded(snippet)
    assert done.returncode == nopickle.EXIT_CODE and "ran" not in done.stdout, done.stderr
    assert "tried to unpickle" in done.stderr


def test_a_reference_taken_before_the_guard_is_caught_by_the_audit_hook():
    code = ("import collections, pickle\nloads = pickle.loads\n"
            "from tessera.config import nopickle\nnopickle.install()\n"
            "loads(pickle.dumps(collections.OrderedDict()))\nprint('ran')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == nopickle.EXIT_CODE and "ran" not in done.stdout, done.stderr
    assert "find_class" in done.stderr


def test_without_the_variable_commands_are_unchanged():
    cmd = [sys.executable, "-m", "tessera.train.trainer"]
    assert nopickle.wrap_command(cmd, {}) == cmd
    assert nopickle.wrap_command(cmd, {envvars.FORBID_PICKLE: "0"}) == cmd
    assert nopickle.wrap_command(cmd, {envvars.FORBID_PICKLE: "1"}) == \
        [sys.executable, "-m", nopickle.MODULE, "-m", "tessera.train.trainer"]
