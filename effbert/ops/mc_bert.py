"""MC-BERT ops (Xu, Gong, Ke, He et al., "MC-BERT: Efficient Language Pre-Training via a Meta Controller", arXiv
2006.05744; code: github.com/MC-BERT/MC-BERT): ``mc_sample`` (the controller's K draws per position;
``mc_sample_fused`` draws them straight from the controller's hidden states and output layer) and
``mc_candidate_loss`` (the main model's multi-choice cross-entropy over K candidates).

Backends: ``triton`` (effbert/kernels/mc_bert.py) and ``eager`` (effbert/reference/mc_bert.py). There is no C++ CPU
build: on the CPU the eager gather + bmm + cross-entropy and ``torch.multinomial`` are already vectorised library
calls, and a C++ loop would not beat them.

The registered ops (``torch.ops.effbert.mc_*``) run the Triton kernels and check every argument themselves (shapes,
dtypes, devices, id ranges, the seed, the backend), in eager calls, under ``torch.compile`` (where they run on the
real tensors) and when called directly, raising ``ValueError``/``TypeError`` naming the argument; their fake
implementations only give the output shapes, so a bad call fails in the op, with its own message.
"""

import numbers
from typing import Optional

import torch

from .. import reference
from .checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._dispatch import Inputs, Support, declare, direct_call_ok, requested_backend, select_backend

__all__ = [
    "mc_sample",
    "mc_sample_fused",
    "mc_candidate_loss",
    "sample_backend",
    "loss_backend",
    "REDUCTIONS",
]

REDUCTIONS = ("mean", "sum", "none")
_EAGER_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _dt(dtype):
    return str(dtype).replace("torch.", "")


# no C++ build: on the CPU the eager gather + bmm + cross-entropy and torch.multinomial are
# vectorised already
declare(
    ("mc_sample", "mc_sample_fused", "mc_candidate_loss"),
    {"triton": Support(dtypes=FLOAT_DTYPES), "eager": Support()},
    {"cuda": ("triton", "eager")},
    absent="mc_bert has no {backend} extension kernels (triton and eager only)",
)


def _inputs(*float_tensors):
    """``Inputs`` of ``(label, tensor)`` pairs, on the first one's device."""
    return Inputs(float_tensors[0][1].device, tuple((label, t.dtype) for label, t in float_tensors))


