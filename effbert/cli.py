"""The ``effbert`` command: ``effbert check`` (every op against the reference on this machine's backends) and
``effbert bench`` (the microbenchmark suite) and ``effbert demo`` (pretraining with TUPE and TNF, then batched
early exit, on a generated corpus)."""

import sys

COMMANDS = {
    "check": ("every op on this machine's backends against the float64 reference", "effbert.check"),
    "bench": ("the microbenchmark suite (see effbert bench --help)", "effbert.bench.runner"),
    "demo": ("pretrain a tiny TUPE-R BERT with TNF, then early exit (see effbert demo --help)", "effbert.demo"),
    "pretrain": ("masked-LM pretraining on your own text, with TNF (see effbert pretrain --help)", "effbert.pretrain"),
    "finetune": ("multi-exit classification on your data, then an early-exit report (see --help)", "effbert.finetune"),
}


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
