"""A user's own training recipe runs unchanged (issue 13): the script's optimizer and
its param groups, an lr scheduler, clipping, accumulation, DistributedSampler and
DataLoader, against the same recipe in one plain process.

``tests/scripts/recipe.py`` is the recipe; ``--plain`` runs it without Tessera at
batch W·b (the same samples per step, see its docstring), in the test's own process.
Real processes over real sockets for the multi-worker modes; one fresh process
(``python recipe.py``: one worker and one in-process server) per optimizer of the sweep
and per mistake, a few at a time.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest
import torch

from tests.harness import ROOT, run_cli

RECIPE = ROOT / "tests" / "scripts" / "recipe.py"


def _plain(tmp_path, *args: str) -> dict:
    """The recipe without Tessera (``recipe.py --plain``, one process at batch W·b), run
    here in the test's process: its imports are this one's, so the reference costs a
    fraction of a second, not a process of its own (3 s of CPU beside the system under
    test). The global RNG is left as it was."""
    out = tmp_path / "plain.json"
    with torch.random.fork_rng(), \
            mock.patch.object(sys, "argv", [str(RECIPE), "--plain", "--out", str(out), *args]):
        runpy.run_path(str(RECIPE), run_name="__main__")
    return json.loads(out.read_text())


def _launched(tmp_path, flags: list, *args: str) -> dict:
    out = tmp_path / "dist.json"
    code, output = run_cli(["launch", *flags, "--out", tmp_path / "run", "--quiet", RECIPE,
                            "--out", out, *args], timeout_s=240)
    assert code == 0, output
    return json.loads(out.read_text())


def _in_process(tmp_path, *args: str, env: dict = None) -> dict:
    out = tmp_path / "one.json"
    proc = subprocess.run([sys.executable, str(RECIPE), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def _close(got: dict, want: dict, rel: float = 1e-4) -> None:
    assert got["steps"] == want["steps"]
    assert got["lr"] == pytest.approx(want["lr"], rel=1e-9)  # the scheduler moved the same way
    assert abs(got["eval_loss"] - want["eval_loss"]) <= rel * abs(want["eval_loss"]), (got, want)
    if want.get("dist_eval") is not None:  # --dist-eval: the DDP recipe's own metric sums
        got_d, want_d = got["dist_eval"], want["dist_eval"]
        assert got_d["samples"] == want_d["samples"] == 297  # every test sample, once
        assert abs(got_d["loss"] - want_d["loss"]) <= rel * want_d["loss"], (got_d, want_d)
        assert got_d["accuracy"] == want_d["accuracy"]
        assert got_d["loss"] == pytest.approx(got["eval_loss"], rel=1e-6)
    if want.get("ema_eval_loss") is not None:  # --ema: AveragedModel(model) took every step
        assert abs(got["ema_eval_loss"] - want["ema_eval_loss"]) <= \
            rel * abs(want["ema_eval_loss"]), (got, want)
        assert got["ema_eval_loss"] != got["eval_loss"]


def test_adamw_groups_schedule_clip_accumulation_sync_2x2_equals_one_process(tmp_path):
    """AdamW (2 groups) + LambdaLR warm-up/cosine per step + clip_grad_norm_(0.5) +
    2 micro-batches + DistributedSampler/DataLoader, 2 workers x 2 servers (17 small
    partitions), sync, against one process at batch W·b: eval_loss within 1e-4 after 32
    steps, and every step's returned norm the same. The servers decide each clipped
    clock among themselves (tessera.ps.agreement), so this holds their coefficient to
    torch's; at 0.5 about half the steps clip (the norms are 0.37-0.73). The workers'
    DataLoaders each fork 2 loader processes (num_workers=2), the plain one none. An EMA
    (``AveragedModel(model)``, built on the wrapper as a DDP recipe builds it on DDP:
    ``copy.deepcopy`` gives the plain module) follows every step alike. The evaluation is
    a DDP recipe's (``--dist-eval``): ``dist.get_rank()``'s share of the test set, sums
    ``dist.all_reduce``'d, a ``dist.barrier()``."""
    dist = _launched(tmp_path, ["--workers", 2, "--servers", 2, "--mode", "sync",
                                "--partition-mb", 0.004], "--steps", "32",
                     "--max-norm", "0.5", "--loader-workers", "2", "--ema", "--dist-eval")
    want = _plain(tmp_path, "--workers", "2", "--steps", "32", "--max-norm", "0.5",
                  "--ema", "--dist-eval")
    _close(dist, want)
    # The script's own torch.distributed calls (rank, all_reduce, barrier) ran on the
    # workers' group that the server modes form through the coordinator.
    assert (dist["dist_eval"]["world"], dist["dist_eval"]["backend"]) == (2, "tessera")
    assert dist["norms"] == pytest.approx(want["norms"], rel=1e-4)
    clipped = sum(n > 0.5 for n in want["norms"])
    assert 0 < clipped < len(want["norms"]), want["norms"]  # the clip did something


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_accumulation_without_no_sync_equals_one_process(tmp_path, mode):
    """A plain accumulation loop (``loss.backward()`` per micro-batch, then
    ``optimizer.step()``, no ``no_sync()``), valid under DDP: the first step finds the
    second backward before anything left, and from then on each step's pushes leave at
    ``step()`` with the summed gradient. 2 micro-batches, clipped, 2 workers: the same
    eval loss as one process at batch W·b (sync), and a run that trains (async: each push
    applied on arrival, so no equality to hold it to); each worker says so once."""
    flags = ["--steps", "16", "--without-no-sync"] + (["--no-clip"] if mode == "async" else [])
    dist = _launched(tmp_path, ["--workers", 2, "--servers", 2, "--mode", mode,
                                "--partition-mb", 0.004], *flags)
    want = _plain(tmp_path, "--workers", "2", "--steps", "16")
    if mode == "sync":
        _close(dist, want)
    else:
        assert dist["steps"] == 16 and dist["eval_loss"] < 1.5 * want["eval_loss"], (dist, want)
    for rank in (0, 1):
        log = (tmp_path / "run" / "logs" / f"worker-{rank}.log").read_text()
        assert log.count("backward() ran more than once before optimizer.step() without "
                         "no_sync()") == 1, log


@pytest.mark.parametrize("clip", [True, False])
def test_allreduce_mode_runs_the_same_recipe(tmp_path, clip):
    """The recipe with torch.amp.GradScaler (DDP's fp16 recipe: a scaled loss, then
    ``scaler.unscale_`` before the clip, or without a clip ``scaler.step`` unscaling by
    itself), against one process. A scale of 2^16 is taken out exactly; the DDP-style
    evaluation (``--dist-eval``) runs on allreduce mode's Gloo group. With the clip,
    AdamW with its biases' param group added at step 4 (add_param_group reaches the
    script's own optimizer, which steps here); without, SGD with momentum, which unlike
    Adam would move 2^16 times too far on gradients the scaler did not unscale. An EMA
    (``AveragedModel`` of the wrapper) follows along."""
    args = ("--steps", "12", "--grad-scaler", "--ema", "--dist-eval",
            *(("--late-group", "4") if clip else ("--no-clip", "--optimizer", "sgd")))
    dist = _launched(tmp_path, ["--workers", 2, "--servers", 0, "--mode", "allreduce"],
                     "--device", "auto", *args)
    want = _plain(tmp_path, "--workers", "2", *args)
    _close(dist, want)
    assert dist["dist_eval"]["backend"] == "gloo"
    assert len(want["lr"]) == 2  # (SGD: two groups from the start)
    want = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert dist["device"] == want  # tessera.device() under a launcher


def test_allreduce_mode_steps_a_branch_not_taken_as_torch_with_find_unused_parameters(tmp_path):
    """A head that forward uses at every third step only: with DDP's flag passed through
    ``tessera.distribute(..., find_unused_parameters=True)`` the job equals one process
    (torch skips the head at the other steps: its gradient is None there, not zeros, so
    AdamW's weight decay and moments leave it alone). Without the flag, DDP would stop
    the job with its traceback at the next forward, after a step whose buckets were never
    averaged: the job stops in one line instead, naming the parameters (a head never
    used: at the first step, before it is applied) or the step, and the flag."""
    args = ("--steps", "9", "--unused", "--no-clip")
    flags = ["--workers", 2, "--servers", 0, "--mode", "allreduce"]
    dist = _launched(tmp_path, flags, *args, "--aux-every", "3", "--find-unused")
    want = _plain(tmp_path, "--workers", "2", *args, "--aux-every", "3")
    _close(dist, want)
    for name in ("aux.weight", "body.0.weight"):
        assert dist["params"][name] == pytest.approx(want["params"][name], rel=1e-5, abs=1e-7)
    for case, extra, says in (
            ("never", (), r"worker [01]: parameters aux\.weight, aux\.bias received no "
                          r"gradient in step 1 .* find_unused_parameters=True"),
            ("sometimes", ("--aux-every", "3"),
             r"worker [01]: some parameters received no gradient in step 2 .* "
             r"find_unused_parameters=True")):
        code, output = run_cli(["launch", *flags, "--out", tmp_path / case, "--quiet", RECIPE,
                                "--out", tmp_path / f"{case}.json", *args, *extra],
                               timeout_s=240)
        assert code != 0 and "Traceback" not in output, output
        assert re.search(says, " ".join(output.split())), output


OPTIM_STATE = ROOT / "tests" / "scripts" / "optim_state.py"


