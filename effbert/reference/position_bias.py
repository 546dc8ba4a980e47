"""Eager references of TUPE's positional term (DESIGN.md, "TUPE"): T5 relative buckets and the untied bias P."""

import math

import torch


def t5_relative_buckets(seq_len, num_buckets=32, max_distance=128, device=None):
    """Bidirectional T5 bucket of the relative distance ``j - i`` for every ``(i, j)``: ``LongTensor[N, N]``.

    Half the buckets hold keys after the query (``j > i``), half the rest. Within a half, distances below
    ``num_buckets // 4`` get a bucket each; larger ones share buckets spaced logarithmically up to
    ``max_distance``, beyond which everything falls in the last bucket.
    """
    pos = torch.arange(seq_len, device=device)
    rel = pos[None, :] - pos[:, None]  # j - i
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    # log-spaced buckets for exact <= dist < max_distance, in float32 as T5 computes them (the truncation at bucket
    # edges then agrees with T5 checkpoints); clamp the log's argument so dist = 0 stays finite
    far = (
        exact
        + (
            torch.log(dist.clamp_min(1).float() / exact)
            / math.log(max_distance / exact)
            * (half - exact)
        ).long()
    )
    far = far.clamp_max(half - 1)
    return bucket + torch.where(dist < exact, dist, far)


def tupe_position_bias(
    pos_q, pos_k, *, scale, rel_table=None, rel_buckets=None, cls_row=None, cls_col=None
):
    """``P[h, i, j] = scale * <pos_q[i, h], pos_k[j, h]> + rel_table[rel_buckets[i, j], h]``, then [CLS] untying:
    ``P[h, 0, :] = cls_row[h]`` and ``P[h, 1:, 0] = cls_col[h]``. Differentiable in every float input. N = 0 gives
    an empty ``[H, 0, 0]`` (zero gradients)."""
    p = scale * torch.einsum("ihd,jhd->hij", pos_q, pos_k)
    if rel_table is not None:
        p = p + rel_table[rel_buckets].permute(2, 0, 1).to(p.dtype)
    if cls_row is not None:
        # position 0 by comparison, not by indexing: N = 0 gives an empty P with cls_row/cls_col still in the graph
        row0 = torch.arange(p.shape[-1], device=p.device) == 0
        col0 = row0
        # out-of-place so autograd sees the override: first row from cls_row, then column 0 below it from cls_col
        p = torch.where(row0[None, :, None], cls_row[:, None, None].to(p.dtype), p)
        p = torch.where(
            col0[None, None, :] & ~row0[None, :, None], cls_col[:, None, None].to(p.dtype), p
        )
    return p
