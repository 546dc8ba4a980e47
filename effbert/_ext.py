"""Loading of the compiled extensions: ``effbert._C`` (C++ CPU) and ``effbert._cuda`` (CUDA C++).

Each is optional. A missing one is recorded with the reason, which the dispatcher reports to users.
"""

import importlib
from functools import lru_cache

import torch

# dtype codes understood by csrc (csrc/include/effbert/common.h holds the same table).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_HINTS = {
    "_C": "reinstall effbert (pip install -e .) with a C++ compiler available",
    "_cuda": "reinstall effbert on a machine with nvcc on the PATH (EFFBERT_FORCE_CUDA_BUILD=1 makes a failed CUDA "
    "build an error instead of a warning)",
}


@lru_cache(maxsize=None)
def load(name):
    """Return ``(module, None)`` or ``(None, reason)`` for ``name`` in {"_C", "_cuda"}."""
    try:
        return importlib.import_module(f"effbert.{name}"), None
    except ImportError as exc:  # not built, or built against another CUDA/Python
        return None, f"effbert.{name} is not available ({exc}); {_HINTS[name]}"


def dtype_code(dtype):
    return DTYPE_CODES[dtype]


def launch(name, entry, device, *args):
    """Call ``entry`` of the extension ``name`` ("_C" or "_cuda") with ``args``. The CUDA bindings take the stream
    last: on "_cuda" the call runs under ``device``'s guard with its current stream appended. The CPU bindings take
    the thread count last: on "_C" it is ``torch.get_num_threads()``, so the C++ kernels use the threads torch is
    allowed (``torch.set_num_threads``, ``OMP_NUM_THREADS``), not every hardware thread of a shared machine."""
    module, why = load(name)
    if module is None:
        raise RuntimeError(why)
    if name == "_cuda":
        with torch.cuda.device(device):
            return getattr(module, entry)(*args, torch.cuda.current_stream(device).cuda_stream)
    return getattr(module, entry)(*args, torch.get_num_threads())
