"""``effbert bench``: the microbenchmark suite (the cases live in :mod:`effbert.bench`).

    effbert bench [--op NAME] [--quick] [--headline | --rest [--after HEADLINE.json]] [--out DIR]
                  [--compare OLD.json] [--budget SECONDS] [--rounds N]
    effbert bench --index benchmarks/results     # regenerate benchmarks/RESULTS.md from the runs

Parsing and wiring only: :class:`BenchSettings` (one field a flag, its default and help once),
:func:`check` (every flag and the cases they select, before anything is measured), then
:func:`effbert.bench.suite.run_suite`.
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..bench import suite
from ..bench.runner import collect_cases, select, settled_keys, write_index
from . import UsageError, check_out_dir
from .settings import fail_if, option, parser

__all__ = ["BenchSettings", "build_parser", "check", "main"]


@dataclass
class BenchSettings:
    """The flags of ``effbert bench``."""

    op: Optional[str] = option(
        None,
        help="only this op (e.g. exit_entropy) or family (e.g. "
        "early_exit); several joined by commas",
    )
    quick: bool = option(False, help="fewer shapes and shorter timing")
    out: str = option("bench-out", metavar="DIR", help="folder for bench.json, bench.md and plots")
    compare: Optional[str] = option(None, metavar="OLD.json", help="ratios against an earlier run")
    index: Optional[str] = option(
        None,
        metavar="RESULTS_DIR",
        help="only regenerate RESULTS.md beside RESULTS_DIR from the runs in it",
    )
    no_progress: bool = option(False, help="no progress bar")
    headline: bool = option(
        False,
        help="only the headline cases: one shape per op family at "
        "BERT-base sizes (the GPU suite's first stage); not with --rest",
    )
    rest: bool = option(False, help="every case but the headline ones")
    after: Optional[str] = option(
        None,
        metavar="HEADLINE.json",
        help="with --rest: the "
        "bench.json of the --headline run this one follows; the headline "
        "cases it did not measure (its --budget was spent, or it was "
        "stopped) run first",
    )
    budget: Optional[float] = option(
        None,
        metavar="SECONDS",
        help="stop starting cases this long "
        "after the command started; the rest are listed as skipped, "
        "and the files are written all the same",
    )
    providers: Optional[str] = option(
        None,
        metavar="A,B",
        help="only these providers (e.g. "
        "effbert,effbert-int8,onnxruntime); the others' rows are "
        "left out, the baseline too unless named",
    )
    rounds: Optional[int] = option(
        None,
        metavar="N",
        help="on the CPU: exactly N interleaved "
        "rounds per shape (default: at least 5, then until 0.5 s per "
        "provider is spent)",
    )


def build_parser():
    """The ``effbert bench`` parser: ``parse_args`` returns a :class:`BenchSettings`."""
    return parser(BenchSettings, "effbert bench", "effbert microbenchmark suite")


def _read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _check_files(s):
    """``--after`` and ``--compare``, read now rather than after the whole run; sets
    ``s.measured``, the keys the ``--headline`` run before this one settled (None without
    ``--after``)."""
    s.measured = None
    if s.after is not None:
        fail_if(
            not s.rest,
            "--after goes with --rest (the headline cases an earlier --headline run left)",
        )
        try:
            s.measured = settled_keys(_read_json(s.after))
        except (OSError, ValueError) as exc:
            raise UsageError(
                f"--after: {s.after!r} is not the bench.json of a --headline run ({exc})"
            ) from None
    if s.compare:
        fail_if(
            not Path(s.compare).is_file(),
            f"--compare must name an existing JSON file from an earlier run, got {s.compare!r}",
        )
        try:
            old = _read_json(s.compare)
            ok = isinstance(old, dict) and isinstance(old.get("cases"), list)
        except (OSError, ValueError):
            ok = False
        fail_if(not ok, f"--compare: {s.compare!r} is not the bench.json of an earlier run")


def _select_cases(s):
    """The cases ``s`` select (``--op``, ``--providers``, ``--headline``/``--rest``), none of
    them an empty choice."""
    device = suite.bench_device()
    cases = collect_cases(device, s.quick, s.op)
    if not cases:
        ops = sorted({c.op for c in collect_cases(device, True)})
        raise UsageError(f"--op {s.op!r} matches no case; ops: {ops}")
    if s.providers is not None:
        wanted = [p.strip() for p in s.providers.split(",") if p.strip()]
        known = {c.provider for c in cases}
        unknown = [p for p in wanted if p not in known]
        fail_if(
            not wanted or unknown,
            f"--providers names no provider of these cases: "
            f"{unknown or s.providers!r}; providers: {', '.join(sorted(known))}",
        )
        cases = [c for c in cases if c.provider in wanted]
    cases = select(cases, suite.selection(s), s.measured)
    fail_if(
        not cases, f"{'--headline' if s.headline else '--rest'} leaves no case of --op {s.op!r}"
    )
    return cases


def check(s):
    """Every flag of ``s`` (a :class:`BenchSettings`) before anything is measured: a
    ``UsageError`` naming the first that is wrong. Returns the cases to run (None with
    ``--index``, which only regenerates the index)."""
    fail_if(
        s.budget is not None and not s.budget > 0,
        f"--budget must be a positive number of seconds, got {s.budget}",
    )
    fail_if(s.rounds is not None and s.rounds < 1, f"--rounds must be at least 1, got {s.rounds}")
    if s.index:
        fail_if(
            not Path(s.index).is_dir(),
            f"--index must be a folder of result JSON files, got {s.index!r}",
        )
        return None
    fail_if(s.headline and s.rest, "give --headline or --rest, not both")
    _check_files(s)
    check_out_dir(s.out)
    return _select_cases(s)


def main(argv=None):
    """``effbert bench``: a mistake in the flags is argparse's one line and ``SystemExit(2)``
    before anything is measured; returns 1 when an effbert provider computed a wrong result."""
    started = time.monotonic()  # --budget counts from here: the ceilings and the setup are in it
    p = build_parser()
    s = p.parse_args(argv)
    try:
        cases = check(s)
    except UsageError as exc:
        p.error(str(exc))
    if s.index:
        print(f"wrote {write_index(s.index)}")
        return 0
    return suite.run_suite(s, cases, print, started)


if __name__ == "__main__":
    sys.exit(main())
