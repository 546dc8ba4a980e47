"""What a run shows and keeps of its progress: :class:`RunLog`, a ``transformers.TrainerCallback``
that writes every logged step (training and evaluation) as a record of a JSON-lines file and prints
it as one line, above the progress bar when there is one (on a terminal), never through it;
:func:`quiet_libraries` keeps the libraries' own bars out of a log file."""

import json
import math
import os
import sys
import time

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

__all__ = ["RunLog", "LogOnlyBar", "make_checkpoint_readable", "quiet_libraries", "perplexity"]


def quiet_libraries():
    """No progress bars from datasets, transformers or huggingface_hub (a log file gets lines, never
    bars)."""
    import datasets
    import huggingface_hub.utils
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


class LogOnlyBar(ProgressCallback):
    """Trainer's tqdm bar without its per-log dict lines (the run prints its own lines above it)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return control


def make_checkpoint_readable(args, state):
    """Give ``checkpoint-<step>`` in ``args.output_dir`` mode 0644 files (safetensors writes 0600;
    every other file of a run is 0644); call from a callback's ``on_save``."""
    from .run_folder import make_readable

    ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
    if state.is_world_process_zero and os.path.isdir(ckpt):
        make_readable(ckpt)


class RunLog(TrainerCallback):
    """Trainer callback (it acts on the first process only): each checkpoint's files made 0644 as
    the run's other files (``run_folder.make_readable``); each training log (``loss``) becomes a
    record ``{"step", "loss", "lr", "seconds", ...keys}``, each evaluation (``eval_loss``) a record
    ``{"step", "eval_loss", "eval_perplexity"?, "seconds", ...}``, appended to ``path`` (JSON
    lines) and kept in ``records``.

    ``keys``: further training metrics copied when logged; ``describe(record) -> str``: text added
    to the printed line; ``show_bar``: a tqdm bar on stderr (:meth:`install` puts it in place of
    Trainer's printer and bar); ``last_step``: log the last step whatever ``logging_steps`` is.
    ``seconds`` count from ``t0`` (``time.perf_counter``; default: now). Raises ``ValueError`` for
    an empty ``path``, ``TypeError`` for a ``describe`` that is not callable."""

    def __init__(self, path, keys=(), describe=None, show_bar=False, t0=None, last_step=True):
        if not isinstance(path, str) or not path:
            raise ValueError(f"path must be a file path, got {path!r}")
        if describe is not None and not callable(describe):
            raise TypeError(f"describe must be callable, got {type(describe).__name__}")
        self.path, self.keys, self.describe, self.last_step = path, tuple(keys), describe, last_step
        self.t0 = time.perf_counter() if t0 is None else t0
        self.bar = LogOnlyBar() if show_bar else None
        self.records = []

    def install(self, trainer):
        """Put this log (and its bar) in place of Trainer's ``PrinterCallback`` and
        ``ProgressCallback``; returns ``trainer``."""
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(self)
        if self.bar is not None:
            trainer.add_callback(self.bar)
        return trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.last_step and state.global_step >= state.max_steps:
            control.should_log = True  # every rank logs the last step together
        return control

    def on_save(self, args, state, control, **kwargs):
        make_checkpoint_readable(args, state)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return control
        if "loss" in logs:
            record = {
                "step": state.global_step,
                "loss": logs["loss"],
                "lr": logs.get("learning_rate"),
            }
            record.update((k, logs[k]) for k in ("grad_norm",) + self.keys if k in logs)
            line = f"  step {record['step']:7d}  loss {record['loss']:.4f}  lr {record['lr']:.3g}"
        elif "eval_loss" in logs:
            record = {"step": state.global_step}
            record.update(
                (k, v)
                for k, v in logs.items()
                if k.startswith("eval_") and "runtime" not in k and "per_second" not in k
            )
            line = f"  step {record['step']:7d}  eval loss {record['eval_loss']:.4f}"
            if "eval_perplexity" in record:
                line += f"  perplexity {record['eval_perplexity']:.4g}"
        else:
            return control
        record["seconds"] = round(time.perf_counter() - self.t0, 3)
        if self.describe is not None:
            line += self.describe(record)
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.print(line)
        return control

    def print(self, line):
        """``line`` on stdout, above the bar when there is one."""
        if self.bar is not None and self.bar.training_bar is not None:
            self.bar.training_bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)


def perplexity(loss):
    """``exp(loss)`` of a mean cross-entropy in nats (inf past float range)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
