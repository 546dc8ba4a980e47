"""Triton kernels.

Kernels only: no autograd, no argument checks. Every module lists the configurations its launchers can pick in
``COMPILE_SPECS`` so that ``python -m effbert.tools.compile_report`` can build each one ahead of time.
"""

import functools
import operator
import os

# The interpreter (no GPU) cannot autotune across several configs; launchers use this to pick one.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# CUDA's grid limit on axes 1 and 2 (y, z); axis 0 (x) takes 2**31 - 1.
MAX_GRID_YZ = 65535


def batch_chunks(batch, heads):
    """``[(b0, b1), ...]``: consecutive batch ranges covering ``range(batch)`` with ``(b1 - b0) * heads`` at most
    MAX_GRID_YZ, for the launchers whose grid puts batch * heads on axis 1 (the attention kernels keep the query
    block on axis 0, so that programs of one head run side by side and share its keys and values in L2): one launch
    per range, one range (one launch, as before) whenever ``batch * heads`` fits."""
    for name, value in (("batch", batch), ("heads", heads)):
        try:
            ok = operator.index(value) >= 0 and not isinstance(value, bool)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"batch_chunks: {name} must be a non-negative integer, got {value!r}")
    if heads > MAX_GRID_YZ:
        raise ValueError(
            f"batch_chunks: heads must be at most {MAX_GRID_YZ} (one grid row per head), got {heads}"
        )
    step = max(1, MAX_GRID_YZ // max(heads, 1))
    return [(b0, min(b0 + step, batch)) for b0 in range(0, batch, step)]


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