def _start_plain(tmp_path, script, *args) -> subprocess.Popen:
    """``script --plain`` (one process, the reference), started at once in ``tmp_path``."""
    return subprocess.Popen([sys.executable, str(script), "--plain", *map(str, args)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finished(*procs) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out


def _state_close(got: dict, want: dict) -> None:
    for name, values in want["params"].items():
        assert got["params"][name] == pytest.approx(values, rel=1e-5, abs=1e-7), name
    assert sorted(got["state"]) == sorted(want["state"]) == ["0", "1", "2", "3"]
    for index, state in want["state"].items():
        assert sorted(got["state"][index]) == sorted(state)
        for key, values in state.items():
            assert got["state"][index][key] == pytest.approx(values, rel=1e-5, abs=1e-8), key


def test_a_scripts_own_checkpoint_carries_the_optimizer_state_the_servers_hold(tmp_path):
    """A script saves ``{"model": model.state_dict(), "optimizer": optimizer.state_dict()}``
    after 6 steps of one process and a sync job (2 workers, 2 servers, 5 partitions that
    cut parameters across servers) loads it, the optimizer's after ``tessera.distribute``
    as a DDP script does, and runs to step 12: it ends where one process running all 12
    steps ends, and its ``optimizer.state_dict()`` (asked of the servers) holds the same
    moments and step count (AdamW, two groups). Before, the state_dict carried the groups
    only and a load kept the servers' fresh moments: the parameters differed. One process
    (``python script.py``), loading before ``tessera.distribute``, with Rprop (elementwise
    and scalar state): the same."""
    def plain(*args: str) -> subprocess.Popen:
        return _start_plain(tmp_path, OPTIM_STATE, *args)

    refs = [plain("--steps", "6", "--save", "a.pt"), plain("--steps", "12", "--out", "want.json"),
            plain("--workers", "1", "--optimizer", "rprop", "--steps", "5", "--save", "r.pt"),
            plain("--workers", "1", "--optimizer", "rprop", "--steps", "10", "--out", "rw.json")]
    _finished(*refs)
    code, output = run_cli(["launch", "--workers", 2, "--servers", 2, "--partition-mb", 0.002,
                            "--out", tmp_path / "run", "--quiet", OPTIM_STATE, "--load",
                            tmp_path / "a.pt", "--steps", 12, "--out", tmp_path / "got.json"],
                           timeout_s=240)
    assert code == 0, output
    parts = json.loads((tmp_path / "run" / "cluster.json").read_text())["partitions"]
    assert len(parts) == 5 and {p["server"] for p in parts} == {0, 1}, parts
    _state_close(json.loads((tmp_path / "got.json").read_text()),
                 json.loads((tmp_path / "want.json").read_text()))
    one = subprocess.run([sys.executable, str(OPTIM_STATE), "--optimizer", "rprop", "--load",
                          "r.pt", "--load-before", "--steps", "10", "--out", "rg.json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stdout + one.stderr
    _state_close(json.loads((tmp_path / "rg.json").read_text()),
                 json.loads((tmp_path / "rw.json").read_text()))


def test_a_resumed_job_keeps_the_servers_optimizer_state_and_replication_refuses_a_load(
        tmp_path):
    """The README's exceptions to the above: a ``--resume``d job whose script loads its own
    checkpoint keeps the state the servers restored (theirs is the job's; worker 0 says the
    loaded one was not sent) and still ends where one process running all the steps ends;
    a job with ``--replication 2`` stops in one line at the load (the backups would keep
    the old state)."""
    want = _start_plain(tmp_path, OPTIM_STATE, "--steps", 9, "--out", "want.json")
    common = ["--workers", 2, "--partition-mb", 0.002, "--quiet"]
    code, output = run_cli(["launch", *common, "--servers", 2, "--checkpoint-every", 3,
                            "--out", tmp_path / "first", OPTIM_STATE, "--steps", 6, "--save",
                            tmp_path / "a.pt"], timeout_s=240)
    assert code == 0, output
    code, output = run_cli(["launch", *common, "--servers", 2, "--resume", tmp_path / "first",
                            "--out", tmp_path / "resumed", OPTIM_STATE, "--load",
                            tmp_path / "a.pt", "--steps", 9, "--out", tmp_path / "got.json"],
                           timeout_s=240)
    assert code == 0, output
    log = (tmp_path / "resumed" / "logs" / "worker-0.log").read_text()
    assert "this is a resumed job, so the servers keep the job's optimizer state" in log, log
    _finished(want)
    _state_close(json.loads((tmp_path / "got.json").read_text()),
                 json.loads((tmp_path / "want.json").read_text()))
    code, output = run_cli(["launch", *common, "--servers", 3, "--replication", 2, "--out",
                            tmp_path / "replicated", OPTIM_STATE, "--load", tmp_path / "a.pt",
                            "--steps", 8], timeout_s=240)
    assert code != 0 and "Traceback" not in output, output
    assert "a job with --replication 2 cannot load optimizer state yet" in \
        " ".join(output.split()), output


SKIP_STEP = ROOT / "tests" / "scripts" / "skip_step.py"


def test_a_step_skipped_after_backward_on_a_gradient_that_is_not_finite(tmp_path):
    """``norm = model.clip_grad_norm_(...)``; ``if not torch.isfinite(norm):
    optimizer.zero_grad(); continue``: worker 0's loss is NaN at step 5, the servers skip
    that step on every worker (its averaged gradient is not finite), and ``zero_grad()``
    finishes it without an update, so the job ends where one process ends that skips the
    same step (2 workers, sync; before, the next backward stopped the job as a second
    one). A script that skips a finite step after backward by its own rule is refused at
    its ``zero_grad()`` in one line (the gradients left during backward), not at the next
    backward with a message about accumulation."""
    want = _start_plain(tmp_path, SKIP_STEP, "--out", "want.json")
    code, output = run_cli(["launch", "--workers", 2, "--servers", 1, "--out", tmp_path / "run",
                            "--quiet", SKIP_STEP, "--out", tmp_path / "got.json"], timeout_s=240)
    assert code == 0, output
    _finished(want)
    got, want = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("got", "want"))
    assert got["skipped"] == want["skipped"] == [4]
    for name, values in want["params"].items():
        assert got["params"][name] == pytest.approx(values, rel=1e-5, abs=1e-7), name
    own = subprocess.run([sys.executable, str(SKIP_STEP), "--no-clip"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert own.returncode != 0 and "Traceback" not in own.stderr, own.stderr
    assert "tessera: worker 0: optimizer.zero_grad() after backward() without optimizer.step() " \
           "would skip step 4, but its gradients left for the servers" in own.stderr, own.stderr


def test_each_worker_gets_its_own_gpu_by_its_local_rank(monkeypatch):
    """tessera.device(): cuda:LOCAL_RANK modulo the visible GPUs, the CPU without one, and
    one line for a LOCAL_RANK that is no index. (torch.cuda stubbed: no GPU here; the real
    thing runs in benchmarks/gpu_recipe.sh.)"""
    import tessera
    from tessera.errors import TesseraError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for local, want in (("0", "cuda:0"), ("1", "cuda:1"), ("3", "cuda:1")):
        monkeypatch.setenv("LOCAL_RANK", local)
        assert str(tessera.device()) == want
    monkeypatch.delenv("LOCAL_RANK")
    assert str(tessera.device()) == "cuda:0"  # a plain process
    monkeypatch.setenv("LOCAL_RANK", "first")
    with pytest.raises(TesseraError, match="LOCAL_RANK='first' is not a worker's index"):
        tessera.device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert str(tessera.device()) == "cpu"


#: Plain processes run at once by :func:`_at_once` (each mostly its imports: 3.5 s of CPU
#: in 4 s): two cores carry this many without waiting on each other.
AT_ONCE = 3


def _at_once(request, tmp_path_factory, test: str, param: str, run):
    """A module fixture's body: ``run(value, cwd, env)`` for the value of ``param`` of
    every selected case of ``test``, ``AT_ONCE`` at a time, each in a directory of its
    own, started when the first case asks; yields value -> a future of what ``run``
    returned.

    ``env``: the environment as it is now, for the processes to start with. They start
    from the pool's threads while this process runs the next tests, which may set
    variables (an in-process job does): a process started with the live environment
    (``env=None``) reads it in the child after ``vfork``, and one such start failed with
    ``OSError: [Errno 14] Bad address`` (most likely its environment array, replaced
    meanwhile by another thread)."""
    values = [item.callspec.params[param] for item in request.session.items
              if getattr(item, "originalname", "") == test]
    root = tmp_path_factory.mktemp(test[:40])
    env = dict(os.environ)

    def in_own_dir(value):
        cwd = root / str(value)
        cwd.mkdir()
        return run(value, cwd, env)

    with ThreadPoolExecutor(AT_ONCE) as pool:
        yield {value: pool.submit(in_own_dir, value) for value in values}


@pytest.fixture(scope="module")
def optimizer_runs(request, tmp_path_factory):
    """``python recipe.py`` (one worker, the in-process server) with each selected class."""
    yield from _at_once(request, tmp_path_factory,
                        "test_every_elementwise_optimizer_runs_on_the_servers", "name",
                        lambda name, cwd, env: _in_process(cwd, *_optimizer_args(name),
                                                           env=env))


def _optimizer_args(name: str) -> tuple:
    return ("--optimizer", name, "--steps", "6", "--workers", "1")


@pytest.mark.parametrize("name", ["sgd", "adam", "adagrad", "adadelta", "rmsprop", "adamax",
                                  "nadam", "radam", "asgd", "rprop"])
def test_every_elementwise_optimizer_runs_on_the_servers(optimizer_runs, tmp_path, name):
    """Each class with two param groups (weight decay on weights only), stepped by the
    in-process server (``python recipe.py``, one worker), equals plain torch."""
    _close(optimizer_runs[name].result(timeout=300), _plain(tmp_path, *_optimizer_args(name)))


def test_a_parameter_no_worker_used_is_stepped_with_a_zero_gradient(tmp_path):
    """The exception the README names: a parameter forward never used is pushed as zeros
    and stepped (SGD's weight decay moves it), as one process that gives it a zero
    gradient would; torch skips a parameter whose gradient is None and leaves it alone."""
    args = ("--optimizer", "sgd", "--steps", "6", "--workers", "1", "--unused", "--no-clip")
    dist = _in_process(tmp_path, *args)
    zeros = _plain(tmp_path, *args, "--zero-unused")
    _close(dist, zeros)
    assert dist["params"]["aux.weight"] == pytest.approx(zeros["params"]["aux.weight"],
                                                         rel=1e-6)
    (tmp_path / "default").mkdir()
    skipped = _plain(tmp_path / "default", *args)
    moved = [abs(a - b) for a, b in zip(dist["params"]["aux.weight"],
                                       skipped["params"]["aux.weight"])]
    assert max(moved) > 1e-6  # torch skipped the head: the exception is real, and named


def test_sync_servers_leave_a_branch_not_taken_alone_with_find_unused_parameters(tmp_path):
    """DDP's flag in a server mode: a head forward uses at every third step only, AdamW
    with two groups, 2 workers x 2 servers. Each worker's pushes name the head unused at
    the other steps, and the servers skip it there as torch skips a parameter whose
    ``.grad`` is None: values, moments and step count (``optimizer.state_dict()`` holds
    the head's own, 3 of 9, as one process's does) equal one process at batch W·b."""
    args = ("--steps", "9", "--unused", "--no-clip", "--aux-every", "3")
    dist = _launched(tmp_path, ["--workers", 2, "--servers", 2, "--mode", "sync"], *args,
                     "--find-unused")
    want = _plain(tmp_path, "--workers", "2", *args)
    _close(dist, want, rel=1e-6)
    for name, values in want["params"].items():
        assert dist["params"][name] == pytest.approx(values, rel=1e-5, abs=1e-7), name
    assert want["step_counts"]["aux.weight"] == 3 and want["step_counts"]["body.0.weight"] == 9
    assert dist["step_counts"] == want["step_counts"]


def test_a_compiled_model_trains_as_one_process_in_sync_mode(tmp_path):
    """``torch.compile`` on the wrapper, as a DDP recipe compiles ``DDP(model)`` (backend
    aot_eager: dynamo and AOTAutograd without a C compiler): the whole recipe (AdamW
    groups, schedule, clipping through the compiled module, 2 micro-batches) on 2 workers
    x 2 servers equals one process that compiles its model the same way."""
    args = ("--steps", "8", "--compile")
    dist = _launched(tmp_path, ["--workers", 2, "--servers", 2, "--mode", "sync"], *args)
    want = _plain(tmp_path, "--workers", "2", *args)
    _close(dist, want, rel=1e-6)
    assert list(dist["params"]) == list(want["params"]) and \
        all(k.startswith("_orig_mod.") for k in want["params"])  # compiled, both
    for name, values in want["params"].items():
        assert dist["params"][name] == pytest.approx(values, rel=1e-5, abs=1e-7), name


def test_uneven_inputs_the_workers_left_train_on_without_the_one_that_ran_out(tmp_path):
    """Worker 1's data runs out after 6 steps, worker 0's after 10 (DDP needs its Join
    context for this; without it the job hangs). In sync mode every server stops waiting
    for a worker once it has sent its final report, so steps 7-10 are worker 0's alone:
    the values equal one process that averages both workers' gradients while both train,
    then takes worker 0's. Before, worker 0's seventh push waited for worker 1 until its
    30 s timeout failed the job. In ssp mode the finished worker no longer holds the
    slowest count down: the job ends."""
    uneven = ROOT / "tests" / "scripts" / "uneven.py"
    plain = _start_plain(tmp_path, uneven, "--out", "plain.json")
    for mode in ("sync", "ssp"):
        code, output = run_cli(["launch", "--workers", 2, "--servers", 2, "--mode", mode,
                                "--out", tmp_path / mode, "--quiet", uneven,
                                "--out", tmp_path / f"{mode}.json"], timeout_s=120)
        assert code == 0, output
    _finished(plain)
    want, got = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "sync"))
    for name, values in want.items():
        assert got[name] == pytest.approx(values, rel=1e-5, abs=1e-7), name


def test_uneven_inputs_in_allreduce_mode_stop_the_job_in_one_line(tmp_path):
    """The same script in allreduce mode: DDP needs every worker in every step, so worker
    0's seventh all-reduce fails once worker 1's process has ended; the job stops with one
    line naming the worker that finished and the remedies, not Gloo's traceback."""
    uneven = ROOT / "tests" / "scripts" / "uneven.py"
    code, output = run_cli(["launch", "--workers", 2, "--servers", 0, "--mode", "allreduce",
                            "--out", tmp_path / "run", "--quiet", uneven,
                            "--out", tmp_path / "ar.json"], timeout_s=120)
    said = " ".join(output.split())
    assert code != 0 and "Traceback" not in output, output
    assert re.search(r"worker 0: an all-reduce failed \(.+\) after worker 1 finished "
                     r"\(tessera\.finish\(\)\) with fewer steps than this one: in --mode "
                     r"allreduce every worker runs every step", said), output


def test_tied_weights_activation_checkpointing_and_one_cycle_equal_one_process(tmp_path):
    """A language model's pieces (tests/scripts/recipe_lm.py): a decoder tied to the
    embedding, reentrant activation checkpointing, OneCycleLR moving AdamW's lr and
    betas[0] every step. One process of the server modes (worker, server and coordinator)
    equals the script without Tessera, and its final.safetensors loads into the tied model."""
    from safetensors.torch import load_file
    script = ROOT / "tests" / "scripts" / "recipe_lm.py"
    plain = _start_plain(tmp_path, script, "--out", "plain.json")
    proc = subprocess.run([sys.executable, str(script), "--out", "one.json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _finished(plain)
    got, want = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "plain.json"))
    assert got["lr"] == want["lr"] and got["betas"] == want["betas"] != [0.95, 0.999]
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    assert sorted(got["params"]) == sorted(want["params"])  # both names of the tied weight
    for name, values in want["params"].items():
        assert got["params"][name] == pytest.approx(values, rel=1e-5, abs=1e-7), name
    final = load_file(next((tmp_path / "runs").glob("recipe_lm-*/final.safetensors")))
    assert torch.equal(final["head.weight"], final["emb.weight"])
    assert final["emb.weight"].reshape(-1).tolist() == pytest.approx(
        want["params"]["emb.weight"], rel=1e-5, abs=1e-7)


def test_only_a_collectives_failure_is_put_down_to_a_worker_that_finished():
    """The one line above is for a collective that failed (Gloo's closed connection, a
    DistError); a script's own RuntimeError raised after another worker finished (a shape
    mismatch in its evaluation, a failed save) keeps its traceback. One piece, on a
    stand-in session whose heartbeat says worker 1 finished."""
    import contextvars
    from types import SimpleNamespace

    from tessera import api

    def said(exc, mode="allreduce"):
        cfg = SimpleNamespace(ps=SimpleNamespace(mode=mode),
                              cluster=SimpleNamespace(heartbeat_interval_s=0.01))
        job = api.Job(SimpleNamespace(cfg=cfg, rank=0, heartbeat=SimpleNamespace(finished=[1])))
        return contextvars.copy_context().run(
            lambda: (api._current.set(job), api._lost_to_a_finished_worker(exc))[1])

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
                        "closed by peer [127.0.0.1]:40811")
    assert "after worker 1 finished (tessera.finish()) with fewer steps" in said(gloo)
    assert "after worker 1 finished" in said(torch.distributed.DistBackendError("NCCL error"))
    assert said(gloo, mode="sync") == ""
    assert said(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x2)")) == ""
    assert said(ValueError("Connection closed")) == ""


def test_frozen_parameters_must_be_alike_on_every_worker(tmp_path):
    """A frozen layer stays each worker's own (the servers hold trainable parameters):
    built alike, the job trains and exports it; built from each worker's own seed, the
    job stops in one line naming the parameter, instead of training on different models."""
    from safetensors.torch import load_file
    frozen = ROOT / "tests" / "scripts" / "frozen.py"
    code, output = run_cli(["launch", "--workers", "2", "--servers", "1", "--out",
                            tmp_path / "same", "--quiet", frozen, "same"], timeout_s=240)
    assert code == 0, output
    final = load_file(tmp_path / "same" / "final.safetensors")
    torch.manual_seed(0)
    torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    assert torch.equal(final["0.weight"], torch.nn.Linear(4, 8).weight.detach())
    code, output = run_cli(["launch", "--workers", "2", "--servers", "1", "--out",
                            tmp_path / "differ", "--quiet", frozen, "differ"], timeout_s=240)
    assert code != 0 and "Traceback" not in output, output
    said = " ".join(output.split())  # the console wraps long lines
    assert re.search(r"worker [01]'s frozen parameter '0\.weight' \(requires_grad=False\) "
                     r"differs from worker [01]'s; .*torch\.manual_seed", said), output


def test_batchnorm_statistics_are_averaged_and_exported(tmp_path):
    """Every worker ends with the same running statistics (the servers average the
    workers' buffers each step), and ``final.safetensors`` loaded into the plain,
    undistributed model gives the eval_loss the run measured."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from tessera.data.datasets import digits_arrays
    from torch import nn

    dist = _launched(tmp_path, ["--workers", 2, "--servers", 2], "--steps", "10", "--bn")
    other = json.loads((tmp_path / "dist.json.rank1").read_text())
    for key in ("1.running_mean", "1.running_var"):
        assert dist["params"][key] == other["params"][key]
        assert dist["params"][key] != [0.0 if "mean" in key else 1.0] * 64  # it did train
    plain = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    plain.load_state_dict(load_file(tmp_path / "run" / "final.safetensors"))  # strict: all keys
    x, y = digits_arrays()
    plain.eval()
    with torch.no_grad():
        loss = F.cross_entropy(plain(torch.tensor(x[1500:] / 16.0, dtype=torch.float32)),
                               torch.tensor(y[1500:])).item()
    assert loss == pytest.approx(dist["eval_loss"], rel=1e-6)


def test_example_recipe_logs_exports_and_checkpoints(tmp_path):
    """examples/recipe.py on 2 workers x 2 servers with --tensorboard and checkpoints: its
    own metrics reach metrics.jsonl and TensorBoard, it learns, and `tessera export` of the
    last checkpoint equals the final.safetensors the run wrote."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    code, output = run_cli(["launch", "--workers", 2, "--servers", 2, "--out", run, "--quiet",
                            "--tensorboard", "--checkpoint-every", 25,
                            ROOT / "examples" / "recipe.py", "--epochs", "1"], timeout_s=300)
    assert code == 0, output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "lr"} <= set(records[0]) and records[0]["step"] == 10
    final = records[-1]
    assert final["eval_accuracy"] >= 0.9, final
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    code, output = run_cli(["export", run, "--out", tmp_path / "export.safetensors"])
    assert code == 0, output
    exported = load_file(tmp_path / "export.safetensors")
    written = load_file(run / "final.safetensors")
    float_keys = {k for k, v in written.items() if v.is_floating_point()}
    assert set(exported) == float_keys  # parameters and BatchNorm statistics
    for key in float_keys:
        assert torch.equal(exported[key], written[key]), key


