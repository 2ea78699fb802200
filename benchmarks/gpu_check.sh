#!/usr/bin/env bash
# GPU checks, run on a machine with one CUDA GPU (see benchmarks/README.md):
#   mnist (CNN) on the GPU through the parameter servers in fp32, bf16 and fp16
#   (CUDA autocast, loss scaling agreed by the cluster), all-reduce over NCCL,
#   and the same fp32 job on the CPU, as a throughput ratio; then all-reduce with 2 workers
#   sharing the one GPU (NCCL refuses that: the group goes over Gloo) in fp32, bf16 and fp16,
#   and pipeline stages on one shared GPU (a one-line error: Gloo sends no CUDA tensors).
# Usage: bash benchmarks/gpu_check.sh OUT_DIR   (prints one JSON line; writes OUT_DIR/gpu.json)
#   ONLY="name ..." runs those runs alone (the names in the JSON).
# Wheels for packages the machine lacks may sit in .whl/ (pip install --no-deps).
set -uo pipefail
out=${1:-runs/gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then $py -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -1; fi
if ls .whl/*.tar.gz >/dev/null 2>&1; then
  $py -m pip install -q --no-deps --no-build-isolation .whl/*.tar.gz 2>&1 | tail -1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
job=$out/mnist_cuda.toml
sed 's/^\[train\]/[train]\ndevice = "cuda"/' examples/mnist.toml > "$job"
ONLY=${ONLY:-}
run() {  # name, args...
  local name=$1; shift
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  local t0=$(date +%s.%N)
  timeout 300 $py -m tessera.cli.main run "$@" --out "$out/$name" --quiet > "$out/$name.out" 2>&1
  local code=$?
  local t1=$(date +%s.%N)
  echo "$name exit $code in $(python3 -c "print(round($t1 - $t0, 1))") s"
  [ $code -eq 0 ] || tail -20 "$out/$name.out"
}
run fp32 "$job"
run bf16 "$job" --precision bf16
run fp16 "$job" --precision fp16
# NCCL needs one GPU per rank (two ranks on one device fail with "Duplicate GPU detected"):
# 2 workers where the machine has 2+ GPUs, else 1, and the JSON says which.
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
nccl_workers=$(( ngpu >= 2 ? 2 : 1 ))
echo "nccl all-reduce with $nccl_workers worker(s) on $ngpu GPU(s)"
run nccl "$job" --mode allreduce --servers 0 --workers $nccl_workers
run cpu examples/mnist.toml
# Two workers on one GPU: NCCL would stop with "Duplicate GPU detected"; the workers agree on
# Gloo (CUDA tensors through host memory) and say so in worker 0's log.
if [ "$ngpu" -lt 2 ]; then
  run ar_shared "$job" --mode allreduce --servers 0 --workers 2
  run ar_shared_bf16 "$job" --mode allreduce --servers 0 --workers 2 --precision bf16
  run ar_shared_fp16 "$job" --mode allreduce --servers 0 --workers 2 --precision fp16
fi
run nccl_fp16 "$job" --mode allreduce --servers 0 --workers $nccl_workers --precision fp16
# A model big enough for the GPU to matter: a character transformer (dim 256, 4 blocks,
# context 128, batch 64) on the Shakespeare texts, 150 steps, one worker.
lm=$out/lm_cuda.toml
sed -e 's/^dim = .*/dim = 256/' -e 's/^layers = .*/layers = 4/' -e 's/^context = .*/context = 128/' \
    -e 's/^batch_size = .*/batch_size = 64/' -e 's/^steps = .*/steps = 150/' \
    -e 's/^eval_every = .*/eval_every = 1000/' -e 's/^\[train\]/[train]\ndevice = "cuda"/' \
    examples/shakespeare.toml > "$lm"
run lm_fp32 "$lm" --stages 1 --workers 1
run lm_bf16 "$lm" --stages 1 --workers 1 --precision bf16
run lm_ps_bf16 "$lm" --stages 1 --workers 1 --mode sync --servers 1 --precision bf16
# Pipeline stages on one shared GPU: refused in one line (the job exits non-zero), not a traceback.
if [ "$ngpu" -lt 2 ]; then
  run pipe_shared "$lm" --stages 2 --workers 2
  grep -h "same GPU" "$out/pipe_shared.out" | head -2
fi
$py - "$out" "$nccl_workers" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
res = {"bench": "gpu_check", "nccl_workers": int(sys.argv[2])}
for name in ("fp32", "bf16", "fp16", "nccl", "cpu", "lm_fp32", "lm_bf16", "lm_ps_bf16",
             "ar_shared", "ar_shared_bf16", "ar_shared_fp16", "nccl_fp16"):
    p = out / name / "summary.json"
    if not p.exists():
        res[name] = None
        continue
    s = json.loads(p.read_text())
    res[name] = {k: s.get(k) for k in ("eval_accuracy", "eval_loss", "samples_per_s", "wall_s", "precision",
                                       "mode", "skipped_steps", "loss_scale", "bytes_pushed")}
    logs = " ".join(f.read_text(errors="replace") for f in (out / name / "logs").glob("worker-*.log"))
    res[name]["note"] = [l for l in logs.splitlines() if "cuda" in l.lower() or "nccl" in l.lower()
                         or "gloo" in l.lower()][:3]
pipe = out / "pipe_shared.out"
res["pipe_shared_refusal"] = ([l for l in pipe.read_text(errors="replace").splitlines()
                               if "same GPU" in l][:1] or None) if pipe.exists() else None
if res.get("fp32") and res.get("cpu"):
    res["gpu_vs_cpu_samples_per_s"] = res["fp32"]["samples_per_s"] / res["cpu"]["samples_per_s"]
for half in ("bf16", "fp16"):
    if res.get(half) and res.get("fp32"):
        res[f"{half}_vs_fp32_samples_per_s"] = res[half]["samples_per_s"] / res["fp32"]["samples_per_s"]
        res[f"{half}_bytes_vs_fp32"] = res[half]["bytes_pushed"] / res["fp32"]["bytes_pushed"]
if res.get("lm_fp32") and res.get("lm_bf16"):
    res["lm_bf16_vs_fp32_samples_per_s"] = (res["lm_bf16"]["samples_per_s"]
                                            / res["lm_fp32"]["samples_per_s"])
(out / "gpu.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res))
EOF
