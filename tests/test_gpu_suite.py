"""scripts/gpu_suite.sh on this CPU through its dry run (`--dry-run`: the GPU steps recorded as skipped with the
reason, everything else run for real), checked through the files it leaves: two stages, each one's files written
before the next starts, per-step limits that cut a step and let the stage go on, a spent stage that skips what is
left, one new run folder per run that never overwrites another, stage 2 as a command of its own continuing stage 1's
run, per benchmark case what was measured; and what the suite relies on: `effbert check --quick` and its loud
failures, the summary's reports."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from effbert.bench import runner
from effbert.bench import checks
from effbert.commands import check
from effbert.tools import suite_report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_suite.sh"
COMMIT = "abc1234def5678"


def run_suite(out, cache, *args, bench_args="--op exit_entropy", **env):
    full = dict(
        os.environ,
        PYTHON=sys.executable,
        SUITE_CACHE=str(cache),
        EFFBERT_COMMIT=COMMIT,
        SUITE_BENCH_ARGS=bench_args,
        **env,
    )
    full.pop("OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(out), *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def summary_rows(text):
    """{step: status} per stage from summary.md's step tables (not the per-case tables after them)."""
    stages, current = {}, None
    for line in text.splitlines():
        if line.startswith("## stage "):
            current = stages.setdefault(int(line.split()[2]), {})
        elif current is not None and line.startswith("| ") and not line.startswith("| step"):
            step, status = [c.strip() for c in line.strip("|").split("|")][:2]
            current[step] = status
        elif current is not None and not line.startswith("|") and current:
            current = None  # the step table ended
    return stages


def run_folder(out):
    """The one run folder under ``out``, and what a remote run brings back of it: at most 8 files, none more than
    two folders below ``out``, named in letters, digits, '.', '_' and '-'."""
    folders = [p for p in Path(out).iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files), files
    assert all(
        re.fullmatch(r"[A-Za-z0-9._-]+", part) for p in files for part in p.relative_to(out).parts
    )
    return folders[0], {str(p.relative_to(folders[0])) for p in files}


ALL_FILES = {
    "summary.md",
    "gpu.txt",
    "stage1/bench.json",
    "stage1/bench.md",
    "stage1/logs.tar.gz",
    "stage2/bench.json",
    "stage2/bench.md",
    "stage2/logs.tar.gz",
}
DRY_STAGE2 = {
    "tests": "skipped: dry run: the kernel test files run on the GPU",
    "tests-marked": "skipped: dry run: the gpu / cuda_ext tests need a GPU",
    "memcheck": "skipped: dry run: compute-sanitizer needs a GPU",
    "racecheck": "skipped: dry run: compute-sanitizer needs a GPU",
}


