#!/usr/bin/env bash
# The GPU suite in two stages, each writing its files before the next starts, so that a short loan of a GPU (15
# minutes with the machine's start, each command at most 10) leaves the most wanted figures even when it ends early.
#
#   bash scripts/gpu_suite.sh                  # both stages in one command (about 9 minutes at most)
#   bash scripts/gpu_suite.sh --stage 1        # stage 1 alone; then, on the same warm machine, in a second command:
#   bash scripts/gpu_suite.sh --stage 2        #   stage 2, reusing stage 1's install, Triton cache and run folder
#   bash scripts/gpu_suite.sh --dry-run        # CI, on a CPU: every stage to its end, the GPU steps recorded as
#                                              #   skipped with the reason (about 2 minutes on 2 cores)
#
# CI's floor venv calls the dry run exactly so (the venv's python first on PATH, or PYTHON=/path/to/python):
#
#   bash scripts/gpu_suite.sh --dry-run --out "$(mktemp -d)"
#
# It exits 0 when every step it ran passed, 1 when one failed or was cut, 2 on a bad argument.
#
#   stage 1 (at most SUITE_STAGE1_S = 240 s): which GPU this is (gpu.txt), the CUDA extension's build (skipped when
#            this machine's install of the same csrc/ and setup.py is there), `effbert check --quick` (one dtype per
#            op), and the headline benchmark cases (`effbert bench --headline`: the fused kernels against their
#            baselines at BERT-base sizes, cheapest first, then the training step padded and unpadded; no
#            torch.compile / FlexAttention provider, which time PyTorch's compiler from cold) -> stage1/
#   stage 2 (at most SUITE_STAGE2_S = 300 s): the GPU tests (the device-parametrised test files whole: TUPE
#            attention, position bias, notes, early exit, MC-BERT; then the tests marked gpu or cuda_ext in the
#            other files), compute-sanitizer memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1: the caching allocator hides
#            out-of-bounds accesses) and racecheck over the CUDA-extension tests, and the rest of the benchmarks
#            (`effbert bench --rest --after stage1/bench.json`: first the headline cases stage 1 did not measure)
#            -> stage2/
#
# Results: one new folder per run, <root>/<date>T<time>Z_<GPU>_<commit>/ (the convention of benchmarks/results/),
# <root> being --out or $OUT when given, else benchmarks/results (a dry run: a new temporary folder). A run never
# writes into a folder it did not create: a name already taken gets -2, -3, ...; `--stage 2` continues the run that
# `--stage 1` recorded in the cache folder (below) when it is still there, else recreates its folder (a remote
# $OUT emptied between commands), its summary starting with stage 1's. In the folder, eight files at most (what a
# remote run brings back): summary.md, gpu.txt, and per stage stageN/bench.json, stageN/bench.md, stageN/logs.tar.gz
# (the step logs, pytest's junit files and the plots, packed when the stage ends).
#
# Every step runs under its own time limit, cut to what is left of its stage; a step that would start with no time
# left is recorded as skipped. The pytest steps are stopped with SIGINT (pytest then still prints its failures and
# writes its junit file) and stop after --maxfail failures. The benchmark steps get `--budget` (no case starts after
# it) and write bench.json and bench.md before the first case and after every case. summary.md gets one line per
# step as it ends; when a stage ends, per benchmark case whether it was measured, skipped (and why) or never reached,
# per test step the counts and failures, and which files the stage wrote.
#
# Environment: EFFBERT_CUDA_ARCHS (default: this GPU's capability); EFFBERT_COMMIT, the commit under test, needed
# when the tree was copied without its .git (else read from git); SUITE_QUICK=1 for the --quick benchmark sets;
# SUITE_BENCH_ARGS: more `effbert bench` arguments for both stages (e.g. "--op tupe_attention"); SUITE_LIMIT_<STEP>:
# another limit in seconds for one step (SUITE_LIMIT_CHECK=20, SUITE_LIMIT_BENCH_HEADLINE=100); SUITE_BENCH_BUDGET_S:
# the most seconds of cases per benchmark step (a dry run: 15); SUITE_CACHE: the folder kept between the two stages'
# commands (default .gpu-cache/, ignored by git: the install record, the Triton and inductor caches, stage 1's
# record); SUITE_RUN_NAME: the run folder's name; PYTHON: the interpreter (default python3).
# The machine needs no network: the build uses the installed setuptools/pybind11/ninja (--no-build-isolation).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