def _check_count(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _rows(t):
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _size(t, dim):
    """``t.shape[dim]``, or 0 where ``t`` has no such dimension (the fake implementations never raise: a bad call
    fails in the op itself, with its own message)."""
    return t.shape[dim] if t.dim() > dim else 0


def _check_seed(seed, device):
    check_tensor(
        "seed", seed, ndim=1, dtypes=(torch.int64,), shape_hint="[1] int64 (the Philox key)"
    )
    if seed.shape[0] != 1:
        raise ValueError(f"seed must be [1] int64 (the Philox key), got shape {tuple(seed.shape)}")
    if seed.device != device:
        raise ValueError(f"seed must be on {device} like the other tensors, got {seed.device}")


def _check_op_backend(op, backend, inputs, called=None):
    """The registered ops run the Triton kernels (the eager backend runs outside them, in ``effbert.<op>``).
    ``ValueError`` for a bad name or another backend, ``BackendNotSupportedError`` where Triton cannot run."""
    called = called or op
    wanted = requested_backend(backend)
    if wanted not in ("auto", "triton"):
        raise ValueError(
            f"backend must be 'triton' for the registered op effbert::{called} (the "
            f"{wanted} backend runs in effbert.{op}, outside it), got {backend!r}"
        )
    select_backend(op, "triton", inputs, called=called)


def _check_padding_idx(padding_idx, vocab):
    if padding_idx is None:
        return None
    if (
        isinstance(padding_idx, bool)
        or not isinstance(padding_idx, numbers.Integral)
        or not 0 <= padding_idx < vocab
    ):
        raise ValueError(
            f"padding_idx must be None or a token id in [0, {vocab}) (embedding's rows), got "
            f"{padding_idx!r}"
        )
    return int(padding_idx)


# ---- sampling ----


def sample_backend(logits, backend="auto"):
    """The backend ``mc_sample(logits, ...)`` would run (raises if none can serve)."""
    return select_backend("mc_sample", backend, _inputs(("logits", logits)))


def _check_sample_logits(logits, dtypes):
    check_tensor("logits", logits, ndim=2, dtypes=dtypes, shape_hint="[M, V]")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have V >= 1 columns, got shape {tuple(logits.shape)}")


def _sample_impl(logits, num_samples, seed, backend):
    from ..kernels import mc_bert as kernels

    lg = logits if logits.shape[1] <= 1 or logits.stride(1) == 1 else logits.contiguous()
    out = torch.empty(logits.shape[0], num_samples, dtype=torch.int64, device=logits.device)
    return kernels.mc_sample(lg, num_samples, seed, out)


@torch.library.custom_op("effbert::mc_sample", mutates_args=())
def _mc_sample_op(
    logits: torch.Tensor, num_samples: int, seed: torch.Tensor, backend: str
) -> torch.Tensor:
    # callable directly and run on real tensors under torch.compile: the kernel trusts these for its addresses
    _check_sample_logits(logits, FLOAT_DTYPES)
    num_samples = _check_count("num_samples", num_samples, 1)
    _check_seed(seed, logits.device)
    _check_op_backend("mc_sample", backend, _inputs(("logits", logits)))
    return _sample_impl(logits, num_samples, seed, backend)


@_mc_sample_op.register_fake
def _(logits, num_samples, seed, backend):
    return logits.new_empty(_size(logits, 0), max(num_samples, 0), dtype=torch.int64)


def new_seed(device, generator=None):
    """A Philox key drawn from ``generator`` (torch's default generator of ``device`` when None), kept on the
    device: drawing it needs no host sync."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=generator)


def mc_sample(logits, num_samples, *, generator=None, backend="auto"):
    """K draws per row from ``softmax(logits)``, with replacement; no gradient.

    ``logits``: ``[M, V]`` fp32/fp16/bf16 (float64 on the eager backend); ``num_samples`` K >= 1; ``generator``:
    a ``torch.Generator`` on ``logits``' device (default: torch's, so ``torch.manual_seed`` makes the draws
    reproducible). Returns int64 ``[M, K]`` token ids in ``[0, V)``; a row holding NaN or no logit above -inf has
    no distribution and gives ``-1`` in every slot (NaN in, invalid out: no silent token). A row holding +inf (and
    no NaN) draws uniformly among its +inf entries, on every backend: the limit of the softmax as those logits grow
    together, which Gumbel-max gives when each +inf entry scores its noise alone, ahead of every finite entry.

    ``triton``: Gumbel-max on Philox noise keyed by one int64 drawn from ``generator`` on the device, each row read
    once, only ``[M, K]`` written (``effbert.reference.mc_sample_gumbel`` gives the same ids). ``eager``:
    ``torch.multinomial`` on the softmax, as the published code samples (the same distribution, other draws).
    Raises ``ValueError``/``TypeError`` naming the argument for bad inputs.
    """
    _check_sample_logits(logits, _EAGER_DTYPES)
    num_samples = _check_count("num_samples", num_samples, 1)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        if generator.device.type != logits.device.type:
            raise ValueError(
                f"generator must be on {logits.device.type} like logits, got {generator.device}"
            )
    name = sample_backend(logits, backend)
    logits = logits.detach()
    if name == "eager":
        return reference.mc_sample(logits, num_samples, generator=generator)
    seed = new_seed(logits.device, generator)
    if direct_call_ok(logits, seed):
        return _sample_impl(logits, num_samples, seed, name)
    return torch.ops.effbert.mc_sample(logits, num_samples, seed, name)


# ---- sampling fused with the controller's output layer ----


def _check_fused_args(hidden, weight, bias, num_samples, dtypes):
    check_tensor("hidden", hidden, ndim=2, dtypes=dtypes, shape_hint="[M, D]")
    check_tensor("weight", weight, ndim=2, dtypes=dtypes, shape_hint="[V, D]")
    check_tensor("bias", bias, ndim=1, dtypes=_EAGER_DTYPES, shape_hint="[V]")
    num_samples = _check_count("num_samples", num_samples, 1)
    if weight.shape[1] != hidden.shape[1] or weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight must be [V, D] with D = {hidden.shape[1]} and hidden's dtype {_dt(hidden.dtype)}, "
            f"got {tuple(weight.shape)} {_dt(weight.dtype)}"
        )
    if weight.shape[0] == 0 or bias.shape[0] != weight.shape[0]:
        raise ValueError(
            f"bias must be [V] = [{weight.shape[0]}] (V >= 1), got {tuple(bias.shape)}"
        )
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    return num_samples


def _sample_fused_impl(hidden, weight, bias, num_samples, seed, backend):
    from ..kernels import mc_bert as kernels

    out = torch.empty(hidden.shape[0], num_samples, dtype=torch.int64, device=hidden.device)
    return kernels.mc_sample_fused(
        _rows(hidden), _rows(weight), bias.contiguous(), num_samples, seed, out
    )


@torch.library.custom_op("effbert::mc_sample_fused", mutates_args=())
def _mc_sample_fused_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_samples: int,
    seed: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    num_samples = _check_fused_args(hidden, weight, bias, num_samples, FLOAT_DTYPES)
    _check_seed(seed, hidden.device)
    _check_op_backend("mc_sample_fused", backend, _inputs(("hidden", hidden), ("weight", weight)))
    return _sample_fused_impl(hidden, weight, bias, num_samples, seed, backend)


@_mc_sample_fused_op.register_fake
def _(hidden, weight, bias, num_samples, seed, backend):
    return hidden.new_empty(_size(hidden, 0), max(num_samples, 0), dtype=torch.int64)


def mc_sample_fused(hidden, weight, bias, num_samples, *, generator=None, backend="auto"):
    """``mc_sample(hidden @ weight.T + bias, num_samples)`` without the ``[M, V]`` logits in memory.

    ``hidden``: ``[M, D]``; ``weight``: ``[V, D]`` (same dtype: fp32/fp16/bf16, float64 on eager); ``bias``: ``[V]``.
    The ``triton`` kernel computes the logits a tile at a time with ``tl.dot`` (float32 accumulation) and draws with
    the same Philox counters as ``mc_sample``'s kernel, so under one seed both give the same ids (up to ties within
    float32 rounding of the logits). The ``eager`` backend materialises the logits and calls ``mc_sample``.
    Returns int64 ``[M, K]``; -1 in every slot of a row whose logits hold NaN (or no logit above -inf); a row with
    +inf logits draws uniformly among them, as ``mc_sample``. No gradient. Raises ``ValueError``/``TypeError``
    naming the argument for bad inputs.
    """
    num_samples = _check_fused_args(hidden, weight, bias, num_samples, _EAGER_DTYPES)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    name = select_backend(
        "mc_sample_fused", backend, _inputs(("hidden", hidden), ("weight", weight))
    )
    hidden, weight, bias = hidden.detach(), weight.detach(), bias.detach()
    if name == "eager":
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), bias.to(dtype))
        return reference.mc_sample(logits, num_samples, generator=generator)
    seed = new_seed(hidden.device, generator)
    if direct_call_ok(hidden, weight, bias, seed):
        return _sample_fused_impl(hidden, weight, bias, num_samples, seed, name)
    return torch.ops.effbert.mc_sample_fused(hidden, weight, bias, num_samples, seed, name)


# ---- the multi-choice loss ----


def _check_loss_args(
    hidden, embedding, bias, candidates, labels, reduction, padding_idx=None, dtypes=_EAGER_DTYPES
):
    check_tensor("hidden", hidden, ndim=2, dtypes=dtypes, shape_hint="[M, D]")
    check_tensor("embedding", embedding, ndim=2, dtypes=dtypes, shape_hint="[V, D]")
    check_tensor("bias", bias, ndim=1, dtypes=dtypes, shape_hint="[V]")
    check_tensor("candidates", candidates, ndim=2, dtypes=(torch.int64,), shape_hint="[M, K]")
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64,), shape_hint="[M]")
    m, d = hidden.shape
    v = embedding.shape[0]
    if embedding.shape[1] != d:
        raise ValueError(
            f"embedding must be [V, D] with D = {d} (hidden's width), got {tuple(embedding.shape)}"
        )
    if embedding.dtype != hidden.dtype:
        raise TypeError(
            f"embedding must have hidden's dtype {_dt(hidden.dtype)}, got {_dt(embedding.dtype)}"
        )
    if bias.shape[0] != v:
        raise ValueError(f"bias must be [V] = [{v}] like embedding's rows, got {tuple(bias.shape)}")
    if candidates.shape[0] != m:
        raise ValueError(
            f"candidates must be [M, K] with M = {m} (hidden's rows), got {tuple(candidates.shape)}"
        )
    if candidates.shape[1] < 2:
        raise ValueError(
            f"candidates must have K >= 2 columns (a choice among one candidate has no loss), got "
            f"{tuple(candidates.shape)}"
        )
    if labels.shape[0] != m:
        raise ValueError(f"labels must be [M] = [{m}], got {tuple(labels.shape)}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_same_device(
        hidden=hidden, embedding=embedding, bias=bias, candidates=candidates, labels=labels
    )
    return _check_padding_idx(padding_idx, v)


def _check_ranges(candidates, labels, vocab):
    """Ids outside their range would read outside ``embedding``: rejected on the host (one read back on CUDA).
    ``labels`` None: the candidates alone (the backward)."""
    if candidates.numel() == 0:
        return
    if labels is None:
        lo_c, hi_c = torch.stack([candidates.min(), candidates.max()]).tolist()
    else:
        lo_c, hi_c, lo_l, hi_l = torch.stack(
            [candidates.min(), candidates.max(), labels.min(), labels.max()]
        ).tolist()
    if lo_c < 0 or hi_c >= vocab:
        raise ValueError(
            f"candidates must hold token ids in [0, {vocab}) (embedding's rows), got values in "
            f"[{lo_c}, {hi_c}]"
        )
    k = candidates.shape[1]
    if labels is not None and (lo_l < 0 or hi_l >= k):
        raise ValueError(
            f"labels must hold candidate slots in [0, {k}), got values in [{lo_l}, {hi_l}]"
        )


def loss_backend(hidden, embedding, bias, backend="auto"):
    """The backend ``mc_candidate_loss(hidden, embedding, bias, ...)`` would run (raises if none can serve)."""
    return select_backend(
        "mc_candidate_loss",
        backend,
        _inputs(("hidden", hidden), ("embedding", embedding), ("bias", bias)),
    )


def _reduce(rows, reduction):
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / max(rows.shape[0], 1)


def _forward_impl(hidden, embedding, bias, candidates, labels, need_grad):
    from ..kernels import mc_bert as kernels

    _check_ranges(candidates, labels, embedding.shape[0])
    m, d = hidden.shape
    k = candidates.shape[1]
    loss = torch.empty(m, dtype=torch.float32, device=hidden.device)
    dh = (
        torch.empty(m, d, dtype=hidden.dtype, device=hidden.device)
        if need_grad
        else hidden.new_empty(0, d)
    )
    dscore = (
        torch.empty(m, k, dtype=torch.float32, device=hidden.device)
        if need_grad
        else hidden.new_empty(0, k, dtype=torch.float32)
    )
    kernels.mc_candidate_forward(
        _rows(hidden),
        _rows(embedding),
        bias.contiguous(),
        candidates.contiguous(),
        labels.contiguous(),
        loss,
        dh if need_grad else None,
        dscore if need_grad else None,
    )
    return loss, dh, dscore


@torch.library.custom_op("effbert::mc_candidate_loss", mutates_args=())
def _mc_candidate_loss_op(
    hidden: torch.Tensor,
    embedding: torch.Tensor,
    bias: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    reduction: str,
    need_grad: bool,
    backend: str,
    padding_idx: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # callable directly and run on real tensors under torch.compile: the kernel trusts these for its addresses
    _check_loss_args(
        hidden, embedding, bias, candidates, labels, reduction, padding_idx, dtypes=FLOAT_DTYPES
    )
    if not isinstance(need_grad, bool):
        raise TypeError(f"need_grad must be a bool, got {type(need_grad).__name__}")
    _check_op_backend(
        "mc_candidate_loss",
        backend,
        _inputs(("hidden", hidden), ("embedding", embedding), ("bias", bias)),
    )
    rows, dh, dscore = _forward_impl(
        hidden, embedding, bias, candidates, labels, need_grad
    )  # checks the ids
    return _reduce(rows, reduction), dh, dscore


@_mc_candidate_loss_op.register_fake
def _(hidden, embedding, bias, candidates, labels, reduction, need_grad, backend, padding_idx=None):
    m, d = _size(hidden, 0), _size(hidden, 1)
    k = _size(candidates, 1)
    loss = hidden.new_empty(m if reduction == "none" else (), dtype=torch.float32)
    dh = hidden.new_empty(m if need_grad else 0, d)
    dscore = hidden.new_empty(m if need_grad else 0, k, dtype=torch.float32)
    return loss, dh, dscore


def _loss_setup_context(ctx, inputs, output):
    hidden, embedding, bias, candidates, labels, reduction, need_grad, backend, padding_idx = inputs
    _, dh, dscore = output
    ctx.save_for_backward(hidden, candidates, dh, dscore)
    ctx.reduction, ctx.vocab, ctx.backend, ctx.padding_idx = (
        reduction,
        embedding.shape[0],
        backend,
        padding_idx,
    )
    ctx.emb_dtype, ctx.bias_dtype = embedding.dtype, bias.dtype
    ctx.mark_non_differentiable(dh, dscore)


def _loss_backward(ctx, grad, _grad_dh, _grad_dscore):
    hidden, candidates, dh, dscore = ctx.saved_tensors
    if dh.shape[0] != hidden.shape[0]:
        raise RuntimeError("mc_candidate_loss: backward through a call made without need_grad")
    d_hidden, d_emb, d_bias = torch.ops.effbert.mc_candidate_loss_backward(
        grad, hidden, candidates, dh, dscore, ctx.vocab, ctx.reduction, ctx.backend, ctx.padding_idx
    )
    return (
        d_hidden,
        d_emb.to(ctx.emb_dtype),
        d_bias.to(ctx.bias_dtype),
        None,
        None,
        None,
        None,
        None,
        None,
    )


def scatter_plan(candidates, dim, chunk):
    """The order of the deterministic scatter-add, with torch (no host sync): the flattened candidates sorted by
    token (stable), each entry's segment ``[seg_first, seg_end)``, and for the pieces of segments longer than
    ``chunk`` their slot in the partial-sum buffers ``part [P, dim]`` / ``part_bias [P]`` (P bounds their count)."""
    sorted_ids, order = torch.sort(candidates.reshape(-1), stable=True)
    seg_first = torch.searchsorted(sorted_ids, sorted_ids)
    seg_end = torch.searchsorted(sorted_ids, sorted_ids, right=True)
    idx = torch.arange(sorted_ids.numel(), device=sorted_ids.device)
    long_piece = ((idx - seg_first) % chunk == 0) & (seg_end - seg_first > chunk)
    piece_id = (
        torch.cumsum(long_piece, 0) - 1
    )  # at a long segment's first entry: its first piece's slot
    bound = (
        2 * sorted_ids.numel() // chunk + 1
    )  # a long segment of n entries has ceil(n / chunk) < 2n / chunk
    return {
        "order": order,
        "sorted": sorted_ids,
        "seg_first": seg_first,
        "seg_end": seg_end,
        "piece_id": piece_id,
        "part": torch.empty(bound, dim, dtype=torch.float32, device=candidates.device),
        "part_bias": torch.empty(bound, dtype=torch.float32, device=candidates.device),
    }


def _check_backward_args(
    grad, hidden, candidates, dh, dscore, vocab, reduction, backend, padding_idx
):
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES, shape_hint="[M, D]")
    m, d = hidden.shape
    check_tensor("candidates", candidates, ndim=2, dtypes=(torch.int64,), shape_hint="[M, K]")
    if candidates.shape[0] != m or candidates.shape[1] < 2:
        raise ValueError(
            f"candidates must be [M, K] with M = {m} (hidden's rows) and K >= 2, got "
            f"{tuple(candidates.shape)}"
        )
    k = candidates.shape[1]
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_tensor("grad", grad, dtypes=_EAGER_DTYPES)
    want = (m,) if reduction == "none" else ()
    if tuple(grad.shape) != want:
        raise ValueError(
            f"grad must be the loss' gradient, shape {list(want)} for reduction {reduction!r}, got "
            f"{list(grad.shape)}"
        )
    check_tensor("dh", dh, ndim=2, dtypes=(hidden.dtype,), shape_hint="[M, D] in hidden's dtype")
    if tuple(dh.shape) != (m, d):
        raise ValueError(
            f"dh must be [M, D] = [{m}, {d}] (the forward's, with need_grad), got {tuple(dh.shape)}"
        )
    check_tensor("dscore", dscore, ndim=2, dtypes=(torch.float32,), shape_hint="[M, K] float32")
    if tuple(dscore.shape) != (m, k):
        raise ValueError(
            f"dscore must be [M, K] = [{m}, {k}] (the forward's, with need_grad), got "
            f"{tuple(dscore.shape)}"
        )
    vocab = _check_count("vocab", vocab, 1)
    padding_idx = _check_padding_idx(padding_idx, vocab)
    check_same_device(grad=grad, hidden=hidden, candidates=candidates, dh=dh, dscore=dscore)
    _check_op_backend(
        "mc_candidate_loss",
        backend,
        _inputs(("hidden", hidden)),
        called="mc_candidate_loss_backward",
    )
    _check_ranges(candidates, None, vocab)
    return vocab, padding_idx


@torch.library.custom_op("effbert::mc_candidate_loss_backward", mutates_args=())
def _mc_candidate_loss_backward_op(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    candidates: torch.Tensor,
    dh: torch.Tensor,
    dscore: torch.Tensor,
    vocab: int,
    reduction: str,
    backend: str,
    padding_idx: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import mc_bert as kernels

    vocab, padding_idx = _check_backward_args(
        grad, hidden, candidates, dh, dscore, vocab, reduction, backend, padding_idx
    )
    m = hidden.shape[0]
    scale = grad.float()
    if reduction == "mean":
        scale = scale / max(m, 1)
    scale_rows = scale.reshape(-1, 1) if reduction == "none" else scale
    d_hidden = (dh.float() * scale_rows).to(hidden.dtype)
    dscore_s = (dscore * scale_rows).contiguous()
    d_emb = torch.zeros(vocab, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device)
    plan = scatter_plan(candidates, hidden.shape[1], kernels.SCATTER_CHUNK)
    kernels.mc_candidate_scatter(_rows(hidden), dscore_s, plan, d_emb, d_bias)
    if (
        padding_idx is not None
    ):  # nn.Embedding's padding_idx: the row gets no gradient (its bias entry does)
        d_emb[padding_idx] = 0.0
    return d_hidden, d_emb, d_bias


@_mc_candidate_loss_backward_op.register_fake
def _(grad, hidden, candidates, dh, dscore, vocab, reduction, backend, padding_idx=None):
    vocab = max(vocab, 0)
    return (
        torch.empty_like(hidden),
        hidden.new_empty(vocab, _size(hidden, 1), dtype=torch.float32),
        hidden.new_empty(vocab, dtype=torch.float32),
    )


_mc_candidate_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def mc_candidate_loss(
    hidden,
    embedding,
    bias,
    candidates,
    labels,
    *,
    reduction="mean",
    padding_idx=None,
    backend="auto",
):
    """The multi-choice cross-entropy of MC-BERT's main model (the published ``GenLMHead`` scoring).

    ``hidden``: ``[M, D]`` (the transformed hidden states of the scored positions); ``embedding``: ``[V, D]`` (the
    tied input embedding), same dtype; ``bias``: ``[V]`` (a scalar per token); ``candidates``: int64 ``[M, K]``
    token ids, K >= 2; ``labels``: int64 ``[M]``, the correct slot of each row in ``[0, K)``. dtypes fp32, fp16,
    bf16 (float64 on the eager backend); math in float32.

    ``score[m, k] = <hidden[m], embedding[candidates[m, k]]> + bias[candidates[m, k]]``; returns the cross-entropy
    of ``softmax(score[m])`` at ``labels[m]``: float32, the mean over rows (``reduction="mean"``, 0 for M = 0),
    their sum (``"sum"``) or per row ``[M]`` (``"none"``). Gradients flow to ``hidden``, ``embedding`` and ``bias``;
    the ``triton`` backend computes the gradient of ``hidden`` in the forward pass (the candidate rows are read
    once) and scatter-adds the embedding-row and bias gradients in sorted order without atomics: bitwise
    reproducible. ``padding_idx`` (None, or a token id in ``[0, V)``): that token's embedding row gets no gradient,
    as in MC-BERT's published code, whose ``GenLMHead`` looks candidates up in the input's
    ``nn.Embedding(..., padding_idx=pad)`` (a controller may draw [PAD]); its score still counts, and its bias
    entry (an ``nn.Embedding(V, 1)`` there, with no ``padding_idx``) keeps its gradient. None: every row gets its
    gradient. Ids out of range raise ``ValueError`` (never read outside ``embedding``), as do bad shapes, dtypes,
    devices, ``reduction`` and ``padding_idx`` (``TypeError`` for a wrong dtype), naming the argument.
    """
    padding_idx = _check_loss_args(
        hidden, embedding, bias, candidates, labels, reduction, padding_idx
    )
    name = loss_backend(hidden, embedding, bias, backend)
    if name == "eager":
        _check_ranges(candidates, labels, embedding.shape[0])
        return reference.mc_candidate_loss(
            hidden,
            embedding,
            bias,
            candidates,
            labels,
            reduction=reduction,
            padding_idx=padding_idx,
        )
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, embedding, bias))
    if direct_call_ok(hidden, embedding, bias, candidates, labels):
        rows, _, _ = _forward_impl(hidden, embedding, bias, candidates, labels, False)
        return _reduce(rows, reduction)
    return torch.ops.effbert.mc_candidate_loss(
        hidden, embedding, bias, candidates, labels, reduction, need_grad, name, padding_idx
    )[0]
