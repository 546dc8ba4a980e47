"""The microbenchmark suite's cases and runner (the command is ``effbert bench``, in
:mod:`effbert.commands.bench`), and the checks ``effbert check`` runs (``checks.py``).

Each op family contributes cases from its own module here (``early_exit.py`` ...); ``runner.py``
measures the device's ceilings, checks every provider against the reference, times, and writes JSON,
Markdown and plots; ``suite.py`` is the run of ``effbert bench``, one function a step.
"""