def test_killed_worker_continues_its_share_every_sample_seen_once(tmp_path):
    """kill -9 of worker 1 mid-epoch with --max-restarts 1: its replacement continues
    its DistributedSampler share where the last applied step left it, so over the
    epoch every sample is trained on, and none twice (a lost step's are re-read)."""
    import random
    import signal

    from tests.harness import Job, wait_for
    from tests.test_faults import pid_of

    seen, run = tmp_path / "seen", tmp_path / "run"
    seen.mkdir()
    job = Job(["launch", "--workers", 2, "--servers", 2, "--max-restarts", 1, "--out", run,
               "--quiet", RECIPE, "--out", tmp_path / "dist.json", "--steps", 50, "--batch",
               30, "--sleep", 0.1, "--samples-log", seen, "--dist-eval"], timeout_s=240)
    # 50 steps, though the assertions are about epoch 0 (25 steps): worker 0 runs on while
    # worker 1's replacement starts (a fork: milliseconds), and the replacement needs steps
    # left to finish its share of epoch 0 (with 30 steps and fresh processes it did not
    # under load: tried).
    kill_at = random.Random(13).randint(4, 10)  # a step of the first epoch (25 steps)
    log = seen / "worker-1.jsonl"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= kill_at
             or job.proc.poll() is not None, 120, "worker 1's first steps")
    assert job.proc.poll() is None, "the job ended before the kill"
    os.kill(pid_of(run, "worker", 1), signal.SIGKILL)
    code, output = job.wait()
    assert code == 0, output
    assert "the data continues at epoch 0" in (run / "logs" / "worker-1.log").read_text()
    ids = [i for name in ("worker-0.jsonl", "worker-1.jsonl")
           for line in (seen / name).read_text().splitlines()
           for rec in [json.loads(line)] if rec["epoch"] == 0 for i in rec["ids"]]
    assert sorted(ids) == list(range(1500))  # every sample of epoch 0, each once
    # The replacement's metric all_reduce (its first collective, its predecessor made none)
    # paired with worker 0's: every test sample counted once.
    assert json.loads((tmp_path / "dist.json").read_text())["dist_eval"]["samples"] == 297


