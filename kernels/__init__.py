"""Triton kernels (installed as ``effbert.kernels``).

Kernels only: no autograd, no argument checks. Every module lists the configurations its launchers can pick in
``COMPILE_SPECS`` so that ``python -m effbert.tools.compile_report`` can build each one ahead of time.
"""

import os

# The interpreter (no GPU) cannot autotune across several configs; launchers use this to pick one.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
