"""The CPU path of ``tupe_attention``: PyTorch's own fused CPU attention
(``torch.nn.functional.scaled_dot_product_attention``, flash-style, threaded and vectorised) run on each sequence's
real tokens, with the shared positional term ``pos_bias[:, :L, :L]`` passed as its additive ``attn_mask``.

No ``[B, H, N, N]`` tensor is built: the bias is read as the shared ``[H, N, N]`` view, broadcast over a batch of
one, and padded keys and queries are never computed, so real-length padding costs nothing (the padded batch of
transformers' BERT computes every padded position). Sequences of equal length share one call; a batch with no
padding is one call. Gradients (``q``, ``k``, ``v`` and ``pos_bias``, the last summed over the batch by autograd)
come from PyTorch's backward of the same fused calls, so fine-tuning on a CPU does not take the eager path.
The sequences are cut out with one ``split`` and the output is one ``cat`` of the results and zero blocks (the bias
blocks through ``_BiasBlocks``), so the backward hands each call a view of the gradient and zero-fills only the
padding. Slicing each sequence out and writing its result into a zero output in place made autograd zero-fill a
gradient of the whole batch per sequence (about half of forward+backward at B = 16, N = 128, 50% padding). The
forward does the same work as before: the cat writes the output once where a zero fill and per-sequence copies did.

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

from ..reference.tupe_attention import packed_index, with_zero_row


MATH_MAX_LEN = 160  # the longest sequence the inference road takes (measured crossover: 128 faster, 200 slower)


def _call(q, k, v, bias, scale, dropout_p):
    """Attention over ``[G, L, H, D]`` with the shared ``bias [H, L, L]`` (or None): ``[G, L, H, D]``."""
    if (
        bias is not None
        and q.shape[0] == 1
        and q.shape[1] <= MATH_MAX_LEN
        and dropout_p == 0.0
        and not (
            torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad or bias.requires_grad)
        )
    ):
        return _call_inference(q, k, v, bias.to(q.dtype), scale)
    mask = None if bias is None else bias.unsqueeze(0).to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        dropout_p=dropout_p,
        scale=scale,
    )
    return out.transpose(1, 2)


def _call_inference(q, k, v, bias, scale):
    """One sequence ``[1, L, H, D]``, no autograd: ``softmax(bias + scale * q k^T) v`` through BLAS batched over
    the heads (strided views in, no copies of q, k or v)."""
    qh, kh, vh = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # [H, L, D] views
    logits = torch.baddbmm(bias, qh, kh.transpose(1, 2), alpha=scale)
    torch.softmax(logits, -1, out=logits)
    return torch.bmm(logits, vh).transpose(0, 1).unsqueeze(0)


class _BiasBlocks(torch.autograd.Function):
    """The positional term of each sequence, ``pos_bias[:, :L, :L]`` for an int ``L`` or ``pos_bias[:, pos][:, :, pos]``
    for an index tensor ``pos``. Slicing or indexing ``pos_bias`` once per sequence would make autograd build and sum
    a whole ``[H, N, N]`` gradient per sequence; here the backward adds each block into one zero tensor."""

    @staticmethod
    def forward(ctx, pos_bias, *blocks):
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.blocks = pos_bias.shape, blocks
        return tuple(
            pos_bias[:, :b, :b]
            if isinstance(b, int)
            else pos_bias.index_select(1, b).index_select(2, b)
            for b in blocks
        )

    @staticmethod
    def backward(ctx, *grads):
        out = None
        for b, g in zip(ctx.blocks, grads):
            if g is None:
                continue
            if out is None:
                out = g.new_zeros(ctx.shape)
            if isinstance(b, int):
                out[:, :b, :b] += g
            else:  # positions are distinct: no index repeats in the accumulation
                out[:, b[:, None], b] += g
        return (out,) + (None,) * len(ctx.blocks)


def _bias_blocks(pos_bias, blocks):
    """``_BiasBlocks`` when ``pos_bias`` needs a gradient; the same slices (views) or gathers otherwise."""
    if pos_bias is None:
        return [None] * len(blocks)
    if torch.is_grad_enabled() and pos_bias.requires_grad:
        return list(_BiasBlocks.apply(pos_bias, *blocks))
    return [
        pos_bias[:, :b, :b]
        if isinstance(b, int)
        else pos_bias.index_select(1, b).index_select(2, b)
        for b in blocks
    ]


def _row_prefixes(t, lengths):
    """``[t[b, :lengths[b]] for b]`` as views whose backward is one ``cat`` (the padding's share filled with zeros
    once): indexing or slicing each sequence out of ``t`` would make autograd build a zero gradient the size of ``t``
    per sequence, most of the backward's time on a padded batch."""
    n = t.shape[1]
    if t.shape[0] == 1 or t.stride(0) == n * t.stride(
        1
    ):  # rows back to back: one split of the flattened batch
        sizes = [s for length in lengths for s in (length, n - length)]
        return list(t.flatten(0, 1).split(sizes)[0::2])
    return [row.split([length, n - length])[0] for row, length in zip(t.unbind(0), lengths)]


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
    # The output is one cat of the per-sequence results and zero blocks, never in-place writes into a zero tensor:
    # the backward of a cat hands each piece a view of the gradient, where slice-assignment would zero-fill a
    # tensor of the whole batch per sequence.
    zeros = q.new_zeros((n,) + q.shape[2:])
    if prefix:  # right padding, the usual case: each sequence cut to its real length, equal lengths together
        qs, ks, vs = (_row_prefixes(t, lengths) for t in (q, k, v))
        groups = {}
        for b, length in enumerate(lengths):
            groups.setdefault(length, []).append(b)
        results = [None] * batch
        groups = {length: rows for length, rows in groups.items() if length}
        for (length, rows), bias in zip(groups.items(), _bias_blocks(pos_bias, list(groups))):
            if len(rows) == 1:
                b = rows[0]
                results[b] = _call(qs[b][None], ks[b][None], vs[b][None], bias, scale, dropout_p)[0]
            else:  # stack's backward hands out views; unbind's is one stack
                out = _call(
                    *(torch.stack([t[b] for b in rows]) for t in (qs, ks, vs)),
                    bias,
                    scale,
                    dropout_p,
                )
                for b, r in zip(rows, out.unbind(0)):
                    results[b] = r
        pieces = []
        for b, length in enumerate(lengths):
            if length:
                pieces.append(results[b])
            if length < n:
                pieces.append(zeros[: n - length])
        return torch.cat(pieces).view(q.shape)
    rows_out = []
    qr, kr, vr = (t.unbind(0) for t in (q, k, v))
    positions = [real[b].nonzero().squeeze(1) if lengths[b] else None for b in range(batch)]
    biases = iter(_bias_blocks(pos_bias, [pos for pos in positions if pos is not None]))
    for b, pos in enumerate(
        positions
    ):  # holes in the mask: each sequence's real tokens and their bias entries
        if pos is None:
            rows_out.append(zeros)
            continue
        bias = next(biases)
        # per-row gathers and scatters: their backward's zeros are one row each, not the whole batch
        res = _call(
            qr[b].index_select(0, pos)[None],
            kr[b].index_select(0, pos)[None],
            vr[b].index_select(0, pos)[None],
            bias,
            scale,
            dropout_p,
        )[0]
        rows_out.append(zeros.index_copy(0, pos, res))
    return torch.stack(rows_out)


def attention_varlen(q, k, v, cu_seqlens, pos_bias, scale, dropout_p):
    """Packed ``[total, H, D]`` attention, sequence ``b`` being rows ``cu_seqlens[b]:cu_seqlens[b + 1]``."""
    total = q.shape[0]
    cu = [
        min(max(c, 0), total) for c in cu_seqlens.tolist()
    ]  # unchecked offsets: rows past the end do not exist
    if not all(a <= b for a, b in zip(cu, cu[1:])):
        return _varlen_unordered(q, k, v, cu, pos_bias, scale, dropout_p)
    # offsets that never decrease cut the rows into consecutive pieces: [0, cu[0]) and [cu[-1], total) belong to no
    # sequence and get zeros. One split in, one cat out: their backwards hand out views (slicing each sequence out
    # of q and writing it into a zero tensor would zero-fill a [total, H, D] gradient per sequence).
    sizes = [cu[0]] + [hi - lo for lo, hi in zip(cu, cu[1:])] + [total - cu[-1]]
    qs, ks, vs = (t.split(sizes) for t in (q, k, v))
    pieces = [q.new_zeros((cu[0],) + q.shape[1:])] if cu[0] else []
    seqs = [b for b in range(1, len(sizes) - 1) if sizes[b]]
    for b, bias in zip(seqs, _bias_blocks(pos_bias, [sizes[b] for b in seqs])):
        pieces.append(_call(qs[b][None], ks[b][None], vs[b][None], bias, scale, dropout_p)[0])
    if total > cu[-1]:
        pieces.append(q.new_zeros((total - cu[-1],) + q.shape[1:]))
    return torch.cat(pieces) if pieces else q.new_zeros(q.shape)


