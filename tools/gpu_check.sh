#!/usr/bin/env bash
# The GPU check, sized for a lent GPU: one command of at most 10 minutes that builds cnnkernels in
# place with the machine's own torch (no network), runs the CUDA and Triton-on-GPU tests, the
# kernel benchmarks (latency and throughput, with % of roofline), the models at batch 64, the
# DenseNet memory profile and the host-overhead table.
#
# Usage: tools/gpu_check.sh [--dry-run] OUTDIR [PHASE ...]
#   --dry-run        print the plan (phases, time budgets, exact commands) and run nothing
#   PHASE ...        a subset of the phases (default: all, in the plan's order)
#   PYTHON=...       the interpreter (default python3: on the lent machine, the one with torch)
#   SKIP_BUILD=1     reuse the cnnkernels/_C*.so in place, e.g. the _C.so.gz of an earlier run,
#                    unpacked and carried along: frees the build's budget for the last phase
#   GPU_CHECK_SECONDS=S  the whole run's deadline (default 570: the device tool's 600 s, less
#                    a margin for its own start and the transfers)
#
# Every phase runs under `timeout` with min(its budget, the time left before the deadline less
# the packing reserve), and packs its results into OUTDIR as soon as it ends, so a run cut off
# still returns what it finished. OUTDIR then holds at most 4 files, none in a subfolder:
#   summary.md     the phase table (budget, time taken, status) and every result as markdown
#   results.json   every phase's JSON, by name
#   logs.tar.gz    every phase's log, the pytest JUnit XML, the JSON files, the memory plot
#   _C.so.gz       the build, to carry into a later run with SKIP_BUILD=1 (left out over 16 MiB)
#
# On the lent machine: device run with command `bash tools/gpu_check.sh "$OUT"`, timeout_s 600.
set -uo pipefail

DRY=0
PHASE_RC=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
ALL_PHASES=(env build gpu-tests kernels-call kernels-stream models-fp32 tune models-bf16 memory
            memory-models overhead models-compile)
# Seconds per phase; they add up to the deadline less the packing reserve, and models-compile,
# the most expensive and least certain, runs last with whatever is left.
# The build's budget: 197 s were measured with 16 jobs when csrc/ had 15 sources (26 now).
declare -A BUDGET=([env]=10 [build]=260 [gpu-tests]=80 [kernels-call]=35 [kernels-stream]=20
                   [models-fp32]=35 [tune]=15 [models-bf16]=20 [memory]=25 [memory-models]=45
                   [overhead]=15 [models-compile]=0)
TOTAL=${GPU_CHECK_SECONDS:-570}
PACK_RESERVE=10   # seconds kept for the last packing
MIN_PHASE=10      # a phase with less time left than this is skipped, not started

is_phase() { [[ " ${ALL_PHASES[*]} " == *" $1 "* ]]; }
OUTDIR=${1:-}
if [[ -z "$OUTDIR" || "$OUTDIR" == -* ]] || is_phase "$OUTDIR"; then
  if (( DRY )); then OUTDIR=OUTDIR; else echo "usage: tools/gpu_check.sh [--dry-run] OUTDIR [PHASE ...]" >&2; exit 2; fi
else
  shift
fi
for phase in "$@"; do
  is_phase "$phase" || { echo "unknown phase '$phase'; known: ${ALL_PHASES[*]}" >&2; exit 2; }
done
if (( $# )); then PHASES=("$@"); else PHASES=("${ALL_PHASES[@]}"); fi
if (( ! DRY )); then  # an absolute OUTDIR before moving to the repository's root
  mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
fi

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/cnnkernels_gpu_check}   # logs and JSON, packed into OUTDIR
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}                   # H100 and H200
JOBS=${MAX_JOBS:-16}
# /usr/bin/g++ first: the lent machines set CXX=/opt/gcc/bin/g++, which built an _C whose
# errors segfault, and each failing probe costs ~15 s of the build's budget
COMPILERS=(/usr/bin/g++ "${CXX:-}" g++)

