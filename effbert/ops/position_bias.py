"""TUPE's positional term: ``t5_relative_buckets`` and ``tupe_position_bias`` (DESIGN.md, "TUPE")."""

import math
from typing import List, Optional

import torch

from .. import reference
from ..kernels import MAX_GRID_YZ  # the package's constants only: no Triton import here
from .checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._dispatch import Inputs, Support, cached_selection, declare, direct_call_ok, select_backend

__all__ = ["t5_relative_buckets", "tupe_position_bias"]


def t5_relative_buckets(seq_len, num_buckets=32, max_distance=128, device=None):
    """T5's bidirectional bucket of the relative distance ``j - i``, as ``LongTensor[seq_len, seq_len]``.

    ``num_buckets`` even and >= 4 (half for keys after the query, half for the rest); ``max_distance`` > the
    exactly-bucketed range ``num_buckets // 4``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    if (
        isinstance(num_buckets, bool)
        or not isinstance(num_buckets, int)
        or num_buckets < 4
        or num_buckets % 2
    ):
        raise ValueError(f"num_buckets must be an even int >= 4, got {num_buckets!r}")
    if not isinstance(max_distance, int) or max_distance <= num_buckets // 4:
        raise ValueError(
            f"max_distance must be an int > num_buckets // 4 = {num_buckets // 4}, got {max_distance!r}"
        )
    return reference.t5_relative_buckets(seq_len, num_buckets, max_distance, device=device)


# effbert.kernels.position_bias.MAX_BUCKETS (not imported here: kernels load with triton)
_MAX_BUCKETS = 64

# P is one [H, N, N] batched matmul plus a gather: on the CPU, PyTorch's ops are the fused path
# ("cpu" runs them)
declare(
    "tupe_position_bias",
    {
        "triton": Support(
            dtypes=FLOAT_DTYPES,
            interpreter_dtypes=(torch.float32, torch.float16),
            takes="Triton kernels take",
            limits={
                "num_buckets": (
                    _MAX_BUCKETS,
                    "the Triton backward sums at most {limit} relative "
                    "buckets in registers, got rel_table with {value} rows",
                ),
                "heads": (
                    MAX_GRID_YZ,
                    "Triton kernels take at most {limit} heads (a grid axis "
                    "of one row per head), got {value}",
                ),
            },
        ),
        "cpu": Support(),
        "eager": Support(),
    },
    {"cuda": ("triton", "eager"), "cpu": ("cpu", "eager")},
    absent="no {backend} kernel for {op} (Triton on CUDA)",
)


def _inputs(pos_q, num_buckets):
    heads = pos_q.shape[1] if pos_q.dim() == 3 else 0
    return Inputs(
        pos_q.device, (("pos_q", pos_q.dtype),), {"num_buckets": num_buckets, "heads": heads}
    )


def _empty_if_none(t, like):
    return t if t is not None else like.new_empty(0)


def _position_bias_triton(pos_q, pos_k, rel_table, rel_buckets, cls_row, cls_col, scale):
    from ..kernels import position_bias as kernels

    n, heads, _ = pos_q.shape
    out = torch.empty(heads, n, n, dtype=pos_q.dtype, device=pos_q.device)
    if out.numel():
        kernels.position_bias_forward(
            pos_q, pos_k, rel_table, rel_buckets, cls_row, cls_col, out, scale
        )
    return out


def _check_triton(op, pos_q, num_buckets):
    """The registered ops run the Triton kernels: ``BackendNotSupportedError`` where they cannot."""
    select_backend("tupe_position_bias", "triton", _inputs(pos_q, num_buckets), called=op)


def _dim(t, i):
    return t.shape[i] if t.dim() > i else 0


@torch.library.custom_op("effbert::tupe_position_bias", mutates_args=())
def _position_bias_op(
    pos_q: torch.Tensor,
    pos_k: torch.Tensor,
    rel_table: Optional[torch.Tensor],
    rel_buckets: Optional[torch.Tensor],
    cls_row: Optional[torch.Tensor],
    cls_col: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    # callable directly and run on real tensors under torch.compile: checked here, not only in the wrapper
    check_position_bias_args(
        pos_q, pos_k, scale, rel_table, rel_buckets, cls_row, cls_col, dtypes=FLOAT_DTYPES
    )
    _check_triton("tupe_position_bias", pos_q, 0 if rel_table is None else rel_table.shape[0])
    return _position_bias_triton(
        pos_q, pos_k, rel_table, rel_buckets, cls_row, cls_col, float(scale)
    )


@_position_bias_op.register_fake
def _(pos_q, pos_k, rel_table, rel_buckets, cls_row, cls_col, scale):
    n, heads = (
        _dim(pos_q, 0),
        _dim(pos_q, 1),
    )  # never raises: a bad call fails in the op, with its own message
    return pos_q.new_empty((heads, n, n))


def _check_backward_args(grad, pos_q, pos_k, rel_buckets, num_buckets, has_cls, scale):
    check_tensor("pos_q", pos_q, ndim=3, dtypes=FLOAT_DTYPES, shape_hint="[N, H, Dh]")
    check_tensor("pos_k", pos_k, ndim=3, dtypes=(pos_q.dtype,), shape_hint="[N, H, Dh]")
    if pos_k.shape != pos_q.shape:
        raise ValueError(
            f"pos_k must have pos_q's shape {tuple(pos_q.shape)}, got {tuple(pos_k.shape)}"
        )
    n, heads, _ = pos_q.shape
    check_tensor(
        "grad", grad, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,), shape_hint="[H, N, N]"
    )
    if tuple(grad.shape) != (heads, n, n):
        raise ValueError(
            f"grad must be [H, N, N] = [{heads}, {n}, {n}] (P's gradient), got {tuple(grad.shape)}"
        )
    if (
        isinstance(num_buckets, bool)
        or not isinstance(num_buckets, int)
        or not 0 <= num_buckets <= _MAX_BUCKETS
    ):
        raise ValueError(
            f"num_buckets must be an int in [0, {_MAX_BUCKETS}] (rel_table's rows; 0 without one), "
            f"got {num_buckets!r}"
        )
    if rel_buckets is not None:
        if num_buckets < 1:
            raise ValueError("num_buckets must be >= 1 with rel_buckets (rel_table's rows)")
        check_tensor(
            "rel_buckets",
            rel_buckets,
            ndim=2,
            dtypes=(torch.int64, torch.int32),
            shape_hint="[N, N]",
        )
        if tuple(rel_buckets.shape) != (n, n):
            raise ValueError(
                f"rel_buckets must be [N, N] = [{n}, {n}], got {tuple(rel_buckets.shape)}"
            )
    if not isinstance(has_cls, bool):
        raise TypeError(f"has_cls must be a bool, got {type(has_cls).__name__}")
    _check_scale(scale)
    check_same_device(
        **{
            k: v
            for k, v in dict(grad=grad, pos_q=pos_q, pos_k=pos_k, rel_buckets=rel_buckets).items()
            if v is not None
        }
    )
    _check_triton("tupe_position_bias_backward", pos_q, num_buckets)


@torch.library.custom_op("effbert::tupe_position_bias_backward", mutates_args=())
def _position_bias_bwd_op(
    grad: torch.Tensor,
    pos_q: torch.Tensor,
    pos_k: torch.Tensor,
    rel_buckets: Optional[torch.Tensor],
    num_buckets: int,
    has_cls: bool,
    scale: float,
) -> List[torch.Tensor]:
    """[d pos_q, d pos_k, d rel_table [num_buckets, H] (empty without a table), d cls_row, d cls_col]."""
    from ..kernels import position_bias as kernels

    _check_backward_args(grad, pos_q, pos_k, rel_buckets, num_buckets, has_cls, scale)
    scale = float(scale)
    n, heads, _ = pos_q.shape
    dp = grad.float()
    if n == 0:
        d_q, d_k, d_rel = torch.zeros_like(pos_q), torch.zeros_like(pos_k), None
    else:
        d_q, d_k, d_rel = kernels.position_bias_backward(
            dp, pos_q, pos_k, rel_buckets, num_buckets, has_cls, scale
        )
    if d_rel is None:
        d_rel = dp.new_zeros(num_buckets, heads) if rel_buckets is not None else dp.new_empty(0)
    if has_cls and n:
        d_row, d_col = dp[:, 0, :].sum(-1), dp[:, 1:, 0].sum(-1)
    else:  # two allocations: custom op outputs may not alias each other
        d_row, d_col = dp.new_zeros(heads if has_cls else 0), dp.new_zeros(heads if has_cls else 0)
    return [d_q, d_k, d_rel, d_row, d_col]


@_position_bias_bwd_op.register_fake
def _(grad, pos_q, pos_k, rel_buckets, num_buckets, has_cls, scale):
    heads = _dim(pos_q, 1)
    f32 = torch.float32
    return [
        torch.empty_like(pos_q),
        torch.empty_like(pos_k),
        grad.new_empty(
            (max(num_buckets, 0), heads) if rel_buckets is not None else (0,), dtype=f32
        ),
        grad.new_empty((heads if has_cls else 0,), dtype=f32),
        grad.new_empty((heads if has_cls else 0,), dtype=f32),
    ]


def _pb_setup_context(ctx, inputs, output):
    pos_q, pos_k, rel_table, rel_buckets, cls_row, cls_col, scale = inputs
    ctx.save_for_backward(pos_q, pos_k, rel_buckets)
    ctx.has_rel = rel_table is not None
    ctx.num_buckets = rel_table.shape[0] if rel_table is not None else 0
    ctx.has_cls = cls_row is not None
    ctx.scale = scale
    ctx.dtypes = [None if t is None else t.dtype for t in (rel_table, cls_row, cls_col)]


def _pb_backward(ctx, grad):
    pos_q, pos_k, rel_buckets = ctx.saved_tensors
    d_q, d_k, d_rel, d_row, d_col = torch.ops.effbert.tupe_position_bias_backward(
        grad,
        pos_q,
        pos_k,
        rel_buckets if ctx.has_rel else None,
        ctx.num_buckets,
        ctx.has_cls,
        ctx.scale,
    )
    rel_dt, row_dt, col_dt = ctx.dtypes
    return (
        d_q,
        d_k,
        d_rel.to(rel_dt) if ctx.has_rel else None,
        None,
        d_row.to(row_dt) if ctx.has_cls else None,
        d_col.to(col_dt) if ctx.has_cls else None,
        None,
    )


_position_bias_op.register_autograd(_pb_backward, setup_context=_pb_setup_context)


def _check_scale(scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")


def check_position_bias_args(
    pos_q,
    pos_k,
    scale,
    rel_table,
    rel_buckets,
    cls_row,
    cls_col,
    dtypes=FLOAT_DTYPES + (torch.float64,),
):
    """Every argument of ``tupe_position_bias`` (``dtypes``: pos_q's allowed dtypes; the registered op, which runs
    the Triton kernel, takes fp32/fp16/bf16); ``ValueError``/``TypeError`` naming the argument."""
    check_tensor("pos_q", pos_q, ndim=3, dtypes=dtypes, shape_hint="[N, H, Dh]")
    check_tensor("pos_k", pos_k, ndim=3, dtypes=(pos_q.dtype,), shape_hint="[N, H, Dh]")
    if pos_k.shape != pos_q.shape:
        raise ValueError(
            f"pos_k must have pos_q's shape {tuple(pos_q.shape)}, got {tuple(pos_k.shape)}"
        )
    n, heads, _ = pos_q.shape
    _check_scale(scale)
    if (rel_table is None) != (rel_buckets is None):
        raise ValueError("rel_table and rel_buckets must be given together")
    if rel_table is not None:
        check_tensor(
            "rel_table",
            rel_table,
            ndim=2,
            dtypes=FLOAT_DTYPES + (torch.float64,),
            shape_hint="[num_buckets, H]",
        )
        if rel_table.shape[1] != heads or rel_table.shape[0] < 1:
            raise ValueError(
                f"rel_table must be [num_buckets >= 1, H={heads}], got {tuple(rel_table.shape)}"
            )
        check_tensor(
            "rel_buckets",
            rel_buckets,
            ndim=2,
            dtypes=(torch.int64, torch.int32),
            shape_hint="[N, N]",
        )
        if tuple(rel_buckets.shape) != (n, n):
            raise ValueError(
                f"rel_buckets must be [N, N] = [{n}, {n}], got {tuple(rel_buckets.shape)}"
            )
        # values are unknown while tracing; the kernels mask out-of-range buckets instead of reading past the table
        if (
            rel_buckets.numel()
            and not torch.compiler.is_compiling()
            and (int(rel_buckets.min()) < 0 or int(rel_buckets.max()) >= rel_table.shape[0])
        ):
            raise ValueError(
                f"rel_buckets must index rel_table's {rel_table.shape[0]} rows, got values in "
                f"[{int(rel_buckets.min())}, {int(rel_buckets.max())}]"
            )
    if (cls_row is None) != (cls_col is None):
        raise ValueError("cls_row and cls_col must be given together")
    if cls_row is not None:
        for name, t in (("cls_row", cls_row), ("cls_col", cls_col)):
            check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,), shape_hint="[H]")
            if t.shape[0] != heads:
                raise ValueError(f"{name} must be [H={heads}], got {tuple(t.shape)}")
    given = {
        k: v
        for k, v in dict(
            pos_q=pos_q,
            pos_k=pos_k,
            rel_table=rel_table,
            rel_buckets=rel_buckets,
            cls_row=cls_row,
            cls_col=cls_col,
        ).items()
        if v is not None
    }
    check_same_device(**given)


def position_bias_backend(pos_q, backend="auto", rel_table=None):
    num_buckets = 0 if rel_table is None else rel_table.shape[0]
    heads = pos_q.shape[1] if pos_q.dim() == 3 else 0
    key = (pos_q.device, pos_q.dtype, num_buckets > _MAX_BUCKETS, heads > MAX_GRID_YZ)
    return cached_selection("tupe_position_bias", backend, key, lambda: _inputs(pos_q, num_buckets))


def tupe_position_bias(
    pos_q,
    pos_k,
    *,
    scale,
    rel_table=None,
    rel_buckets=None,
    cls_row=None,
    cls_col=None,
    backend="auto",
):
    """TUPE's positional logits ``P [H, N, N]``, the same in every layer (compute once per forward pass).

    ``P[h, i, j] = scale * <pos_q[i, h], pos_k[j, h]> + rel_table[rel_buckets[i, j], h]`` (the second term only
    with ``rel_table [num_buckets, H]`` and ``rel_buckets [N, N]``), then, with ``cls_row``/``cls_col`` ``[H]``,
    ``P[h, 0, :] = cls_row[h]`` and ``P[h, 1:, 0] = cls_col[h]``. ``pos_q``/``pos_k``: ``[N, H, Dh]``, the
    position embeddings after the per-head projections. Differentiable in every float input; P has pos_q's dtype.
    N = 0 gives an empty ``[H, 0, 0]`` on every backend (and zero gradients). The Triton backward takes at most 64
    relative buckets (``auto`` falls back to the eager path beyond). Raises ``ValueError``/``TypeError`` naming
    the argument for bad inputs, here and in the registered op (``torch.ops.effbert.tupe_position_bias``).
    """
    check_position_bias_args(pos_q, pos_k, scale, rel_table, rel_buckets, cls_row, cls_col)
    chosen = position_bias_backend(pos_q, backend, rel_table)
    if chosen in (
        "eager",
        "cpu",
    ):  # on the CPU: the reference's batched matmul and gather (no per-batch tensor)
        return reference.tupe_position_bias(
            pos_q,
            pos_k,
            scale=scale,
            rel_table=rel_table,
            rel_buckets=rel_buckets,
            cls_row=cls_row,
            cls_col=cls_col,
        )
    unit = lambda t: t if t is None or t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    args = (
        unit(pos_q),
        unit(pos_k),
        rel_table,
        None if rel_buckets is None else rel_buckets.long(),
        cls_row,
        cls_col,
        float(scale),
    )
    if direct_call_ok(*[a for a in args if isinstance(a, torch.Tensor)]):
        return _position_bias_triton(*args)
    return torch.ops.effbert.tupe_position_bias(*args)
