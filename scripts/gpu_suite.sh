#!/usr/bin/env bash
# The GPU suite in two stages, each writing its files before the next starts, so that a short loan of a GPU (15
# minutes with the machine's start, on an H200) leaves the most wanted figures even when it ends early.
#
#   stage 1 (at most SUITE_STAGE1_S = 240 s): which GPU this is (gpu.txt), the CUDA extension's build,
#            `effbert check`, and the headline benchmark cases (`effbert bench --headline`: one shape per op family
#            at BERT-base sizes, the training step padded and unpadded, batched early exit) -> $OUT/stage1/
#   stage 2 (at most SUITE_STAGE2_S = 300 s): the GPU tests (markers gpu, cuda_ext), compute-sanitizer (memcheck,
#            racecheck) over the CUDA-extension tests, the rest of the benchmarks (`effbert bench --rest`)
#            -> $OUT/stage2/
#
#   bash scripts/gpu_suite.sh      # $OUT when set, else ./gpu-suite-out; then commit the bench files it wrote
#
# Every step runs under its own time limit, cut to what is left of its stage; a step that would start with no time
# left is recorded as skipped. The benchmark steps get `--budget` (no case starts after it) and write bench.json and
# bench.md after every case, so a step stopped from outside still leaves what it measured. summary.md gets one line
# per step as it ends and a line when a stage's files are complete.
# What lands in $OUT is eight files at most (a remote run brings back no more): summary.md, gpu.txt, and per stage
# stageN/bench.json, stageN/bench.md, stageN/logs.tar.gz (the step logs and plots, packed when the stage ends; until
# then they live in a scratch folder).
#
# Environment: EFFBERT_CUDA_ARCHS (default: this GPU's capability); SUITE_QUICK=1 for the --quick benchmark sets;
# SUITE_BENCH_ARGS: more `effbert bench` arguments for both stages (e.g. "--op tupe_attention");
# SUITE_LIMIT_<STEP>: another limit in seconds for one step (SUITE_LIMIT_CHECK=20, SUITE_LIMIT_BENCH_HEADLINE=100);
# SUITE_NO_GPU=1 leaves out the steps that need a GPU (build, GPU tests, compute-sanitizer) and runs the rest on the
# CPU: how tests/test_gpu_suite.py checks the suite's structure on a machine without one.
# The machine needs no network: the build uses the installed setuptools/pybind11/ninja (--no-build-isolation).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-suite-out}"
PY="${PYTHON:-python3}"
STAGE1_S="${SUITE_STAGE1_S:-240}"
STAGE2_S="${SUITE_STAGE2_S:-300}"
NO_GPU="${SUITE_NO_GPU:-0}"
BENCH_ARGS="${SUITE_BENCH_ARGS:-}"
[ "${SUITE_QUICK:-0}" = 1 ] && BENCH_ARGS="--quick $BENCH_ARGS"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/effbert-suite.XXXXXX")"
mkdir -p "$OUT/stage1" "$OUT/stage2" "$WORK/stage1" "$WORK/stage2"
SUMMARY="$OUT/summary.md"
START=$(date +%s)
export PYTHONUNBUFFERED=1
# The commit under test: from git, or EFFBERT_COMMIT when the tree was copied without its .git.
export EFFBERT_COMMIT="${EFFBERT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)}"
FAILED=0
STAGE=0
DEADLINE=0

stage() {  # stage N LIMIT_S: start stage N, which must end LIMIT_S seconds from now
  STAGE="$1"
  DEADLINE=$(( $(date +%s) + $2 ))
  { echo; echo "## stage $1 (limit $2 s, started at +$(( $(date +%s) - START )) s)"; echo
    echo "| step | status | time |"; echo "|---|---|---|"; } >> "$SUMMARY"
}

record() {  # record NAME STATUS SECONDS
  echo "| $1 | $2 | $3 s |" >> "$SUMMARY"
  echo "=== [stage $STAGE: $1] $2"
}

limit_for() {  # limit_for NAME LIMIT_S: SUITE_LIMIT_<NAME> when set, else LIMIT_S; at most what is left of the stage
  local override="SUITE_LIMIT_$(echo "$1" | tr 'a-z-' 'A-Z_')" limit="$2"
  [ -n "${!override:-}" ] && limit="${!override}"
  local left=$(( DEADLINE - $(date +%s) ))
  echo $(( left < limit ? left : limit ))
}

step() {  # step NAME LIMIT_S COMMAND...: run with limit_for NAME LIMIT_S; log it; record its status
  local name="$1" limit; limit=$(limit_for "$1" "$2"); shift 2
  if [ "$limit" -lt 1 ]; then
    record "$name" "skipped: stage $STAGE's time was spent" 0
    FAILED=1
    return 1
  fi
  local t0=$(date +%s) log="$WORK/stage$STAGE/$name.log"
  echo "=== [stage $STAGE: $name] $* (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  tail -n 30 "$log"
  local status=ok
  [ $rc -ne 0 ] && status="FAILED (exit $rc)"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMED OUT after ${limit}s"
  [ $rc -ne 0 ] && FAILED=1
  record "$name" "$status" $(( $(date +%s) - t0 ))
  return $rc
}

