"""The ``effbert`` command: ``check`` (every op against the reference on this machine's backends), ``bench`` (the
microbenchmark suite), ``demo`` (pretraining with TUPE and TNF, then batched early exit, on a generated corpus),
``pretrain`` and ``finetune`` (the same on a user's own data); and what the commands share for their errors."""

import sys

COMMANDS = {
    "check": ("every op on this machine's backends against the float64 reference", "effbert.check"),
    "bench": ("the microbenchmark suite (see effbert bench --help)", "effbert.bench.runner"),
    "demo": ("pretrain a tiny TUPE-R BERT with TNF, then early exit (see effbert demo --help)", "effbert.demo"),
    "pretrain": ("masked-LM pretraining on your own text, with TNF (see effbert pretrain --help)", "effbert.pretrain"),
    "finetune": ("multi-exit classification on your data, then an early-exit report (see --help)", "effbert.finetune"),
}


class UsageError(Exception):
    """A mistake in a command line or in the files it names: reported in one line, exit code 2."""


def run_command(prog, parser, check, body, argv):
    """Parse ``argv``, ``check(args)``, then ``body(args, log)``; a ``UsageError`` from either is one line on stderr
    and exit code 2, never a traceback."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its message
        return int(exc.code or 0)
    try:
        check(args)
        body(args, lambda msg: print(msg, flush=True))
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: effbert {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (help_text, _) in COMMANDS.items():
            print(f"  {name:9} {help_text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\neffbert: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]][1]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