@pytest.mark.slow
def test_the_dry_run_reaches_the_end_of_every_stage_with_every_benchmark_case_accounted_for(
    tmp_path,
):
    """The command CI runs, on the whole benchmark selection (--quick) with this interpreter."""
    out = tmp_path / "suite"
    done = run_suite(out, tmp_path / "cache", bench_args="")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder, files = run_folder(out)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d{4}Z_CPU_abc1234_dry-run", folder.name)
    assert files == ALL_FILES
    summary = (folder / "summary.md").read_text()
    stages = summary_rows(summary)
    assert stages[1] == {
        "build": "skipped: dry run: no CUDA build here; the steps use the installed effbert",
        "check": "ok",
        "bench-headline": "ok",
    }
    assert stages[2] == {
        "tests-collect": "ok",
        "tests-marked-collect": "ok",
        **DRY_STAGE2,
        "bench-rest": "ok",
    }
    assert f"- commit: {COMMIT} (from EFFBERT_COMMIT)" in summary
    # stage 1 said what it wrote before stage 2 started
    assert (
        summary.index("stage 1 ended at")
        < summary.index("## stage 2")
        < summary.index("stage 2 ended at")
    )
    assert re.search(
        r"stage 1 ended at \+\d+ s \(.*\); it wrote stage1/bench.json \([\d,]+ bytes\)", summary
    )

    first = json.loads((folder / "stage1" / "bench.json").read_text())
    second = json.loads((folder / "stage2" / "bench.json").read_text())
    assert first["complete"] and second["complete"] and first["env"]["git_commit"] == COMMIT
    assert (first["selection"], second["selection"]) == ("headline", "rest")
    cases = runner.collect_cases(torch.device("cpu"), True)
    head = runner.select(cases, "headline")
    assert [r["key"] for r in first["cases"]] == [c.key for c in head]
    assert any(r["status"] == "ok" for r in first["cases"])
    # stage 2: the headline cases stage 1 left for its budget, then the rest; every case measured or said why not
    left = [r["key"] for r in first["cases"] if r.get("skipped_for") == runner.BUDGET_SKIP]
    assert [r["key"] for r in second["cases"]] == left + [
        c.key for c in runner.select(cases, "rest")
    ]
    for data in (first, second):
        assert all(
            r["status"] in ("ok", "skipped") and (r["status"] == "ok" or r["reason"])
            for r in data["cases"]
        )
    # the summary names every case of both runs with what became of it
    for row in first["cases"] + second["cases"]:
        assert (
            f"| {' · '.join(row['key'].split('|'))} | {'measured' if row['status'] == 'ok' else 'skipped'}"
            in summary
        ), row["key"]

    with tarfile.open(folder / "stage1" / "logs.tar.gz") as tar:
        assert {"stage1/check.log", "stage1/bench-headline.log"} <= set(tar.getnames())
        log = tar.extractfile("stage1/check.log").read().decode()
    assert "--quick" in log and "all checks passed" in log
    with tarfile.open(folder / "stage2" / "logs.tar.gz") as tar:
        assert {"stage2/bench-rest.log", "stage2/tests-collect.log"} <= set(tar.getnames())
    assert "torch: no CUDA device" in (folder / "gpu.txt").read_text()
    assert "| check | ok |" in done.stdout and f"results: {folder}" in done.stdout
    assert "| case | result |" not in done.stdout  # the per-case tables stay in the file


