"""Eager references of TUPE attention (DESIGN.md, "TUPE"): padded ``[B, N, H, D]`` and packed (varlen) layouts."""

import torch


def tupe_attention(
    q, k, v, pos_bias=None, *, attention_mask=None, scale=None, dropout_p=0.0, dropout_mask=None
):
    """``softmax(scale * q k^T + pos_bias)`` over keys, dropout, ``@ v``; ``[B, N, H, D]`` in and out.

    ``attention_mask [B, N]`` (True = real token): masked keys get no weight, masked queries output 0, and a query
    with no valid key outputs 0. Nothing at a masked position (an inf or NaN in q, k, v or in the bias's masked rows
    and columns) reaches a real token's output or gradient. NaN or +inf among a real row's logits gives NaN.
    ``dropout_mask [B, H, N, N]`` (bool, True = keep) replaces the random draw so a test can feed the mask a kernel
    used; without it, ``torch.nn.functional.dropout`` draws one.
    """
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    if attention_mask is not None:
        # `where`, not a product: 0 * inf is NaN, and where's gradient at the masked entries is exactly 0
        real = attention_mask[:, :, None, None]
        q, k, v = (
            torch.where(real, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in (q, k, v)
        )
    logits = scale * torch.einsum("bihd,bjhd->bhij", q, k)
    if pos_bias is not None:
        logits = logits + pos_bias.to(logits.dtype)[None]
    if attention_mask is not None:
        pair = attention_mask[:, None, :, None] & attention_mask[:, None, None, :]
        logits = logits.masked_fill(~pair, float("-inf"))
    # a row with no finite logit (no valid key) gets weight 0 everywhere instead of NaN; a NaN row is not dead
    dead = ~(logits != float("-inf")).any(dim=-1, keepdim=True)  # (any, not amax: N = 0 is allowed)
    weights = torch.softmax(logits.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout_mask is not None:
        weights = weights * dropout_mask.to(weights.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p)
    return torch.einsum("bhij,bjhd->bihd", weights, v)


def packed_index(cu_seqlens, total, max_seqlen):
    """Where packed rows go in the padded ``[B, max_seqlen]`` layout, with tensor ops only (no host copy, so it
    traces under torch.compile). Returns ``(src [B, S], mask [B, S], dst [total])``: ``src`` the packed row of each
    padded slot (``total`` for padding), ``mask`` True at real tokens, ``dst`` the flat padded slot of each packed
    row (``B * S`` for a row after ``cu_seqlens[-1]``, which belongs to no sequence)."""
    cu = cu_seqlens.long()
    batch = cu.shape[0] - 1
    pos = torch.arange(max_seqlen, device=cu.device)
    lengths = cu[1:] - cu[:-1]
    mask = pos[None, :] < lengths[:, None]
    src = torch.where(mask, cu[:-1, None] + pos[None, :], total)
    rows = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(
        cu[1:], rows, right=True
    )  # the sequence b with cu[b] <= row < cu[b + 1]
    inside = seq < batch
    seq = seq.clamp(max=max(batch - 1, 0))
    dst = torch.where(inside, seq * max_seqlen + rows - cu[seq], batch * max_seqlen)
    return src, mask, dst


def with_zero_row(x):
    """``x [R, ...]`` with one row of zeros appended (``[R + 1, ...]``): the slot that
    `packed_index` sends padding
    to."""
    return torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))], dim=0)


def pad_packed(x, cu_seqlens, max_seqlen):
    """Packed ``[total, ...]`` rows to ``[B, max_seqlen, ...]`` (zeros after each sequence) and the padding mask."""
    src, mask, _ = packed_index(cu_seqlens, x.shape[0], max_seqlen)
    return with_zero_row(x)[src], mask


def unpad(x, cu_seqlens, total=None):
    """``[B, N, ...]`` back to the packed ``[total, ...]`` rows of ``cu_seqlens`` (``total`` defaults to
    ``cu_seqlens[-1]``); rows after ``cu_seqlens[-1]`` belong to no sequence and get zeros."""
    total = int(cu_seqlens[-1]) if total is None else total
    _, _, dst = packed_index(cu_seqlens, total, x.shape[1])
    return with_zero_row(x.reshape((-1,) + tuple(x.shape[2:])))[dst]


def tupe_attention_varlen(
    q, k, v, cu_seqlens, max_seqlen, pos_bias=None, *, scale=None, dropout_p=0.0, dropout_mask=None
):
    """Packed ``[total, H, D]`` tokens, sequences delimited by ``cu_seqlens``; positions restart at 0 in each
    sequence. Defined as the padded reference on the real tokens; rows after ``cu_seqlens[-1]`` (in no sequence)
    get zeros. Tensor ops only: it traces under torch.compile."""
    qp, mask = pad_packed(q, cu_seqlens, max_seqlen)
    kp, _ = pad_packed(k, cu_seqlens, max_seqlen)
    vp, _ = pad_packed(v, cu_seqlens, max_seqlen)
    bias = None if pos_bias is None else pos_bias[:, :max_seqlen, :max_seqlen]
    out = tupe_attention(
        qp,
        kp,
        vp,
        bias,
        attention_mask=mask,
        scale=scale,
        dropout_p=dropout_p,
        dropout_mask=dropout_mask,
    )
    return unpad(out, cu_seqlens, q.shape[0])


def tupe_attention_varlen_subset(
    q, k, v, cu_seqlens_q, cu_seqlens_k, position_ids_q, pos_bias, *, scale=None
):
    """Packed attention where the queries are a subset of each sequence's tokens and the keys are all of them.

    Sequence ``b``'s queries are ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``, its keys and values
    ``k, v[cu_seqlens_k[b]:cu_seqlens_k[b+1]]``. ``logits[h, i, j] = scale * <q_i, k_j> + pos_bias[h, pos(i), j]``
    with ``pos(i) = position_ids_q[i]``, the query's own position among its sequence's keys; softmax over ``j``, then
    ``@ v``. A sequence with no key gives 0 to its queries; rows of q after ``cu_seqlens_q[-1]`` get 0. One loop
    over the sequences, in the inputs' dtype (float64 for tests); reads the offsets on the host."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q_lo, q_hi, k_lo, k_hi = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q_hi <= q_lo or k_hi <= k_lo:
            continue
        pos = position_ids_q[q_lo:q_hi].long()
        bias = pos_bias[:, pos, : k_hi - k_lo].to(q.dtype)  # [H, Lq, Lk]: each query's own row of P
        logits = scale * torch.einsum("ihd,jhd->hij", q[q_lo:q_hi], k[k_lo:k_hi]) + bias
        out[q_lo:q_hi] = torch.einsum("hij,jhd->ihd", torch.softmax(logits, dim=-1), v[k_lo:k_hi])
    return out
