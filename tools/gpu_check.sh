#!/usr/bin/env bash
# GPU verification in one call, for a machine with a CUDA GPU and torch already installed (no
# network needed): builds cnnkernels in place with that machine's torch, runs the whole test suite
# (CUDA and Triton-on-GPU tests included), runs the benchmarks, and leaves everything in OUTDIR:
#   env.txt  build.log  tests.log  tests.xml  bench.log  bench.json  bench.md  kernels.json  info.json
#   models.json  densenet_memory.{json,png,log}
# Usage: tools/gpu_check.sh OUTDIR        (PYTHON=... to pick the interpreter; default python3)
set -uo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
status=0

{
  date -u; nvidia-smi; nvcc --version
  $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__)"
  $PY -m pip list 2>/dev/null | grep -i -E "^(pytest|pytest-benchmark|expecttest|numpy) "
} > "$OUT/env.txt" 2>&1

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
if ! FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "   built in $(( $(date +%s) - start )) s"
$PY -m cnnkernels info --json "$OUT/info.json"

echo "== tests"
$PY -m pytest tests -q -rs --junitxml="$OUT/tests.xml" -p no:cacheprovider > "$OUT/tests.log" 2>&1 || status=1
tail -n 15 "$OUT/tests.log"

echo "== benchmarks (pytest-benchmark)"
$PY -m pytest bench -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1 || status=1
$PY bench/compare.py "$OUT/bench.json" > "$OUT/bench.md" 2>&1 || status=1

echo "== cnnkernels bench kernels"
$PY -m cnnkernels bench kernels --compile --json "$OUT/kernels.json" || status=1

echo "== cnnkernels bench models (plain vs convert()-ed torchvision models)"
$PY -m cnnkernels bench models --device cuda --batch 64 --json "$OUT/models.json" || status=1

echo "== cnnkernels memory densenet (DenseNet-BC k=12, batch 64: naive / checkpoint / shared)"
timeout 900 $PY -m cnnkernels memory densenet --device cuda --depths 40,100,160,250 \
  --json "$OUT/densenet_memory.json" --plot "$OUT/densenet_memory.png" 2> "$OUT/densenet_memory.log" || status=1

echo "== summary (torch eager median / ours; > 1 is faster)"
cat "$OUT/bench.md"
exit $status