@pytest.mark.slow
def test_two_commands_one_run_and_a_cut_step_lets_the_stage_go_on(tmp_path):
    """--stage 1, then --stage 2 as a command of its own with the same cache: into the same folder when it is still
    there, else (a remote $OUT emptied between the commands) into a folder of the same name whose summary starts with
    stage 1's; stage 2 follows stage 1's headline file."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    # the check gets 2 s (it needs about 5 here): it is cut, recorded, and stage 1 goes on to its benchmark
    one = run_suite(out, cache, "--stage", "1", SUITE_LIMIT_CHECK="2")
    assert one.returncode == 1, (
        one.stdout[-3000:] + one.stderr[-3000:]
    )  # a cut step fails the suite
    folder, files = run_folder(out)
    assert files == {
        "summary.md",
        "gpu.txt",
        "stage1/bench.json",
        "stage1/bench.md",
        "stage1/logs.tar.gz",
    }
    stages = summary_rows((folder / "summary.md").read_text())
    assert (
        set(stages) == {1}
        and stages[1]["check"] == "TIMED OUT after 2s"
        and stages[1]["bench-headline"] == "ok"
    )
    assert (cache / "suite-run").is_file() and (cache / "stage1" / "bench.json").is_file()

    # a remote run's $OUT is empty for the second command: the run's folder is made again, summary whole
    elsewhere = tmp_path / "second-command"
    two = run_suite(elsewhere, cache, "--stage", "2")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    again, files = run_folder(elsewhere)
    assert again.name == folder.name
    assert files == {
        "summary.md",
        "gpu.txt",
        "stage2/bench.json",
        "stage2/bench.md",
        "stage2/logs.tar.gz",
    }
    summary = (again / "summary.md").read_text()
    stages = summary_rows(summary)
    assert stages[1]["check"] == "TIMED OUT after 2s"
    assert stages[2] == {
        "build": "skipped: dry run: no CUDA build here; the steps use the installed effbert",
        "tests-collect": "ok",
        "tests-marked-collect": "ok",
        **DRY_STAGE2,
        "bench-rest": "ok",
    }
    assert summary.count("# effbert GPU suite") == 1 and "continuing run " + folder.name in summary
    assert json.loads((again / "stage2" / "bench.json").read_text())["selection"] == "rest"
    assert (
        f"--rest --after {cache}/stage1/bench.json" in two.stdout
    )  # stage 1's file, kept in the cache

    # the first folder is still there: stage 2 continues it in place, after stage 1's lines
    three = run_suite(out, cache, "--stage", "2")
    assert three.returncode == 0, three.stdout[-3000:] + three.stderr[-3000:]
    same, files = run_folder(out)
    assert same == folder and files == ALL_FILES
    summary = (folder / "summary.md").read_text()
    assert summary.index("stage 1 ended at") < summary.index("## stage 2")
    assert f"--rest --after {folder}/stage1/bench.json" in three.stdout


def test_a_spent_stage_skips_what_is_left_and_a_taken_name_is_never_overwritten(tmp_path):
    out = tmp_path / "short"
    taken = out / "fixed-name"
    taken.mkdir(parents=True)
    (taken / "bench.json").write_text("someone else's run")
    done = run_suite(
        out,
        tmp_path / "cache",
        SUITE_STAGE1_S="1",
        SUITE_STAGE2_S="0",
        SUITE_LIMIT_CHECK="1",
        SUITE_RUN_NAME="fixed-name",
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["fixed-name", "fixed-name-2"]
    assert [p.name for p in taken.iterdir()] == ["bench.json"]
    assert (taken / "bench.json").read_text() == "someone else's run"
    folder = out / "fixed-name-2"
    summary = (folder / "summary.md").read_text()
    stages = summary_rows(summary)
    assert set(stages) == {1, 2}
    assert stages[1]["bench-headline"] == "skipped: stage 1's time was spent"
    assert (
        stages[2]["bench-all"] == "skipped: stage 2's time was spent"
    )  # stage 1 wrote no headline file
    assert stages[1]["check"] in ("TIMED OUT after 1s", "skipped: stage 1's time was spent")
    # no stage says it is complete: each says it wrote no benchmark file, and which files it wrote
    assert "complete" not in summary
    assert re.search(
        r"stage 1 ended at .* WITHOUT a benchmark file .*; it wrote stage1/logs.tar.gz", summary
    )
    assert (
        "#### bench-headline: no bench.json was written (the step: skipped: stage 1's time was spent)"
        in summary
    )
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert files == {"summary.md", "gpu.txt", "stage1/logs.tar.gz", "stage2/logs.tar.gz"}


def test_bad_arguments_and_a_machine_without_a_gpu_are_refused_in_one_line(tmp_path):
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        SUITE_CACHE=str(tmp_path / "cache"),
        CUDA_VISIBLE_DEVICES="",
    )
    for args, message in (
        (["--stage", "3"], "--stage must be 1, 2 or all, got '3'"),
        (["--frobnicate"], "unknown argument '--frobnicate'"),
        (["--out"], "--out needs a folder"),
    ):
        done = subprocess.run(
            ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2 and message in done.stderr, done.stderr
    bad = dict(env, SUITE_STAGE1_S="soon")
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], env=bad, capture_output=True, text=True, timeout=60
    )
    assert (
        done.returncode == 2
        and "SUITE_STAGE1_S must be a whole number of seconds, got 'soon'" in done.stderr
    )
    bad = dict(env, SUITE_RUN_NAME="a/b")
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "o")],
        env=bad,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "SUITE_RUN_NAME must be letters, digits" in done.stderr
    if not torch.cuda.is_available():
        done = subprocess.run(
            ["bash", str(SCRIPT), "--out", str(tmp_path / "o")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and "torch sees no CUDA device here" in done.stderr
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    done = subprocess.run(
        ["bash", str(SCRIPT), "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "bash scripts/gpu_suite.sh --dry-run --out" in done.stdout


# ---- effbert check: --quick, and an install that cannot serve fails loudly ------------------------------------------


def test_check_quick_runs_one_dtype_per_op():
    for fn in checks.CHECKS:
        rows = fn(quick=True)
        per_op = {}
        for op, backend, device, dtype, *_ in rows:
            per_op.setdefault((op, device), set()).add(dtype)
        assert rows and all(len(d) == 1 for d in per_op.values()), (fn.__name__, per_op)
    # without --quick: every dtype
    assert checks._dtypes(checks.ALL_DTYPES, False) == checks.ALL_DTYPES
    assert checks._dtypes(checks.ALL_DTYPES, True, torch.bfloat16) == (torch.bfloat16,)
    with pytest.raises(ValueError, match="one must be one of"):
        checks._dtypes((torch.float32,), True, torch.float16)
    with pytest.raises(ValueError, match="quick must be a bool"):
        checks.check_notes(quick="yes")


def test_check_fails_in_one_line_when_the_kernels_or_the_cpu_extension_are_missing(
    monkeypatch, capsys
):
    import importlib

    from effbert import _ext

    real_import = importlib.import_module

    def no_notes(name, *args):
        if name == "effbert.kernels.notes":
            raise ModuleNotFoundError("No module named 'effbert.kernels.notes'")
        return real_import(name, *args)

    monkeypatch.setattr(checks.importlib, "import_module", no_notes)
    assert check.main(["--quick"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "effbert check: error: the Triton kernels cannot be imported (effbert.kernels.notes: "
        "ModuleNotFoundError: No module named 'effbert.kernels.notes'); reinstall effbert "
        "(pip install -e .)"
    ]
    monkeypatch.setattr(checks.importlib, "import_module", real_import)
    monkeypatch.setattr(
        _ext, "load", lambda name: (None, f"effbert.{name} is not available (gone)")
    )
    assert checks.install_problems() == [
        "the install failed or never ran: effbert._C is not available (gone)"
    ]
    assert check.main([]) == 1
    out = capsys.readouterr()
    assert (
        "effbert check: error: the install failed or never ran" in out.err
        and "rel. error" not in out.out
    )


def test_check_on_a_gpu_needs_a_triton_result_for_every_op():
    rows = [(op, "eager", "cuda", "float32", "s", 0.0, 1e-4) for op in checks.TRITON_OPS]
    assert checks.missing_gpu_rows(rows, False) == []
    # passed on eager alone: not served
    assert checks.missing_gpu_rows(rows, True) == list(checks.TRITON_OPS)
    rows += [(op, "triton", "cuda", "float32", "s", 0.0, 1e-4) for op in checks.TRITON_OPS[1:]]
    assert checks.missing_gpu_rows(rows, True) == [checks.TRITON_OPS[0]]
    with pytest.raises(ValueError, match="cuda_available must be a bool"):
        checks.missing_gpu_rows(rows, 1)


def test_a_failing_check_row_names_the_worst_index_and_both_values(monkeypatch, capsys):
    """An eager exit entropy off by 1 at row 7: its rows fail, and the table gives the worst
    entry (the index, the output's value, the float64 reference's), as the comparator finds it."""
    from effbert.ops import early_exit as early_exit_ops

    real = early_exit_ops.entropy_into

    def off_at_7(backend, x, out):
        result = real(backend, x, out)
        if backend == "eager":
            result[7] += 1.0
        return result

    monkeypatch.setattr(early_exit_ops, "entropy_into", off_at_7)
    rows = checks.check_exit_entropy(quick=True)
    bad = [r for r in rows if not r.error <= r.bound]
    assert bad and {r.backend for r in bad} == {"eager"}
    assert all(r.comparison.index == (7,) for r in bad)
    assert all(r.comparison.got - r.comparison.want == pytest.approx(1.0, abs=1e-3) for r in bad)
    monkeypatch.setattr(checks, "CHECKS", [checks.check_exit_entropy])
    assert check.main(["--quick"]) == 1
    out = capsys.readouterr().out
    worst = re.findall(r"worst at index \[7\]: got (\S+), reference (\S+)", out)
    assert len(worst) == len(bad) and f"{len(bad)} checks FAILED" in out
    assert all(float(got) - float(want) == pytest.approx(1.0, abs=1e-3) for got, want in worst)
    assert "entropy: relative error" in out


def test_a_check_that_raises_is_a_failure_not_a_traceback(monkeypatch, capsys):
    def broken(quick=False):
        raise RuntimeError("kernel launch failed\nmore")

    monkeypatch.setattr(checks, "CHECKS", [checks.check_multi_exit_loss, broken])
    assert check.main(["--quick"]) == 1
    out = capsys.readouterr().out
    assert (
        "broken             ERROR: RuntimeError: kernel launch failed" in out
        and "1 checks FAILED" in out
    )


# ---- the summary's reports --------------------------------------------------------------------------------------------


def test_bench_report_says_per_case_measured_skipped_or_not_reached(tmp_path):
    data = {
        "complete": False,
        "planned": ["a|s|f|m|p1", "a|s|f|m|p2", "a|s|f|m|p3", "a|s|f|m|p4"],
        "cases": [
            {
                "key": "a|s|f|m|p1",
                "status": "ok",
                "ms": 0.25,
                "provider": "p1",
                "baseline": "p2",
                "speedup_vs_baseline": 2.0,
            },
            {"key": "a|s|f|m|p2", "status": "skipped", "reason": "no CUDA | here"},
            {"key": "a|s|f|m|p3", "status": "error", "reason": "RuntimeError: boom"},
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    lines = suite_report.bench_section("bench-headline", "TIMED OUT after 90s", path)
    assert lines[0] == (
        "#### bench-headline: 2 of 4 cases measured, 1 error, 1 skipped, 1 not reached (the step: "
        "TIMED OUT after 90s; the run did not finish)"
    )
    assert "| a · s · f · m · p1 | measured: 0.2500 ms (2.00x vs p2) |" in lines
    assert "| a · s · f · m · p2 | skipped: no CUDA \\| here |" in lines
    assert "| a · s · f · m · p3 | ERROR: RuntimeError: boom |" in lines
    assert (
        "| a · s · f · m · p4 | not reached: the step ended before it (TIMED OUT after 90s) |"
        in lines
    )
    missing = suite_report.bench_section("bench-rest", "ok", tmp_path / "none.json")
    assert missing[0].startswith("#### bench-rest: no bench.json was written (the step: ok)")
    path.write_text('{"cases": [')
    assert "is unreadable" in suite_report.bench_section("bench-rest", "ok", path)[0]
    with pytest.raises(ValueError, match="step_status must be a non-empty string"):
        suite_report.bench_section("bench-rest", "", path)


def test_junit_report_counts_and_lists_failures(tmp_path):
    xml = tmp_path / "tests.junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="5" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad[triton-cuda]">'
        '<failure message="AssertionError: error 3e-2 &gt; 1e-4&#10;more">trace</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_broken"><error message="">boom</error></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped/></testcase>'
        '<testcase classname="tests.test_b" name="test_ok2"/></testsuite></testsuites>'
    )
    lines = suite_report.junit_section("tests", "TIMED OUT after 110s", xml)
    assert (
        lines[0]
        == "#### tests: 5 tests: 2 passed, 1 failed, 1 errors, 1 skipped (the step: TIMED OUT after 110s)"
    )
    assert (
        "- FAILED `tests.test_a::test_bad[triton-cuda]`: AssertionError: error 3e-2 > 1e-4" in lines
    )
    assert "- FAILED `tests.test_b::test_broken`: boom" in lines
    assert (
        "no junit file was written"
        in suite_report.junit_section("tests", "ok", tmp_path / "no.xml")[0]
    )
    (tmp_path / "stage1").mkdir()
    assert suite_report.stage_files(tmp_path / "stage1") == "no files"
    (tmp_path / "stage1" / "bench.json").write_text("{}")
    assert suite_report.stage_files(tmp_path / "stage1") == "stage1/bench.json (2 bytes)"
    with pytest.raises(ValueError, match="stage_dir must be an existing folder"):
        suite_report.stage_files(tmp_path / "nope")
    assert suite_report.main(["bench", "only-two"]) == 2


# ---- the GPU path, on this CPU: a stand-in interpreter and compute-sanitizer record what the suite runs ---------------

STUB_PYTHON = r"""#!/usr/bin/env bash
# Stands in for the GPU machine's python: says it sees an H100, records each call, and writes the files the
# suite's steps would (bench.json into --out, the junit file); runs the suite's report script for real.
echo "$* | caching=${PYTORCH_NO_CUDA_MEMORY_CACHING:-} | triton_cache=${TRITON_CACHE_DIR:-}" >> "$STUB_LOG"
arg() { local want="$1"; shift; while [ $# -gt 0 ]; do [ "$1" = "$want" ] && { echo "$2"; return; }; shift; done; }
case "$1" in
  -c) case "$2" in
        *get_device_properties*) echo "torch: NVIDIA H100 80GB HBM3, capability 9.0, 132 SMs, cuda 13.0" ;;
        *get_device_name*) echo H100 ;;
        *get_device_capability*) echo 90 ;;
        *sys.executable*) echo "stub 2.11.0+cu130 13.0" ;;
        *triton.__version__*) echo "3.12.3 torch 2.11.0+cu130 triton 3.6.0" ;;
        *transformers*) echo 5.17.0 ;;
        *) echo "stub python: unexpected -c" >&2; exit 3 ;;
      esac ;;
  -m) case "$2" in
        pip) exit 0 ;;
        effbert.commands)
          [ "$3" = check ] && { echo "all checks passed"; exit 0; }
          out="$(arg --out "$@")"; sel=all
          case " $* " in *" --headline "*) sel=headline ;; *" --rest "*) sel=rest ;; esac
          mkdir -p "$out"
          printf '{"selection": "%s", "complete": true, "planned": ["op|s|d|m|%s"], "cases": [{"key": "op|s|d|m|%s", "status": "ok", "ms": 1.0}]}' "$sel" "$sel" "$sel" > "$out/bench.json"
          echo "# bench" > "$out/bench.md" ;;
        pytest)
          for a in "$@"; do case "$a" in --junitxml=*) junit="${a#--junitxml=}" ;; esac; done
          echo '<testsuite tests="2" failures="1" errors="0" skipped="0"><testcase classname="t" name="ok"/><testcase classname="t" name="bad"><failure message="boom"/></testcase></testsuite>' > "$junit"
          exit 1 ;;
      esac ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""

