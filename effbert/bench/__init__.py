"""The microbenchmark suite (``effbert bench`` / ``python -m effbert.bench``).

Each op family contributes cases from its own module here (``early_exit.py`` ...); ``runner.py`` measures the
device's ceilings, checks every provider against the reference, times, and writes JSON, Markdown and plots.
"""

from .runner import main

__all__ = ["main"]
