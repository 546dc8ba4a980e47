"""The ``effbert`` command: ``check`` (every op against the reference on this machine's backends), ``bench`` (the
microbenchmark suite), ``demo`` (pretraining with TUPE and TNF, then batched early exit, on a generated corpus),
``pretrain`` and ``finetune`` (the same on a user's own data); and what the commands share for their errors."""

import sys

COMMANDS = {
    "check": (
        "every op on this machine's backends against the float64 reference",
        "effbert.commands.check",
    ),
    "bench": ("the microbenchmark suite (see effbert bench --help)", "effbert.commands.bench"),
    "demo": (
        "pretrain a tiny TUPE-R BERT with TNF, then early exit (see effbert demo --help)",
        "effbert.commands.demo",
    ),
    "pretrain": (
        "masked-LM pretraining on your own text, with TNF (see effbert pretrain --help)",
        "effbert.commands.pretrain",
    ),
    "finetune": (
        "multi-exit classification on your data, then an early-exit report (see --help)",
        "effbert.commands.finetune",
    ),
}


# What a command needs besides torch and transformers: regular dependencies of effbert that an install can still lack
# (the GPU image has no datasets, and at times no accelerate, which transformers' Trainer needs).
NEEDS = {"pretrain": ("datasets", "accelerate"), "finetune": ("datasets", "accelerate")}


def missing_packages(command):
    """The packages ``NEEDS[command]`` names that are not installed, in that order."""
    import importlib.util

    return [name for name in NEEDS.get(command, ()) if importlib.util.find_spec(name) is None]


from ..training.run_folder import UsageError, parse_device  # noqa: E402,F401  (the training floor's)


def check_backend(backend, device, flag="--backend"):
    """An effbert op backend (or ``auto``) that can run on ``device``: available on this machine, and on the
    device's kind (cpu: CPU tensors; cuda: CUDA tensors; triton: CUDA tensors, or CPU ones under
    ``TRITON_INTERPRET=1``; eager: either)."""
    from ..ops import backends
    from ..ops import device_reasons

    if backend in (None, "auto"):
        return
    status = backends().get(backend)
    if status is None:
        raise UsageError(f"{flag} must be auto or one of {sorted(backends())}, got {backend!r}")
    if not status.available:
        raise UsageError(f"{flag} {backend} cannot run here: {status}")
    reasons = device_reasons(backend, device)
    if reasons:
        raise UsageError(
            f"{flag} {backend} does not run with --device {device}: {'; '.join(reasons)}"
        )


def check_out_dir(path, flag="--out"):
    """An output folder the command can make or write to, checked before any work: not an existing file, and
    its nearest existing folder writable."""
    import os

    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag}: {path!r} exists and is not a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag}: cannot make {path!r}: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot write to {parent!r} (permission denied)")


def run_command(prog, parser, check, body, argv):
    """Parse ``argv``, ``check(args)``, then ``body(args, log)``; a ``UsageError`` from either is one line on stderr
    and exit code 2 (its ``code``), never a traceback. Either may set ``args.run_folder`` (a locked
    ``run_folder.RunFolder``): ctrl-C then ends in its one line, and its lock is released at the end."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its message
        return int(exc.code or 0)
    except UsageError as exc:  # an old spelling (settings.RENAMED)
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    try:
        try:
            check(args)
            body(args, lambda msg: print(msg, flush=True))
        except KeyboardInterrupt as exc:  # ctrl-C, or SIGTERM while a run folder is held
            folder = getattr(args, "run_folder", None)
            if folder is None:
                raise
            raise folder.stopped(exc) from None
    except UsageError as exc:
        print(f"{prog}: {'error: ' if exc.code == 2 else ''}{exc}", file=sys.stderr, flush=True)
        return exc.code
    finally:
        folder = getattr(args, "run_folder", None)
        if folder is not None:
            folder.release()
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        from .. import __version__

        print(f"effbert {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: effbert [--version] {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (help_text, _) in COMMANDS.items():
            print(f"  {name:9} {help_text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\neffbert: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    missing = missing_packages(argv[0])
    if missing:
        print(
            f"effbert {argv[0]}: error: needs {' and '.join(missing)}, not installed here "
            f"(pip install {' '.join(missing)})",
            file=sys.stderr,
        )
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]][1]).main(argv[1:])
