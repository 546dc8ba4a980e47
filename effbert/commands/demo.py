"""``effbert demo``: pretrain a tiny TUPE-R BERT with TNF, fine-tune multi-exit off-ramps, run
batched early exit.

Everything it needs is generated (no download); ``effbert.training.demo`` is the run. This module is
its command line: the settings (each flag's default and help, once) and their check before any work.
"""

import sys
from dataclasses import dataclass
from typing import Optional

from . import check_out_dir, parse_device, run_command
from .settings import option, parser, stderr_is_terminal


@dataclass
class DemoSettings:
    """What ``effbert demo`` is told."""

    out: str = option("effbert-demo", help="folder for the plot")
    quick: bool = option(False, help="a reduced size (seconds, for tests)")
    device: Optional[str] = option(None, help="cpu, cuda or cuda:N (default: cuda when available)")
    seed: int = option(0, help="seed of the generated corpus, the weights and the batches")
    quiet: bool = option(
        False, help="no progress bar (there is none when stderr is not a terminal)"
    )


def build_parser():
    """The ``effbert demo`` parser: ``parse_args`` returns a ``DemoSettings``."""
    return parser(
        DemoSettings,
        "effbert demo",
        "Pretrain a tiny TUPE-R BERT with TNF, fine-tune "
        "multi-exit off-ramps, run batched early exit.",
    )


def check(s):
    """Before minutes of training: a device this torch cannot use, an --out the plot cannot go
    to."""
    parse_device(s.device)
    check_out_dir(s.out)


def body(s, log):
    """The run (``effbert.training.demo.run``), with progress bars when a person watches."""
    from ..training import demo

    demo.run(
        s.out,
        quick=s.quick,
        device=s.device,
        seed=s.seed,
        quiet=s.quiet,
        progress=stderr_is_terminal(),
    )


def main(argv=None):
    return run_command("effbert demo", build_parser(), check, body, argv)


if __name__ == "__main__":
    sys.exit(main())
