"""The training floor, below the commands: ``transformers.Trainer`` subclasses for pretraining and multi-exit
fine-tuning (``trainers``), adversarial fine-tuning as a Trainer mixin (``adversarial``: FGM, PGD,
FreeLB), the run folder both commands write (``run_folder``), their log and progress bar
(``progress.RunLog``) and ``effbert pretrain``'s run, step by step (``pretrain.run``).

Importing this package is light: the trainers (which import ``transformers.Trainer`` and with it ``accelerate``) load
on first use, so ``effbert check`` and ``effbert bench`` run where ``accelerate`` is not installed.
"""

_TRAINERS = (
    "PretrainingTrainer",
    "StopOnNonFinite",
    "NonFiniteError",
    "MC_METRICS",
    "MultiExitTrainer",
    "EXIT_LOSSES",
)
_ADVERSARIAL = (
    "AdversarialConfig",
    "AdversarialTrainingMixin",
    "with_adversarial",
    "ADVERSARIAL_METHODS",
)

__all__ = list(_TRAINERS + _ADVERSARIAL)


def __getattr__(name):
    if name in _TRAINERS:
        from . import trainers

        return getattr(trainers, name)
    if name in _ADVERSARIAL:
        from . import adversarial

        return getattr(adversarial, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
