"""What the commands share about their command lines: settings dataclasses parsed by transformers'
``HfArgumentParser`` (each field's default and help written once), one flag vocabulary (``transformers.
TrainingArguments``' names wherever Trainer has the concept), old spellings refused with a one-line hint, and the
one-line form of an error.

A command declares ``@dataclass class Settings`` with fields made by :func:`option`; :func:`parser` builds its
``argparse`` parser (``--learning-rate`` and ``--learning_rate`` both parse, as in transformers' examples) whose
``parse_args`` returns a ``Settings`` instance, so ``run_command`` wires it as it wires any parser.
"""

import argparse
import dataclasses
import sys

from transformers import HfArgumentParser

from ..training.run_folder import UsageError, fail_if, one_line, stderr_is_terminal  # noqa: F401

# The one vocabulary (docs/commands.md has the table): old spellings, and what replaced each.
RENAMED = {
    "--lr": "--learning-rate",
    "--steps": "--max-steps",
    "--epochs": "--num-train-epochs",
    "--grad-accum": "--gradient-accumulation-steps",
    "--warmup": "--warmup-steps (a count) or --warmup-ratio (a share of the steps)",
    "--save-every": "--save-steps",
    "--log-every": "--logging-steps",
    "--eval-batch-size": "--per-device-eval-batch-size",
    "--max-len": "--max-seq-length",
}


def option(default=dataclasses.MISSING, help=None, **argparse_kwargs):
    """A settings field: its default and its ``--help`` line, once (``metavar``, ``choices``, ``nargs``, ``aliases``
    and other ``argparse`` keywords pass through)."""
    metadata = dict(argparse_kwargs)
    if help is not None:
        metadata["help"] = help
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def refuse_renamed(argv, renamed=RENAMED):
    """Raise ``UsageError`` for the first old spelling in ``argv`` (``--lr 1e-4`` or ``--lr=1e-4``), naming the new
    one."""
    for arg in argv:
        if arg == "--":
            break
        flag = arg.split("=", 1)[0]
        if flag in renamed:
            raise UsageError(f"{flag} is now {renamed[flag]}")


class _HelpFormatter(argparse.HelpFormatter):
    """``--help`` as a user reads it: the dashed spelling first, a switch without a value placeholder, and a default
    shown once (only where there is one to show and the help line does not already say it)."""

    def _format_action_invocation(self, action):
        if getattr(action, "is_switch", False):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)

    def _format_args(self, action, default_metavar):
        return (
            ""
            if getattr(action, "is_switch", False)
            else super()._format_args(action, default_metavar)
        )

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default  # by identity: 1 == True and 0 == False, but 1 and 0 are shown
        shown = not (
            default is None
            or default is True
            or default is False
            or default in (argparse.SUPPRESS, dataclasses.MISSING, [])
        )
        if shown and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


class SettingsParser(HfArgumentParser):
    """``HfArgumentParser`` for one settings dataclass: ``parse_args`` returns its instance, after refusing the old
    spellings (one line on stderr and ``SystemExit(2)``, as argparse does for its own errors)."""

    def __init__(self, settings_class, prog, description, renamed=RENAMED):
        super().__init__(
            settings_class,
            prog=prog,
            description=description,
            allow_abbrev=False,
            formatter_class=_HelpFormatter,
        )
        for action in self._actions:
            # the dashed spelling first (both parse), and bool fields shown as plain switches
            action.option_strings.sort(key=lambda flag: ("_" in flag, flag.startswith("--no")))
            action.is_switch = action.nargs == "?" and action.const is True
        self._settings_class = settings_class
        self._renamed = renamed

    def parse_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            refuse_renamed(argv, self._renamed)
        except UsageError as exc:  # argparse's way for a command line's mistake: one line, exit 2
            self.exit(exc.code, f"{self.prog}: error: {exc}\n")
        settings, rest = self.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False, return_remaining_strings=True
        )
        if rest:  # argparse's own message and exit code 2, not HfArgumentParser's ValueError
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        return settings


def parser(settings_class, prog, description, renamed=RENAMED):
    """The command-line parser of ``settings_class`` (a dataclass of :func:`option` fields)."""
    return SettingsParser(settings_class, prog, description, renamed)
