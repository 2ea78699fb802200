"""Wire precision: push+pull time and bytes for fp32, bf16 and fp16 on a 25M-parameter
vector, and training samples/s of examples/mnist.toml under each precision, in one run.

Part 1 (``bench: precision_wire``): one parameter-server process (a real
``ParameterServer`` on an authenticated endpoint, async, SGD on fp32 masters) and
this process as the worker. Each iteration pushes a gradient for every 4 MiB
partition in the wire dtype and waits for the replies, which carry the new values in
the same dtype. The three dtypes take turns round by round, from one client; median
time of the timed iterations after warm-up, and the CPU of both processes per step
(``--wire-only`` stops after this part).

Part 2 (``bench: precision_train``): ``tessera run examples/mnist.toml`` with 2
workers and 2 servers in sync mode, ``--precision fp32|bf16|fp16``, same steps;
``samples_per_s`` and bytes from each run's summary.json.

The first line (``bench: precision_cpu``) says whether this CPU has native bf16
(the ``avx512_bf16`` or ``amx_bf16`` flags) and fp16 (``avx512_fp16``) arithmetic:
bf16 compute pays off only with the former; fp16 compute on a CPU without the
latter is far slower than fp32, which is why ``fp16`` on CPU means fp16 on the
wire and fp32 compute.

    .venv/bin/python benchmarks/precision.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECRET = secrets.token_hex(16)


def cpu_flags() -> dict:
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"bench": "precision_cpu", "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "avx512_fp16": "avx512_fp16" in flags}


def _serve(n: int, secret: str, addr_q, stop) -> None:
    import torch
    import zmq

    from tessera.config.schema import OptimizerConfig
    from tessera.ps.server import ParameterServer, ServerHooks, ServerOptions
    from tessera.ps.sharding import partition_elems_for, plan_shards
    from tessera.transport.endpoint import ServerEndpoint
    from tessera.transport.wire import ParamSpec

    torch.set_num_threads(1)
    shard_map = plan_shards([ParamSpec(name="w", shape=[n], numel=n)], 1, partition_elems_for(4.0))
    ep = ServerEndpoint(zmq.Context(), "127.0.0.1", secret)
    addr_q.put(ep.address)
    ParameterServer(ServerOptions(rank=0, num_workers=1, mode="async"), endpoint=ep,
                    partitions=list(shard_map.partitions),
                    optimizer=OptimizerConfig(name="sgd", lr=1e-6),
                    hooks=ServerHooks(should_stop=stop.is_set)).serve()


def wire_cases(n: int, iters: int, rounds: int) -> list[dict]:
    """fp32, bf16 and fp16 push+pull through one server, from one client, taking turns
    round by round (so a slow phase of a shared machine hits all three); per dtype the
    median time, and the CPU of both processes per iteration."""
    import torch
    import zmq

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _machine import busy_s, cpu_s, foreign_cpu_pct, own_s

    from tessera.ps.client import PSClient
    from tessera.ps.sharding import partition_elems_for, plan_shards
    from tessera.transport.frames import torch_dtype
    from tessera.transport.wire import ParamSpec

    dtypes = ("float32", "bfloat16", "float16")
    ctx_mp = mp.get_context("spawn")
    addr_q, stop = ctx_mp.Queue(), ctx_mp.Event()
    proc = ctx_mp.Process(target=_serve, args=(n, SECRET, addr_q, stop), daemon=True)
    proc.start()
    ctx = zmq.Context()
    try:
        address = addr_q.get(timeout=60)
        shard_map = plan_shards([ParamSpec(name="w", shape=[n], numel=n)], 1,
                                partition_elems_for(4.0))
        client = PSClient(ctx=ctx, shard_map=shard_map, server_addresses=[address],
                          secret=SECRET, worker=0, timeout_s=60)
        client.connect()
        client.init_params(torch.zeros(n))
        base = torch.randn(n)
        grads = {d: base.to(torch_dtype(d)) for d in dtypes}  # gradients in the working dtype
        times = {d: [] for d in dtypes}
        cpu = {d: 0.0 for d in dtypes}
        moved = {}
        clock = 0
        busy0, own0, t_all = busy_s(), own_s() + cpu_s([proc.pid]), time.monotonic()

        def step(d: str) -> float:
            nonlocal clock
            t0 = time.perf_counter()
            handles = [client.push(p.id, grads[d][p.start:p.stop], clock, dtype=d)
                       for p in shard_map.partitions]
            for h in handles:  # consumed as taken (a worker copies each into its model)
                h.wait()
                h.release()
            clock += 1
            return time.perf_counter() - t0

        for d in dtypes:  # warm-up: buffers allocated, pages touched
            for _ in range(2):
                step(d)
        for _ in range(rounds):
            for d in dtypes:
                b0 = client.bytes_pushed + client.bytes_pulled
                c0 = time.process_time() + cpu_s([proc.pid])
                for _ in range(iters):
                    times[d].append(step(d))
                cpu[d] += time.process_time() + cpu_s([proc.pid]) - c0
                moved[d] = (client.bytes_pushed + client.bytes_pulled - b0) // iters
        foreign = foreign_cpu_pct(busy0, own0 + 0.0, time.monotonic() - t_all)
        client.close()
        rows = []
        for d in dtypes:
            t = statistics.median(times[d])
            rows.append({"bench": "precision_wire", "elements": n, "wire_dtype": d,
                         "tessera_ms": round(t * 1e3, 2), "bytes_per_step": moved[d],
                         "tessera_gbps": round(moved[d] / t / 1e9, 3),
                         "cpu_ms_per_step": round(1e3 * cpu[d] / (iters * rounds), 1),
                         "timed_iters": iters * rounds, "foreign_cpu_pct": round(foreign, 1),
                         "loadavg_1m": os.getloadavg()[0]})
        return rows
    finally:
        stop.set()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
        ctx.destroy(linger=0)


def train_case(precision: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "tessera.cli.main", "run", str(ROOT / "examples/mnist.toml"),
               "--workers", "2", "--servers", "2", "--mode", "sync", "--precision", precision,
               "--steps", str(steps), "--quiet", "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"tessera run --precision {precision} failed:\n{proc.stdout}{proc.stderr}")
        s = json.loads((out / "summary.json").read_text())
    return {"bench": "precision_train", "precision": precision, "steps": steps,
            "tessera_samples_per_s": round(s["samples_per_s"], 1),
            "eval_accuracy": round(s["eval_accuracy"], 4),
            "bytes_pushed": s["bytes_pushed"], "bytes_pulled": s["bytes_pulled"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1M elements, 30 training steps")
    ap.add_argument("--elements", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None, help="wire: rounds of the three dtypes")
    ap.add_argument("--wire-only", action="store_true", help="part 1 only")
    args = ap.parse_args()
    n = args.elements or (1_000_000 if args.quick else 25_000_000)
    iters = 2 if args.quick else 3
    rounds = args.rounds or (2 if args.quick else 4)
    steps = 30 if args.quick else 150
    print(json.dumps(cpu_flags()), flush=True)
    wire = {row["wire_dtype"]: row for row in wire_cases(n, iters, rounds)}
    for d, row in wire.items():
        row["vs_fp32_time"] = round(row["tessera_ms"] / wire["float32"]["tessera_ms"], 3)
        row["vs_fp32_cpu"] = round(row["cpu_ms_per_step"] / wire["float32"]["cpu_ms_per_step"], 3)
        row["vs_fp32_bytes"] = round(row["bytes_per_step"] / wire["float32"]["bytes_per_step"], 3)
        print(json.dumps(row), flush=True)
    if args.wire_only:
        return
    base = None
    for precision in ("fp32", "bf16", "fp16"):
        row = train_case(precision, steps)
        base = base or row
        row["vs_fp32_samples_per_s"] = round(row["tessera_samples_per_s"]
                                             / base["tessera_samples_per_s"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