STUB_SANITIZER = r"""#!/usr/bin/env bash
echo "compute-sanitizer $* | caching=${PYTORCH_NO_CUDA_MEMORY_CACHING:-}" >> "$STUB_LOG"
while [ $# -gt 0 ] && [ "$1" != "$STUB_PYTHON" ]; do shift; done
exec "$@"
"""


def test_the_gpu_path_runs_its_steps_in_order_with_their_arguments(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub, sanitizer = bin_dir / "python-gpu", bin_dir / "compute-sanitizer"
    stub.write_text(STUB_PYTHON)
    sanitizer.write_text(STUB_SANITIZER)
    stub.chmod(0o755), sanitizer.chmod(0o755)
    log, out, cache = tmp_path / "calls.log", tmp_path / "out", tmp_path / "cache"
    env = dict(
        os.environ,
        PYTHON=str(stub),
        STUB_PYTHON=str(stub),
        REAL_PYTHON=sys.executable,
        STUB_LOG=str(log),
        SUITE_CACHE=str(cache),
        EFFBERT_COMMIT="0123456789abcdef",
        PATH=f"{bin_dir}:{os.environ['PATH']}",
    )
    env.pop("TRITON_CACHE_DIR", None)
    done = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 1, (
        done.stdout[-3000:] + done.stderr[-3000:]
    )  # the stub's tests fail one test each
    folder, files = run_folder(out)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d{4}Z_H100_0123456", folder.name) and files == ALL_FILES
    summary = (folder / "summary.md").read_text()
    stages = summary_rows(summary)
    assert stages[1] == {"build": "ok", "check": "ok", "bench-headline": "ok"}
    assert stages[2] == {
        "tests": "FAILED (exit 1)",
        "tests-marked": "FAILED (exit 1)",
        "memcheck": "FAILED (exit 1)",
        "racecheck": "FAILED (exit 1)",
        "bench-rest": "ok",
    }
    assert (
        "#### tests: 2 tests: 1 passed, 1 failed, 0 errors, 0 skipped (the step: FAILED (exit 1))"
        in summary
    )
    assert "- FAILED `t::bad`: boom" in summary
    assert (
        "#### tests: 2 tests: 1 passed, 1 failed" in done.stdout
    )  # the counts reach the console too
    calls = log.read_text().splitlines()
    steps = [
        c for c in calls if c.startswith(("-m ", "compute-sanitizer "))
    ]  # not -c probes nor the reports
    kernel_tests = (
        "tests/test_tupe_attention.py tests/test_position_bias.py tests/test_notes.py "
        "tests/test_early_exit.py tests/test_mc_bert.py"
    )
    assert steps[0].startswith("-m pip install --no-build-isolation --no-deps --no-input -e .")
    assert steps[1].startswith("-m effbert.commands check --quick |")
    assert steps[2].startswith("-m effbert.commands bench --headline --no-progress --budget ")
    assert re.match(
        r"-m pytest -q -p no:cacheprovider --maxfail=20 --junitxml=\S+/tests.junit.xml "
        + re.escape(kernel_tests)
        + " -m not aot \\|",
        steps[3],
    )
    assert (
        "--ignore=tests/test_mc_bert.py" in steps[4]
        and "-m (gpu or cuda_ext) and not aot" in steps[4]
    )
    sanitized = [c for c in steps if c.startswith("compute-sanitizer")]
    assert "--tool memcheck" in sanitized[0] and sanitized[0].endswith(
        "caching=1"
    )  # no caching allocator
    assert "--tool racecheck" in sanitized[1]
    assert re.match(
        r"-m effbert.commands bench --rest --after \S+/stage1/bench.json --no-progress", steps[-1]
    )
    assert all(f"triton_cache={cache}/triton" in c for c in steps if c.startswith("-m "))
    assert (cache / "install").read_text().endswith(" ok\n")

    # stage 2 again, as a command of its own on the same machine: the install is reused, not rebuilt
    log.unlink()
    again = subprocess.run(
        ["bash", str(SCRIPT), "--stage", "2", "--out", str(tmp_path / "out2")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert again.returncode == 1
    folder2, _ = run_folder(tmp_path / "out2")
    assert folder2.name == folder.name
    stages = summary_rows((folder2 / "summary.md").read_text())
    assert stages[2]["build"].startswith("skipped: this machine's install of the same csrc/")
    assert not any(c.startswith("-m pip") for c in log.read_text().splitlines())
