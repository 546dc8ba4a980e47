"""TUPE attention: ``tupe_attention`` (padded) and ``tupe_attention_varlen`` (packed), DESIGN.md "TUPE".

The Triton backend runs one fused forward kernel and two backward kernels (no atomics: every gradient is bitwise
reproducible, ``deterministic`` or not); the eager backend is the reference under torch autograd. Both are
registered so that ``torch.compile(fullgraph=True)`` traces them without a graph break.
"""

import math
from dataclasses import replace
from typing import List, Optional

import torch

from .. import reference
from . import _attention_cpu
from .checks import (
    FLOAT_DTYPES,
    as_bool_attention_mask,
    check_offsets,
    check_same_device,
    check_tensor,
)
from ..kernels import MAX_GRID_YZ  # the package's constants only: no Triton import here
from ._dispatch import Inputs, Support, cached_selection, declare, direct_call_ok, select_backend

__all__ = ["tupe_attention", "tupe_attention_varlen", "tupe_attention_varlen_subset", "HEAD_DIMS"]

HEAD_DIMS = (16, 32, 64, 128)  # the head dims the Triton kernels are built for


CPU_DTYPES = (torch.float32, torch.float64)  # the CPU path's dtypes with autograd
CPU_INFERENCE_DTYPES = CPU_DTYPES + (torch.bfloat16,)  # ... and in inference (no gradient wanted)

_TRITON = Support(
    dtypes=FLOAT_DTYPES,
    head_dims=HEAD_DIMS,
    takes="Triton kernels take",
    # fp64 under the interpreter for gradcheck; the interpreter computes bf16 dot products wrongly
    interpreter_dtypes=(torch.float32, torch.float16, torch.float64),
    limits={
        "heads": (
            MAX_GRID_YZ,
            "Triton kernels take at most {limit} heads (a grid axis of one "
            "row per head), got {value}",
        )
    },
)
_PREFERENCE = {"cuda": ("triton", "eager"), "cpu": ("cpu", "eager")}
# the CPU path: PyTorch's fused CPU attention per sequence (_attention_cpu)
declare(
    "tupe_attention",
    {
        "triton": _TRITON,
        "cpu": Support(
            dtypes=CPU_INFERENCE_DTYPES,
            grad_dtypes=CPU_DTYPES,
            takes="the CPU path takes",
            why="bf16 in inference only: pos_bias gradients would accumulate in bf16",
        ),
        "eager": Support(),
    },
    _PREFERENCE,
    absent="no {backend} kernel for {op} (Triton on CUDA)",
)
# forward only: the op refuses inputs that need grad
declare(
    "tupe_attention_varlen_subset",
    {
        "triton": replace(_TRITON, supports_backward=False),
        "cpu": Support(
            dtypes=CPU_INFERENCE_DTYPES, supports_backward=False, takes="the CPU path takes"
        ),
        "eager": Support(),
    },
    _PREFERENCE,
    absent="no {backend} kernel for {op} (Triton on CUDA)",
)


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _inputs(q, wants_grad):
    return Inputs(
        q.device,
        (("q", q.dtype),),
        {"head_dim": q.shape[-1], "heads": q.shape[-2] if q.dim() >= 3 else 0},
        wants_grad,
    )


def attention_backend(q, backend="auto", wants_grad=None):
    """The backend ``tupe_attention`` would run for ``q`` (raises `BackendNotSupportedError` if none
    can serve);
    ``wants_grad``: whether the call builds a graph (None: ``q`` alone decides)."""
    if wants_grad is None:
        wants_grad = _wants_grad(q)
    heads = q.shape[-2] if q.dim() >= 3 else 0
    key = (q.device, q.dtype, wants_grad, q.shape[-1] if q.dim() else None, heads > MAX_GRID_YZ)
    return cached_selection("tupe_attention", backend, key, lambda: _inputs(q, wants_grad))