die() { echo "gpu_suite.sh: $*" >&2; exit 2; }

STAGES="1 2"
DRY="${SUITE_DRY_RUN:-0}"
while [ $# -gt 0 ]; do
  case "$1" in
    --stage|--stage=*)
      if [ "$1" = --stage ]; then [ $# -ge 2 ] || die "--stage needs a value: 1, 2 or all"; shift; v="$1"
      else v="${1#--stage=}"; fi
      case "$v" in 1|2) STAGES="$v" ;; all) STAGES="1 2" ;; *) die "--stage must be 1, 2 or all, got '$v'" ;; esac ;;
    --out|--out=*)
      if [ "$1" = --out ]; then [ $# -ge 2 ] || die "--out needs a folder"; shift; OUT="$1"
      else OUT="${1#--out=}"; fi
      [ -n "$OUT" ] || die "--out must name a folder, got ''" ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo pipefail/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

nonneg() {  # nonneg NAME VALUE: VALUE is a whole number of seconds, else a clear error naming NAME
  [ $# -eq 2 ] || die "nonneg: expected NAME VALUE, got $#"
  case "$2" in ''|*[!0-9]*) die "$1 must be a whole number of seconds, got '$2'" ;; esac
}

PY="${PYTHON:-python3}"
command -v "$PY" > /dev/null 2>&1 || die "PYTHON: '$PY' is not an interpreter on this machine"
if [ "$DRY" = 1 ]; then
  STAGE1_S="${SUITE_STAGE1_S:-150}"; STAGE2_S="${SUITE_STAGE2_S:-150}"; BUDGET_CAP="${SUITE_BENCH_BUDGET_S:-15}"
  # the dry run is the CPU run, also on a machine with a GPU, and times the CPU providers (not the interpreter)
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=0
else
  STAGE1_S="${SUITE_STAGE1_S:-240}"; STAGE2_S="${SUITE_STAGE2_S:-300}"; BUDGET_CAP="${SUITE_BENCH_BUDGET_S:-}"
fi
nonneg SUITE_STAGE1_S "$STAGE1_S"; nonneg SUITE_STAGE2_S "$STAGE2_S"
[ -z "$BUDGET_CAP" ] || nonneg SUITE_BENCH_BUDGET_S "$BUDGET_CAP"
BENCH_ARGS="${SUITE_BENCH_ARGS:-}"
[ "${SUITE_QUICK:-0}" = 1 ] || [ "$DRY" = 1 ] && BENCH_ARGS="--quick $BENCH_ARGS"
KERNEL_TESTS="tests/test_tupe_attention.py tests/test_position_bias.py tests/test_notes.py tests/test_early_exit.py
tests/test_mc_bert.py"
for f in $KERNEL_TESTS; do [ -f "$f" ] || die "the kernel test file $f is missing from this tree"; done

CACHE="${SUITE_CACHE:-$REPO/.gpu-cache}"
mkdir -p "$CACHE" || die "SUITE_CACHE: cannot make '$CACHE'"
CACHE="$(cd "$CACHE" && pwd)"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$CACHE/triton}" TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$CACHE/inductor}"
export PYTHONUNBUFFERED=1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/effbert-suite.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)

# ---- the commit under test: EFFBERT_COMMIT, else git when this tree has its own .git, else unknown ----------------
if [ -n "${EFFBERT_COMMIT:-}" ]; then
  COMMIT_FROM="from EFFBERT_COMMIT"
