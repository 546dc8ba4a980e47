"""Triton kernels.

Kernels only: no autograd, no argument checks. Every module lists the configurations its launchers can pick in
``COMPILE_SPECS`` so that ``python -m effbert.tools.compile_report`` can build each one ahead of time.
"""

import functools
import os

# The interpreter (no GPU) cannot autotune across several configs; launchers use this to pick one.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_arch(arch=None):
    """``arch`` when given, else the compute capability of the current CUDA device (the one Triton compiles and
    launches for) as an integer: 90 for sm_90 (H100 and H200 alike), 80 for sm_80. 80 without a CUDA device (the
    interpreter's configurations do not depend on it)."""
    if arch is not None:
        return arch
    if INTERPRET:
        return 80
    import torch

    if not torch.cuda.is_available():
        return 80
    return _capability(torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index):
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor
