"""Tolerances and backend cases shared by the op tests (DESIGN.md, "Conventions")."""

import pytest
import torch

import effbert
from effbert import _ext
from effbert.reference import compare
from effbert.ops._dispatch import OPS

ON_GPU = torch.cuda.is_available()
# fp32 kernels: 1e-5 relative error under the interpreter / on the CPU, 1e-4 on the GPU.
FP32_RTOL = 1e-4 if ON_GPU else 1e-5
POISON = float("nan")


def assert_close(out, ref, *, rtol=None, lowp_eager=None, what="output"):
    """`out` against a float64 `ref` by the one rule of ``effbert.reference.compare``: within `rtol`
    (fp32 default), or within 2x the error of the eager reference run in the same low precision
    (`lowp_eager`) plus `rtol`, as DESIGN.md says for fp16/bf16. Returns the relative error."""
    return compare.assert_close(out, ref, rtol=rtol or FP32_RTOL, lowp_eager=lowp_eager, what=what)


def backend_cases(op=None):
    """(backend, device) pairs that can run on this machine, as pytest params; GPU-only ones carry
    the gpu mark. ``op``: only the backends that op declares (``effbert.ops._dispatch.OPS``), so
    that a test's matrix follows the op's declaration instead of restating it."""
    cases = [pytest.param("eager", "cpu", id="eager-cpu")]
    if _ext.load("_C")[0] is not None:
        cases.append(pytest.param("cpu", "cpu", id="cpu"))
    cases.append(
        pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu)
        if ON_GPU
        else pytest.param("triton", "cpu", id="triton-interpreter")
    )
    cases.append(
        pytest.param("cuda", "cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.cuda_ext])
    )
    cases.append(pytest.param("eager", "cuda", id="eager-cuda", marks=pytest.mark.gpu))
    if op is not None:
        declared = OPS[op].backends
        cases = [case for case in cases if case.values[0] in declared]
    return cases


def require_backend(backend, device):
    """Inside a test: fail loudly if a backend that should exist on this machine does not."""
    status = effbert.backends()[backend]
    assert status.available, f"backend {backend} should run here for device {device}: {status}"
