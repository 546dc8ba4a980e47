"""``effbert bench``: the microbenchmark suite (the cases live in :mod:`effbert.bench`).

    effbert bench [--op NAME] [--quick] [--headline | --rest [--after HEADLINE.json]] [--out DIR]
                  [--compare OLD.json] [--budget SECONDS] [--rounds N]
    effbert bench --index benchmarks/results     # regenerate benchmarks/RESULTS.md from the committed runs
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..bench.runner import (BUDGET_SKIP, add_speedups, collect_cases, compare, environment,
                            format_tables, groups, run_group, select, settled_keys, write_index, write_markdown,
                            write_plots, write_seqlen_plots, progress)
from ..bench.timing import measure_ceilings
from . import UsageError, check_out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(prog="effbert bench", description="effbert microbenchmark suite")
    parser.add_argument("--op", default=None, help="only this op (e.g. exit_entropy) or family (e.g. early_exit); several joined by commas")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing")
    parser.add_argument("--out", default="bench-out", help="folder for bench.json, bench.md and plots")
    parser.add_argument("--compare", default=None, metavar="OLD.json", help="ratios against an earlier run")
    parser.add_argument("--index", default=None, metavar="RESULTS_DIR",
                        help="only regenerate RESULTS.md beside RESULTS_DIR from the runs in it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--headline", action="store_true",
                       help="only the headline cases: one shape per op family at BERT-base sizes (the GPU suite's "
                            "first stage)")
    which.add_argument("--rest", action="store_true", help="every case but the headline ones")
    parser.add_argument("--after", default=None, metavar="HEADLINE.json",
                        help="with --rest: the bench.json of the --headline run this one follows; the headline cases "
                             "it did not measure (its --budget was spent, or it was stopped) run first")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="stop starting cases this long after the command started; the rest are listed as "
                             "skipped, and the files are written all the same")
    parser.add_argument("--providers", default=None, metavar="A,B",
                        help="only these providers (e.g. effbert,effbert-int8,onnxruntime); the others' rows are "
                             "left out, the baseline too unless named")
    parser.add_argument("--rounds", type=int, default=None, metavar="N",
                        help="on the CPU: exactly N interleaved rounds per shape (default: at least 5, then until "
                             "0.5 s per provider is spent)")
    started = time.monotonic()  # --budget counts from here: the ceilings and the setup are part of the run
    args = parser.parse_args(argv)
    if args.budget is not None and not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.index:
        if not Path(args.index).is_dir():
            parser.error(f"--index must be a folder of result JSON files, got {args.index!r}")
        print(f"wrote {write_index(args.index)}")
        return 0
    measured = None
    if args.after is not None:
        if not args.rest:
            parser.error("--after goes with --rest (the headline cases an earlier --headline run left)")
        try:
            measured = settled_keys(json.loads(Path(args.after).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            parser.error(f"--after: {args.after!r} is not the bench.json of a --headline run ({exc})")
    if args.compare and not Path(args.compare).is_file():
        parser.error(f"--compare must name an existing JSON file from an earlier run, got {args.compare!r}")
    if args.compare:  # read it now, not after the whole run
        try:
            old = json.loads(Path(args.compare).read_text(encoding="utf-8"))
            ok = isinstance(old, dict) and isinstance(old.get("cases"), list)
        except (OSError, ValueError):
            ok = False
        if not ok:
            parser.error(f"--compare: {args.compare!r} is not the bench.json of an earlier run")
    try:
        check_out_dir(args.out)
    except UsageError as exc:
        parser.error(str(exc))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    cases = collect_cases(device, args.quick, args.op)
    if not cases:
        parser.error(f"--op {args.op!r} matches no case; ops: {sorted({c.op for c in collect_cases(device, True)})}")
    if args.providers is not None:
        wanted = [p.strip() for p in args.providers.split(",") if p.strip()]
        known = {c.provider for c in cases}
        unknown = [p for p in wanted if p not in known]
        if not wanted or unknown:
            parser.error(f"--providers names no provider of these cases: {unknown or args.providers!r}; "
                         f"providers: {', '.join(sorted(known))}")
        cases = [c for c in cases if c.provider in wanted]
    which = "headline" if args.headline else "rest" if args.rest else "all"
    cases = select(cases, which, measured)
    if not cases:
        parser.error(f"{'--headline' if args.headline else '--rest'} leaves no case of --op {args.op!r}")
    print(f"effbert bench on {env['device']}: measuring ceilings, then {len(cases)} cases", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # what the run means to measure, written before anything is measured: a run stopped from outside still says
    # which cases it never reached
    result = {"env": env, "ceilings": {}, "quick": args.quick, "selection": which,
              "planned": [c.key for c in cases], "complete": False, "cases": []}
    _write(out, result)
    ceilings = result["ceilings"] = measure_ceilings(device, quick=args.quick)
    _write(out, result)
    rows = result["cases"]
    budget_skipped = set()

    def emit(row):
        if row["key"] in budget_skipped:
            row["skipped_for"] = BUDGET_SKIP  # a later --rest --after this file runs it
        rows.append(row)
        add_speedups(rows)
        _write(out, result)  # after every case: a run stopped from outside still leaves what it measured

    # the providers of one shape go together: on the CPU they are timed interleaved, against each other
    for group in progress(groups(cases), not args.no_progress):
        spent = args.budget is not None and time.monotonic() - started > args.budget
        for case in group:
            if spent and not case.skip_reasons:
                case.skip_reasons = [f"the run's --budget of {args.budget:g} s was spent"]
                budget_skipped.add(case.key)
        run_group(group, device, ceilings, args.quick, emit, rounds=args.rounds)
    result["loadavg_end"] = list(os.getloadavg())
    result["complete"] = True
    if args.compare:
        result["compare"] = {"against": str(args.compare), "cases": compare(rows, args.compare)}
    _write(out, result)
    plots = write_plots(out, rows) + write_seqlen_plots(out, rows)

    print(format_tables(rows, ceilings, env))
    if args.compare:
        cmp_rows = result["compare"]["cases"]
        bad = [c for c in cmp_rows if c["regression"]]
        print(f"\ncompare with {args.compare}: {len(cmp_rows)} cases matched, {len(bad)} regressions")
        for c in bad:
            print(f"  REGRESSION {c['key']}: {c['old_ms']:.4f} -> {c['new_ms']:.4f} ms "
                  f"({c['ratio']:.2f}x, noise allowance {c['tolerance']:.0%})")
    wrong = [r for r in rows if r["status"] in ("wrong", "error")]
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}" + "".join(f", {p}" for p in plots)
          + ("" if plots else " (no plots: matplotlib is not installed; pip install matplotlib)"))
    if wrong:
        print(f"{len(wrong)} cases failed their correctness check or raised; see the table")
    return 1 if any(r["status"] == "wrong" and r["provider"].startswith("effbert") for r in rows) else 0


def _write(out, result):
    """bench.json and bench.md, each replaced whole (written beside, then renamed) so a reader never sees half."""
    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "bench.json")
    write_markdown(out / "bench.md.tmp", result["cases"], result["ceilings"], result["env"])
    (out / "bench.md.tmp").replace(out / "bench.md")
