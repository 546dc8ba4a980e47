"""scripts/gpu_suite.sh's structure, on this CPU: its GPU steps left out (SUITE_NO_GPU=1), everything else run for
real with a small benchmark selection, then checked through the files it leaves: two stages, each one's files
complete before the next starts, per-step limits that cut a step and let the stage go on, a spent stage that skips
what is left, the GPU it ran on, and no more files than a remote run brings back."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from effbert.bench import runner

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_suite.sh"
BENCH_ARGS = "--quick --op exit_entropy"


def run_suite(out, **env):
    full = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SUITE_NO_GPU="1", SUITE_BENCH_ARGS=BENCH_ARGS,
                TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=600, cwd=ROOT)


def summary_rows(text):
    """{step: status} per stage from summary.md's tables."""
    stages, current = {}, None
    for line in text.splitlines():
        if line.startswith("## stage "):
            current = stages.setdefault(int(line.split()[2]), {})
        elif current is not None and line.startswith("| ") and not line.startswith("| step"):
            step, status = [c.strip() for c in line.strip("|").split("|")][:2]
            current[step] = status
    return stages


def returned_files(out):
    """What a remote run brings back of $OUT: at most 8 files, none deeper than two folders."""
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files), files
    return {str(p.relative_to(out)) for p in files}


@pytest.mark.slow
def test_two_stages_write_their_files_in_order_and_a_cut_step_lets_the_stage_go_on(tmp_path):
    out = tmp_path / "suite"
    # the check gets 2 s (it needs about 20 here): it is cut, recorded, and stage 1 goes on to its benchmark
    done = run_suite(out, SUITE_STAGE1_S="150", SUITE_STAGE2_S="150", SUITE_LIMIT_CHECK="2")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # a cut step fails the suite
    summary = (out / "summary.md").read_text()
    stages = summary_rows(summary)
    assert stages[1] == {"build": "skipped: SUITE_NO_GPU=1", "check": "TIMED OUT after 2s", "bench-headline": "ok"}
    assert stages[2] == {"tests": "skipped: SUITE_NO_GPU=1", "memcheck": "skipped: SUITE_NO_GPU=1",
                         "racecheck": "skipped: SUITE_NO_GPU=1", "bench-rest": "ok"}
    # stage 1 says its files are complete before stage 2 starts, and they were written before stage 2's
    assert summary.index("stage 1 files complete") < summary.index("## stage 2") < summary.index(
        "stage 2 files complete")
    s1, s2 = out / "stage1", out / "stage2"
    assert (s1 / "logs.tar.gz").stat().st_mtime <= (s2 / "bench.json").stat().st_mtime
    assert returned_files(out) == {"summary.md", "gpu.txt", "stage1/bench.json", "stage1/bench.md",
                                   "stage1/logs.tar.gz", "stage2/bench.json", "stage2/bench.md", "stage2/logs.tar.gz"}

    # stage 1 measured the headline cases of the selection, stage 2 the rest: together the whole selection, once
    cases = runner.collect_cases(torch.device("cpu"), True, "exit_entropy")
    first = json.loads((s1 / "bench.json").read_text())
    second = json.loads((s2 / "bench.json").read_text())
    assert first["complete"] and second["complete"]
    keys1 = [r["key"] for r in first["cases"]]
    keys2 = [r["key"] for r in second["cases"]]
    assert keys1 == [c.key for c in runner.select(cases, "headline")] and keys1
    assert keys2 == [c.key for c in runner.select(cases, "rest")] and keys2
    assert sorted(keys1 + keys2) == sorted(c.key for c in cases)
    assert any(r["status"] == "ok" for r in first["cases"])
    assert "## exit_entropy" in (s1 / "bench.md").read_text()

    # the logs (and plots) of each stage travel packed; the cut check left its log
    with tarfile.open(s1 / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"stage1/check.log", "stage1/bench-headline.log"} <= names
    with tarfile.open(s2 / "logs.tar.gz") as tar:
        assert "stage2/bench-rest.log" in tar.getnames()

    # which GPU: none here, and the record says so (nvidia-smi's line, torch's view)
    gpu = (out / "gpu.txt").read_text()
    assert "torch: no CUDA device" in gpu
    assert "- gpu: " in summary and "- torch: no CUDA device" in summary


def test_a_spent_stage_skips_what_is_left_and_the_next_stage_still_runs(tmp_path):
    out = tmp_path / "short"
    done = run_suite(out, SUITE_STAGE1_S="1", SUITE_STAGE2_S="0", SUITE_LIMIT_CHECK="1")
    assert done.returncode == 1
    stages = summary_rows((out / "summary.md").read_text())
    assert set(stages) == {1, 2}
    assert stages[1]["bench-headline"] == "skipped: stage 1's time was spent"
    assert stages[2]["bench-rest"] == "skipped: stage 2's time was spent"
    assert stages[1]["check"] in ("TIMED OUT after 1s", "skipped: stage 1's time was spent")
    # each stage still packed what it had, and nothing was measured that the summary does not list
    assert returned_files(out) == {"summary.md", "gpu.txt", "stage1/logs.tar.gz", "stage2/logs.tar.gz"}