def test_a_replaced_worker_whose_predecessor_made_collectives_is_refused_in_one_line(tmp_path):
    """A script's torch.distributed.barrier() right after distribute, then kill -9 of
    worker 1 mid-training with --max-restarts 1: the replacement's script starts over at
    that barrier while worker 0 trains on, so their calls cannot pair up. The replacement
    says so in one line at once, and the job fails within seconds, not after the
    collectives' half-hour wait (worker 0, waiting in its final all_reduce, is answered
    when the job fails)."""
    import signal
    import time

    from tests.harness import Job, wait_for
    from tests.test_faults import pid_of

    seen, run = tmp_path / "seen", tmp_path / "run"
    seen.mkdir()
    job = Job(["launch", "--workers", 2, "--servers", 1, "--max-restarts", 1, "--out", run,
               "--quiet", RECIPE, "--out", tmp_path / "dist.json", "--steps", 40, "--batch",
               30, "--sleep", 0.05, "--samples-log", seen, "--dist-eval", "--barrier-first"],
              timeout_s=120)
    log = seen / "worker-1.jsonl"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 5
             or job.proc.poll() is not None, 120, "worker 1's first steps")
    assert job.proc.poll() is None, "the job ended before the kill"
    os.kill(pid_of(run, "worker", 1), signal.SIGKILL)
    killed = time.monotonic()
    code, output = job.wait()
    assert code != 0
    assert time.monotonic() - killed < 60
    says = ("torch.distributed.barrier (collective #1 of this job's workers): this worker "
            "replaced one that had called torch.distributed collectives")
    worker1 = (run / "logs" / "worker-1.log").read_text()
    assert says in worker1, worker1
    assert "Traceback" not in worker1


