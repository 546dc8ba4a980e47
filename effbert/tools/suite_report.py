"""What the GPU suite (scripts/gpu_suite.sh) writes into summary.md about a step's files: per benchmark case,
measured, skipped (and why) or never reached; per test step, the counts and the failures from pytest's junit file;
per stage, the files it wrote.

Standard library only, and run by path (``python effbert/tools/suite_report.py ...``), so that it reports even when
the install it reports on is broken:

    python effbert/tools/suite_report.py bench STEP STATUS BENCH_JSON   # a bench step's cases
    python effbert/tools/suite_report.py junit STEP STATUS JUNIT_XML    # a pytest step's counts and failures
    python effbert/tools/suite_report.py files STAGE_DIR                # what a stage wrote
"""

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

MEASURED = ("ok", "wrong", "error")  # rows that ran (effbert.bench.runner.MEASURED_STATUSES)
MAX_FAILURES = 30  # failures listed per test step; the rest are in the junit file


def _cell(text):
    """Text for one Markdown table cell: one line, no column breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _check_str(name, value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _case_name(key):
    return " · ".join(key.split("|"))


def _result(row):
    status = row.get("status")
    if status == "ok":
        text = f"measured: {row['ms']:.4f} ms"
        if row.get("speedup_vs_baseline") and row.get("provider") != row.get("baseline"):
            text += f" ({row['speedup_vs_baseline']:.2f}x vs {row.get('baseline')})"
        return text
    if status == "wrong":
        return f"measured, WRONG: {row.get('reason', '')}"
    if status == "error":
        return f"ERROR: {row.get('reason', '')}"
    return f"skipped: {row.get('reason') or 'no reason given'}"


def bench_section(step, step_status, path):
    """Markdown lines on one ``effbert bench`` step: how many of its planned cases it measured, then one table row
    per case (measured with its time; skipped with the reason; not reached, with the step's status as the reason).
    ``path``: its bench.json, which may be missing or cut short (a step stopped from outside)."""
    _check_str("step", step)
    _check_str("step_status", step_status)
    path = Path(path)
    head = f"#### {step}: "
    if not path.is_file():
        return [
            head
            + f"no bench.json was written (the step: {step_status}); its log is in the stage's "
            "logs.tar.gz",
            "",
        ]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = [r for r in data["cases"] if isinstance(r, dict) and "key" in r]
        planned = list(data.get("planned") or [r["key"] for r in rows])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [
            head
            + f"{path.name} is unreadable ({type(exc).__name__}: {exc}); the step: {step_status}",
            "",
        ]
    by_key = {r["key"]: r for r in rows}
    keys = planned + [k for k in by_key if k not in planned]
    counts = {"measured": 0, "wrong": 0, "error": 0, "skipped": 0, "not reached": 0}
    table = ["| case | result |", "|---|---|"]
    for key in keys:
        row = by_key.get(key)
        if row is None:
            counts["not reached"] += 1
            result = f"not reached: the step ended before it ({step_status})"
        else:
            status = row.get("status")
            counts[
                "measured" if status == "ok" else status if status in MEASURED else "skipped"
            ] += 1
            result = _result(row)
        table.append(f"| {_cell(_case_name(key))} | {_cell(result)} |")
    measured = counts["measured"] + counts["wrong"] + counts["error"]
    parts = [f"{measured} of {len(keys)} cases measured"]
    parts += [f"{n} {what}" for what, n in counts.items() if n and what != "measured"]
    state = "" if data.get("complete") else "; the run did not finish"
    return [head + ", ".join(parts) + f" (the step: {step_status}{state})", ""] + table + [""]


def junit_section(step, step_status, path):
    """Markdown lines on one pytest step from its junit file: the counts, then each failure (test id and the first
    line of its message), at most MAX_FAILURES."""
    _check_str("step", step)
    _check_str("step_status", step_status)
    path = Path(path)
    head = f"#### {step}: "
    if not path.is_file():
        return [
            head
            + f"no junit file was written (the step: {step_status}); its log is in the stage's "
            "logs.tar.gz",
            "",
        ]
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return [head + f"{path.name} is unreadable ({exc}); the step: {step_status}", ""]
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in suites:
        for name in total:
            total[name] += int(suite.get(name, 0) or 0)
        for case in suite.iter("testcase"):
            bad = case.find("failure")
            bad = case.find("error") if bad is None else bad
            if bad is not None:
                test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
                message = (bad.get("message") or bad.text or "").strip().splitlines()
                failed.append((test_id, message[0] if message else ""))
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    line = (
        f"{total['tests']} tests: {passed} passed, {total['failures']} failed, {total['errors']} errors, "
        f"{total['skipped']} skipped (the step: {step_status})"
    )
    out = [head + line, ""]
    for test_id, message in failed[:MAX_FAILURES]:
        out.append(f"- FAILED `{test_id}`: {_cell(message)[:300]}")
    if len(failed) > MAX_FAILURES:
        out.append(f"- ... and {len(failed) - MAX_FAILURES} more in the junit file")
    return out + ([""] if failed else [])


def stage_files(stage_dir):
    """One line: the files a stage folder holds (name and size), or that it holds none."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        raise ValueError(f"stage_dir must be an existing folder, got {str(stage_dir)!r}")
    files = sorted(p for p in stage_dir.iterdir() if p.is_file())
    if not files:
        return "no files"
    return ", ".join(f"{stage_dir.name}/{p.name} ({p.stat().st_size:,} bytes)" for p in files)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = __doc__.split("\n\n")[-1]
    if argv[:1] in (["bench"], ["junit"]) and len(argv) == 4:
        fn = bench_section if argv[0] == "bench" else junit_section
        print("\n".join(fn(*argv[1:])))
        return 0
    if argv[:1] == ["files"] and len(argv) == 2:
        print(stage_files(argv[1]))
        return 0
    print(f"usage:\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:
        print(f"suite_report: error: {exc}", file=sys.stderr)
        sys.exit(2)
