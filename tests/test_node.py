"""``tessera node``: per-node launch (the torchrun way) on one machine.

Refusals are checked through the CLI (exit 2, one line naming the flag, nothing
started); the shares, GPU assignment and address parsing as plain functions; and
a whole job as two ``tessera node`` processes on loopback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from tessera.launch.node_plan import NodeSettingError, parse_host_port, share
from tessera.config.env import gpu_env
from tessera.launch.process import visible_gpus
from tests.harness import ROOT, TESSERA, Job

DIGITS = str(ROOT / "examples" / "digits.toml")
SECRET = "tessera-test-node-secret-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_cli(args: list, env: dict, timeout_s: float = 30) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    out = subprocess.run([*TESSERA, "node", *map(str, args)], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout_s, env=env)
    return out.returncode, out.stdout, out.stderr, time.monotonic() - t0


LAUNCHER_VARS = ("TESSERA_SECRET", "TESSERA_COORDINATOR", "MASTER_ADDR", "MASTER_PORT",
                 "NNODES", "SLURM_NNODES", "WORLD_SIZE", "NODE_RANK", "SLURM_NODEID",
                 "JOB_COMPLETION_INDEX", "GROUP_RANK")


def clean_env(**extra) -> dict:
    """The test's environment without any launcher variable that could leak in."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(extra)
    return env


# ------------------------------------------------------------------ refusals

REFUSALS = [
    # (flags, environment, words the one line must hold)
    (["--nodes", 2, "--node-rank", 0], {}, ["--coordinator", "TESSERA_COORDINATOR"]),
    (["--coordinator", "127.0.0.1:29500", "--nodes", 2, "--node-rank", 2], {},
     ["--node-rank 2", "--nodes 2", "0..1"]),
    (["--coordinator", "127.0.0.1:29500", "--nodes", 2, "--node-rank", -1], {},
     ["--node-rank -1"]),
    (["--coordinator", "node0-without-port", "--nodes", 2, "--node-rank", 0], {},
     ["--coordinator", "HOST:PORT"]),
    (["--coordinator", "127.0.0.1:99999", "--nodes", 2, "--node-rank", 0], {},
     ["--coordinator", "HOST:PORT"]),
    (["--coordinator", "127.0.0.1:29500", "--nodes", 2, "--node-rank", 0, "--backend", "ray"],
     {}, ["--backend ray"]),
    (["--coordinator", "127.0.0.1:29500", "--node-rank", 0], {}, ["--nodes", "NNODES"]),
    (["--coordinator", "127.0.0.1:29500", "--nodes", 2], {}, ["--node-rank", "NODE_RANK"]),
    ([], {"NNODES": "2", "SLURM_NODEID": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     ["SLURM_NODEID=3", "NNODES=2"]),
    ([], {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, ["MASTER_PORT"]),
    ([], {"WORLD_SIZE": "two", "NODE_RANK": "0", "TESSERA_COORDINATOR": "127.0.0.1:29500"},
     ["--nodes", "WORLD_SIZE"]),
    # node 0 runs the coordinator: the address must be one of this machine's
    (["--coordinator", "192.0.2.1:29500", "--nodes", 2, "--node-rank", 0], {},
     ["--coordinator 192.0.2.1:29500", "cannot bind"]),
    # a loopback --host cannot serve nodes that reach the coordinator elsewhere
    (["--coordinator", "192.0.2.1:29500", "--nodes", 2, "--node-rank", 1, "--host", "127.0.0.1"],
     {}, ["--host 127.0.0.1", "loopback"]),
    # every node's servers write their part of each checkpoint: one shared location
    (["--coordinator", "127.0.0.1:29500", "--nodes", 2, "--node-rank", 1,
      "--checkpoint-every", 10], {}, ["--checkpoint-every 10", "--checkpoint-dir", "share"]),
]


@pytest.mark.parametrize("flags,env,words", REFUSALS,
                         ids=[f"refuse{i}" for i in range(len(REFUSALS))])
def test_refusals_exit_2_naming_the_flag(tmp_path, flags, env, words):
    # In-process through click (no interpreter start per case); the exit code is the
    # CLI's own sys.exit. test_refuses_without_a_secret... runs the real command.
    from click.testing import CliRunner

    from tessera.cli.main import cli
    unset = {k: None for k in LAUNCHER_VARS}
    t0 = time.monotonic()
    result = CliRunner().invoke(
        cli, ["node", DIGITS, "--out", str(tmp_path / "n{node}"), "--quiet",
              *map(str, flags)], env={**unset, "TESSERA_SECRET": SECRET, **env})
    took = time.monotonic() - t0
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tessera: "), result.stderr
    assert all(w in lines[0] for w in words), (words, result.stderr)
    assert took < 5, took
    # Nothing was started: no logs (the refusal comes before any spawn).
    assert not any(tmp_path.glob("*/logs/*")), list(tmp_path.rglob("*"))


def test_refuses_without_a_secret_naming_both_ways(tmp_path):
    args = [DIGITS, "--out", tmp_path / "n", "--coordinator", "127.0.0.1:29500", "--nodes", 2,
            "--node-rank", 0]
    code, _, stderr, _ = node_cli(args, clean_env())
    assert code == 2 and "TESSERA_SECRET" in stderr and "--secret-file" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    empty = tmp_path / "secret"
    empty.write_text("\n")
    code, _, stderr, _ = node_cli([*args, "--secret-file", empty], clean_env())
    assert code == 2 and "--secret-file" in stderr and "empty" in stderr, stderr
    code, _, stderr, _ = node_cli([*args, "--secret-file", tmp_path / "missing"], clean_env())
    assert code == 2 and "--secret-file" in stderr, stderr
    assert not (tmp_path / "n").exists()


def test_empty_share_warns_and_exits_cleanly(tmp_path):
    # 2 servers and 2 workers over 4 nodes: node 2 gets [1, 1) of each, i.e. nothing.
    code, stdout, stderr, took = node_cli(
        [DIGITS, "--out", tmp_path / "n{node}", "--coordinator", "127.0.0.1:29500", "--nodes", 4,
         "--node-rank", 2, "--workers", 2, "--servers", 2],
        clean_env(TESSERA_SECRET=SECRET))
    assert code == 0, (stdout, stderr)
    assert "warning: node 2 of 4 gets no servers and no workers" in stderr, stderr
    assert took < 10
    assert json.loads((tmp_path / "n2" / "node.json").read_text())["workers"] == []


# ------------------------------------------------------------------ pure functions


@pytest.mark.parametrize("count,nodes", [(2, 2), (3, 2), (1, 3), (4, 3), (7, 4), (0, 2)])
def test_shares_are_contiguous_blocks_covering_every_rank_once(count, nodes):
    blocks = [share(count, nodes, k) for k in range(nodes)]
    assert [r for b in blocks for r in b] == list(range(count))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    if count:
        assert len(blocks[-1]) >= 1  # the last node always gets one


def test_parse_host_port():
    assert parse_host_port("node0:29500") == ("node0", 29500)
    assert parse_host_port("tcp://10.0.0.1:1") == ("10.0.0.1", 1)
    assert parse_host_port("[::1]:29500") == ("::1", 29500)
    for bad in ("node0", ":29500", "node0:", "node0:0", "node0:x"):
        with pytest.raises(NodeSettingError, match="--coordinator"):
            parse_host_port(bad)


def test_gpu_per_worker_without_torch(tmp_path, monkeypatch):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    gpus = ["2", "3"]
    assert [gpu_env(i, gpus) for i in range(3)] == [
        {"CUDA_VISIBLE_DEVICES": "2"}, {"CUDA_VISIBLE_DEVICES": "3"},
        {"CUDA_VISIBLE_DEVICES": "2"}]
    assert gpu_env(0, []) == {}
    # Without the variable: one GPU per "GPU n:" line of `nvidia-smi -L` (a fake here).
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\n"
                    "echo '  MIG 1g.10gb Device 0: (UUID: MIG-b)'\n"
                    "echo 'GPU 1: NVIDIA H100 (UUID: GPU-c)'\n")
    fake.chmod(0o755)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '')}")
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert visible_gpus() == []  # no nvidia-smi: no GPU
    probe = "import sys, tessera.launch.node; sys.exit('torch' in sys.modules)"
    code = subprocess.run([TESSERA[0], "-c", probe], cwd=ROOT, check=False).returncode
    assert code == 0, "tessera.launch.node imports torch"