# A command line as it would be typed: words with spaces or quotes are single-quoted.
show() {
  local word out=()
  for word in "$@"; do
    if [[ "$word" =~ [[:space:]\"\'\(\)\;\&\|\<\>\*\$] || -z "$word" ]]; then
      out+=("'${word//\'/\'\\\'\'}'")
    else
      out+=("$word")
    fi
  done
  echo "${out[*]}"
}

# Run one command of the current phase under the phase's time limit, appending to its log; in a
# dry run, print it instead. A failure is remembered in PHASE_RC (a time-out, 124, over others),
# so the phase fails when any of its commands did.
run() {
  if (( DRY )); then echo "    $(show "$@")"; return 0; fi
  local rc left=$(( PHASE_END - $(date +%s) ))
  if (( left < 1 )); then
    echo "(no time left for: $(show "$@"))" >> "$LOG"; rc=124
  else
    echo "\$ $(show "$@")   # timeout ${left} s" >> "$LOG"
    timeout --signal=INT --kill-after=10 "$left" "$@" >> "$LOG" 2>&1; rc=$?
  fi
  (( rc == 0 || PHASE_RC == 124 )) || PHASE_RC=$rc
  return $rc
}

# --- the phases: each a list of `run` commands; a phase fails when one of them fails ---------------

phase_env() {
  run nvidia-smi
  run nvcc --version
  run "$PY" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
  run "$PY" -m pip list --disable-pip-version-check
}

pick_compiler() {  # the first candidate whose extensions raise errors into Python (tools/probe_cxx.py)
  local cxx seen=" " rc_before=$PHASE_RC
  for cxx in "${COMPILERS[@]}"; do
    [[ -n "$cxx" ]] || continue
    if (( DRY )); then run "$PY" tools/probe_cxx.py "$cxx"; CXX_PICKED=$cxx
      echo "    (the first of: $(show ${COMPILERS[@]}) that passes)"; return 0; fi
    cxx=$(command -v "$cxx") || continue
    [[ "$seen" == *" $cxx "* ]] && continue; seen+="$cxx "
    if run "$PY" tools/probe_cxx.py "$cxx"; then
      (( PHASE_RC == 124 )) || PHASE_RC=$rc_before  # a candidate refused is no failure of the phase
      CXX_PICKED=$cxx; return 0
    fi
  done
  CXX_PICKED=${CXX:-g++}
  echo "WARNING: no candidate compiler passed tools/probe_cxx.py; building with $CXX_PICKED" >> "$LOG"
}

phase_build() {
  if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
    echo "    (SKIP_BUILD=1: the cnnkernels/_C*.so in place is used)"
    [[ $DRY == 1 ]] || ls cnnkernels/_C*.so >> "$LOG" 2>&1 || return 1
  else
    pick_compiler
    run env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$JOBS" CXX="$CXX_PICKED" \
      CC="${CXX_PICKED/g++/gcc}" "$PY" setup.py build_ext --inplace || return 1
  fi
  run "$PY" -m cnnkernels info --device cuda --json "$WORK/info.json" || return 1
  # an argument check in _C must come back as a RuntimeError, not kill the process
  run "$PY" -c 'import pytest, torch, cnnkernels; pytest.raises(RuntimeError, torch.ops.cnnkernels.affine_act, torch.zeros(1, 2, 3, 3), torch.ones(2), torch.ones(2), 9, 0.0); print("errors from _C raise RuntimeError: ok")'
}

phase_gpu-tests() {
  run "$PY" -m pytest tests -q -rf -m "(cuda or triton) and not slow" -n "$JOBS" -p no:cacheprovider \
    --benchmark-disable --durations=15 --junitxml="$WORK/tests_gpu.xml"
}

phase_kernels-call() {
  run "$PY" -m cnnkernels bench kernels --device cuda --timing call --json "$WORK/kernels_call.json"
}

phase_kernels-stream() {
  run "$PY" -m cnnkernels bench kernels --device cuda --timing stream --reps 10 \
    --json "$WORK/kernels_stream.json"
}

phase_models-fp32() {
  run "$PY" -m cnnkernels bench models --device cuda --batch 64 --dtype float32 \
    --json "$WORK/models_fp32.json"
}

phase_tune() {  # each converted layer of MobileNetV3-Large: ours vs PyTorch's, the winner
  run "$PY" -m cnnkernels tune mobilenet_v3_large --device cuda --batch 64 \
    --json "$WORK/tune_mobilenet_v3_large.json"
}

phase_models-bf16() {  # the CLI casts model and input to bfloat16 (no autocast mode yet)
  run "$PY" -m cnnkernels bench models --device cuda --batch 64 --dtype bfloat16 \
    --json "$WORK/models_bf16.json"
}

phase_memory() {
  run "$PY" -m cnnkernels memory densenet --device cuda --depths 40,100 \
    --json "$WORK/densenet_memory.json" --plot "$WORK/densenet_memory.png"
}

phase_memory-models() {  # saved and peak bytes at batch 64, one model per command (each kept)
  local model
  for model in mobilenet_v2 resnet50 mobilenet_v3_large densenet121; do
    run "$PY" -m cnnkernels memory models --device cuda --batch-size 64 --models "$model" \
      --json "$WORK/memory_models_$model.json" --plot ""
  done
}

phase_overhead() {
  run "$PY" -m cnnkernels bench overhead --device cuda --json "$WORK/overhead.json"
}

phase_models-compile() {  # one model per command, so each finished model is kept
  local model
  for model in mobilenet_v2 resnet50; do
    run "$PY" -m cnnkernels bench models --device cuda --batch 64 --dtype float32 --compile \
      --models "$model" --json "$WORK/models_compile_$model.json"
  done
}

# --- packing ---------------------------------------------------------------------------------------

# Refresh OUTDIR from WORK: summary.md and results.json (tools/gpu_check_summary.py), the logs
# tarball and the build; each written under a temporary name, then renamed.
publish() {
  timeout 30 "$PY" tools/gpu_check_summary.py "$WORK" "$OUTDIR" 2>> "$WORK/packing.log"
  tar -czf "$OUTDIR/logs.tar.gz.tmp" -C "$WORK" . 2>> "$WORK/packing.log" \
    && mv "$OUTDIR/logs.tar.gz.tmp" "$OUTDIR/logs.tar.gz"
  local so
  so=$(ls cnnkernels/_C*.so 2>/dev/null | head -n 1)
  if [[ -n "$so" && ! -e "$OUTDIR/_C.so.gz" && "${SKIP_BUILD:-0}" != 1 ]]; then
    gzip -c "$so" > "$OUTDIR/_C.so.gz.tmp" && mv "$OUTDIR/_C.so.gz.tmp" "$OUTDIR/_C.so.gz"
    if (( $(stat -c %s "$OUTDIR/_C.so.gz") > 16 * 1024 * 1024 )); then
      rm -f "$OUTDIR/_C.so.gz"; echo "_C.so.gz left out: over 16 MiB" >> "$WORK/packing.log"
    fi
  fi
}

record() {  # phase, budget, status, seconds, note: one line of phases.tsv
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/phases.tsv"
}

# --- the plan --------------------------------------------------------------------------------------

print_plan() {
  local phase fixed=0
  for phase in "${PHASES[@]}"; do fixed=$(( fixed + BUDGET[$phase] )); done
  echo "tools/gpu_check.sh plan: ${#PHASES[@]} phases, deadline ${TOTAL} s after the start"
  echo "  each phase's timeout = min(its budget, seconds left before the deadline - ${PACK_RESERVE} s for packing);"
  echo "  a phase with under ${MIN_PHASE} s left is skipped; the budgets add up to ${fixed} s + models-compile"
  echo "  output: $OUTDIR/{summary.md,results.json,logs.tar.gz,_C.so.gz}, refreshed after every phase"
  echo "  python: $PY; logs: $WORK; TORCH_CUDA_ARCH_LIST=$ARCH; MAX_JOBS=$JOBS"
  DRY=1
  for phase in "${PHASES[@]}"; do
    if [[ "$phase" == models-compile ]]; then
      echo "== $phase: the rest (at least $(( TOTAL - PACK_RESERVE - fixed )) s when every phase uses its whole budget)"
    else
      echo "== $phase: ${BUDGET[$phase]} s"
    fi
    "phase_$phase"
  done
}

if (( DRY )); then print_plan; exit 0; fi

START=$(date +%s)
DEADLINE=$(( START + TOTAL - PACK_RESERVE ))
rm -rf -- "$WORK" && mkdir -p "$WORK" || exit 2
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
print_plan > "$WORK/plan.txt"; DRY=0
trap 'publish; exit 130' INT TERM
status=0
for phase in "${PHASES[@]}"; do
  now=$(date +%s)
  budget=${BUDGET[$phase]}
  [[ "$phase" == models-compile ]] && budget=$(( DEADLINE - now ))
  PHASE_END=$(( now + budget < DEADLINE ? now + budget : DEADLINE ))
  LOG="$WORK/$phase.log"
  if (( PHASE_END - now < MIN_PHASE )); then
    record "$phase" "$budget" skipped 0 "$(( DEADLINE - now )) s left before the deadline"
    echo "== $phase: skipped, $(( DEADLINE - now )) s left"
    continue
  fi
  echo "== $phase ($(( PHASE_END - now )) s, at $(( now - START )) s)"
  PHASE_RC=0
  "phase_$phase"; rc=$?
  (( rc == 0 || PHASE_RC != 0 )) || PHASE_RC=$rc
  rc=$PHASE_RC
  took=$(( $(date +%s) - now ))
  case $rc in
    0) result=ok ;;
    124) result="timed out"; status=1 ;;
    *) result="failed (exit $rc)"; status=1 ;;
  esac
  record "$phase" "$budget" "$result" "$took" "$(grep -E '[0-9]+ (passed|failed)' "$LOG" 2>/dev/null | tail -n 1)"
  tail -n 3 "$LOG" 2>/dev/null | cut -c1-200 | sed 's/^/   /'
  echo "   -> $result in $took s"
  publish
done
publish  # the skipped phases too
echo "== done in $(( $(date +%s) - START )) s"
awk -F'\t' '{printf "%-15s %6s s budget %5s s  %-18s %s\n", $1, $2, $4, $3, $5}' "$WORK/phases.tsv"
exit $status
