"""The same model under every data-parallel mode, against plain DDP, in one run.

samples/s of examples/mnist.toml's CNN with 2 workers, batch 32 per worker, under
``--mode allreduce`` (DDP over Gloo inside Tessera's launcher), ``sync`` and
``async`` parameter servers (2 servers), and plain DistributedDataParallel over
Gloo with 2 processes started by this script (``benchmarks/train_throughput.py``'s
DDP runner). Tessera's figure is the training loop's throughput from
summary.json (start-up excluded), as is DDP's.

    .venv/bin/python benchmarks/allreduce_vs_ps.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput  # noqa: E402  (the DDP baseline runner lives there)


def tessera_samples_per_s(mode: str, steps: int, batch: int) -> float:
    servers = "0" if mode == "allreduce" else "2"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "tessera.cli.main", "run", str(ROOT / "examples/mnist.toml"),
               "--workers", "2", "--servers", servers, "--mode", mode, "--batch-size", str(batch),
               "--steps", str(steps), "--quiet", "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
        return json.loads((out / "summary.json").read_text())["samples_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 30 if args.quick else args.steps
    batch = 32
    row = {"bench": "allreduce_vs_ps", "workers": 2, "batch_size": batch, "steps": steps}
    for mode in ("allreduce", "sync", "async"):
        row[f"tessera_{mode}_samples_per_s"] = round(tessera_samples_per_s(mode, steps, batch), 1)
    ddp = train_throughput.run_ddp(steps, 10, batch, time.monotonic() + 600)
    row["ddp_samples_per_s"] = round(ddp["samples_per_s"], 1)
    for mode in ("allreduce", "sync", "async"):
        row[f"{mode}_vs_ddp"] = round(row[f"tessera_{mode}_samples_per_s"]
                                      / row["ddp_samples_per_s"], 3)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
