"""Eager references of TUPE attention (DESIGN.md, "TUPE"): padded ``[B, N, H, D]`` and packed (varlen) layouts."""

import torch


def tupe_attention(q, k, v, pos_bias=None, *, key_padding_mask=None, scale=None, dropout_p=0.0, dropout_mask=None):
    """``softmax(scale * q k^T + pos_bias)`` over keys, dropout, ``@ v``; ``[B, N, H, D]`` in and out.

    ``key_padding_mask [B, N]`` (True = real token): masked keys get no weight, masked queries output 0, and a query
    with no valid key outputs 0. ``dropout_mask [B, H, N, N]`` (bool, True = keep) replaces the random draw so a
    test can feed the mask a kernel used; without it, ``torch.nn.functional.dropout`` draws one.
    """
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    logits = scale * torch.einsum("bihd,bjhd->bhij", q, k)
    if pos_bias is not None:
        logits = logits + pos_bias.to(logits.dtype)[None]
    if key_padding_mask is not None:
        logits = logits.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    # a row with no finite logit (no valid key) gets weight 0 everywhere instead of NaN
    row_max = logits.amax(dim=-1, keepdim=True)
    dead = row_max == float("-inf")
    weights = torch.softmax(logits.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout_mask is not None:
        weights = weights * dropout_mask.to(weights.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", weights, v)
    if key_padding_mask is not None:
        out = out * key_padding_mask[:, :, None, None].to(out.dtype)
    return out


def pad_packed(x, cu_seqlens, max_seqlen):
    """Packed ``[total, ...]`` rows to ``[B, max_seqlen, ...]`` (zeros after each sequence) and the padding mask."""
    cu = cu_seqlens.tolist()
    batch = len(cu) - 1
    out = x.new_zeros((batch, max_seqlen) + tuple(x.shape[1:]))
    mask = torch.zeros(batch, max_seqlen, dtype=torch.bool, device=x.device)
    for b in range(batch):
        n = cu[b + 1] - cu[b]
        out[b, :n] = x[cu[b]:cu[b + 1]]
        mask[b, :n] = True
    return out, mask


def unpad(x, cu_seqlens):
    """``[B, N, ...]`` back to the packed ``[total, ...]`` rows of ``cu_seqlens``."""
    cu = cu_seqlens.tolist()
    return torch.cat([x[b, : cu[b + 1] - cu[b]] for b in range(len(cu) - 1)], dim=0)


def tupe_attention_varlen(q, k, v, cu_seqlens, max_seqlen, pos_bias=None, *, scale=None, dropout_p=0.0,
                          dropout_mask=None):
    """Packed ``[total, H, D]`` tokens, sequences delimited by ``cu_seqlens``; positions restart at 0 in each
    sequence. Defined as the padded reference on the real tokens."""
    qp, mask = pad_packed(q, cu_seqlens, max_seqlen)
    kp, _ = pad_packed(k, cu_seqlens, max_seqlen)
    vp, _ = pad_packed(v, cu_seqlens, max_seqlen)
    bias = None if pos_bias is None else pos_bias[:, :max_seqlen, :max_seqlen]
    out = tupe_attention(qp, kp, vp, bias, key_padding_mask=mask, scale=scale, dropout_p=dropout_p,
                         dropout_mask=dropout_mask)
    return unpad(out, cu_seqlens)
