"""Early-exit ops: ``exit_entropy`` (the DeeBERT / RomeBERT exit criterion)."""

import torch

from .. import _ext
from .. import reference
from ._checks import FLOAT_DTYPES, check_tensor
from ._dispatch import default_preference, direct_call_ok, requested_backend, select_backend

__all__ = ["exit_entropy"]

_KERNEL_DTYPES = FLOAT_DTYPES


def _entropy_reasons(logits):
    def reasons(name):
        if name != "eager" and logits.dtype not in _KERNEL_DTYPES:
            return [f"{name} kernels take fp32/fp16/bf16 logits, got {str(logits.dtype).replace('torch.', '')}"]
        return []

    return reasons


def _entropy_eager(x, out):
    out.copy_(reference.exit_entropy(x))


def _entropy_triton(x, out):
    from ..kernels import early_exit as kernels

    kernels.exit_entropy(x, out)


def _entropy_native(x, out, module_name):
    module, _ = _ext.load(module_name)
    rows, cols = x.shape
    args = (x.data_ptr(), _ext.dtype_code(x.dtype), rows, cols, x.stride(0), out.data_ptr())
    if module_name == "_cuda":
        with torch.cuda.device(x.device):
            module.exit_entropy(*args, torch.cuda.current_stream(x.device).cuda_stream)
    else:
        module.exit_entropy(*args)


# Each writes entropy(x) into a float32 `out` of x.shape[0] elements on x's device.
_ENTROPY_INTO = {
    "eager": _entropy_eager,
    "triton": _entropy_triton,
    "cpu": lambda x, out: _entropy_native(x, out, "_C"),
    "cuda": lambda x, out: _entropy_native(x, out, "_cuda"),
}


def entropy_into(backend, logits, out):
    """Run one concrete backend into a caller-provided float32 ``out`` (tests poison it first)."""
    # Kernels take a row stride and unit column stride; broadcast or transposed layouts are copied once.
    rows, cols = logits.shape
    plain = logits.stride(-1) == 1 and (rows <= 1 or logits.stride(0) >= cols)
    x = logits if plain else logits.contiguous()
    _ENTROPY_INTO[backend](x, out)
    return out


def entropy_backend(logits, backend="auto"):
    """The backend that ``exit_entropy(logits, backend=backend)`` would run (raises if none can serve)."""
    return select_backend("exit_entropy", backend, logits.device, _entropy_reasons(logits), default_preference)


def _exit_entropy_impl(logits, backend):
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    return entropy_into(entropy_backend(logits, backend), logits, out)


@torch.library.custom_op("effbert::exit_entropy", mutates_args=())
def _exit_entropy_op(logits: torch.Tensor, backend: str) -> torch.Tensor:
    return _exit_entropy_impl(logits, backend)


@_exit_entropy_op.register_fake
def _(logits, backend):
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


def _entropy_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)


def _entropy_backward(ctx, grad):
    # dH/dz_k = -p_k (log p_k + H); classes with p_k = 0 (z_k = -inf) get no gradient.
    logits, entropy = ctx.saved_tensors
    logp = torch.log_softmax(logits.float(), dim=-1)
    term = logp.exp() * (logp + entropy.unsqueeze(-1))
    term = torch.where(logp == float("-inf"), torch.zeros_like(term), term)
    return (-grad.unsqueeze(-1) * term).to(logits.dtype), None


_exit_entropy_op.register_autograd(_entropy_backward, setup_context=_entropy_setup_context)


def exit_entropy(logits, *, backend="auto"):
    """Entropy of ``softmax(logits)`` per row, natural log, as float32 ``[B]``.

    ``logits``: ``[B, C]`` float tensor (fp32, fp16, bf16; float64 on the eager backend), ``C >= 1``, any ``B``.
    Stable for logits of any magnitude; a row holding NaN gives NaN. Differentiable.
    """
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,), shape_hint="[B, C]")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one class (C >= 1), got shape {tuple(logits.shape)}")
    requested_backend(backend)  # reject a bad name here, with the argument's name, before tracing
    if direct_call_ok(logits):
        return _exit_entropy_impl(logits, backend)
    return torch.ops.effbert.exit_entropy(logits, backend)
