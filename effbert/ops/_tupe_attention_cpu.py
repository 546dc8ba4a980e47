"""The CPU path of ``tupe_attention``: PyTorch's own fused CPU attention
(``torch.nn.functional.scaled_dot_product_attention``, flash-style, threaded and vectorised) run on each sequence's
real tokens, with the shared positional term ``pos_bias[:, :L, :L]`` passed as its additive ``attn_mask``.

No ``[B, H, N, N]`` tensor is built: the bias is read as the shared ``[H, N, N]`` view, broadcast over a batch of
one, and padded keys and queries are never computed, so real-length padding costs nothing (the padded batch of
transformers' BERT computes every padded position). Sequences of equal length share one call; a batch with no
padding is one call. Gradients (``q``, ``k``, ``v`` and ``pos_bias``, the last summed over the batch by autograd)
come from PyTorch's backward of the same fused calls, so fine-tuning on a CPU does not take the eager path.

Semantics are DESIGN.md's: a padded query outputs 0 and gets no gradient; padded keys are left out of the call,
so their values (inf or NaN included) never reach a real token's output or gradient; a sequence with no real
token outputs 0; NaN in a real token's inputs gives NaN.

Measured against one call over the padded batch with a combined ``[B, H, N, N]`` mask or an extra head-dim column
carrying the key padding: both cost more (the combined mask is read per head; a head dim of 65 misses the fast
GEMM path) than the per-sequence calls, whose per-call overhead is small next to the padded work they skip.

Inference (no gradient wanted, no dropout) of one sequence with a bias and at most ``MATH_MAX_LEN`` tokens takes
a shorter road: ``baddbmm`` (the bias as its addend, the content logits scaled on the way), an in-place softmax and
``bmm``, one ``[H, L, L]`` buffer for that sequence only. The fused kernel adds the bias tile by tile, which at
these lengths costs more than the three BLAS-backed calls (8% less time at L = 128, 1 and 2 threads); beyond
about 200 tokens the fused kernel's blocking wins and is used.

Under ``torch.compile`` the per-sequence split cannot be traced (it reads the lengths or offsets on the host and
loops over them), so a traced call takes ``attention_traced`` / ``attention_varlen_traced`` instead: one fused call
over the padded batch (packed tokens laid out as ``[B, max_seqlen]`` rows with tensor ops only), the positional
term and the padding folded into one additive ``[B, H, L, L]`` mask. Same semantics (padded q, k and v are
zeroed first, so an inf or NaN there reaches nothing; a padded query attends uniformly to zeros and is then set to
0, so its row is finite and passes no gradient on), at the cost of the padded work and that mask: one graph
(``fullgraph=True``) on the CPU backend, not the fastest CPU path.
"""

import torch
import torch.nn.functional as F

from ..reference.tupe_attention import _packed_index, _with_zero_row


MATH_MAX_LEN = 160  # the longest sequence the inference road takes (measured crossover: 128 faster, 200 slower)


def _call(q, k, v, bias, scale, dropout_p):
    """Attention over ``[G, L, H, D]`` with the shared ``bias [H, L, L]`` (or None): ``[G, L, H, D]``."""
    if (bias is not None and q.shape[0] == 1 and q.shape[1] <= MATH_MAX_LEN and dropout_p == 0.0
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                                  or bias.requires_grad))):
        return _call_inference(q, k, v, bias.to(q.dtype), scale)
    mask = None if bias is None else bias.unsqueeze(0).to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)


def _call_inference(q, k, v, bias, scale):
    """One sequence ``[1, L, H, D]``, no autograd: ``softmax(bias + scale * q k^T) v`` through BLAS batched over
    the heads (strided views in, no copies of q, k or v)."""
    qh, kh, vh = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # [H, L, D] views
    logits = torch.baddbmm(bias, qh, kh.transpose(1, 2), alpha=scale)
    torch.softmax(logits, -1, out=logits)
    return torch.bmm(logits, vh).transpose(0, 1).unsqueeze(0)


def attention(q, k, v, pos_bias, attention_mask, scale, dropout_p):
    """Padded ``[B, N, H, D]`` attention; ``attention_mask [B, N]`` (True/1 = real token) or None."""
    batch, n = q.shape[0], q.shape[1]
    if attention_mask is None:
        return _call(q, k, v, pos_bias, scale, dropout_p)
    real = attention_mask.bool()
    if bool(real.all()):
        return _call(q, k, v, pos_bias, scale, dropout_p)
    lengths_t = real.sum(1)
    prefix = bool((real == (torch.arange(n, device=q.device) < lengths_t[:, None])).all())
    lengths = lengths_t.tolist()  # CPU tensors: no device synchronisation
    out = q.new_zeros(q.shape)  # in-place writes below are recorded by autograd; padded rows stay 0
    if prefix:  # right padding, the usual case: each sequence cut to its real length, equal lengths together
        groups = {}
        for b, length in enumerate(lengths):
            groups.setdefault(length, []).append(b)
        for length, rows in groups.items():
            if length == 0:
                continue
            bias = None if pos_bias is None else pos_bias[:, :length, :length]
            if len(rows) == 1:
                b = rows[0]
                out[b:b + 1, :length] = _call(q[b:b + 1, :length], k[b:b + 1, :length], v[b:b + 1, :length], bias,
                                              scale, dropout_p)
            else:
                idx = torch.tensor(rows, device=q.device)
                out[idx, :length] = _call(q[idx, :length], k[idx, :length], v[idx, :length], bias, scale,
                                          dropout_p)
        return out
    for b in range(batch):  # holes in the mask: each sequence's real tokens and their bias entries, gathered
        if lengths[b] == 0:
            continue
        pos = real[b].nonzero().squeeze(1)
        bias = None if pos_bias is None else pos_bias.index_select(1, pos).index_select(2, pos)
        out[b, pos] = _call(q[b:b + 1, pos], k[b:b + 1, pos], v[b:b + 1, pos], bias, scale, dropout_p)[0]
    return out