# ------------------------------------------------------------------ a whole job


def _node_pair(tmp_path, monkeypatch, target, *script_args) -> tuple:
    """``tessera node TARGET`` as nodes 0 and 1 on loopback (2 workers, 2 servers, run
    directories ``node0``/``node1``): the coordinator port, then each node's exit code and
    output, ``(port, (code0, out0), (code1, out1))``."""
    monkeypatch.setenv("TESSERA_SECRET", SECRET)
    for name in ("TESSERA_COORDINATOR", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    common = [target, "--coordinator", f"127.0.0.1:{port}", "--nodes", 2, "--workers", 2,
              "--servers", 2, "--out", tmp_path / "node{node}", "--quiet"]
    tail = ["--", *script_args] if script_args else []
    # Node 1 first: it waits for the coordinator that node 0 brings up.
    n1 = Job(["node", *common, "--node-rank", 1, *tail], timeout_s=150)
    n0 = Job(["node", *common, "--node-rank", 0, *tail], timeout_s=150)
    try:
        return port, n0.wait(), n1.wait()
    finally:
        n0.kill()
        n1.kill()


def _two_nodes(tmp_path, monkeypatch, target, *script_args) -> int:
    """:func:`_node_pair`, asserting both nodes exit 0; the coordinator port."""
    port, (code0, out0), (code1, out1) = _node_pair(tmp_path, monkeypatch, target,
                                                     *script_args)
    assert code0 == 0, out0
    assert code1 == 0, out1
    return port


def test_two_nodes_on_loopback_train_digits(tmp_path, monkeypatch):
    t0 = time.monotonic()
    port = _two_nodes(tmp_path, monkeypatch, DIGITS)
    summary = json.loads((tmp_path / "node0" / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.95, summary
    assert summary["workers"] == 2 and summary["servers"] == 2
    cluster = json.loads((tmp_path / "node0" / "cluster.json").read_text())
    coord = next(p for p in cluster["processes"] if p["role"] == "coordinator")
    assert coord["address"] == f"tcp://127.0.0.1:{port}"
    # Each node ran its block: node 0 server 0 + worker 0, node 1 server 1 + worker 1.
    for k in (0, 1):
        run = tmp_path / f"node{k}"
        assert sorted(p.name for p in (run / "logs").iterdir()) == sorted(
            [f"server-{k}.log", f"worker-{k}.log", "forkserver.log"]
            + (["coordinator-0.log"] if k == 0 else []))
        assert json.loads((run / "config.json").read_text())["cluster"]["host"] == "127.0.0.1"
    assert not (tmp_path / "node1" / "summary.json").exists()
    print(f"two loopback nodes: {time.monotonic() - t0:.1f} s")


def test_two_nodes_run_a_users_script(tmp_path, monkeypatch):
    """`tessera node SCRIPT.py`: a user's own script goes multi-node as `launch` runs it
    (its arguments after `--`)."""
    _two_nodes(tmp_path, monkeypatch, ROOT / "examples" / "train_script.py", "--steps", 60)
    summary = json.loads((tmp_path / "node0" / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["workers"] == 2, summary
    assert summary["eval_accuracy"] >= 0.85, summary
    assert "worker-1.log" in {p.name for p in (tmp_path / "node1" / "logs").iterdir()}


def test_a_worker_ending_before_it_joined_on_another_node_stops_the_job(tmp_path, monkeypatch):
    """Worker 1, on the node without the coordinator, ends (exit 0) before it joined: that
    node's launcher cannot see the coordinator's cluster.json, but the worker's own life
    tally (written when its registration returns) is missing, so it tells the coordinator
    at once and both nodes stop naming it, not after the start-up timeout."""
    _, (code0, out0), (code1, out1) = _node_pair(
        tmp_path, monkeypatch, ROOT / "tests" / "scripts" / "leaves_on_node1.py")
    said1, said0 = " ".join(out1.split()), " ".join(out0.split())
    assert code1 != 0 and "worker 1 (pid" in said1 and "before it joined the job" in said1, out1
    assert code0 != 0 and "worker 1" in said0, out0


def test_interrupt_checkpoints_only_into_a_shared_location(tmp_path):
    """Node 0 of a multi-node job asks for a checkpoint on SIGTERM only when --checkpoint-dir
    gives one location for every node (tests/test_multihost.py runs it on two hosts)."""
    from tessera.config import load_config
    from tessera.launch.node import NodeLauncher
    from tessera.launch.node_plan import node_settings

    def launcher(nodes, *flags):
        cfg = load_config(DIGITS, dict(zip(flags[::2], flags[1::2])))
        st = node_settings(cfg, coordinator="127.0.0.1:29500", nodes=nodes, node_rank=0,
                           host=None, secret_file=None, env={"TESSERA_SECRET": SECRET})
        return NodeLauncher(cfg, st, quiet=True)

    out = str(tmp_path / "n{node}")
    why = launcher(2, "--out", out)._why_no_checkpoint()
    assert "--checkpoint-dir" in why and "2 nodes" in why, why
    assert launcher(2, "--out", out, "--checkpoint-dir", str(tmp_path / "ck")
                    )._why_no_checkpoint() is None
    assert launcher(1, "--out", out)._why_no_checkpoint() is None
    with pytest.raises(NodeSettingError, match="--checkpoint-dir"):
        launcher(2, "--out", out, "--checkpoint-every", 5)


def test_deploy_examples_give_every_checkpoint_one_shared_location(tmp_path):
    """deploy/slurm.sbatch passes --checkpoint-dir on the shared $JOBDIR; the Kubernetes
    job file checkpoints to an fsspec URL, which `tessera node` accepts on 2 nodes."""
    yaml = pytest.importorskip("yaml")
    from tessera.config import load_config
    from tessera.launch.node_plan import node_settings
    sbatch = (ROOT / "deploy" / "slurm.sbatch").read_text()
    assert '--checkpoint-dir "$JOBDIR/checkpoints"' in sbatch
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    job = next(d for d in docs if d and d["kind"] == "ConfigMap")["data"]["job.toml"]
    (tmp_path / "job.toml").write_text(job)
    cfg = load_config(tmp_path / "job.toml")
    assert cfg.checkpoint.every and cfg.checkpoint.dir.startswith("s3://")
    node_settings(cfg, coordinator="127.0.0.1:29500", nodes=2, node_rank=1, host=None,
                  secret_file=None, env={"TESSERA_SECRET": SECRET})
