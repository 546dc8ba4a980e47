"""One rule for "an output against its reference", used by the tests, ``effbert check`` and the
bench.

The reference runs in float64. The error is the relative norm error over the entries where the
reference is finite (``||out - ref|| / ||ref||``, in float64); the non-finite entries must agree
(NaN where the reference has NaN, the same infinity where it has one), or the error is infinite. The
bound is ``rtol``, or, for a low-precision output (fp16/bf16), twice the error of the eager
reference run in that same precision plus ``rtol`` (DESIGN.md, "Conventions": a kernel may round
differently, but not be worse than the framework computing the same thing in the same dtype). A
failure names the worst entry, its index and both values, as Liger-Kernel's
``assert_verbose_allclose`` does."""

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Comparison", "relative_error", "compare", "assert_close"]


def _as64(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must be a real tensor, got {str(t.dtype).replace('torch.', '')}")
    return t.detach().to("cpu", torch.float64)


def _pair(out, ref):
    out64, ref64 = _as64("out", out), _as64("ref", ref)
    if out64.shape != ref64.shape:
        raise ValueError(
            f"out must have the reference's shape {tuple(ref64.shape)}, got {tuple(out64.shape)}"
        )
    return out64, ref64


def _nonfinite_mismatch(out64, ref64):
    """Where the non-finite entries disagree (a bool tensor)."""
    finite = torch.isfinite(ref64)
    same = (out64 == ref64) | (torch.isnan(out64) & torch.isnan(ref64))
    return ~finite & ~same | (finite & ~torch.isfinite(out64))


def _error(out64, ref64):
    if bool(_nonfinite_mismatch(out64, ref64).any()):
        return float("inf")
    finite = torch.isfinite(ref64)
    if not bool(finite.any()):
        return 0.0
    diff = (out64[finite] - ref64[finite]).norm()
    return float(diff / ref64[finite].norm().clamp_min(1e-30))


def relative_error(out, ref):
    """``||out - ref|| / ||ref||`` in float64 over the entries where ``ref`` is finite; ``inf``
    where the non-finite entries disagree; 0.0 for empty tensors. ``out`` and ``ref``: tensors of
    one shape, any real dtype and device. Raises ``TypeError`` for a non-tensor or complex argument,
    ``ValueError`` for differing shapes."""
    return _error(*_pair(out, ref))


@dataclass(frozen=True)
class Comparison:
    """One output against its reference: the relative ``error``, the ``bound`` it is held to, and
    the worst entry (``index``, the output's value ``got`` and the reference's ``want``; ``index``
    is None for empty tensors)."""

    what: str
    error: float
    bound: float
    index: Optional[tuple]
    got: float
    want: float

    @property
    def ok(self):
        return self.error <= self.bound

    def __str__(self):
        verdict = "<=" if self.ok else ">"
        text = f"{self.what}: relative error {self.error:.3e} {verdict} {self.bound:.3e}"
        if self.index is not None:
            text += (
                f"; worst at index {list(self.index)}: got {self.got!r}, reference {self.want!r}"
            )
        return text


def _worst(out64, ref64):
    if out64.numel() == 0:
        return None, float("nan"), float("nan")
    mismatch = _nonfinite_mismatch(out64, ref64)
    if bool(mismatch.any()):
        flat = int(torch.nonzero(mismatch.flatten())[0])
    else:
        gap = (out64 - ref64).abs()
        gap = torch.where(torch.isfinite(ref64), gap, torch.zeros_like(gap))
        flat = int(gap.flatten().argmax())
    index = ()
    if out64.dim():
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), out64.shape))
    return index, float(out64.flatten()[flat]), float(ref64.flatten()[flat])


def compare(out, ref, *, rtol, lowp_eager=None, what="output"):
    """``out`` against the float64 reference ``ref`` (same shape; the module's rule): a
    `Comparison`.

    ``rtol``: the bound on the relative error (a float >= 0). ``lowp_eager``: the eager reference
    run in the output's own low precision, for fp16/bf16 outputs; the bound is then ``2 *
    relative_error(lowp_eager, ref) + rtol``. ``what`` names the output in the message. Raises
    ``ValueError``/``TypeError`` naming the argument."""
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol >= 0:
        raise ValueError(f"rtol must be a number >= 0, got {rtol!r}")
    if not isinstance(what, str):
        raise TypeError(f"what must be a str, got {type(what).__name__}")
    out64, ref64 = _pair(out, ref)
    bound = float(rtol)
    if lowp_eager is not None:
        if tuple(lowp_eager.shape) != tuple(ref64.shape):
            raise ValueError(
                f"lowp_eager must have the reference's shape "
                f"{tuple(ref64.shape)}, got {tuple(lowp_eager.shape)}"
            )
        bound += 2 * relative_error(lowp_eager, ref64)
    index, got, want = _worst(out64, ref64)
    return Comparison(what, _error(out64, ref64), bound, index, got, want)


def assert_close(out, ref, *, rtol, lowp_eager=None, what="output"):
    """`compare`, raising ``AssertionError`` with its message (the error, the bound, the worst index
    and both
    values) when the error exceeds the bound; returns the relative error otherwise."""
    result = compare(out, ref, rtol=rtol, lowp_eager=lowp_eager, what=what)
    if not result.ok:
        raise AssertionError(str(result))
    return result.error