def attention_varlen(q, k, v, cu_seqlens, pos_bias, scale, dropout_p):
    """Packed ``[total, H, D]`` attention, sequence ``b`` being rows ``cu_seqlens[b]:cu_seqlens[b + 1]``."""
    cu = cu_seqlens.tolist()
    # offsets that start at 0 and never decrease cover rows [0, cu[-1]) exactly: only the tail needs zeros; any
    # others (a caller that skipped the offsets' check) start from zeros, so no row is left unwritten
    if cu[0] == 0 and all(a <= b for a, b in zip(cu, cu[1:])):
        out = q.new_empty(q.shape)
        out[cu[-1]:] = 0
    else:
        out = q.new_zeros(q.shape)
    for b in range(len(cu) - 1):
        lo, hi = cu[b], cu[b + 1]
        if hi > lo:
            bias = None if pos_bias is None else pos_bias[:, :hi - lo, :hi - lo]
            out[lo:hi] = _call(q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], bias, scale, dropout_p)[0]
    return out


def attention_traced(q, k, v, pos_bias, attention_mask, scale, dropout_p):
    """``attention`` with tensor ops only (no host read, no loop over the batch): what torch.compile traces.
    ``attention_mask [B, N]`` bool (True = real token) or None."""
    bias = None if pos_bias is None else pos_bias[None].to(q.dtype)  # [1, H, N, N]
    if attention_mask is not None:
        real = attention_mask.bool()
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        token = real[:, :, None, None]  # [B, N, 1, 1]
        q, k, v = (torch.where(token, t, zero) for t in (q, k, v))  # `where`: 0 * inf would be NaN
        pair = (real[:, :, None] & real[:, None, :])[:, None]  # [B, 1, N, N]: both real
        padded_query = ~real[:, None, :, None]  # [B, 1, N, 1]
        # real pairs: the bias; a real query's padded keys: -inf (no weight); a padded query: 0 everywhere (it
        # attends uniformly to zeroed values, a finite row that is discarded and passes no gradient on)
        outside = torch.where(padded_query, zero, torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
        bias = torch.where(pair, bias if bias is not None else zero, outside)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias,
                                         dropout_p=dropout_p, scale=scale).transpose(1, 2)
    if attention_mask is not None:
        out = torch.where(token, out, zero)
    return out


def attention_varlen_traced(q, k, v, cu_seqlens, max_seqlen, pos_bias, scale, dropout_p):
    """``attention_varlen`` with tensor ops only: the packed tokens laid out as ``[B, max_seqlen]`` rows (the
    reference's index arithmetic, no host read), ``attention_traced`` on them, and back; rows after
    ``cu_seqlens[-1]`` get zeros."""
    heads, dim = q.shape[-2], q.shape[-1]
    src, mask, dst = _packed_index(cu_seqlens, q.shape[0], max_seqlen)
    qp, kp, vp = (_with_zero_row(t)[src] for t in (q, k, v))
    bias = None if pos_bias is None else pos_bias[:, :max_seqlen, :max_seqlen]
    out = attention_traced(qp, kp, vp, bias, mask, scale, dropout_p)
    return _with_zero_row(out.reshape(-1, heads, dim))[dst]


def attention_varlen_subset(q, k, v, cu_seqlens_q, cu_seqlens_k, position_ids_q, pos_bias, scale):
    """Inference of ``tupe_attention_varlen_subset``: per sequence, ``baddbmm`` with the gathered rows
    ``pos_bias[:, position_ids_q, :Lk]`` as its addend, an in-place softmax and ``bmm`` (the gathered ``[H, Lq, Lk]``
    bias is as large as the logits, so a fused call with it as a mask would save nothing). Rows of q in no sequence
    and sequences with no key give 0."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = q.new_zeros(q.shape)
    for b in range(len(cq) - 1):
        q_lo, q_hi, k_lo, k_hi = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q_hi <= q_lo or k_hi <= k_lo:
            continue
        # index_select copies: baddbmm's addend is then overwritten by the softmax without touching pos_bias
        bias = pos_bias[:, :, :k_hi - k_lo].index_select(1, position_ids_q[q_lo:q_hi]).to(q.dtype)
        qh, kh, vh = q[q_lo:q_hi].transpose(0, 1), k[k_lo:k_hi].transpose(0, 1), v[k_lo:k_hi].transpose(0, 1)
        logits = torch.baddbmm(bias, qh, kh.transpose(1, 2), alpha=scale)
        torch.softmax(logits, -1, out=logits)
        out[q_lo:q_hi] = torch.bmm(logits, vh).transpose(0, 1)
    return out
