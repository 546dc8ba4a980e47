"""The run of ``effbert bench``, step by step: the device, the result file written before
anything is measured, the ceilings, the case groups under the ``--budget``, the files and the
summary. The command (``effbert.commands.bench``) parses and checks the flags, selects the cases
and calls :func:`run_suite`; each step here is a function a test can call.

The result folder holds ``bench.json`` (the environment, the ceilings, the planned case keys, one
row per case, ``complete`` once every case ran), ``bench.md`` and the PNG plots.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

from .runner import (
    BUDGET_SKIP,
    add_speedups,
    compare,
    environment,
    format_tables,
    groups,
    progress,
    run_group,
    write_markdown,
    write_plots,
    write_seqlen_plots,
)
from .timing import measure_ceilings

__all__ = [
    "bench_device",
    "selection",
    "write_results",
    "start_result",
    "skip_for_budget",
    "measure",
    "finish",
    "summary",
    "exit_code",
    "run_suite",
]


def bench_device():
    """The device the suite measures: ``cuda`` when torch sees one, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def selection(settings):
    """Which cases ``settings`` ask for: ``"headline"``, ``"rest"`` or ``"all"`` (the ``which``
    of ``runner.select``)."""
    return "headline" if settings.headline else "rest" if settings.rest else "all"


def write_results(out, result):
    """``bench.json`` and ``bench.md`` in the folder ``out``, each replaced whole (written beside,
    then renamed) so that a reader never sees half of one. ``result``: the run's dict."""
    out = Path(out)
    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "bench.json")
    write_markdown(out / "bench.md.tmp", result["cases"], result["ceilings"], result["env"])
    (out / "bench.md.tmp").replace(out / "bench.md")


def start_result(out, env, quick, which, cases):
    """The result before anything is measured, written to ``out`` (made if missing): a run
    stopped from outside still says which cases it never reached. Returns the dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "env": env,
        "ceilings": {},
        "quick": quick,
        "selection": which,
        "planned": [c.key for c in cases],
        "complete": False,
        "cases": [],
    }
    write_results(out, result)
    return result


def skip_for_budget(group, budget, elapsed):
    """Mark the cases of ``group`` skipped when ``elapsed`` seconds exceed ``budget`` (None: no
    budget); a case already skipped for a reason of its own keeps that reason. Returns the keys
    skipped for the budget (a later ``--rest --after`` run measures them)."""
    if budget is None or not elapsed > budget:
        return set()
    skipped = set()
    for case in group:
        if not case.skip_reasons:
            case.skip_reasons = [f"the run's --budget of {budget:g} s was spent"]
            skipped.add(case.key)
    return skipped


def measure(cases, device, result, out, settings, started):
    """Every case of ``cases``, a group of one shape's providers at a time (on the CPU they are
    timed interleaved, against each other), each row appended to ``result["cases"]`` and the
    files rewritten after it: a run stopped from outside still leaves what it measured."""
    rows, budget_skipped = result["cases"], set()

    def emit(row):
        if row["key"] in budget_skipped:
            row["skipped_for"] = BUDGET_SKIP
        rows.append(row)
        add_speedups(rows)
        write_results(out, result)

    for group in progress(groups(cases), not settings.no_progress):
        budget_skipped |= skip_for_budget(group, settings.budget, time.monotonic() - started)
        run_group(group, device, result["ceilings"], settings.quick, emit, rounds=settings.rounds)
    return rows


def finish(result, out, compare_with=None):
    """Mark the run complete (with the load average at its end and, given ``compare_with``, the
    ratios against that earlier bench.json), write the files and the plots. Returns the plots
    written (none without matplotlib)."""
    result["loadavg_end"] = list(os.getloadavg())
    result["complete"] = True
    if compare_with:
        result["compare"] = {
            "against": str(compare_with),
            "cases": compare(result["cases"], compare_with),
        }
    write_results(out, result)
    return write_plots(out, result["cases"]) + write_seqlen_plots(out, result["cases"])


def summary(result, out, plots):
    """The lines printed after the tables: the comparison's regressions, the files written and
    the count of failed cases."""
    lines, rows, out = [], result["cases"], Path(out)
    if "compare" in result:
        matched = result["compare"]["cases"]
        bad = [c for c in matched if c["regression"]]
        lines.append(
            f"\ncompare with {result['compare']['against']}: {len(matched)} cases "
            f"matched, {len(bad)} regressions"
        )
        lines += [
            f"  REGRESSION {c['key']}: {c['old_ms']:.4f} -> {c['new_ms']:.4f} ms "
            f"({c['ratio']:.2f}x, noise allowance {c['tolerance']:.0%})"
            for c in bad
        ]
    lines.append(
        f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}"
        + "".join(f", {p}" for p in plots)
        + ("" if plots else " (no plots: matplotlib is not installed; pip install matplotlib)")
    )
    wrong = [r for r in rows if r["status"] in ("wrong", "error")]
    if wrong:
        lines.append(f"{len(wrong)} cases failed their correctness check or raised; see the table")
    return lines


def exit_code(rows):
    """1 when an effbert provider's row failed its correctness check, else 0 (a peer's failure or
    a provider that raised is reported, not fatal)."""
    return (
        1
        if any(r["status"] == "wrong" and r["provider"].startswith("effbert") for r in rows)
        else 0
    )


def run_suite(settings, cases, log=print, started=None):
    """Measure ``cases`` (chosen by the command from ``settings``: a ``BenchSettings``) into
    ``settings.out``; ``log(str)`` hears the tables and the summary. ``started``: the
    ``time.monotonic()`` the ``--budget`` counts from (default: now). Returns the exit code."""
    if not cases:
        raise ValueError("cases must name at least one case")
    started = time.monotonic() if started is None else started
    # the device and what the run means to measure, written before anything is measured
    device = bench_device()
    env = environment(device)
    print(
        f"effbert bench on {env['device']}: measuring ceilings, then {len(cases)} cases",
        file=sys.stderr,
    )
    result = start_result(settings.out, env, settings.quick, selection(settings), cases)
    # the machine's ceilings, then every case against them
    result["ceilings"] = measure_ceilings(device, quick=settings.quick)
    write_results(settings.out, result)
    measure(cases, device, result, settings.out, settings, started)
    # complete: the comparison, the files, the plots, then what a person reads
    plots = finish(result, settings.out, settings.compare)
    log(format_tables(result["cases"], result["ceilings"], env))
    for line in summary(result, settings.out, plots):
        log(line)
    return exit_code(result["cases"])
