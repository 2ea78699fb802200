#!/usr/bin/env bash
# The recipe API on one CUDA GPU (the torch CUDA build of the GPU machines): the recipe of
# tests/scripts/recipe.py (AdamW with two groups, warm-up + cosine, clipping, 2 micro-batches,
# DistributedSampler + DataLoader) with the model on the GPU, plain against Tessera:
#   sync 2 workers x 2 servers, one process (1 worker + 1 in-process server) with NAdam,
#   allreduce (Gloo: one GPU, so both workers share it), and a BatchNorm model's export.
# Usage: bash benchmarks/gpu_recipe.sh OUT_DIR   (prints one JSON line; writes OUT_DIR/recipe.json)
# Wheels for packages the machine lacks may sit in .whl/ (pip install --no-deps).
set -uo pipefail
out=${1:-runs/gpu-recipe}
mkdir -p "$out"
py=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then $py -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -1; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
r=tests/scripts/recipe.py
step() {  # name, command...
  local name=$1; shift
  timeout 240 "$@" > "$out/$name.log" 2>&1
  local code=$?
  echo "$name exit $code"
  [ $code -eq 0 ] || tail -15 "$out/$name.log"
}
step plain $py $r --plain --workers 2 --steps 32 --device cuda --out "$out/plain.json"
step sync $py -m tessera.cli.main launch --workers 2 --servers 2 --partition-mb 0.004 \
  --out "$out/run-sync" --quiet $r --steps 32 --device cuda --out "$out/sync.json"
step allreduce $py -m tessera.cli.main launch --workers 2 --servers 0 --mode allreduce \
  --out "$out/run-ar" --quiet $r --steps 32 --device cuda --out "$out/allreduce.json"
step plain1 $py $r --plain --workers 1 --steps 6 --optimizer nadam --device cuda --out "$out/plain1.json"
step one $py $r --workers 1 --steps 6 --optimizer nadam --device auto --out "$out/one.json"
step bn $py -m tessera.cli.main launch --workers 2 --servers 2 --out "$out/run-bn" --quiet \
  $r --steps 10 --bn --device cuda --out "$out/bn.json"
$py - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None
res = {"bench": "gpu_recipe"}
import torch
res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
res["torch"] = torch.__version__
plain, plain1 = load("plain"), load("plain1")
for name, ref in (("sync", plain), ("allreduce", plain), ("one", plain1)):
    got = load(name)
    if got and ref:
        res[f"{name}_eval_loss"] = got["eval_loss"]
        res[f"{name}_rel_diff"] = abs(got["eval_loss"] - ref["eval_loss"]) / abs(ref["eval_loss"])
        res[f"{name}_device"] = got.get("device")
    else:
        res[f"{name}_rel_diff"] = None
bn = load("bn")
other = out / "bn.json.rank1"
if bn and other.exists():
    o = json.loads(other.read_text())
    res["bn_buffers_equal"] = bn["params"]["1.running_mean"] == o["params"]["1.running_mean"]
res["plain_eval_loss"] = plain and plain["eval_loss"]
(out / "recipe.json").write_text(json.dumps(res))
print(json.dumps(res))
PY
