#!/usr/bin/env bash
# GPU verification for a machine with a CUDA GPU and torch already installed (no network needed):
# builds cnnkernels in place with that machine's torch, runs the tests on the GPU, runs the
# benchmarks, and leaves everything in OUTDIR:
#   env.txt build.log tests_gpu.log tests_all.log bench.log bench.json bench.md kernels.json
#   kernels_stream.json kernels_bf16_cl.json
#   models.json densenet_memory.{json,png,log} _C.so.gz (the build, to reuse with SKIP_BUILD=1)
#
# Usage: tools/gpu_check.sh OUTDIR [PHASE ...]
#   phases: build gpu-tests all-tests kernels kernels-stream kernels-bf16-cl models memory
#           pytest-bench
#           (default: all of them, in that order)
#   PYTHON=...        the interpreter (default python3)
#   SKIP_BUILD=1      reuse the cnnkernels/_C*.so already in place (built on this kind of machine)
#   PHASE_TIMEOUT=S   seconds each test or benchmark phase may run (default 900)
#   KERNELS_ARGS=...  arguments of `bench kernels` (default --compile; e.g. "--compile --quick")
#   DEPTHS=...        DenseNet depths of `memory densenet` (default 40,100,160,250)
set -uo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR [PHASE ...]}
shift
PHASES=${*:-build gpu-tests all-tests kernels kernels-stream kernels-bf16-cl models memory pytest-bench}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${PHASE_TIMEOUT:-900}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
status=0
want() { [[ " $PHASES " == *" $1 "* ]]; }
stamp() { echo "== $1 ($(date -u +%H:%M:%S))"; }

{
  date -u; nvidia-smi; nvcc --version
  $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "CC=${CC:-} CXX=${CXX:-}"; ${CXX:-g++} --version | head -1
  $PY -m pip list 2>/dev/null | grep -i -E "^(pytest|pytest-benchmark|pytest-xdist|timm|numpy) "
} > "$OUT/env.txt" 2>&1

# A C++ compiler other than torch's can build an extension in which every TORCH_CHECK failure
# segfaults instead of raising (seen on the lent H100 with CXX=/opt/gcc/bin/g++). Probe each
# candidate with a one-op extension and build with the first whose errors reach Python.
pick_compiler() {
  local candidates=("${CXX:-g++}" g++ /usr/bin/g++ /usr/bin/g++-14 /usr/bin/g++-13 /usr/bin/g++-12)
  local cxx seen=" "
  for cxx in "${candidates[@]}"; do
    cxx=$(command -v "$cxx") || continue
    [[ "$seen" == *" $cxx "* ]] && continue; seen+="$cxx "
    if $PY tools/probe_cxx.py "$cxx" 2>/dev/null | tee -a "$OUT/env.txt" | grep -q ": ok:"; then
      export CXX=$cxx CC=$(command -v "${cxx/g++/gcc}" || echo "${CC:-gcc}")
      echo "   C++ compiler: $CXX (C: $CC)"; return 0
    fi
  done
  echo "   WARNING: no candidate compiler passed tools/probe_cxx.py; building with the default"
}

if want build && [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  stamp build
  pick_compiler
  start=$(date +%s)
  if ! FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  echo "   built in $(( $(date +%s) - start )) s"
  gzip -c cnnkernels/_C*.so > "$OUT/_C.so.gz"
fi
$PY -m cnnkernels info --json "$OUT/info.json" || exit 1
# An op's argument check must come back as a RuntimeError, not kill the process.
$PY -c "
import torch, cnnkernels
try:
    torch.ops.cnnkernels.affine_act(torch.zeros(1, 2, 3, 3), torch.ones(2), torch.ones(2), 9, 0.0)
except RuntimeError as e:
    print('   errors from _C raise RuntimeError: ok')
" || { echo "ERRORS FROM _C CRASH THE PROCESS"; exit 1; }

if want gpu-tests; then
  stamp "tests on the GPU (-m 'cuda or triton')"
  timeout "$LIMIT" $PY -m pytest tests -q -rf -m "cuda or triton" -n "${XDIST:-16}" -p no:cacheprovider \
    --junitxml="$OUT/tests_gpu.xml" --durations=15 > "$OUT/tests_gpu.log" 2>&1 || status=1
  tail -n 25 "$OUT/tests_gpu.log"
fi

if want all-tests; then
  stamp "the rest of the test suite (-m 'not cuda and not triton')"
  timeout "$LIMIT" $PY -m pytest tests -q -rf -m "not cuda and not triton" -n "${XDIST:-16}" \
    -p no:cacheprovider > "$OUT/tests_all.log" 2>&1 || status=1
  tail -n 8 "$OUT/tests_all.log"
fi


if want kernels; then
  stamp "cnnkernels bench kernels --compile"
  timeout "$LIMIT" $PY -m cnnkernels bench kernels ${KERNELS_ARGS:---compile} --json "$OUT/kernels.json" || status=1
fi

if want kernels-stream; then
  # back-to-back calls: the host queues work while the GPU runs, so this approaches kernel time
  stamp "cnnkernels bench kernels --timing stream"
  timeout "$LIMIT" $PY -m cnnkernels bench kernels ${KERNELS_ARGS:---compile} --timing stream \
    --json "$OUT/kernels_stream.json" || status=1
fi

if want kernels-bf16-cl; then
  # issue 3's and 5's GPU targets: bf16, channels_last, batch 128 (every backend we have,
  # including backends `auto` does not pick yet, such as depthwise's CUDA C++ kernels)
  stamp "cnnkernels bench kernels --dtype bfloat16 --channels-last --batch 128"
  timeout "$LIMIT" $PY -m cnnkernels bench kernels --ops depthwise_conv2d,batch_norm_act,pointwise_conv2d,squeeze_excite \
    --dtype bfloat16 --channels-last --batch 128 --compile --bandwidth --json "$OUT/kernels_bf16_cl.json" || status=1
fi

if want models; then
  stamp "cnnkernels bench models (plain vs convert()-ed torchvision models)"
  timeout "$LIMIT" $PY -m cnnkernels bench models --device cuda --batch 64 --json "$OUT/models.json" || status=1
fi

if want memory; then
  stamp "cnnkernels memory densenet (DenseNet-BC k=12, batch 64: naive / checkpoint / shared)"
  timeout "$LIMIT" $PY -m cnnkernels memory densenet --device cuda --depths ${DEPTHS:-40,100,160,250} \
    --json "$OUT/densenet_memory.json" --plot "$OUT/densenet_memory.png" 2> "$OUT/densenet_memory.log" || status=1
fi
if want pytest-bench; then
  stamp "benchmarks (pytest-benchmark)"
  timeout "$LIMIT" $PY -m pytest bench -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
    > "$OUT/bench.log" 2>&1 || status=1
  $PY bench/compare.py "$OUT/bench.json" > "$OUT/bench.md" 2>&1 || status=1
  tail -n 5 "$OUT/bench.log"
fi

stamp done
exit $status