def test_hybrid_mode_runs_the_recipe_with_a_table(tmp_path):
    """Hybrid mode (dense part on the workers by DDP, a table on the servers): the same
    recipe, one worker (the tables are asynchronous, so one worker is the exact case),
    against plain torch with the table as an nn.Embedding from the same rows."""
    script = ROOT / "tests" / "scripts" / "recipe_tables.py"
    out = tmp_path / "plain.json"
    proc = subprocess.run([sys.executable, str(script), "--plain", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plain = json.loads(out.read_text())
    code, output = run_cli(["launch", "--workers", 1, "--servers", 1, "--mode", "hybrid",
                            "--out", tmp_path / "run", "--quiet", script,
                            "--out", tmp_path / "dist.json"], timeout_s=180)
    assert code == 0, output
    _close(json.loads((tmp_path / "dist.json").read_text()), plain)
    # final.safetensors holds the table as the rows the run touched, with their ids.
    from safetensors.torch import load_file
    final = load_file(tmp_path / "run" / "final.safetensors")
    assert torch.equal(final["tables.users.ids"], torch.arange(50))
    torch.testing.assert_close(final["tables.users.rows"], torch.tensor(plain["table"]),
                               rtol=1e-4, atol=1e-6)


def test_hybrid_mode_refuses_a_grad_scaler_whose_scale_the_rows_carry(tmp_path):
    """Hybrid mode: the dense part would take a torch.amp.GradScaler as DDP does, but the
    table's row gradients leave for the servers during backward still scaled, so the
    first scaler.step stops the job in one line (without the allreduce remedy, which has
    no tables)."""
    script = ROOT / "tests" / "scripts" / "recipe_tables.py"
    code, output = run_cli(["launch", "--workers", 1, "--servers", 1, "--mode", "hybrid",
                            "--out", tmp_path / "run", "--quiet", script,
                            "--out", tmp_path / "dist.json", "--grad-scaler"], timeout_s=180)
    assert code != 0
    log = (tmp_path / "run" / "logs" / "worker-0.log").read_text()
    assert "torch.amp.GradScaler cannot step this job: the tables' row gradients left for the " \
           "servers during backward() still multiplied by its loss scale (65536)" in log, log
    assert "--mode allreduce" not in log and "Traceback" not in log, log


@pytest.mark.parametrize("cluster", [["--servers", 2], ["--servers", 0, "--mode", "allreduce"]],
                         ids=["sync", "allreduce"])
def test_resume_continues_the_distributed_sampler_mid_epoch(tmp_path, cluster):
    """kill -9 of the whole job mid-epoch, then --resume: the data continues from the
    checkpoint's position (every worker's sampler position is saved beside it), so
    epoch 0's samples are each trained once, counting the first run up to the
    checkpoint and the resumed run after it (in allreduce mode too: worker 0's dense
    replica file and every worker's position)."""
    from tests.harness import Job, wait_for
    from tests.test_faults import kill_cluster

    seen, run = tmp_path / "seen", tmp_path / "run"
    seen.mkdir()
    args = [RECIPE, "--out", tmp_path / "dist.json", "--steps", 30, "--batch", 30,
            "--samples-log", seen]
    job = Job(["launch", "--workers", 2, *cluster, "--checkpoint-every", 5, "--out", run,
               "--quiet", *args, "--sleep", 0.1], timeout_s=240)
    log = seen / "worker-0.jsonl"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 13
             or job.proc.poll() is not None, 120, "worker 0's first 13 steps")
    assert job.proc.poll() is None, "the job ended before the kill"
    kill_cluster(job, run)
    first = [json.loads(line) for name in ("worker-0.jsonl", "worker-1.jsonl")
             for line in (seen / name).read_text().splitlines()]
    for name in ("worker-0.jsonl", "worker-1.jsonl"):
        (seen / name).rename(seen / f"first-{name}")
    code, output = run_cli(["launch", "--workers", 2, *cluster, "--resume", run,
                            "--out", tmp_path / "run2", "--quiet", *args], timeout_s=240)
    assert code == 0, output
    clock = json.loads((tmp_path / "run2" / "summary.json").read_text()).get("resumed_from")
    resumed_at = min(r["step"] for name in ("worker-0.jsonl", "worker-1.jsonl")
                     for line in (seen / name).read_text().splitlines()
                     for r in [json.loads(line)]) - 1
    assert resumed_at % 5 == 0 and resumed_at >= 10, (resumed_at, clock)
    ids = [i for r in first if r["epoch"] == 0 and r["step"] <= resumed_at for i in r["ids"]]
    ids += [i for name in ("worker-0.jsonl", "worker-1.jsonl")
            for line in (seen / name).read_text().splitlines()
            for r in [json.loads(line)] if r["epoch"] == 0 for i in r["ids"]]
    assert sorted(ids) == list(range(1500))


@pytest.fixture(scope="module")
def mistake_runs(request, tmp_path_factory):
    """Every selected case of ``tests/scripts/mistakes.py``, each a fresh plain process:
    name -> a future of its ``CompletedProcess``."""
    def run(name, cwd, env):
        return subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "mistakes.py"),
                               name], capture_output=True, text=True, timeout=120, cwd=cwd,
                              env=env)

    yield from _at_once(request, tmp_path_factory,
                        "test_a_recipe_mistake_is_one_line_not_a_traceback", "mistake", run)


