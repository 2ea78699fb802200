"""The cluster-wide profiler on real clusters: it names the straggler and the hot
server (asserted on report.json), and its trace is valid Chrome trace JSON with
spans from every process."""

from __future__ import annotations

import json
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F

import tessera
from tessera.config.schema import JobConfig, TrainConfig
from tessera.launch.inprocess import run as run_in_process
from tessera.profiler.recorder import OFF, SpanRecorder
from tests.harness import ROOT, run_cli, run_job

PHASES = {"B", "E", "X", "i", "I", "M", "C", "b", "e", "n", "s", "t", "f"}


def validate_chrome_trace(doc: dict) -> None:
    """The Trace Event Format's rules that viewers rely on (JSON object form)."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    for ev in doc["traceEvents"]:
        assert ev["ph"] in PHASES, ev
        assert isinstance(ev["pid"], int) and isinstance(ev.get("tid", 0), int), ev
        assert isinstance(ev["name"], str) and ev["name"], ev
        if ev["ph"] != "M":
            assert isinstance(ev["ts"], (int, float)) and ev["ts"] >= 0, ev
        if ev["ph"] == "X":
            assert isinstance(ev["dur"], (int, float)) and ev["dur"] >= 0, ev
        if "args" in ev:
            assert isinstance(ev["args"], dict)
    json.dumps(doc)  # serialisable as is


@pytest.fixture(scope="module")
def straggler_run(tmp_path_factory):
    """Three planted causes of known size: worker 1 sleeps 12 ms in every forward,
    server 0 holds three quarters of the partitions (a hot server), and worker 0
    evaluates every 10 steps in its own loop (no gradients), 30 ms each time."""
    tmp = tmp_path_factory.mktemp("straggler")
    job = tmp / "job.toml"
    job.write_text("[ps]\npartition_mb = 0.005\nserver_weights = [3.0, 1.0]\n")
    out = tmp / "run"
    code, output = run_cli(["launch", "--job", job, "--workers", 2, "--servers", 2, "--profile",
                            "--out", out, "--quiet", ROOT / "tests" / "scripts" / "straggler.py",
                            40], timeout_s=180)
    assert code == 0, output
    return out


def assert_ranked(report: dict) -> None:
    """Every cause's share printed, largest first, and together about the step."""
    shares = [c["share"] for c in report["causes"]]
    assert shares == sorted(shares, reverse=True), report["causes"]
    assert 0.8 <= sum(shares) <= 1.2, report["causes"]
    assert report["kind"] == report["causes"][0]["cause"]


def test_report_names_the_straggler(straggler_run):
    report = json.loads((straggler_run / "report.json").read_text())
    assert report["kind"] == "straggler", report["bottleneck"]
    assert report["stragglers"][0] == 1
    assert_ranked(report)
    # The planted 12 ms is what the straggler costs each step, and the planted hot
    # server, a smaller cost on digits' small partitions, ranks below it.
    causes = {c["cause"]: c for c in report["causes"]}
    assert causes["straggler"]["who"] == "worker 1" and 8.0 <= causes["straggler"]["ms"] <= 20.0
    assert causes["hot_server"]["who"] == "server 0", report["causes"]
    assert 0 < causes["hot_server"]["ms"] < causes["straggler"]["ms"]
    assert f"{causes['hot_server']['share']:.0%}" in report["bottleneck"]  # every share printed
    assert "worker 1" in report["bottleneck"] and "forward" in report["bottleneck"]
    slow = next(w for w in report["workers"] if w["rank"] == 1)
    fast = next(w for w in report["workers"] if w["rank"] == 0)
    assert slow["forward_ms"] > 10.0 > fast["forward_ms"]  # the 12 ms sleep is seen
    # Worker 0's evaluation (3 ms a step on average) is evaluation, not its compute: its
    # training forwards alone stay small (they took ~4 ms when the evaluation's forwards
    # were counted with them), and it ranks below the straggler.
    assert fast["forward_ms"] < 1.5 and 2.0 <= fast["evaluation_ms"] <= 6.0, fast
    assert slow["evaluation_ms"] == 0.0
    assert causes["evaluation"]["who"] == "worker 0", report["causes"]
    assert 2.0 <= causes["evaluation"]["ms"] <= 6.0 < causes["straggler"]["ms"]
    assert "| evaluation (worker 0) |" in (straggler_run / "report.md").read_text()
    # Worker 0 pays for it by waiting at the servers for worker 1's pushes.
    assert fast["waiting_ms"] > slow["waiting_ms"]
    assert {"rank", "bytes", "bytes_share", "queue_ms", "apply_ms", "hot_partitions"} <= \
        set(report["servers"][0])
    assert (straggler_run / "report.md").read_text().count("| 1 |") >= 1
    assert "<svg" in (straggler_run / "report.html").read_text()