def _draw_seed(device):
    """A Philox seed from torch's generator of ``device``: ``torch.manual_seed`` reproduces the dropout mask."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def dropout_keep_mask(seed, batch, heads, seq_len, dropout_p):
    """The keep-mask ``[B, H, N, N]`` the Triton kernels draw from ``seed`` (for tests and for checking a run)."""
    from ..kernels import tupe_attention as kernels

    return kernels.dropout_keep_mask(seed, batch, heads, seq_len, dropout_p, seed.device)


# --- the Triton path: a forward op and a backward op, tied together by register_autograd ------------------------


def _tokens(q, cu_seqlens):
    return q.shape[0] if cu_seqlens is not None else q.shape[0] * q.shape[1]


def _forward_triton(
    q, k, v, pos_bias, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed
):
    from ..kernels import tupe_attention as kernels

    heads = q.shape[-2]
    batch = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else q.shape[0]
    seq_len = max_seqlen if cu_seqlens is not None else q.shape[1]
    # packed rows after cu_seqlens[-1] belong to no sequence: no program writes them, so they start at 0 (+inf
    # log-sum-exp: a backward that reads them sees probability 0)
    if cu_seqlens is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(heads, _tokens(q, cu_seqlens), dtype=torch.float32, device=q.device)
    else:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((heads, q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    if out.numel():
        kernels.attention_forward(
            q,
            k,
            v,
            pos_bias,
            attention_mask,
            cu_seqlens,
            seed,
            out,
            lse,
            batch=batch,
            seq_len=seq_len,
            scale=scale,
            dropout_p=dropout_p,
        )
    return out, lse


def _backward_triton(
    dout,
    q,
    k,
    v,
    out,
    lse,
    pos_bias,
    attention_mask,
    cu_seqlens,
    max_seqlen,
    scale,
    dropout_p,
    seed,
    bias_grad,
):
    from ..kernels import tupe_attention as kernels

    heads = q.shape[-2]
    batch = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else q.shape[0]
    seq_len = max_seqlen if cu_seqlens is not None else q.shape[1]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    if attention_mask is not None:
        # padded positions' q, k and v meet zero weights inside the backward's products (0 * inf is NaN): zero them
        pad = ~attention_mask[:, :, None, None]
        q, k, v = q.masked_fill(pad, 0), k.masked_fill(pad, 0), v.masked_fill(pad, 0)
    # delta[h, token] = <dO, O> of each query row: the softmax backward's row term
    delta = (dout.float() * out.float()).sum(-1).reshape(-1, heads).t().contiguous()
    alloc = (
        torch.empty if cu_seqlens is None else torch.zeros
    )  # packed rows in no sequence get a zero gradient
    dq, dk, dv = (alloc(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    dbias_groups = None
    if bias_grad:
        cfg = kernels.dq_config(
            q.shape[-1], kernels._DTYPE_NAME[str(q.dtype)], cu_seqlens is not None
        )
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        # on the CPU (interpreter) two groups exercise the same summation the GPU does
        groups = (
            kernels.bias_grad_groups(batch, heads, seq_len, cfg["BLOCK_M"], sms)
            if q.is_cuda
            else min(batch, 2)
        )
        dbias_groups = torch.zeros(
            max(groups, 1), *pos_bias.shape, dtype=torch.float32, device=q.device
        )
    if q.numel():
        kernels.attention_backward(
            q,
            k,
            v,
            pos_bias,
            attention_mask,
            cu_seqlens,
            seed,
            dout,
            kernels.lse_log2(lse),
            delta,
            dq,
            dk,
            dv,
            dbias_groups,
            batch=batch,
            seq_len=seq_len,
            scale=scale,
            dropout_p=dropout_p,
        )
    else:
        dq.zero_(), dk.zero_(), dv.zero_()
    if dbias_groups is None:
        dbias = q.new_empty(0, dtype=torch.float32)
    else:  # the groups' partial sums, added in group order
        dbias = dbias_groups[0] if dbias_groups.shape[0] == 1 else dbias_groups.sum(0)
    return [dq, dk, dv, dbias]


@torch.library.custom_op("effbert::tupe_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_bias: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    max_seqlen: int,
    scale: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
) -> List[torch.Tensor]:
    # the op can be called directly (torch.ops.effbert.tupe_attention) and runs with real tensors under
    # torch.compile: the kernels trust these arguments for their addresses, so they are checked here too
    _check_op_args(
        q, k, v, pos_bias, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed
    )
    return list(
        _forward_triton(
            q, k, v, pos_bias, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed
        )
    )


@_attention_op.register_fake
def _(q, k, v, pos_bias, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed):
    tokens = q.shape[0] if cu_seqlens is not None else q.shape[0] * q.shape[1]
    return [
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty((q.shape[-2], tokens), dtype=torch.float32),
    ]


@torch.library.custom_op("effbert::tupe_attention_backward", mutates_args=())
def _attention_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pos_bias: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    max_seqlen: int,
    scale: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    bias_grad: bool,
) -> List[torch.Tensor]:
    _check_op_args(
        q,
        k,
        v,
        pos_bias,
        attention_mask,
        cu_seqlens,
        max_seqlen,
        scale,
        dropout_p,
        seed,
        values=False,
    )  # the kernels bound packed offsets themselves: no device round trip here
    tokens = _tokens(q, cu_seqlens)
    for name, t, shape in (
        ("dout", dout, tuple(q.shape)),
        ("out", out, tuple(q.shape)),
        ("lse", lse, (q.shape[-2], tokens)),
    ):
        check_tensor(name, t, dtypes=(q.dtype,) if name != "lse" else (torch.float32,))
        if tuple(t.shape) != shape or t.device != q.device:
            raise ValueError(
                f"{name} must be {list(shape)} on {q.device}, got {tuple(t.shape)} on {t.device}"
            )
    if bias_grad and pos_bias is None:
        raise ValueError("bias_grad needs pos_bias")
    return _backward_triton(
        dout,
        q,
        k,
        v,
        out,
        lse,
        pos_bias,
        attention_mask,
        cu_seqlens,
        max_seqlen,
        scale,
        dropout_p,
        seed,
        bias_grad,
    )


@_attention_bwd_op.register_fake
def _(
    dout,
    q,
    k,
    v,
    out,
    lse,
    pos_bias,
    attention_mask,
    cu_seqlens,
    max_seqlen,
    scale,
    dropout_p,
    seed,
    bias_grad,
):
    dbias = (
        pos_bias.new_empty(pos_bias.shape, dtype=torch.float32)
        if bias_grad
        else q.new_empty(0, dtype=torch.float32)
    )
    return [
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        dbias,
    ]


def _setup_context(ctx, inputs, output):
    q, k, v, pos_bias, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, pos_bias, attention_mask, cu_seqlens, seed)
    ctx.max_seqlen, ctx.scale, ctx.dropout_p = max_seqlen, scale, dropout_p
    ctx.bias_grad = pos_bias is not None and ctx.needs_input_grad[3]
    ctx.bias_dtype = pos_bias.dtype if pos_bias is not None else None
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grads):
    dout = grads[0]  # the log-sum-exp output is not differentiable
    q, k, v, out, lse, pos_bias, attention_mask, cu_seqlens, seed = ctx.saved_tensors
    dq, dk, dv, dbias = torch.ops.effbert.tupe_attention_backward(
        dout,
        q,
        k,
        v,
        out,
        lse,
        pos_bias,
        attention_mask,
        cu_seqlens,
        ctx.max_seqlen,
        ctx.scale,
        ctx.dropout_p,
        seed,
        ctx.bias_grad,
    )
    dbias = dbias.to(ctx.bias_dtype) if ctx.bias_grad else None
    return dq, dk, dv, dbias, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --- argument checks and the public functions --------------------------------------------------------------------


def _check_common(q, k, v, pos_bias, scale, dropout_p, deterministic, layout, bias_min):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(
            name,
            t,
            ndim=layout.count(",") + 1,
            dtypes=FLOAT_DTYPES + (torch.float64,),
            shape_hint=layout,
        )
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have one shape {layout}, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    heads = q.shape[-2]
    if q.shape[-1] < 1:
        raise ValueError(f"q's head dim must be >= 1, got {q.shape[-1]}")
    if pos_bias is not None:
        check_tensor(
            "pos_bias",
            pos_bias,
            ndim=3,
            dtypes=FLOAT_DTYPES + (torch.float64,),
            shape_hint="[H, N, N]",
        )
        if (
            pos_bias.shape[0] != heads
            or pos_bias.shape[1] != pos_bias.shape[2]
            or pos_bias.shape[1] < bias_min
        ):
            want = (
                f"[H={heads}, N, N] with N >= {bias_min}"
                if layout != "[B, N, H, D]"
                else f"[{heads}, {bias_min}, {bias_min}]"
            )
            raise ValueError(f"pos_bias must be {want}, got {tuple(pos_bias.shape)}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if (
        isinstance(dropout_p, bool)
        or not isinstance(dropout_p, (int, float))
        or not 0.0 <= dropout_p < 1.0
    ):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")


def _unit_last(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def tupe_attention(
    q,
    k,
    v,
    pos_bias=None,
    *,
    attention_mask=None,
    scale=None,
    dropout_p=0.0,
    deterministic=False,
    backend="auto",
):
    """Attention with a positional term shared by the batch: ``[B, N, H, D]`` in and out.

    ``logits[b, h, i, j] = scale * <q[b, i, h], k[b, j, h]> + pos_bias[h, i, j]``, softmax over ``j``, dropout
    (``dropout_p``, inverted scaling), then ``@ v``. ``scale`` defaults to ``1/sqrt(D)`` (TUPE passes
    ``1/sqrt(2D)``). ``pos_bias [H, N, N]`` may be a strided view of a larger cached table; its gradient is the
    logit gradient summed over the batch, accumulated in float32. ``attention_mask [B, N]`` bool or 0/1
    integers, True/1 = real token (a float mask is refused): masked keys get no weight, masked queries output 0, a query with no valid key outputs 0; an inf or NaN
    in q, k or v at a masked position reaches no real token's output or gradient, while NaN or +inf among a real
    query's logits gives NaN (never a silent 0). A bias of float32's lowest value is softmaxed like any other.
    Dropout draws from torch's generator of q's device, so ``torch.manual_seed`` reproduces it. The Triton
    kernels never use atomics: gradients are bitwise reproducible with ``deterministic`` True or False.
    """
    _check_common(
        q,
        k,
        v,
        pos_bias,
        scale,
        dropout_p,
        deterministic,
        "[B, N, H, D]",
        q.shape[1] if q.dim() == 4 else 0,
    )
    batch, n = q.shape[0], q.shape[1]
    if pos_bias is not None and pos_bias.shape[1] != n:
        raise ValueError(
            f"pos_bias must be [H, N, N] = [{q.shape[2]}, {n}, {n}], got {tuple(pos_bias.shape)}"
        )
    attention_mask = as_bool_attention_mask(attention_mask, (batch, n), q.device)
    check_same_device(
        **{
            k_: t
            for k_, t in dict(
                q=q, k=k, v=v, pos_bias=pos_bias, attention_mask=attention_mask
            ).items()
            if t is not None
        }
    )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = attention_backend(q, backend, _wants_grad(q, k, v, pos_bias))
    if chosen == "eager":
        return reference.tupe_attention(
            q,
            k,
            v,
            pos_bias,
            attention_mask=attention_mask,
            scale=scale,
            dropout_p=float(dropout_p),
        )
    if chosen == "cpu":
        if (
            torch.compiler.is_compiling()
        ):  # the per-sequence split reads lengths on the host: one call instead
            return _attention_cpu.attention_traced(
                q, k, v, pos_bias, attention_mask, scale, float(dropout_p)
            )
        return _attention_cpu.attention(q, k, v, pos_bias, attention_mask, scale, float(dropout_p))
    seed = _draw_seed(q.device) if dropout_p > 0 else None
    mask = attention_mask.contiguous() if attention_mask is not None else None
    args = (
        _unit_last(q),
        _unit_last(k),
        _unit_last(v),
        _unit_last(pos_bias),
        mask,
        None,
        n,
        scale,
        float(dropout_p),
        seed,
    )
    if direct_call_ok(*[a for a in args if isinstance(a, torch.Tensor)]):
        return _forward_triton(*args)[0]
    return torch.ops.effbert.tupe_attention(*args)[0]


def _check_cu_seqlens(cu_seqlens, max_seqlen):
    """What can be checked without reading the offsets (also while tracing)."""
    check_tensor(
        "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), shape_hint="[B + 1] int32"
    )
    if cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must hold B + 1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}"
        )
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be an int >= 1, got {max_seqlen!r}")


def _check_cu_seqlens_values(cu_seqlens, total, max_seqlen):
    """The offsets themselves: one small device-to-host copy. Rows after ``cu_seqlens[-1]`` are allowed (they
    belong to no sequence and get zeros)."""
    check_offsets(
        "cu_seqlens",
        cu_seqlens,
        total,
        what=f"the packed length {total} (q.shape[0])",
        exact=False,
        max_seqlen=max_seqlen,
    )


@torch.library.custom_op("effbert::tupe_attention_varlen_check", mutates_args=())
def _varlen_check_op(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> torch.Tensor:
    """The offsets' check as an op of its own: under torch.compile it runs on the real offsets (a traced function
    cannot read them). Returns a copy the eager path indexes with, so the check is never dropped from a graph."""
    _check_cu_seqlens(
        cu_seqlens, max_seqlen
    )  # callable directly: the tensor and the sizes too, not only the values
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be the packed length, an int >= 0, got {total!r}")
    _check_cu_seqlens_values(cu_seqlens, total, max_seqlen)
    return cu_seqlens.clone()


@_varlen_check_op.register_fake
def _(cu_seqlens, total, max_seqlen):
    return torch.empty_like(cu_seqlens)


def _checked_cu_seqlens(cu_seqlens, total, max_seqlen):
    if direct_call_ok(cu_seqlens):
        _check_cu_seqlens_values(cu_seqlens, total, max_seqlen)
        return cu_seqlens
    return torch.ops.effbert.tupe_attention_varlen_check(cu_seqlens, total, max_seqlen)


def _check_op_args(
    q,
    k,
    v,
    pos_bias,
    attention_mask,
    cu_seqlens,
    max_seqlen,
    scale,
    dropout_p,
    seed,
    *,
    values=True,
):
    """Everything the registered ops' callers could get wrong, checked inside the ops (they can be called
    directly); ``values``: also read the packed offsets back."""
    if cu_seqlens is None:
        layout, bias_min = "[B, N, H, D]", q.shape[1] if q.dim() == 4 else 0
    else:
        layout, bias_min = "[total, H, D]", max_seqlen if isinstance(max_seqlen, int) else 0
    _check_common(q, k, v, pos_bias, scale, dropout_p, False, layout, bias_min)
    if cu_seqlens is None:
        if pos_bias is not None and pos_bias.shape[1] != q.shape[1]:
            raise ValueError(
                f"pos_bias must be [H, N, N] with N = {q.shape[1]}, got {tuple(pos_bias.shape)}"
            )
        if attention_mask is not None:
            check_tensor(
                "attention_mask", attention_mask, ndim=2, dtypes=(torch.bool,), shape_hint="[B, N]"
            )
            if tuple(attention_mask.shape) != tuple(q.shape[:2]):
                raise ValueError(
                    f"attention_mask must be [B, N] = {list(q.shape[:2])}, got "
                    f"{tuple(attention_mask.shape)}"
                )
    else:
        if attention_mask is not None:
            raise ValueError(
                "attention_mask must be None with cu_seqlens (packed tokens are all real)"
            )
        _check_cu_seqlens(cu_seqlens, max_seqlen)
    if seed is not None:
        check_tensor("seed", seed, ndim=1, dtypes=(torch.int64,), shape_hint="[1] int64")
        if seed.numel() != 1:
            raise ValueError(f"seed must be [1] int64, got shape {tuple(seed.shape)}")
    elif dropout_p > 0:
        raise ValueError("seed must be given when dropout_p > 0")
    check_same_device(
        **{
            n: t
            for n, t in dict(
                q=q,
                k=k,
                v=v,
                pos_bias=pos_bias,
                attention_mask=attention_mask,
                cu_seqlens=cu_seqlens,
                seed=seed,
            ).items()
            if t is not None
        }
    )
    if values and cu_seqlens is not None:
        _check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)


def tupe_attention_varlen(
    q,
    k,
    v,
    cu_seqlens,
    max_seqlen,
    pos_bias=None,
    *,
    scale=None,
    dropout_p=0.0,
    deterministic=False,
    backend="auto",
    check_offsets=True,
):
    """``tupe_attention`` over packed tokens ``[total, H, D]``: sequence ``b`` is rows
    ``cu_seqlens[b]:cu_seqlens[b+1]`` (int32 ``[B + 1]``), positions restart at 0 in each, so ``pos_bias [H, S, S]``
    (``S >= max_seqlen``) is indexed by the position inside the sequence. Equal to the padded version on the real
    tokens; padding costs nothing. ``cu_seqlens`` must start at 0, never decrease and end at most at ``total``;
    rows after ``cu_seqlens[-1]`` belong to no sequence and get zeros (and a zero gradient). ``max_seqlen`` must be
    at least the longest sequence. These checks read the offsets back (one small copy), in eager code, under
    torch.compile and in the registered op alike; ``ValueError`` names the argument.

    ``check_offsets=False`` skips reading the offsets back: for a caller that built ``cu_seqlens`` itself and
    checked it once (a model checks its packing once per forward, not once per layer). Nothing reads out of bounds
    then either: the Triton kernels bound every offset (a bad one empties its sequence), the CPU backend slices on
    the host (under torch.compile it gathers with the eager reference's index arithmetic instead, whose
    out-of-range index is an error, never a read), and the eager reference checks anyway on a GPU (a bad gather
    index there would be a device assert) and raises ``IndexError`` on a CPU.

    Raises ``ValueError``/``TypeError`` naming the argument for any bad input."""
    if not isinstance(check_offsets, bool):
        raise TypeError(f"check_offsets must be a bool, got {type(check_offsets).__name__}")
    _check_common(
        q,
        k,
        v,
        pos_bias,
        scale,
        dropout_p,
        deterministic,
        "[total, H, D]",
        max_seqlen if isinstance(max_seqlen, int) else 0,
    )
    _check_cu_seqlens(cu_seqlens, max_seqlen)
    check_same_device(
        **{
            k_: t
            for k_, t in dict(q=q, k=k, v=v, pos_bias=pos_bias, cu_seqlens=cu_seqlens).items()
            if t is not None
        }
    )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = attention_backend(q, backend, _wants_grad(q, k, v, pos_bias))
    if chosen in ("eager", "cpu") and (
        check_offsets or (chosen == "eager" and q.device.type != "cpu")
    ):
        cu_seqlens = _checked_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    if chosen == "eager":
        return reference.tupe_attention_varlen(
            q, k, v, cu_seqlens, max_seqlen, pos_bias, scale=scale, dropout_p=float(dropout_p)
        )
    if chosen == "cpu":
        if (
            torch.compiler.is_compiling()
        ):  # the per-sequence loop reads the offsets on the host: padded rows instead
            return _attention_cpu.attention_varlen_traced(
                q, k, v, cu_seqlens, max_seqlen, pos_bias, scale, float(dropout_p)
            )
        return _attention_cpu.attention_varlen(
            q, k, v, cu_seqlens, pos_bias, scale, float(dropout_p)
        )
    seed = _draw_seed(q.device) if dropout_p > 0 else None
    args = (
        _unit_last(q),
        _unit_last(k),
        _unit_last(v),
        _unit_last(pos_bias),
        None,
        cu_seqlens.contiguous(),
        max_seqlen,
        scale,
        float(dropout_p),
        seed,
    )
    if direct_call_ok(*[a for a in args if isinstance(a, torch.Tensor)]):
        if check_offsets:
            _check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
        return _forward_triton(*args)[0]
    return torch.ops.effbert.tupe_attention(*args)[0]


# --- queries a subset of the tokens, keys all of them (token-level early exit): forward only ---------------------


def _check_subset_args(
    q, k, v, cu_seqlens_q, cu_seqlens_k, position_ids_q, pos_bias, max_seqlen_q, max_seqlen_k, scale
):
    """What can be checked without reading a tensor back (also while tracing)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,), shape_hint="[Tq, H, D]")
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=(q.dtype,), shape_hint="[Tk, H, D] of q's dtype")
    if k.shape != v.shape or k.shape[1:] != q.shape[1:]:
        raise ValueError(
            f"k and v must be [Tk, H, D] with q's H and D ({tuple(q.shape[1:])}), got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[-1] < 1:
        raise ValueError(f"q's head dim must be >= 1, got {q.shape[-1]}")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int32,), shape_hint="[B + 1] int32")
        if t.shape[0] < 2:
            raise ValueError(f"{name} must hold B + 1 >= 2 offsets, got shape {tuple(t.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same sequences ([B + 1] each), got "
            f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}"
        )
    check_tensor(
        "position_ids_q",
        position_ids_q,
        ndim=1,
        dtypes=(torch.int32, torch.int64),
        shape_hint="[Tq]",
    )
    if position_ids_q.shape[0] != q.shape[0]:
        raise ValueError(
            f"position_ids_q must be [Tq] = [{q.shape[0]}] (one position per query), got "
            f"{tuple(position_ids_q.shape)}"
        )
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    check_tensor(
        "pos_bias", pos_bias, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,), shape_hint="[H, S, S]"
    )
    if (
        pos_bias.shape[0] != q.shape[1]
        or pos_bias.shape[1] < max_seqlen_k
        or pos_bias.shape[2] < max_seqlen_k
    ):
        raise ValueError(
            f"pos_bias must be at least [H, max_seqlen_k, max_seqlen_k] = [{q.shape[1]}, {max_seqlen_k}, "
            f"{max_seqlen_k}], got {tuple(pos_bias.shape)}"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    check_same_device(
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        position_ids_q=position_ids_q,
        pos_bias=pos_bias,
    )


def _subset_offsets(cu_seqlens_q, cu_seqlens_k, tq, tk):
    """The offsets read back (one small copy each), checked: start at 0, never decrease, end at Tq / Tk."""
    return [
        check_offsets("cu_seqlens_q", cu_seqlens_q, tq, what=f"q.shape[0] = {tq}"),
        check_offsets("cu_seqlens_k", cu_seqlens_k, tk, what=f"k.shape[0] = {tk}"),
    ]


def _check_subset_values(
    q, k, cu_seqlens_q, cu_seqlens_k, position_ids_q, max_seqlen_q, max_seqlen_k
):
    cq, ck = _subset_offsets(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    lens_q = [b - a for a, b in zip(cq, cq[1:])]
    lens_k = [b - a for a, b in zip(ck, ck[1:])]
    for name, lens, given in (
        ("max_seqlen_q", lens_q, max_seqlen_q),
        ("max_seqlen_k", lens_k, max_seqlen_k),
    ):
        if max(lens) > given:
            raise ValueError(f"{name} must be >= the longest sequence ({max(lens)}), got {given}")
    if q.shape[0]:
        # each query's bound: its sequence's key count
        bound = torch.repeat_interleave(torch.tensor(lens_k), torch.tensor(lens_q)).to(
            position_ids_q.device
        )
        bad = ((position_ids_q < 0) | (position_ids_q >= bound)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            b = next(s for s in range(len(lens_q)) if cq[s] <= i < cq[s + 1])
            raise ValueError(
                f"position_ids_q must be in [0, that sequence's key count): query {i} (sequence {b}, "
                f"{lens_k[b]} keys) has position {int(position_ids_q[i])}"
            )


def subset_attention_backend(q, backend="auto"):
    """The backend ``tupe_attention_varlen_subset`` would run for ``q`` (raises if none can serve)."""
    return select_backend("tupe_attention_varlen_subset", backend, _inputs(q, False))


def _subset_checked(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    position_ids_q,
    pos_bias,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    check_offsets,
    backend,
):
    """The op's body: every check, then the chosen backend."""
    _check_subset_args(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        position_ids_q,
        pos_bias,
        max_seqlen_q,
        max_seqlen_k,
        scale,
    )
    if not isinstance(check_offsets, bool):
        raise TypeError(f"check_offsets must be a bool, got {type(check_offsets).__name__}")
    chosen = subset_attention_backend(q, backend)
    # the eager reference on a GPU would turn a bad gather index into a device assert: it checks regardless
    if check_offsets or (chosen == "eager" and q.device.type != "cpu"):
        _check_subset_values(
            q, k, cu_seqlens_q, cu_seqlens_k, position_ids_q, max_seqlen_q, max_seqlen_k
        )
    if chosen == "eager":
        return reference.tupe_attention_varlen_subset(
            q, k, v, cu_seqlens_q, cu_seqlens_k, position_ids_q, pos_bias, scale=scale
        )
    if chosen == "cpu":
        return _attention_cpu.attention_varlen_subset(
            q, k, v, cu_seqlens_q, cu_seqlens_k, position_ids_q, pos_bias, scale
        )
    from ..kernels import tupe_attention as kernels

    out = torch.zeros(
        q.shape, dtype=q.dtype, device=q.device
    )  # rows in no sequence are never written
    if q.numel() and max_seqlen_q:
        kernels.attention_forward_subset(
            _unit_last(q),
            _unit_last(k),
            _unit_last(v),
            _unit_last(pos_bias),
            cu_seqlens_q.contiguous(),
            cu_seqlens_k.contiguous(),
            position_ids_q.contiguous(),
            out,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            scale=scale,
        )
    return out


@torch.library.custom_op("effbert::tupe_attention_varlen_subset", mutates_args=())
def _subset_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    position_ids_q: torch.Tensor,
    pos_bias: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    check_offsets: bool,
    backend: str,
) -> torch.Tensor:
    # callable directly and run on real tensors under torch.compile: checked here, not only in the wrapper. No
    # autograd is registered: a backward through it raises torch's "autograd not implemented" error
    return _subset_checked(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        position_ids_q,
        pos_bias,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        check_offsets,
        backend,
    )


@_subset_op.register_fake
def _(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    position_ids_q,
    pos_bias,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    check_offsets,
    backend,
):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def tupe_attention_varlen_subset(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    position_ids_q,
    pos_bias,
    *,
    max_seqlen_q=None,
    max_seqlen_k=None,
    scale=None,
    backend="auto",
    check_offsets=True,
):
    """TUPE attention over packed sequences whose queries are a subset of their tokens and whose keys and values
    are all of them: the attention of a layer after token-level early exit, where exited tokens stop being
    queries but stay keys and values. Forward only (inference); flash-attn's varlen naming.

    ``logits[h, i, j] = scale * <q_i, k_j> + pos_bias[h, position_ids_q[i], j]`` for query ``i`` and key ``j`` of
    the same sequence (``j`` its position in the sequence), softmax over ``j``, then ``@ v``. Each query reads the
    positional row of its own position, so with every token active (``cu_seqlens_q == cu_seqlens_k``,
    ``position_ids_q`` = 0, 1, ... in each sequence) this is ``tupe_attention_varlen``.

    Args:
        q: ``[Tq, H, D]``, fp32/fp16/bf16 (float64 on the eager and cpu backends): the active tokens, packed per
            sequence; sequence ``b``'s are ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``.
        k, v: ``[Tk, H, D]``, q's dtype: every token; sequence ``b``'s are rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` each: start at 0, never decrease, end at ``Tq`` / ``Tk``. A
            sequence may have no active query.
        position_ids_q: int32 or int64 ``[Tq]``: each query's 0-based position among its sequence's keys, in
            ``[0, that sequence's key count)``.
        pos_bias: ``[H, S, S']`` float, ``S, S' >= max_seqlen_k``, shared by the batch (a strided view of a cached
            table is fine); the TUPE positional term ``P``.
        max_seqlen_q, max_seqlen_k: ints ``>=`` the most queries / keys of any sequence; ``None`` reads them from the
            offsets (one small copy each; under ``torch.compile(fullgraph=True)`` pass both).
        scale: the content logits' factor, ``1/sqrt(D)`` by default (TUPE passes ``1/sqrt(2D)``).
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` (per-sequence ``baddbmm`` + softmax + ``bmm``) or ``"eager"``.
        check_offsets: ``False`` skips reading the offsets and positions back, for a caller that checked them
            once; the Triton kernel still bounds every offset and position (a bad one empties its sequence or
            drops its bias), and the host backends raise ``IndexError`` rather than read out of bounds.

    Returns:
        ``[Tq, H, D]`` in q's dtype: each active query's output; a query of a sequence with no key gets 0.

    Raises:
        ``ValueError``/``TypeError`` naming the argument (shapes, dtypes, devices, offsets, positions out of range,
        ``max_seqlen_*`` too small, ``pos_bias`` too small); ``BackendNotSupportedError`` for an explicit backend
        that cannot serve; ``RuntimeError`` when called with inputs that require grad while grad is enabled (no
        backward).

    TUPE: Ke, He, Liu, "Rethinking Positional Encoding in Language Pre-training" (ICLR 2021). Token-level early exit:
    Li et al., "Accelerating BERT Inference for Sequence Labeling via Early-Exit" (ACL 2021).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("pos_bias", pos_bias)):
        if torch.is_grad_enabled() and isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(
                f"tupe_attention_varlen_subset is forward only (inference), but {name} requires grad: "
                "call it under torch.no_grad() or torch.inference_mode()"
            )
    if not isinstance(check_offsets, bool):
        raise TypeError(f"check_offsets must be a bool, got {type(check_offsets).__name__}")
    for name, cu, given in (
        ("cu_seqlens_q", cu_seqlens_q, max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, max_seqlen_k),
    ):
        if given is None:
            check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), shape_hint="[B + 1] int32")
    if max_seqlen_q is None:
        max_seqlen_q = (
            int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if cu_seqlens_q.shape[0] > 1 else 0
        )
    if max_seqlen_k is None:
        max_seqlen_k = (
            int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if cu_seqlens_k.shape[0] > 1 else 0
        )
    scale = q.shape[-1] ** -0.5 if scale is None and isinstance(q, torch.Tensor) else scale
    scale = float(scale) if isinstance(scale, int) and not isinstance(scale, bool) else scale
    args = (
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        position_ids_q,
        pos_bias,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        check_offsets,
        backend,
    )
    if direct_call_ok(*[a for a in args if isinstance(a, torch.Tensor)]):
        return _subset_checked(*args)  # the op's body without the dispatcher's tens of microseconds
    return torch.ops.effbert.tupe_attention_varlen_subset(*args)