#: tests/scripts/mistakes.py NAME, and the line it must end with.
MISTAKES = [
    ("lbfgs", "optimizer torch.optim.lbfgs.LBFGS cannot run on the parameter servers"),
    ("second_backward", "a second backward() before step() would push parameter"),
    ("closure", "SGD.step(closure) cannot run on parameter servers"),
    ("optimizer_class", "tessera.distribute(model, optimizer): pass an optimizer object, e.g."),
    ("unknown_name", "tessera.distribute(model, 'sgdd', ...): Invalid enum value 'sgdd'"),
    ("bad_setting", "tessera.distribute(model, 'sgd', ...): Expected `float`, got `SGD`"),
    ("torch_clip", "the gradients were changed after backward() "
                   "(torch.nn.utils.clip_grad_norm_ or another in-place change"),
    ("clip_value", "the gradients were changed after backward() (torch.nn.utils.clip_grad_norm_"
                   " or another in-place change of .grad?), but they left for the servers during "
                   "backward, so the change would be lost: clip with model.clip_grad_norm_"),
    ("skip_first", "optimizer.zero_grad() after backward() without optimizer.step() would "
                   "skip step 1, but its gradients are due at the servers, whose step waits "
                   "for every worker's"),
    ("unfreeze", "parameter 'bias' was frozen (requires_grad=False) at tessera.distribute and "
                 "now requires grad"),
    ("freeze_later", "parameter 'bias' was trainable at tessera.distribute and is frozen now "
                     "(requires_grad=False), but without find_unused_parameters the servers "
                     "would step it with a zero gradient"),
    ("add_group", "SGD.add_param_group(): the servers build the optimizer's param groups once"),
    ("load_after", "the model's parameters were changed in place after tessera.distribute "
                   "(module.load_state_dict, an init or a clamp under torch.no_grad()?)"),
    ("clamp", "the model's parameters were changed in place after tessera.distribute"),
    ("collective_too_big", "torch.distributed.all_reduce of a (262144,) float32 tensor "
                           "(1,048,576 bytes): in the server modes (sync, async, ssp) the "
                           "workers' process group carries metrics-sized tensors"),
    ("sync_batchnorm", "nn.SyncBatchNorm '1': in --mode sync the workers' torch.distributed "
                       "group carries metrics, not a collective in every forward"),
    ("reduce_scatter", "torch.distributed.reduce_scatter is not supported by the server modes' "
                       "process group"),
    ("reduce_scatter_tensor", "torch.distributed.reduce_scatter_tensor is not supported by "
                              "the server modes' process group"),
    ("second_model", "tessera.distribute() was already called in this process: a job trains "
                     "one model with one optimizer (a second model with its own optimizer, as "
                     "a GAN's discriminator, is not supported yet)"),
    ("optim_state_other_class", "SGD.load_state_dict(): the state holds ['exp_avg', "
                                "'exp_avg_sq', 'step'], but SGD with these settings keeps "
                                "['momentum_buffer']"),
    ("bf16_model", "parameter 'weight' is bfloat16, but in --mode sync the servers keep "
                   "float32 masters and the workers float32 parameters: keep the model in "
                   "float32 and train in bfloat16 with --precision bf16"),
    ("double_buffer", "buffer '1.running_mean' is float64, but in --mode sync the servers "
                      "keep float32 masters and the workers float32 parameters: use --mode "
                      "allreduce"),
    ("copy_tables", "--mode sync does not support copy.deepcopy(model) yet: the sharded "
                    "tables' rows live on the servers"),
    ("grad_scaler", "torch.amp.GradScaler cannot step this job: the gradients left for the "
                    "servers during backward() still multiplied by its loss scale (65536)"),
    ("grad_scaler_async", "torch.amp.GradScaler cannot step this job: the gradients left"),
    ("grad_scaler_unscaled", "torch.amp.GradScaler cannot step this job: the gradients left "
                             "for the servers during backward() still multiplied by its loss "
                             "scale, which")]


