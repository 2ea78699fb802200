"""``tessera node`` across "machines": network namespaces on a bridge (tests/netns.py).

Each host is a namespace with its own address (10.77.0.i) and loopback, so every
connection between nodes crosses a real (virtual) link that a test can pull.
Needs root and iproute2; elsewhere the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests import netns
from tests.harness import ROOT, wait_for

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
                           "--precision", "bf16", "--steps", 200],
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