no_gpu() {  # no_gpu NAME: record a GPU step left out under SUITE_NO_GPU=1; true when it is
  [ "$NO_GPU" = 1 ] || return 1
  record "$1" "skipped: SUITE_NO_GPU=1" 0
}

bench() {  # bench NAME OUT_DIR SELECTION: effbert bench on what is left of the stage, cases stopping with a margin
  local left; left=$(limit_for "$1" $(( DEADLINE - $(date +%s) )))
  local margin=$(( left / 5 > 10 ? left / 5 : 10 ))  # the last case's timing and the plots
  local budget=$(( left - margin > 1 ? left - margin : 1 ))
  # shellcheck disable=SC2086
  step "$1" "$left" $PY -m effbert.commands bench $3 $BENCH_ARGS --no-progress --budget "$budget" --out "$2"
  local rc=$?
  mv "$2"/*.png "$WORK/stage$STAGE/" 2>/dev/null  # plots travel in the stage's archive
  return $rc
}

finish_stage() {  # pack the stage's logs and plots; say in the summary that its files are complete
  tar -czf "$OUT/stage$STAGE/logs.tar.gz" -C "$WORK" "stage$STAGE"
  echo >> "$SUMMARY"
  echo "stage $STAGE files complete at +$(( $(date +%s) - START )) s ($(date -u +%Y-%m-%dT%H:%M:%SZ))" >> "$SUMMARY"
}

gpu_identity() {  # which GPU this is: nvidia-smi's name, driver, compute capability and memory, and torch's view
  if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv 2>&1 \
      || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  $PY -c 'import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"torch: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, cuda {torch.version.cuda}")
else:
    print("torch: no CUDA device")' 2>&1
}

gpu_identity > "$OUT/gpu.txt"
{
  echo "# effbert GPU suite"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: ${EFFBERT_COMMIT:-unknown}"
  echo "- gpu: $(grep -v "^torch" "$OUT/gpu.txt" | tail -1)"
  echo "- $(grep '^torch' "$OUT/gpu.txt")"
  echo "- python: $($PY -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)' 2>&1)"
  echo "- nvcc: $(nvcc --version 2>/dev/null | tail -1)"
  [ "$NO_GPU" = 1 ] && echo "- SUITE_NO_GPU=1: the GPU steps are left out, the rest runs on the CPU"
} > "$SUMMARY"

# ---- stage 1: the figures a loan must not end without -------------------------------------------------------------
stage 1 "$STAGE1_S"
if ! no_gpu build; then
  ARCH="${EFFBERT_CUDA_ARCHS:-$($PY -c 'import torch; p = torch.cuda.get_device_capability(); print(f"{p[0]}{p[1]}")')}"
  # a failed build costs only the cuda backend: installed without it, the Triton kernels and the benchmarks still run
  step build 150 env EFFBERT_FORCE_CUDA_BUILD=1 EFFBERT_CUDA_ARCHS="$ARCH" \
    $PY -m pip install --no-build-isolation --no-deps --no-input -e . \
  || step install-without-cuda 60 env EFFBERT_SKIP_CUDA_BUILD=1 \
    $PY -m pip install --no-build-isolation --no-deps --no-input -e .
fi
step check 40 $PY -m effbert.commands check
bench bench-headline "$OUT/stage1" --headline
finish_stage

# ---- stage 2: tests, sanitizers, everything else ------------------------------------------------------------------
stage 2 "$STAGE2_S"
if ! no_gpu tests; then
  # a test module that cannot be imported there (a package the machine lacks) costs its own tests only
  step tests 120 $PY -m pytest tests -q -p no:cacheprovider -m "(gpu or cuda_ext) and not aot" \
    --continue-on-collection-errors --junitxml="$WORK/stage2/junit.xml"
fi
SAN="compute-sanitizer --error-exitcode=3 --print-limit 20"
no_gpu memcheck || step memcheck 60 $SAN --tool memcheck $PY -m pytest tests -q -p no:cacheprovider -m cuda_ext -x
no_gpu racecheck || step racecheck 50 $SAN --tool racecheck --racecheck-report all \
  $PY -m pytest tests -q -p no:cacheprovider -m cuda_ext -x
bench bench-rest "$OUT/stage2" --rest
finish_stage

{ echo; echo "total: $(( $(date +%s) - START )) s"; } >> "$SUMMARY"
rm -rf "$WORK"
cat "$SUMMARY"
exit $FAILED