@pytest.mark.parametrize("mistake, says", MISTAKES)
def test_a_recipe_mistake_is_one_line_not_a_traceback(mistake_runs, mistake, says):
    proc = mistake_runs[mistake].result(timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"tessera: worker 0: {says}" in proc.stderr or f"tessera: {says}" in proc.stderr, \
        proc.stderr
    # Said once: the job's end (the coordinator's line, the last word) names it instead.
    assert (proc.stdout + proc.stderr).count(says) == 1, proc.stdout + proc.stderr


def test_a_script_that_ends_without_joining_stops_the_job_at_once(tmp_path):
    """A script that never calls tessera.distribute()/init() (a DDP script launched as it
    is, or an early exit) left the others waiting for it until the start-up timeout (120 s)
    and then said the job was interrupted: now its clean exit before the cluster is up
    stops the job in one paragraph naming the worker and the cause."""
    script = tmp_path / "never_joins.py"
    script.write_text("print('trained elsewhere')\n")
    start = time.monotonic()
    code, output = run_cli(["launch", "--workers", 2, "--servers", 1, "--out", tmp_path / "run",
                            "--quiet", script], timeout_s=100)
    said = " ".join(output.split())
    assert code == 1 and "Traceback" not in output, output
    assert re.search(r"worker [01] \(pid \d+\) exited with code 0 before it joined the job: "
                     r"the script ended without calling tessera\.distribute\(\) or "
                     r"tessera\.init\(\)", said), output
    assert time.monotonic() - start < 60, "it waited for the start-up timeout"


def test_allreduce_refuses_a_group_the_script_made_itself_in_one_line(tmp_path):
    """A DDP script's own ``dist.init_process_group`` before ``tessera.distribute``: in
    allreduce mode Tessera forms the group (and forms it again when a worker is replaced),
    so the call is refused in one line naming the remedy, where torch's "trying to
    initialize the default process group twice" traceback ended the job."""
    script = tmp_path / "own_group.py"
    script.write_text(
        "import os\nimport torch\nimport torch.distributed as dist\nimport tessera\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'rendezvous'}', "
        "rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']))\n"
        "model = torch.nn.Linear(4, 2)\n"
        "tessera.distribute(model, torch.optim.SGD(model.parameters(), lr=0.1))\n")
    code, output = run_cli(["launch", "--workers", 2, "--servers", 0, "--mode", "allreduce",
                            "--out", tmp_path / "run", "--quiet", script], timeout_s=100)
    assert code != 0 and "Traceback" not in output, output
    assert "the script called torch.distributed.init_process_group before tessera.distribute, " \
           "but with --mode allreduce Tessera forms the workers' group itself" in \
           " ".join(output.split()), output


def test_reading_gradients_after_backward_is_no_change(tmp_path):
    """The refusal above watches changes only: a script that reads its gradients (a norm
    to log) between backward and step trains on."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "mistakes.py"),
                           "read_grads"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


COLLECTIVES = ROOT / "tests" / "scripts" / "collectives.py"


def test_a_scripts_torch_distributed_calls_work_in_a_server_mode(tmp_path):
    """A DDP script's own torch.distributed calls, async mode, 2 workers: rank and world
    size, all_reduce with every ReduceOp (fp32, int32, bf16), broadcast, all_gather,
    all_gather_into_tensor (flat and stacked), reduce, gather, scatter, all_gather_object,
    async_op, barrier, and torch's own DistributedSampler() without arguments. Worker 1
    reaches them 2 s after worker 0, which waits in the first."""
    code, output = run_cli(["launch", "--workers", 2, "--servers", 1, "--mode", "async",
                            "--out", tmp_path / "run", "--quiet", COLLECTIVES, "--out",
                            tmp_path / "got", "--late", 2], timeout_s=120)
    assert code == 0, output
    got = [json.loads((tmp_path / f"got.rank{r}").read_text()) for r in range(2)]
    for r, g in enumerate(got):
        assert (g["rank"], g["world"], g["backend"], g["tessera_rank"]) == (r, 2, "tessera", r)
        assert g["sum"] == [3.0, (torch.tensor(0.1) + torch.tensor(0.2)).item()]  # fp32, 0+1
        assert (g["max"], g["min"], g["avg"], g["product"], g["bor"]) == (3.0, 2.0, 2.5, 6.0, 3)
        assert g["bf16"] == [3.0, 3.0, 3.0]
        assert g["broadcast"] == 42.0
        assert g["all_gather"] == [[0.0, 0.0], [1.0, 10.0]]
        assert g["all_gather_into_tensor"] == [[0.0, 0.0, 1.0, 10.0], [[0, 7], [1, 8]]]
        assert g["scatter"] == [float(r)] * 2
        assert g["all_gather_object"] == [{"rank": 0}, {"rank": 1}]
        assert g["async_op"] is True
        assert g["sampler"] == [2, r, list(range(r, 10, 2))]
    assert got[0]["sum"] == got[1]["sum"]  # the same bits on every worker
    assert got[1]["reduce_at_1"] == 3.0 and got[0]["gather_at_0"] == [0.0, 5.0]


def test_collectives_called_out_of_order_stop_the_job_in_one_line(tmp_path):
    code, output = run_cli(["launch", "--workers", 2, "--servers", 1, "--out",
                            tmp_path / "run", "--quiet", COLLECTIVES, "--out", tmp_path / "got",
                            "--mismatch"], timeout_s=120)
    assert code != 0
    logs = "".join((tmp_path / "run" / "logs" / f"worker-{r}.log").read_text() for r in (0, 1))
    assert "worker 0 called all_reduce at this point, this worker broadcast with root 0: every " \
           "worker must call the same collectives in the same order" in logs, logs
    assert "Traceback" not in logs