def test_trace_is_chrome_json_with_spans_from_every_process(straggler_run):
    doc = json.loads((straggler_run / "trace.json").read_text())
    validate_chrome_trace(doc)
    names = {ev["pid"]: ev["args"]["name"] for ev in doc["traceEvents"]
             if ev["ph"] == "M" and ev["name"] == "process_name"}
    assert sorted(names.values()) == ["coordinator 0", "server 0", "server 1", "worker 0",
                                      "worker 1"]
    spans_by_pid = {pid: [ev for ev in doc["traceEvents"] if ev["pid"] == pid and ev["ph"] != "M"]
                    for pid in names}
    assert all(spans_by_pid[pid] for pid in names), {names[p]: len(s) for p, s in spans_by_pid.items()}
    worker_spans = {ev["name"] for pid, evs in spans_by_pid.items() if names[pid].startswith("worker")
                    for ev in evs}
    assert {"forward", "backward", "wait", "copy", "in flight"} <= worker_spans
    server_spans = {ev["name"] for pid, evs in spans_by_pid.items() if names[pid].startswith("server")
                    for ev in evs}
    assert "apply" in server_spans
    assert doc["metadata"]["clock_error_us_max"] >= 0


def test_report_names_the_hot_server(tmp_path):
    # One worker (no one to straggle behind) and four servers, server 0 holding about
    # 10/13 of a 0.7 MB model's bytes in 20 KB partitions: balanced servers would save
    # about 1 - (1/4)/(10/13) = 2/3 of the communication, the largest cost of a step
    # whose batch is one sample (compute is small; no evaluation inside the timed steps).
    job = tmp_path / "hot.toml"
    job.write_text(textwrap.dedent("""
        name = "hot"
        profile = true
        [cluster]
        workers = 1
        servers = 4
        [model]
        name = "mlp"
        hidden = [512, 256]
        [data]
        dataset = "digits"
        batch_size = 1
        [train]
        steps = 60
        threads = 1
        eval_every = 1000
        log_every = 1000
        [ps]
        partition_mb = 0.02
        server_weights = [10.0, 1.0, 1.0, 1.0]
    """))
    run_job(str(job), tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["kind"] == "hot_server", report["bottleneck"]
    assert_ranked(report)
    assert report["servers"][0]["rank"] == 0 and report["servers"][0]["bytes_share"] > 0.7
    assert report["servers"][0]["hot"] and not any(s["hot"] for s in report["servers"][1:])
    assert "server 0" in report["bottleneck"]


def test_report_command_prints_the_table(straggler_run):
    code, output = run_cli(["report", straggler_run], timeout_s=60)
    assert code == 0, output
    assert "Bottleneck" in output and "worker 1" in output
    assert "causes, by share of step time" in output and "straggler (worker 1)" in output
    code, output = run_cli(["report", straggler_run / "nope"], timeout_s=60)
    assert code == 2 and "--profile" in output


# ------------------------------------------------------------ the recorder alone


def test_the_recorder_gives_back_every_span_in_order_with_its_args(tmp_path):
    rec = SpanRecorder("worker", 3, offset_ns=1_000)
    with rec.span("outer", "compute"):
        with rec.span("outer", "compute", depth=2):  # the same kind, nested
            pass
    rec.add("wait", "comm", 50, 7, clock=4)
    wait, copy = rec.kinds((("wait", "comm"), ("copy", "optimizer")))
    assert rec.kinds((("wait", "comm"), ("copy", "optimizer"))) == (wait, copy)
    rec.put(copy, 60, 8)
    rec.put(wait, 70, 9, {"clock": 5})
    before = time.time_ns()
    rec.instant("step", "step", step=1)
    for i in range(5000):  # past any first allotment
        rec.put(copy, 100 + i, i)
    spans = rec.spans
    assert len(spans) == 6 + 5000
    inner, outer = spans[0], spans[1]  # a span is recorded when it ends
    assert inner[:2] == outer[:2] == ("outer", "compute")
    assert inner[4] == {"depth": 2} and outer[4] is None
    assert outer[2] <= inner[2] and inner[2] + inner[3] <= outer[2] + outer[3]
    assert spans[2:5] == [("wait", "comm", 50, 7, {"clock": 4}), ("copy", "optimizer", 60, 8, None),
                          ("wait", "comm", 70, 9, {"clock": 5})]
    name, cat, start, dur, args = spans[5]
    assert (name, cat, dur, args) == ("step", "step", 0, {"step": 1})
    assert before + 1_000 <= start <= time.time_ns() + 1_000  # on the aligned clock
    assert spans[-1] == ("copy", "optimizer", 100 + 4999, 4999, None)
    rec.dump(tmp_path / "w.json")
    doc = json.loads((tmp_path / "w.json").read_text())
    assert (doc["role"], doc["rank"], doc["offset_ns"]) == ("worker", 3, 1_000)
    assert [tuple(s) for s in doc["spans"]] == spans


def test_the_off_recorder_keeps_nothing(tmp_path):
    with OFF.span("forward", "compute"):
        OFF.add("wait", "comm", 1, 2, clock=3)
        OFF.put(0, 1, 2)
        OFF.instant("step")
    assert OFF.spans == [] and not OFF.enabled
    OFF.dump(tmp_path / "off.json")
    assert not (tmp_path / "off.json").exists()


def test_a_workers_step_spans_are_on_the_aligned_clock(tmp_path):
    """PSDataParallel times its step with this process's clock and records it on the
    coordinator's (the recorder's offset added): every span of three steps lies inside
    the steps' own window on the aligned clock, and the pushes' bytes are the model's."""
    offset = 10**15  # far from 0 either way: a span left unaligned lies outside the window
    rec = SpanRecorder("worker", 0, offset_ns=offset)
    window = []

    def main() -> None:
        tessera.init()
        torch.manual_seed(0)
        model = tessera.distribute(torch.nn.Linear(4, 2), "sgd", lr=0.1)
        model.profiler = model.client.profiler = rec
        window.append(time.time_ns() + offset)
        for _ in range(3):
            loss = F.mse_loss(model(torch.randn(8, 4)), torch.zeros(8, 2))
            model.scale_loss(loss).backward()
            model.step()
        window.append(time.time_ns() + offset)
        tessera.finish(eval_loss=loss.item(), steps=3)

    cfg = JobConfig(name="aligned", out=str(tmp_path / "run"), train=TrainConfig(steps=3))
    assert run_in_process(cfg, main, quiet=True) == 0
    lo, hi = window
    spans = rec.spans
    assert sorted({s[0] for s in spans}) == ["backward", "copy", "forward", "in flight",
                                             "send", "wait"]
    for name, cat, start, dur, args in spans:
        assert dur >= 0 and lo <= start and start + dur <= hi, (name, start - lo, dur, hi - lo)
    flights = [s for s in spans if s[0] == "in flight"]
    assert [s[4]["clock"] for s in flights] == [0, 1, 2]
    assert all(s[4]["bytes"] == (4 * 2 + 2) * 4 for s in flights)


def test_evaluation_is_counted_once_and_only_within_the_steps():
    """The report's arithmetic on spans of known length: worker 0 evaluates for 50 ms in
    the middle of 10 steps (the trainer's ``eval`` window holding forwards without
    gradients: counted once) and for 500 ms after its last step (in no step: not
    counted); its training forwards stay its compute."""
    from tessera.profiler.report import analyze

    ms = 1_000_000

    def worker(rank: int, evaluates: bool) -> dict:
        spans, t = [], 0
        for step in range(10):
            spans += [["forward", "compute", t, 2 * ms],
                      ["backward", "compute", t + 2 * ms, 3 * ms],
                      ["wait", "comm", t + 5 * ms, 1 * ms]]
            t += 6 * ms
            if evaluates and step == 4:
                spans += [["eval", "eval", t, 50 * ms], ["evaluate", "eval", t + ms, 20 * ms],
                          ["evaluate", "eval", t + 25 * ms, 20 * ms]]
            t += 50 * ms if step == 4 else 0  # (both: worker 1 waits at its next step)
        if evaluates:
            spans.append(["eval", "eval", t + ms, 500 * ms])
        return {"role": "worker", "rank": rank, "spans": spans, "counters": {}}

    report = analyze([worker(0, True), worker(1, False)])
    w0, w1 = report["workers"]
    assert w0["forward_ms"] == pytest.approx(2.0) and w0["evaluation_ms"] == pytest.approx(5.0)
    assert w1["evaluation_ms"] == 0.0 and report["stragglers"] == []
    causes = {c["cause"]: c for c in report["causes"]}
    assert causes["evaluation"]["who"] == "worker 0"
    assert causes["evaluation"]["ms"] == pytest.approx(5.0)
    assert causes["evaluation"]["share"] == pytest.approx(5.0 / 11.0, rel=1e-3)
