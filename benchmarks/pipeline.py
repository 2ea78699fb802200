"""Pipeline schedules: step time, bubble fraction and peak activation memory per stage,
GPipe against 1F1B, at 2 and 4 stages with 4 to 16 micro-batches.

Each case runs ``tessera launch --mode allreduce --stages P --microbatches M
--schedule S`` over a 6-block character transformer (one replica, P worker
processes) and reads, from every stage: the median step time, and the peak
bytes autograd held for backward (counted with saved-tensor hooks as tensors are
saved and freed). The bubble is measured against the same model's step on one
process: ``bubble = 1 - (t_single / P) / t_step`` (how much of a pipelined step
each stage is *not* doing its share of the work), printed beside the ideal
``(P - 1) / (M + P - 1)``. On this 2-core machine P processes share 2 cores, so
4-stage step times include contention: compare schedules within a row, not rows.

    .venv/bin/python benchmarks/pipeline.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def single_process_step(batch: int, steps: int) -> float:
    import torch

    from tessera.models.transformer import char_transformer, lm_loss
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = char_transformer(80, context=64, dim=64, heads=4, layers=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randint(0, 80, (batch, 64)), torch.randint(0, 80, (batch, 64))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:] if len(times) > 3 else times)


def case(stages: int, micro: int, schedule: str, batch: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "tessera.cli.main", "launch", "--mode", "allreduce",
               "--servers", "0", "--workers", str(stages), "--stages", str(stages),
               "--microbatches", str(micro), "--schedule", schedule, "--batch-size", str(batch),
               "--quiet", "--out", str(out), str(ROOT / "benchmarks" / "_pipeline_worker.py"),
               str(steps), str(batch)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
        docs = [json.loads((out / f"bench-{r}.json").read_text()) for r in range(stages)]
    step = statistics.median(statistics.median(d["step_s"]) for d in docs)
    return {"step_s": step, "peak_mb": [round(d["peak_activation_bytes"] / 2**20, 2)
                                        for d in sorted(docs, key=lambda d: d["stage"])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    batch = 32
    steps = 4 if args.quick else 8
    grid = [(2, 4), (4, 8)] if args.quick else [(2, 4), (2, 8), (2, 16), (4, 4), (4, 8), (4, 16)]
    t_single = single_process_step(batch, steps)
    for stages, micro in grid:
        rows = {s: case(stages, micro, s, batch, steps) for s in ("gpipe", "1f1b")}
        ideal = (stages - 1) / (micro + stages - 1)
        out = {"bench": "pipeline", "stages": stages, "microbatches": micro, "batch": batch,
               "single_process_step_s": round(t_single, 4), "ideal_bubble": round(ideal, 3)}
        for s, r in rows.items():
            out[f"{s}_step_s"] = round(r["step_s"], 4)
            out[f"{s}_bubble"] = round(1 - (t_single / stages) / r["step_s"], 3)
            out[f"{s}_peak_activation_mb"] = r["peak_mb"]
        out["1f1b_vs_gpipe_peak_memory"] = round(max(rows["1f1b"]["peak_mb"])
                                                 / max(rows["gpipe"]["peak_mb"]), 3)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
