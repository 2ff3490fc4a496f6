#!/usr/bin/env bash
# Set up a development environment from scratch: .venv with the pinned requirements, and
# cnnkernels built in place (editable). Re-running it only rebuilds what changed.
#   FORCE_CUDA=1          compile the CUDA kernels (the default whenever torch is a CUDA build and
#                         nvcc is found; FORCE_CUDA makes a missing nvcc an error)
#   CNNKERNELS_CPU_ONLY=1 skip the CUDA kernels
#   TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default 9.0: H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "== installing the pinned requirements (torch from the local wheel cache where present)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
echo "== building cnnkernels._C"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
MAX_JOBS=${MAX_JOBS:-$(nproc)} .venv/bin/python -m pip install -v --no-build-isolation --no-deps -e . \
  > .venv/build.log 2>&1 || { tail -n 60 .venv/build.log; echo "build failed: see .venv/build.log"; exit 1; }
grep -A8 "cnnkernels build configuration" .venv/build.log | head -n 9 || true
.venv/bin/python -c "import cnnkernels, json; print(json.dumps(cnnkernels.info()))"