elif [ -e "$REPO/.git" ] && c="$(git -C "$REPO" rev-parse HEAD 2>/dev/null)" && [ -n "$c" ]; then
  EFFBERT_COMMIT="$c$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
  COMMIT_FROM="from git"
else
  EFFBERT_COMMIT=""
  COMMIT_FROM="unknown: this tree has no .git and EFFBERT_COMMIT is not set"
fi
export EFFBERT_COMMIT
SHORT="${EFFBERT_COMMIT:0:7}"; [ -n "$SHORT" ] || SHORT=nocommit
case "$EFFBERT_COMMIT" in *+dirty) SHORT="$SHORT-dirty" ;; esac

# ---- which GPU this is --------------------------------------------------------------------------------------------
gpu_identity() {  # nvidia-smi's name, driver, compute capability and memory, and torch's view
  if command -v nvidia-smi > /dev/null 2>&1 && [ "$DRY" != 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv 2>&1 \
      || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  else
    echo "nvidia-smi: $([ "$DRY" = 1 ] && echo "not asked (dry run)" || echo "not found")"
  fi
  $PY -c 'import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"torch: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, cuda {torch.version.cuda}")
else:
    print("torch: no CUDA device")' 2>&1
}
gpu_identity > "$WORK/gpu.txt"
if [ "$DRY" != 1 ] && ! grep -q "^torch: .*capability" "$WORK/gpu.txt"; then
  cat "$WORK/gpu.txt" >&2
  die "torch sees no CUDA device here: on a machine without a GPU run the dry run (--dry-run)"
fi
DEV="$($PY -c 'import re, sys, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
m = re.search(r"\b([A-Z]+[0-9]+[A-Za-z]*)\b", name.replace("NVIDIA", ""))
print(m.group(1) if m else (re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:24] or "GPU"))' 2>/dev/null)"
[ -n "$DEV" ] || DEV=unknown

# ---- the run folder -----------------------------------------------------------------------------------------------
if [ -n "${OUT:-}" ]; then ROOT="$OUT"
elif [ "$DRY" = 1 ]; then ROOT="$(mktemp -d "${TMPDIR:-/tmp}/effbert-suite-dry.XXXXXX")"
else ROOT="$REPO/benchmarks/results"; fi
mkdir -p "$ROOT" || die "--out/OUT: cannot make '$ROOT'"
ROOT="$(cd "$ROOT" && pwd)"

