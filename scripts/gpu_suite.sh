#!/usr/bin/env bash
# The GPU suite in one command (at most 10 minutes on an H100): build the CUDA extension, run every test with CUDA
# (the GPU-marked ones included), run compute-sanitizer (memcheck, racecheck) over the CUDA-extension tests, run
# `effbert check` and the whole benchmark suite. Everything lands in one folder: $OUT when set, else ./gpu-suite-out.
#
#   bash scripts/gpu_suite.sh            # then commit: effbert bench results under benchmarks/results/
#
# Environment: EFFBERT_CUDA_ARCHS (default: this GPU's capability), SUITE_QUICK=1 for the --quick benchmark set.
# The machine needs no network: the build uses the installed setuptools/pybind11/ninja (--no-build-isolation).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-suite-out}"
mkdir -p "$OUT/logs"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/summary.md"
START=$(date +%s)
export PYTHONUNBUFFERED=1
# The commit under test: from git, or EFFBERT_COMMIT when the tree was copied without its .git.
export EFFBERT_COMMIT="${EFFBERT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)}"

step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log it, record its status
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s)
  echo "=== [$name] $* (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/logs/$name.log"
  local status=ok; [ $rc -ne 0 ] && status="FAILED (exit $rc)"; [ $rc -eq 124 ] && status="TIMED OUT after ${limit}s"
  echo "| $name | $status | $(( $(date +%s) - t0 )) s |" >> "$SUMMARY"
  echo "=== [$name] $status"
  return $rc
}

{
  echo "# effbert GPU suite"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: ${EFFBERT_COMMIT:-unknown}"
  echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  echo "- python: $($PY -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)' 2>&1)"
  echo "- nvcc: $(nvcc --version 2>/dev/null | tail -1)"
  echo
  echo "| step | status | time |"
  echo "|---|---|---|"
} > "$SUMMARY"

ARCH="${EFFBERT_CUDA_ARCHS:-$($PY -c 'import torch; p = torch.cuda.get_device_capability(); print(f"{p[0]}{p[1]}")')}"
step build 150 env EFFBERT_FORCE_CUDA_BUILD=1 EFFBERT_CUDA_ARCHS="$ARCH" \
  $PY -m pip install --no-build-isolation --no-deps --no-input -e . || { cat "$SUMMARY"; exit 1; }

step check 60 $PY -m effbert.commands check
# the ahead-of-time compile report tests (marker aot) need no GPU: CI runs them, the suite spends its time on the GPU
step tests 280 $PY -m pytest tests -q -p no:cacheprovider -m "not aot" --junitxml="$OUT/logs/junit.xml"
SAN="compute-sanitizer --error-exitcode=3 --print-limit 20"
step memcheck 100 $SAN --tool memcheck $PY -m pytest tests -q -p no:cacheprovider -m cuda_ext -x
step racecheck 100 $SAN --tool racecheck --racecheck-report all $PY -m pytest tests -q -p no:cacheprovider -m cuda_ext -x
QUICK=""; [ "${SUITE_QUICK:-0}" = 1 ] && QUICK="--quick"
# the benchmark gets what is left of a 10-minute budget (at least a minute)
LEFT=$(( 570 - ($(date +%s) - START) )); [ $LEFT -lt 60 ] && LEFT=60
# cases stop starting a minute before the limit, so the files are written even when the suite runs long
step bench $LEFT $PY -m effbert.commands bench $QUICK --no-progress --budget $(( LEFT - 60 > 30 ? LEFT - 60 : 30 )) --out "$OUT/bench"

echo >> "$SUMMARY"
echo "total: $(( $(date +%s) - START )) s" >> "$SUMMARY"
# At most a handful of files come back from a remote run: the summary, the benchmark files, and one archive of logs.
cp "$OUT/bench/bench.json" "$OUT/bench/bench.md" "$OUT/" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs bench 2>/dev/null
cat "$SUMMARY"
grep -q "FAILED\|TIMED OUT" "$SUMMARY" && exit 1
exit 0
