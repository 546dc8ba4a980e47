"""Tolerances and backend cases shared by the op tests (DESIGN.md, "Conventions")."""

import pytest
import torch

import effbert
from effbert import _ext

ON_GPU = torch.cuda.is_available()
# fp32 kernels: 1e-5 relative error under the interpreter / on the CPU, 1e-4 on the GPU.
FP32_RTOL = 1e-4 if ON_GPU else 1e-5
POISON = float("nan")


def rel_error(out, ref):
    """||out - ref|| / ||ref|| over the entries where ref is finite, in float64; NaN positions must agree."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    nan_out, nan_ref = torch.isnan(out64), torch.isnan(ref64)
    assert torch.equal(nan_out, nan_ref), (
        f"NaN pattern differs: {int(nan_out.sum())} NaN in output, {int(nan_ref.sum())} in reference "
        f"(first mismatch at {torch.nonzero(nan_out != nan_ref)[0].tolist()})"
    )
    keep = ~nan_ref
    diff = (out64[keep] - ref64[keep]).norm()
    return float(diff / ref64[keep].norm().clamp_min(1e-30)) if keep.any() else 0.0


def assert_close(out, ref, *, rtol=None, lowp_eager=None, what="output"):
    """`out` against a float64 `ref`: within `rtol` (fp32 default), or within 2x the error of the eager reference
    run in the same low precision (`lowp_eager`), as DESIGN.md says for fp16/bf16."""
    err = rel_error(out, ref)
    if lowp_eager is not None:
        bound = 2 * rel_error(lowp_eager, ref) + (rtol or FP32_RTOL)
    else:
        bound = rtol or FP32_RTOL
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e}"
    return err


def backend_cases():
    """(backend, device) pairs that can run on this machine, as pytest params; GPU-only ones carry the gpu mark."""
    cases = [pytest.param("eager", "cpu", id="eager-cpu")]
    if _ext.load("_C")[0] is not None:
        cases.append(pytest.param("cpu", "cpu", id="cpu"))
    cases.append(
        pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu)
        if ON_GPU
        else pytest.param("triton", "cpu", id="triton-interpreter")
    )
    cases.append(pytest.param("cuda", "cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.cuda_ext]))
    cases.append(pytest.param("eager", "cuda", id="eager-cuda", marks=pytest.mark.gpu))
    return cases


def require_backend(backend, device):
    """Inside a test: fail loudly if a backend that should exist on this machine does not."""
    status = effbert.backends()[backend]
    assert status.available, f"backend {backend} should run here for device {device}: {status}"