def _varlen_unordered(q, k, v, cu, pos_bias, scale, dropout_p):
    """Offsets that decrease somewhere (a caller that skipped the offsets' check): the rows no sequence names stay
    0, none is left unwritten."""
    out = q.new_zeros(q.shape)
    for b in range(len(cu) - 1):
        lo, hi = cu[b], cu[b + 1]
        if hi > lo:
            bias = None if pos_bias is None else pos_bias[:, : hi - lo, : hi - lo]
            out[lo:hi] = _call(
                q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], bias, scale, dropout_p
            )[0]
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
        outside = torch.where(
            padded_query, zero, torch.full((), float("-inf"), dtype=q.dtype, device=q.device)
        )
        bias = torch.where(pair, bias if bias is not None else zero, outside)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=bias,
        dropout_p=dropout_p,
        scale=scale,
    ).transpose(1, 2)
    if attention_mask is not None:
        out = torch.where(token, out, zero)
    return out


def attention_varlen_traced(q, k, v, cu_seqlens, max_seqlen, pos_bias, scale, dropout_p):
    """``attention_varlen`` with tensor ops only: the packed tokens laid out as ``[B, max_seqlen]`` rows (the
    reference's index arithmetic, no host read), ``attention_traced`` on them, and back; rows after
    ``cu_seqlens[-1]`` get zeros."""
    heads, dim = q.shape[-2], q.shape[-1]
    src, mask, dst = packed_index(cu_seqlens, q.shape[0], max_seqlen)
    qp, kp, vp = (with_zero_row(t)[src] for t in (q, k, v))
    bias = None if pos_bias is None else pos_bias[:, :max_seqlen, :max_seqlen]
    out = attention_traced(qp, kp, vp, bias, mask, scale, dropout_p)
    return with_zero_row(out.reshape(-1, heads, dim))[dst]


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
        bias = pos_bias[:, :, : k_hi - k_lo].index_select(1, position_ids_q[q_lo:q_hi]).to(q.dtype)
        qh, kh, vh = (
            q[q_lo:q_hi].transpose(0, 1),
            k[k_lo:k_hi].transpose(0, 1),
            v[k_lo:k_hi].transpose(0, 1),
        )
        logits = torch.baddbmm(bias, qh, kh.transpose(1, 2), alpha=scale)
        torch.softmax(logits, -1, out=logits)
        out[q_lo:q_hi] = torch.bmm(logits, vh).transpose(0, 1)
    return out
