"""``effbert check``: every op on this machine's backends against the float64 reference, as a table.

The first thing to run on a new machine: it shows which backends exist, and that each one computes
the right thing. An install that cannot serve (the Triton kernels or the C++ CPU extension missing,
no Triton result on a GPU) fails the command with one line saying what is missing, instead of
passing on the eager reference alone.

Parsing, wiring and printing only: the checks are :mod:`effbert.bench.checks`.
"""

import sys
import time
from dataclasses import dataclass

import torch

from ..bench import checks
from ..ops import backends
from .settings import option, parser

__all__ = ["CheckSettings", "build_parser", "main"]

HEAD = (
    f"{'op':18} {'backend':8} {'device':6} {'dtype':9} {'shape':14} {'rel. error':>11} "
    f"{'tolerance':>9}  result"
)


@dataclass
class CheckSettings:
    """The flags of ``effbert check``."""

    quick: bool = option(
        False,
        help="one dtype per op (bf16 for TUPE attention on a GPU, fp32 "
        "elsewhere): a fraction of the Triton JIT compiles, for a first look at a "
        "fresh GPU machine",
    )


def build_parser():
    """The ``effbert check`` parser: ``parse_args`` returns a :class:`CheckSettings`."""
    return parser(CheckSettings, "effbert check", __doc__.split("\n")[0].replace("``", ""))


def _error(message):
    print(f"effbert check: error: {message}", file=sys.stderr)


def format_row(row):
    """The table's line for ``row`` (a ``checks.CheckRow``); a failing row adds a second line
    with its worst entry: the index and both values."""
    op, backend, device, dtype, shape, err, tol = row[:7]
    ok = err <= tol
    line = (
        f"{op:18} {backend:8} {device:6} {dtype:9} {shape:14} {err:11.2e} {tol:9.0e}  "
        f"{'pass' if ok else 'FAIL'}"
    )
    comparison = getattr(row, "comparison", None)
    if not ok and comparison is not None:
        line += f"\n    {comparison}"
    return line


def run_checks(quick):
    """Every check of ``checks.CHECKS``, its rows printed as they come. Returns the rows and the
    count of failures (a check that raises is one failure and one line, not a traceback)."""
    failed, rows = 0, []
    for check in checks.CHECKS:
        try:
            found = check(quick=quick)
        except Exception as exc:  # noqa: BLE001 - a check that crashes is a failure to report
            failed += 1
            first = str(exc).splitlines()[0] if str(exc) else ""
            print(f"{check.__name__:18} ERROR: {type(exc).__name__}: {first}")
            continue
        for row in found:
            failed += not row[5] <= row[6]
            print(format_row(row))
        rows += found
    return rows, failed


def main(argv=None):
    try:
        s = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed its message
        return int(exc.code or 0)
    started = time.monotonic()
    problems = checks.install_problems()
    print("backends:")
    for status in backends().values():
        print(f"  {status}")
    if problems:
        for problem in problems:
            _error(problem)
        return 1
    print(f"\n{HEAD}\n{'-' * len(HEAD)}")
    rows, failed = run_checks(s.quick)
    print(
        f"\n({len(rows)} results in {time.monotonic() - started:.1f} s"
        f"{', --quick' if s.quick else ''})"
    )
    missing = checks.missing_gpu_rows(rows, torch.cuda.is_available())
    if missing:
        _error(
            f"no Triton result on cuda for {', '.join(missing)}: the GPU is not served by the "
            "kernels (see the backends above)"
        )
        return 1
    print(f"{'all checks passed' if not failed else f'{failed} checks FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
