"""Argument checks shared by the public ops: each error names the argument and what was expected."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name, value, *, ndim=None, dtypes=None, shape_hint=""):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(
            f"{name} must have {ndim} dimensions{hint}, got shape {tuple(value.shape)}"
        )
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(
            f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}"
        )
    return value


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def as_bool_attention_mask(attention_mask, shape, device):
    """``attention_mask [B, N]`` (bool, or 0/1 integers; True/1 = real token, as transformers and flash-attn's
    padding helpers) as a bool tensor, or None. A float mask (an additive bias, or weights) is refused rather than
    guessed at. Raises ``TypeError``/``ValueError`` naming ``attention_mask``."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}"
        )
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(
            f"attention_mask must be bool or 0/1 integers (True/1 = real token), got "
            f"{str(attention_mask.dtype).replace('torch.', '')}: a float mask is ambiguous (additive "
            "bias or weights)"
        )
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask must be [B, N] = {list(shape)}, got {list(attention_mask.shape)}"
        )
    if attention_mask.device != device:
        raise ValueError(f"attention_mask must be on {device}, got {attention_mask.device}")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if (
        not torch.compiler.is_compiling()
        and attention_mask.numel()
        and not bool(((attention_mask == 0) | (attention_mask == 1)).all())
    ):
        raise ValueError("attention_mask must hold 0/1 values (1 = real token)")
    return attention_mask != 0


def check_offsets(
    name, offsets, total, *, what, exact=True, max_seqlen=None, max_name="max_seqlen"
):
    """Check cumulative sequence offsets on the host (one small device-to-host copy) and return them as a list.

    They must start at 0 and never decrease; end at ``total`` (``exact``) or at most there (rows after the last
    offset then belong to no sequence); and, when ``max_seqlen`` is given, no sequence may be longer. ``what`` names
    ``total`` and its value in the error message (e.g. "the packed length 15 (q.shape[0])")."""
    cu = offsets.tolist()
    shown = f"{cu[:8]}{'...' if len(cu) > 8 else ''}"
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"{name} must start at 0 and never decrease, got {shown}")
    if cu[-1] > total or (exact and cu[-1] != total):
        bound = "at" if exact else "at most at"
        raise ValueError(f"{name} must end {bound} {what}, got {cu[-1]}")
    if max_seqlen is not None:
        longest = max(b - a for a, b in zip(cu, cu[1:]))
        if longest > max_seqlen:
            raise ValueError(
                f"{max_name} must be >= the longest sequence ({longest}), got {max_seqlen}"
            )
    return cu