claim() {  # claim NAME: make a new folder ROOT/NAME (NAME-2, NAME-3, ... when taken) and print its path
  [ $# -eq 1 ] && [ -n "$1" ] || die "claim: expected one folder name"
  local dir="$ROOT/$1" n=2
  until mkdir "$dir" 2> /dev/null; do
    [ -e "$dir" ] || die "cannot make the run folder '$dir'"
    dir="$ROOT/$1-$n"; n=$((n + 1))
  done
  echo "$dir"
}

STATE="$CACHE/suite-run"  # stage 1's record, for a stage 2 run as a command of its own
PREV_NAME="" PREV_DIR="" PREV_ID="" PREV_COMMIT=""
if [ "$STAGES" = 2 ] && [ -f "$STATE" ]; then
  PREV_NAME="$(sed -n 's/^name=//p' "$STATE")"; PREV_DIR="$(sed -n 's/^dir=//p' "$STATE")"
  PREV_ID="$(sed -n 's/^id=//p' "$STATE")"; PREV_COMMIT="$(sed -n 's/^commit=//p' "$STATE")"
  [ "$PREV_COMMIT" = "$EFFBERT_COMMIT" ] && [ -n "$PREV_NAME" ] || PREV_NAME=""  # another tree: a run of its own
fi
CONTINUES=0
if [ -n "$PREV_NAME" ]; then
  if [ "$PREV_DIR" = "$ROOT/$PREV_NAME" ] && grep -qs "^- run: $PREV_NAME (id $PREV_ID)" "$PREV_DIR/summary.md"; then
    RUN_DIR="$PREV_DIR"; CONTINUES=1  # stage 1's folder, still here
  else
    RUN_DIR="$(claim "$PREV_NAME")"; CONTINUES=2  # recreated: its summary starts with stage 1's
    cp "$CACHE/stage1/summary.md" "$RUN_DIR/summary.md" 2> /dev/null
    cp "$CACHE/stage1/gpu.txt" "$RUN_DIR/gpu.txt" 2> /dev/null
  fi
  RUN_ID="$PREV_ID"
else
  NAME="${SUITE_RUN_NAME:-$(date -u +%Y-%m-%dT%H%MZ)_${DEV}_${SHORT}$([ "$DRY" = 1 ] && echo _dry-run)}"
  [[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "SUITE_RUN_NAME must be letters, digits, '.', '_' and '-' only, got '$NAME'"
  RUN_DIR="$(claim "$NAME")"
  RUN_ID="$(date +%s)-$$"
fi
RUN_NAME="$(basename "$RUN_DIR")"
SUMMARY="$RUN_DIR/summary.md"
[ -f "$RUN_DIR/gpu.txt" ] || cp "$WORK/gpu.txt" "$RUN_DIR/gpu.txt"

# ---- summary and steps --------------------------------------------------------------------------------------------
FAILED=0
STAGE=0
DEADLINE=0
LAST_STATUS=""

stage() {  # stage N LIMIT_S: start stage N, which must end LIMIT_S seconds from now
  [ $# -eq 2 ] || die "stage: expected N LIMIT_S, got $#"
  nonneg "stage $1's limit" "$2"
  STAGE="$1"
  DEADLINE=$(( $(date +%s) + $2 ))
  mkdir -p "$WORK/stage$1"
  : > "$WORK/stage$1/details.md"
  { echo; echo "## stage $1 (limit $2 s, started at +$(( $(date +%s) - START )) s)"; echo
    echo "| step | status | time |"; echo "|---|---|---|"; } >> "$SUMMARY"
}

record() {  # record NAME STATUS SECONDS
  [ $# -eq 3 ] || die "record: expected NAME STATUS SECONDS, got $#"
  LAST_STATUS="$2"
  echo "| $1 | $2 | $3 s |" >> "$SUMMARY"
  echo "=== [stage $STAGE: $1] $2"
}

limit_for() {  # limit_for NAME LIMIT_S: SUITE_LIMIT_<NAME> when set, else LIMIT_S; at most what is left of the stage
  [ $# -eq 2 ] || die "limit_for: expected NAME LIMIT_S, got $#"
  local override="SUITE_LIMIT_$(echo "$1" | tr 'a-z-' 'A-Z_')" limit="$2"
  if [ -n "${!override:-}" ]; then nonneg "$override" "${!override}"; limit="${!override}"; fi
  local left=$(( DEADLINE - $(date +%s) ))
  echo $(( left < limit ? left : limit ))
}

step() {  # [SIG=INT] step NAME LIMIT_S COMMAND...: run with limit_for NAME LIMIT_S; log it; record its status
  [ $# -ge 3 ] || die "step: expected NAME LIMIT_S COMMAND..., got $#"
  local name="$1" limit; limit=$(limit_for "$1" "$2"); shift 2
  if [ "$limit" -lt 1 ]; then
    record "$name" "skipped: stage $STAGE's time was spent" 0
    FAILED=1
    return 1
  fi
  local t0=$(date +%s) log="$WORK/stage$STAGE/$name.log" sig="${SIG:-TERM}"
  echo "=== [stage $STAGE: $name] $* (limit ${limit}s)"
  timeout --signal="$sig" --kill-after=15 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  tail -n 30 "$log"
  local status=ok
  [ $rc -ne 0 ] && status="FAILED (exit $rc)"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMED OUT after ${limit}s"
  [ $rc -ne 0 ] && FAILED=1
  record "$name" "$status" $(( $(date +%s) - t0 ))
  return $rc
}

skip() {  # skip NAME REASON: a step left out, with the reason (not a failure)
  [ $# -eq 2 ] || die "skip: expected NAME REASON, got $#"
  record "$1" "skipped: $2" 0
}

report() {  # report bench|junit NAME FILE: what the step left, into the stage's details (summary.md at its end)
  [ $# -eq 3 ] || die "report: expected bench|junit NAME FILE, got $#"
  $PY "$REPO/effbert/tools/suite_report.py" "$1" "$2" "$LAST_STATUS" "$3" >> "$WORK/stage$STAGE/details.md" 2>&1
}

tree_hash() {  # what an install depends on: setup.py, pyproject.toml, csrc/ and the interpreter with its torch
  { cat setup.py pyproject.toml; find csrc -type f | LC_ALL=C sort | xargs cat
    $PY -c 'import sys, torch; print(sys.executable, torch.__version__, torch.version.cuda)'; } 2> /dev/null \
    | sha256sum | cut -c1-16
}

install() {  # the CUDA extension's build and the editable install, unless this machine has them for this tree
  if [ "$DRY" = 1 ]; then
    skip build "dry run: no CUDA build here; the steps use the installed effbert"
    return 0
  fi
  local hash; hash="$(tree_hash)"
  if [ "$(cat "$CACHE/install" 2> /dev/null)" = "$hash ok" ]; then
    skip build "this machine's install of the same csrc/, setup.py and torch is there (SUITE_CACHE/install)"
    return 0
  fi
  if [ "$STAGE" = 2 ] && [ "$(cat "$CACHE/install" 2> /dev/null)" = "$hash without-cuda" ]; then
    # stage 1's CUDA build failed on this tree: stage 2 does not spend its time failing it again
    skip build "this machine's install without the CUDA extension (its build failed in stage 1; see its log)"
    return 0
  fi
  local arch="${EFFBERT_CUDA_ARCHS:-$($PY -c 'import torch; p = torch.cuda.get_device_capability(); print(f"{p[0]}{p[1]}")')}"
  rm -f "$CACHE/install"
  # a failed build costs only the cuda backend: installed without it, the Triton kernels and the benchmarks still run
  if step build 150 env EFFBERT_FORCE_CUDA_BUILD=1 EFFBERT_CUDA_ARCHS="$arch" \
      $PY -m pip install --no-build-isolation --no-deps --no-input -e .; then
    echo "$hash ok" > "$CACHE/install"
  elif step install-without-cuda 60 env EFFBERT_SKIP_CUDA_BUILD=1 \
      $PY -m pip install --no-build-isolation --no-deps --no-input -e .; then
    echo "$hash without-cuda" > "$CACHE/install"  # the next command tries the CUDA build again
  fi
}

bench() {  # bench NAME OUT_DIR EFFBERT_BENCH_ARGS...: effbert bench on what is left of the stage, with a margin
  [ $# -ge 2 ] || die "bench: expected NAME OUT_DIR ARGS..., got $#"
  local name="$1" dir="$2"; shift 2
  local left; left=$(limit_for "$name" $(( DEADLINE - $(date +%s) )))
  local margin=$(( left / 5 > 10 ? left / 5 : 10 ))  # the last case's timing and the plots
  local budget=$(( left - margin > 1 ? left - margin : 1 ))
  [ -n "$BUDGET_CAP" ] && [ "$budget" -gt "$BUDGET_CAP" ] && budget="$BUDGET_CAP"
  mkdir -p "$dir"
  # shellcheck disable=SC2086
  step "$name" "$left" $PY -m effbert.commands bench "$@" $BENCH_ARGS --no-progress --budget "$budget" --out "$dir"
  local rc=$?
  mv "$dir"/*.png "$WORK/stage$STAGE/" 2> /dev/null  # plots travel in the stage's archive
  report bench "$name" "$dir/bench.json"
  return $rc
}

pytest_step() {  # [WRAP=CMD] pytest_step NAME LIMIT_S PYTEST_ARGS...: pytest (under CMD), stopped by SIGINT
  [ $# -ge 2 ] || die "pytest_step: expected NAME LIMIT_S ARGS..., got $#"
  local name="$1" limit="$2"; shift 2
  local junit="$WORK/stage$STAGE/$name.junit.xml"  # packed with the stage's logs; its counts go to the summary
  # shellcheck disable=SC2086
  SIG=INT step "$name" "$limit" ${WRAP:-} $PY -m pytest -q -p no:cacheprovider --maxfail=20 --junitxml="$junit" "$@"
  local rc=$?
  report junit "$name" "$junit"
  return $rc
}

finish_stage() {  # pack the stage's logs, junit files and plots; the stage's details and what it wrote
  tar -czf "$RUN_DIR/stage$STAGE/logs.tar.gz" -C "$WORK" --exclude=details.md "stage$STAGE"
  local wrote; wrote="$($PY "$REPO/effbert/tools/suite_report.py" files "$RUN_DIR/stage$STAGE" 2>&1)"
  {
    echo
    if [ -s "$WORK/stage$STAGE/details.md" ]; then
      echo "<details><summary>stage $STAGE: per benchmark case and per test step</summary>"; echo
      cat "$WORK/stage$STAGE/details.md"
      echo "</details>"; echo
    fi
    if [ -f "$RUN_DIR/stage$STAGE/bench.json" ]; then
      echo "stage $STAGE ended at +$(( $(date +%s) - START )) s ($(date -u +%Y-%m-%dT%H:%M:%SZ)); it wrote $wrote"
    else
      echo "stage $STAGE ended at +$(( $(date +%s) - START )) s ($(date -u +%Y-%m-%dT%H:%M:%SZ)) WITHOUT a" \
        "benchmark file (see its steps above); it wrote $wrote"
    fi
  } >> "$SUMMARY"
}

remember_stage1() {  # what a stage 2 run as a command of its own needs: the run folder, the summary, the headline file
  mkdir -p "$CACHE/stage1"
  rm -f "$CACHE/stage1/bench.json"
  cp "$SUMMARY" "$RUN_DIR/gpu.txt" "$CACHE/stage1/"
  cp "$RUN_DIR/stage1/bench.json" "$CACHE/stage1/" 2> /dev/null
  printf 'name=%s\ndir=%s\nid=%s\ncommit=%s\n' "$RUN_NAME" "$RUN_DIR" "$RUN_ID" "$EFFBERT_COMMIT" > "$STATE"
}

if [ "$CONTINUES" = 0 ]; then
  {
    echo "# effbert GPU suite"
    echo
    echo "- run: $RUN_NAME (id $RUN_ID)"
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: ${EFFBERT_COMMIT:-unknown} ($COMMIT_FROM)"
    echo "- gpu: $(grep -v "^torch" "$WORK/gpu.txt" | tail -1)"
    echo "- $(grep '^torch' "$WORK/gpu.txt")"
    echo "- python: $($PY -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)' 2>&1 | tail -1)"
    echo "- transformers: $($PY -c 'import transformers; print(transformers.__version__)' 2>&1 | tail -1)"
    echo "- nvcc: $(nvcc --version 2> /dev/null | tail -1)"
    echo "- stages: $STAGES"
    [ "$DRY" = 1 ] && echo "- dry run: on the CPU; the GPU steps are recorded as skipped, the benchmarks run --quick"
  } > "$SUMMARY"
else
  { echo; echo "(stage 2 as a command of its own at $(date -u +%Y-%m-%dT%H:%M:%SZ), continuing run $RUN_NAME)"; } \
    >> "$SUMMARY"
fi

# ---- stage 1: the figures a loan must not end without -------------------------------------------------------------
if [ "$STAGES" != 2 ]; then
  stage 1 "$STAGE1_S"
  mkdir -p "$RUN_DIR/stage1"
  install
  step check 45 $PY -m effbert.commands check --quick
  bench bench-headline "$RUN_DIR/stage1" --headline
  finish_stage
  remember_stage1
fi

# ---- stage 2: tests, sanitizers, everything else ------------------------------------------------------------------
if [ "$STAGES" != 1 ]; then
  stage 2 "$STAGE2_S"
  mkdir -p "$RUN_DIR/stage2"
  [ "$STAGES" = 2 ] && install  # a stage 2 of its own: this machine's install when there is one, else a build
  # shellcheck disable=SC2086
  IGNORE="$(for f in $KERNEL_TESTS; do printf -- '--ignore=%s ' "$f"; done)"
  if [ "$DRY" = 1 ]; then
    # the GPU steps need a GPU; the dry run still imports every test module they would run (a module that cannot
    # be imported in this environment is a collection error here, instead of lost tests on the GPU)
    # shellcheck disable=SC2086
    step tests-collect 60 $PY -m pytest -q -p no:cacheprovider --collect-only $KERNEL_TESTS
    # shellcheck disable=SC2086
    step tests-marked-collect 60 $PY -m pytest -q -p no:cacheprovider --collect-only tests $IGNORE \
      -m "(gpu or cuda_ext) and not aot"
    skip tests "dry run: the kernel test files run on the GPU"
    skip tests-marked "dry run: the gpu / cuda_ext tests need a GPU"
    skip memcheck "dry run: compute-sanitizer needs a GPU"
    skip racecheck "dry run: compute-sanitizer needs a GPU"
  else
    # the device-parametrised files whole (by marker they ran a few of their tests), then the marked tests elsewhere;
    # a test module that cannot be imported there (a package the machine lacks) costs its own tests only
    # shellcheck disable=SC2086
    pytest_step tests 110 $KERNEL_TESTS -m "not aot"
    # shellcheck disable=SC2086
    pytest_step tests-marked 30 tests $IGNORE -m "(gpu or cuda_ext) and not aot" --continue-on-collection-errors
    if command -v compute-sanitizer > /dev/null 2>&1; then
      SAN="compute-sanitizer --error-exitcode=3 --print-limit 20"
      # without PyTorch's caching allocator every tensor is an allocation of its own, whose bounds memcheck sees
      WRAP="env PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SAN --tool memcheck" \
        pytest_step memcheck 60 tests -m cuda_ext -x --continue-on-collection-errors
      WRAP="$SAN --tool racecheck --racecheck-report all" \
        pytest_step racecheck 50 tests -m cuda_ext -x --continue-on-collection-errors
    else
      skip memcheck "compute-sanitizer is not on this machine's PATH"
      skip racecheck "compute-sanitizer is not on this machine's PATH"
    fi
  fi
  if [ -f "$RUN_DIR/stage1/bench.json" ]; then AFTER="$RUN_DIR/stage1/bench.json"
  elif [ "$CONTINUES" = 2 ] && [ -f "$CACHE/stage1/bench.json" ]; then AFTER="$CACHE/stage1/bench.json"
  else AFTER=""; fi
  if [ -n "$AFTER" ]; then
    bench bench-rest "$RUN_DIR/stage2" --rest --after "$AFTER"
  else  # no headline run to follow (stage 1 not run, or it wrote no file): every case
    bench bench-all "$RUN_DIR/stage2"
  fi
  finish_stage
fi

{ echo; echo "total: $(( $(date +%s) - START )) s"; } >> "$SUMMARY"
# the stage tables, each step's counts and failures, and the stages' last lines (the per-case rows stay in the file)
awk '/^<details>/ {skip = 1; next} /^<\/details>/ {skip = 0; next} !skip || /^#### / || /^- FAILED/' "$SUMMARY"
echo
echo "results: $RUN_DIR"
exit $FAILED
