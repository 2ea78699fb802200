"""``tessera node`` across "machines": network namespaces on a bridge (tests/netns.py).

Each host is a namespace with its own address (10.77.0.i) and loopback, so every
connection between nodes crosses a real (virtual) link that a test can pull.
Needs root and iproute2; elsewhere the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import netns
from tests.harness import ROOT, alive, wait_for

DIGITS = str(ROOT / "examples" / "digits.toml")
MOVIELENS = str(ROOT / "examples" / "movielens.toml")
SHAKESPEARE = str(ROOT / "examples" / "shakespeare.toml")
JOB = str(ROOT / "tests" / "jobs" / "multihost.toml")  # heartbeat timeout 4 s
HEARTBEAT_TIMEOUT_S = 4.0
SECRET = "tessera-test-multihost-secret-0123456789"
PORT = 29500  # each test's namespaces are fresh: any port is free
LAUNCHER_VARS = ("TESSERA_SECRET", "TESSERA_COORDINATOR", "MASTER_ADDR", "MASTER_PORT", "NNODES",
                 "SLURM_NNODES", "WORLD_SIZE", "NODE_RANK", "SLURM_NODEID",
                 "JOB_COMPLETION_INDEX", "GROUP_RANK", "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def hosts():
    """``hosts(n)`` builds n namespaces; all are torn down after the test."""
    netns.require()
    made: list[netns.Hosts] = []

    def build(n: int) -> netns.Hosts:
        h = netns.Hosts(n).up()
        made.append(h)
        return h

    yield build
    for h in made:
        h.down()


def start_node(hosts: netns.Hosts, host: int, job: str, rank: int, nodes: int, out, *flags):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(TESSERA_SECRET=SECRET, PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "tessera.cli.main", "node", job,
            "--coordinator", f"{hosts.address(1)}:{PORT}", "--nodes", nodes,
            "--node-rank", rank, "--out", out, "--quiet", *flags]
    return hosts.popen(host, argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout_s: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"node did not finish within {timeout_s} s:\n{out}")
    return proc.returncode, " ".join(out.split())  # one line: rich wraps long messages


def test_two_hosts_train_digits(hosts, tmp_path):
    h = hosts(2)
    t0 = time.monotonic()
    # Node 1 first: it waits for node 0's coordinator on 10.77.0.1.
    n1 = start_node(h, 2, DIGITS, 1, 2, tmp_path / "node1", "--workers", 2, "--servers", 2)
    n0 = start_node(h, 1, DIGITS, 0, 2, tmp_path / "node0", "--workers", 2, "--servers", 2)
    code0, out0 = finish(n0, 150)
    code1, out1 = finish(n1, 60)
    assert code0 == 0, out0
    assert code1 == 0, out1
    summary = json.loads((tmp_path / "node0" / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.95, summary
    cluster = json.loads((tmp_path / "node0" / "cluster.json").read_text())
    where = {(p["role"], p["rank"]): p["address"] for p in cluster["processes"]}
    # Servers bound to their own host's address (the route toward the coordinator).
    assert where[("coordinator", 0)] == f"tcp://10.77.0.1:{PORT}"
    assert where[("server", 0)].startswith("tcp://10.77.0.1:")
    assert where[("server", 1)].startswith("tcp://10.77.0.2:")
    assert json.loads((tmp_path / "node1" / "node.json").read_text())["host"] == "10.77.0.2"
    print(f"two hosts: {time.monotonic() - t0:.1f} s")


# The collective modes on two hosts, one worker each: Gloo rendezvous through the
# coordinator and binds to each host's own address (10.77.0.i), not the 127.0.0.1
# its hostname resolves to. What each job must reach, from its summary.json.
COLLECTIVE = {
    "allreduce": (DIGITS, ["--mode", "allreduce", "--workers", 2, "--servers", 0,
                           "--precision", "bf16", "--cpu-bf16", "wire", "--steps", 200],
                  lambda s: s["eval_accuracy"] >= 0.9 and s["allreduce_bytes"] > 0),
    "hybrid": (MOVIELENS, ["--mode", "hybrid", "--workers", 2, "--servers", 2, "--steps", 30],
               lambda s: s["eval_rmse"] < 1.2 and sum(s["server_bytes_received"]) > 0),
    "pipeline": (SHAKESPEARE, ["--stages", 2, "--workers", 2, "--steps", 20],
                 lambda s: s["eval_loss"] < 3.5),
}


@pytest.mark.parametrize("mode", list(COLLECTIVE))
def test_two_hosts_collective_modes(hosts, tmp_path, mode):
    h = hosts(2)
    job, flags, good = COLLECTIVE[mode]
    t0 = time.monotonic()
    n1 = start_node(h, 2, job, 1, 2, tmp_path / "node1", *flags)
    n0 = start_node(h, 1, job, 0, 2, tmp_path / "node0", *flags)
    code0, out0 = finish(n0, 150)
    code1, out1 = finish(n1, 60)
    assert code0 == 0, out0
    assert code1 == 0, out1
    summary = json.loads((tmp_path / "node0" / "summary.json").read_text())
    assert summary["workers"] == 2 and good(summary), summary
    assert json.loads((tmp_path / "node1" / "node.json").read_text())["host"] == "10.77.0.2"
    if mode == "allreduce":  # bf16 wire-only: each host's first worker says so, in its log
        for node, rank in (("node0", 0), ("node1", 1)):
            log = (tmp_path / node / "logs" / f"worker-{rank}.log").read_text()
            assert f"worker {rank}: precision bf16 on CPU" in log, (node, log)
    print(f"two hosts, {mode}: {time.monotonic() - t0:.1f} s")


def test_host_dropping_off_the_network_fails_the_job_naming_it(hosts, tmp_path):
    # 1 server and 3 workers over 3 nodes (contiguous blocks):
    #   host 1, node 0: the coordinator and worker 0
    #   host 2, node 1: worker 1 only           <- its cable is pulled mid-run
    #   host 3, node 2: server 0 and worker 2
    h = hosts(3)
    t0 = time.monotonic()
    nodes = [start_node(h, k + 1, JOB, k, 3, tmp_path / f"node{k}") for k in (2, 1, 0)][::-1]
    metrics = tmp_path / "node0" / "metrics.jsonl"

    def training() -> bool:
        for p in nodes:
            if p.poll() is not None:
                raise AssertionError(f"a node exited before the cut:\n{p.communicate()[0]}")
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return bool(lines) and json.loads(lines[-1])["step"] >= 50

    wait_for(training, 150, "training to reach step 50 on all three hosts")
    cut = time.monotonic()
    h.link_down(2)
    results = [finish(p, HEARTBEAT_TIMEOUT_S + 40) for p in nodes]
    ended = time.monotonic() - cut
    for k, (code, out) in enumerate(results):
        assert code != 0, f"node {k} exited 0 after its peer vanished:\n{out}"
    # No hang: everything is over within the heartbeat timeout plus a margin.
    assert ended < HEARTBEAT_TIMEOUT_S + 20, ended
    # Node 0 (coordinator) names the process on the host that vanished.
    out0 = results[0][1]
    assert "worker 1" in out0 and "no heartbeat" in out0, out0
    # The cut-off node says it lost the coordinator; the third names worker 1 too.
    assert "coordinator" in results[1][1] and "heartbeats" in results[1][1], results[1][1]
    assert "worker 1" in results[2][1], results[2][1]
    assert not (tmp_path / "node0" / "summary.json").exists()
    for k, (code, out) in enumerate(results):
        print(f"node {k} (exit {code}): {out}")
    print(f"three hosts: cut after {cut - t0:.1f} s, all nodes ended {ended:.1f} s after the cut")


def _node_pair(h, job_flags, tmp_path, run: str):
    """Nodes 1 and 0 of a 2-node job (node k on host k+1), run dirs ``<run>-node<k>``."""
    n1 = start_node(h, 2, DIGITS, 1, 2, tmp_path / f"{run}-node1", *job_flags)
    n0 = start_node(h, 1, DIGITS, 0, 2, tmp_path / f"{run}-node0", *job_flags)
    return n0, n1


def _after_usr1(dead: list[dict], nodes, tmp_path) -> str:
    """What the test saw when a process of run A was gone 0.5 s after SIGUSR1: which ones,
    the node launchers' output, and every log of run A (the dead processes' first)."""
    lines = [f"gone after SIGUSR1: {dead}"]
    for k, p in enumerate(nodes):
        lines.append(f"node {k} launcher: {'running' if p.poll() is None else p.returncode}")
        if p.poll() is None:
            p.kill()
        lines.append(p.communicate(timeout=30)[0])
    names = {f"{d['role']}-{d['rank']}.log" for d in dead}
    logs = sorted(tmp_path.glob("a-node*/logs/*.log"), key=lambda f: f.name not in names)
    for log in logs:
        lines.append(f"--- {log.relative_to(tmp_path)}:\n{log.read_text()[-4000:]}")
    return "\n".join(lines)


def test_two_hosts_checkpoint_to_one_shared_dir_interrupted_and_resumed(hosts, tmp_path):
    """Every checkpoint of a 2-node job lands in --checkpoint-dir: both nodes' server files
    and node 0's manifest, on schedule and on SIGTERM to the launchers (as Slurm sends it);
    the job resumes from it and ends at the asked step. (kill -9 of a launcher:
    tests/test_orphans.py; the refusal without --checkpoint-dir: tests/test_node.py.)

    2 servers and 1 worker over 2 hosts: host 1 (node 0) runs the coordinator and server 0,
    host 2 (node 1) server 1 and worker 0 (so metrics.jsonl is in node 1's run dir)."""
    from tessera.ps.checkpoint import CheckpointError, CheckpointStore
    h = hosts(2)
    t0 = time.monotonic()
    ck = tmp_path / "ck"  # one filesystem for both "hosts": a shared path
    flags = ["--workers", 1, "--servers", 2, "--checkpoint-dir", ck]
    store = CheckpointStore(str(ck))
    marks = []

    def mark(what: str) -> None:
        marks.append(f"{what} {time.monotonic() - t0:.1f}")

    def check_complete(clock: int) -> None:
        m = store.manifest(clock)
        assert m["files"] == {"0": "server-0.safetensors", "1": "server-1.safetensors"}, m
        assert all((ck / f"clock-{clock:08d}" / f).is_file() for f in m["files"].values())

    def a_periodic_checkpoint() -> int:
        """The newest complete checkpoint of a job still running, checked whole. The job
        keeps 2 (checkpoint.keep's default) and runs on: one listed complete can be pruned
        before it is read, so a check that fails because its manifest is gone moves on to
        a newer one; any other failure is the test's."""
        for _ in range(20):
            clock = store.clocks()[0][-1]
            try:
                check_complete(clock)
                return clock
            except (CheckpointError, AssertionError):
                # pruning removes the directory's files in no set order: give it a moment
                deadline = time.monotonic() + 2.0
                while store.has_manifest(clock) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if store.has_manifest(clock):
                    raise
        raise AssertionError("every complete checkpoint read was pruned before its check")

    # A: checkpoints every 10 steps; after the first, SIGTERM to both launchers: node 0
    # asks for one more, then every process of both nodes ends.
    n0, n1 = _node_pair(h, [*flags, "--steps", 100000, "--checkpoint-every", 10], tmp_path, "a")
    wait_for(lambda: store.clocks()[0] or n0.poll() is not None, 60, "a checkpoint in run A")
    mark("A checkpointed")
    periodic = a_periodic_checkpoint()
    procs = json.loads((tmp_path / "a-node0" / "cluster.json").read_text())["processes"]
    pids = [p["pid"] for p in procs]
    assert len(pids) == 4  # the coordinator, 2 servers, 1 worker over the 2 hosts
    # Slurm's --signal=USR1 reaches every process of the job: the children ignore it.
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    time.sleep(0.5)
    dead = [p for p in procs if not alive(p["pid"])]
    if dead or n0.poll() is not None or n1.poll() is not None:
        raise AssertionError(_after_usr1(dead, (n0, n1), tmp_path))
    for p in (n1, n0):
        p.send_signal(signal.SIGTERM)
    code0, out0 = finish(n0, 60)
    mark("A node 0 ended")
    code1, out1 = finish(n1, 60)
    mark("A node 1 ended")
    assert code0 == 130 and f"continue with --resume {ck}" in out0, out0
    assert code1 == 130, out1
    wait_for(lambda: not any(alive(p) for p in pids), 5, "every process of run A to end")
    last = store.latest()["clock"]
    assert last > periodic and f"checkpoint at clock {last} in {ck}" in out0, out0
    check_complete(last)
    assert not list(tmp_path.glob("a-node*/checkpoints")), "a checkpoint left in a run dir"

    # B: resumes from the SIGTERM checkpoint and finishes 10 steps later.
    n0, n1 = _node_pair(h, [*flags, "--resume", ck, "--steps", last + 10], tmp_path, "b")
    (code0, out0), (code1, out1) = finish(n0, 90), finish(n1, 30)
    mark("B done")
    print(f"checkpoints at clocks {periodic} (every 10) and {last} (SIGTERM); at s: "
          f"{', '.join(marks)}")
    assert code0 == 0, out0
    assert code1 == 0, out1
    summary = json.loads((tmp_path / "b-node0" / "summary.json").read_text())
    assert summary["steps"] == last + 10 and summary["worker_first_steps"] == [last], summary
    # Each node's server read its part from the shared location.
    for k in (0, 1):
        log = (tmp_path / f"b-node{k}" / "logs" / f"server-{k}.log").read_text()
        assert f"at clock {last} from {ck}" in log, log
