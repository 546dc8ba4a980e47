"""TUPE attention kernels: flash-style forward and backward with a shared positional bias and its gradient.

logits[b, h, i, j] = scale * <q[b, i, h], k[b, j, h]> + bias[h, i, j]. The forward keeps a running maximum and sum
per query (online softmax) and saves the log-sum-exp; nothing of size N*N per batch element touches memory. The
backward recomputes the probabilities from it in two kernels, neither of which uses atomics, so every gradient is
bitwise reproducible:

- `tupe_attn_bwd_dkdv_kernel`: one program per (key block, batch, head) walks the query blocks: dK, dV.
- `tupe_attn_bwd_dq_kernel`: one program per (query block, head, batch group) walks the batch elements of its group
  and the key blocks: dQ per batch element, and the bias gradient of its query rows summed over its batch elements
  in a float32 buffer that no other program touches (the wrapper sums the groups' buffers in a fixed order).

Padded layout ([B, N, H, D], optional key padding mask) and packed layout ([total, H, D] with cu_seqlens) share the
kernels: `VARLEN` reads each sequence's start and length from cu_seqlens. Log-sum-exp and the backward's row terms
are indexed by (head, token) with token = b * N + i (padded) or cu_seqlens[b] + i (packed).

The forward keeps logits, their running maximum and the saved log-sum-exp in natural units and takes each
exponential as exp2((s - max) * log2(e)), after the subtraction: scaling the logits themselves by log2(e) would
overflow a bias of float32's lowest finite value (transformers' "masked") to -inf and turn a row the reference
softmaxes into a dead one. The backward kernels, at their register limit, carry logits times log2(e) as before; a
row whose every logit is near float32's lowest (its log-sum-exp overflows there, and a single saved log-sum-exp of
that magnitude has lost log(N) to rounding anyway) gets no gradient. Such rows are fully masked queries in practice,
whose output gradient is 0.

Non-finite values never leak from padded positions: the logits of a masked key are -inf and its logit gradient
exactly 0, and wherever a padded position's input meets a zero weight inside a product it must be 0, since 0 * inf
is NaN: the forward reads a masked key's v as 0, and the backward wrapper passes q, k and v with padded positions
zeroed (one copy each, which keeps the backward kernels within their register budget). So an inf or NaN in q, k or v
at a padded position reaches no real token's output or gradient. A NaN or +inf among a real row's logits gives NaN
(the row is not mistaken for one with no valid key). Packed sequence bounds are checked in the kernels too (an
offset outside [0, total], a decreasing one or a sequence longer than max_seqlen makes that sequence empty), so no
input reads or writes outside a buffer even when the op is called without its argument checks.

Dropout draws a Philox number per (batch, head, i, j) from a seed tensor, so the backward regenerates the mask.

The attention grids put batch * heads on axis 1, which CUDA caps at 65535 (the query or key block stays on axis 0,
so that the programs of one head run side by side and share its keys and values in L2). A larger batch is launched
in consecutive chunks of batch elements (`batch_chunks`), each kernel on views of its chunk (packed: on its slice of
cu_seqlens); chunk c draws its dropout from seed + c, the same in the forward, both backward kernels and
`dropout_keep_mask`. A batch that fits is one launch, as it always was.
"""

import torch
import triton
import triton.language as tl

from . import INTERPRET, MAX_GRID_YZ, batch_chunks, device_arch

LOG2E = 1.4426950408889634


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, seq_stride, p_drop, TRANSPOSED: tl.constexpr = False):
    """Keep-mask of one tile: one Philox draw per (batch * H + head, i, j); [BLOCK_M, BLOCK_N], or [BLOCK_N,
    BLOCK_M] when TRANSPOSED."""
    row = bh.to(tl.int64) * seq_stride + offs_m
    if TRANSPOSED:
        offs = row[None, :] * seq_stride + offs_n[:, None]
    else:
        offs = row[:, None] * seq_stride + offs_n[None, :]
    return tl.rand(seed, offs) >= p_drop


@triton.jit
def _seq_bounds(CuSeq, b, N, TOTAL, VARLEN: tl.constexpr):
    """(first token, length) of sequence b; a packed sequence whose bounds leave [0, TOTAL], decrease or exceed N
    rows is empty (the wrappers raise on those; this keeps every address inside the buffers regardless)."""
    if VARLEN:
        lo = tl.load(CuSeq + b)
        hi = tl.load(CuSeq + b + 1)
        ok = (lo >= 0) & (hi >= lo) & (hi <= TOTAL) & (hi - lo <= N)
        start = tl.where(ok, lo, 0).to(tl.int64)
        seqlen = tl.where(ok, hi - lo, 0).to(tl.int32)
    else:
        start = b.to(tl.int64) * N
        seqlen = N
    return start, seqlen


@triton.jit
def _head_base(Ptr, b, h, start, sb, sn, sh, VARLEN: tl.constexpr):
    """Address of token 0 of sequence b, head h: packed rows start at cu_seqlens[b], padded ones at row b."""
    if VARLEN:
        return Ptr + start * sn + h * sh
    return Ptr + b.to(tl.int64) * sb + h * sh


@triton.jit
def _logits_tile(
    q,
    k,
    Bias,
    h,
    offs_m,
    offs_n,
    seqlen,
    key_real,
    bias_keys,
    sbh,
    sbi,
    sbj,
    scale,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LOG2: tl.constexpr = False,
):
    """scale * q k^T + bias (natural units; times log2(e) when LOG2, with ``scale`` already so multiplied), -inf at
    keys that are not real tokens. The bias is read on the sequence's rows and the keys ``bias_keys`` (the forward
    reads every key of the sequence, the backward only real ones: each keeps its kernel clear of spills); whatever a
    masked row reads there, the callers make that row dead or its gradient 0."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    if HAS_BIAS:
        tile_ok = (offs_m[:, None] < seqlen) & bias_keys[None, :]
        bias = tl.load(
            Bias + h * sbh + offs_m[:, None] * sbi + offs_n[None, :] * sbj, mask=tile_ok, other=0.0
        )
        if LOG2:
            s += bias.to(tl.float32) * 1.4426950408889634
        else:
            s += bias.to(tl.float32)
    return tl.where(key_real[None, :], s, float("-inf"))


@triton.jit
def _real_tokens(Mask, b, offs, seqlen, smb, HAS_MASK: tl.constexpr):
    """Which of the positions `offs` are real tokens: inside the sequence and, with a mask, not padding."""
    ok = offs < seqlen
    if HAS_MASK:
        ok = ok & (tl.load(Mask + b.to(tl.int64) * smb + offs, mask=ok, other=0) != 0)
    return ok


@triton.jit
def tupe_attn_fwd_kernel(
    Q,
    K,
    V,
    Bias,
    Mask,
    CuSeq,
    Seed,
    Out,
    Lse,
    sqb,
    sqn,
    sqh,
    skb,
    skn,
    skh,
    svb,
    svn,
    svh,
    sob,
    son,
    soh,
    sbh,
    sbi,
    sbj,
    smb,
    slh,
    H,
    N,
    TOTAL,
    scale,
    p_drop,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start, seqlen = _seq_bounds(CuSeq, b, N, TOTAL, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:  # packed layout: this sequence is shorter than the longest one
        return
    q_base = _head_base(Q, b, h, start, sqb, sqn, sqh, VARLEN)
    k_base = _head_base(K, b, h, start, skb, skn, skh, VARLEN)
    v_base = _head_base(V, b, h, start, svb, svn, svh, VARLEN)
    o_base = _head_base(Out, b, h, start, sob, son, soh, VARLEN)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < seqlen
    q = tl.load(
        q_base + offs_m[:, None] * sqn + offs_d[None, :],
        mask=_real_tokens(Mask, b, offs_m, seqlen, smb, HAS_MASK)[:, None],
        other=0.0,
    )
    if DROPOUT:
        seed = tl.load(Seed)
        keep_scale = 1.0 / (1.0 - p_drop)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seqlen
        # masks that do not depend on a load keep these loads software-pipelined
        k = tl.load(
            k_base + offs_n[:, None] * skn + offs_d[None, :], mask=col_ok[:, None], other=0.0
        )
        v = tl.load(
            v_base + offs_n[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0
        )
        col_real = _real_tokens(Mask, b, offs_n, seqlen, smb, HAS_MASK)
        if HAS_MASK:  # a masked key's k only reaches logits that become -inf; its v would meet p = 0 as 0 * inf
            v = tl.where(col_real[:, None], v, 0.0)
        # a masked row may read any bias (even NaN): it is made dead after the loop
        s = _logits_tile(
            q,
            k,
            Bias,
            h,
            offs_m,
            offs_n,
            seqlen,
            col_real,
            col_ok,
            sbh,
            sbi,
            sbj,
            scale,
            HAS_BIAS,
            DOT_PRECISION,
        )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row that has seen only -inf shifts by 0, so exp2(-inf - 0) = 0 instead of NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_ref) * 1.4426950408889634)
        p = tl.exp2((s - m_ref[:, None]) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, N, p_drop)
            p = tl.where(keep, p * keep_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # l_i is 0 only for a row with no valid key; a NaN l_i (NaN or +inf among the row's logits) stays alive, so NaN
    # in gives NaN out
    alive = (l_i != 0.0) & _real_tokens(Mask, b, offs_m, seqlen, smb, HAS_MASK)
    out = tl.where(alive[:, None], acc / tl.where(alive, l_i, 1.0)[:, None], 0.0)
    tl.store(
        o_base + offs_m[:, None] * son + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )
    # +inf log-sum-exp makes every recomputed probability of a dead or padded row 0 in the backward
    lse = tl.where(alive, m_i + tl.log(tl.where(alive, l_i, 1.0)), float("inf"))
    tl.store(Lse + h * slh + start + offs_m, lse, mask=row_ok)


@triton.jit
def tupe_attn_fwd_subset_kernel(
    Q,
    K,
    V,
    Bias,
    CuSeqQ,
    CuSeqK,
    PosQ,
    Out,
    sqn,
    sqh,
    skn,
    skh,
    svn,
    svh,
    son,
    soh,
    sbh,
    sbi,
    sbj,
    H,
    NQ,
    NK,
    TOTAL_Q,
    TOTAL_K,
    BIAS_I,
    BIAS_J,
    scale,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Forward of packed attention whose queries are a subset of each sequence's tokens (token-level early exit):
    one program per (query block, sequence * head) walks all the sequence's keys; each query's bias row is
    ``Bias[h, PosQ[query], :]``. No log-sum-exp, no dropout: inference only."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_q, len_q = _seq_bounds(CuSeqQ, b, NQ, TOTAL_Q, True)
    start_k, len_k = _seq_bounds(CuSeqK, b, NK, TOTAL_K, True)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:  # this sequence has fewer active queries than the most active one
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < len_q
    q = tl.load(
        Q + start_q * sqn + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    # a position outside the bias reads nothing (the op refuses it; a caller that skipped the check gets bias 0)
    pos = tl.load(PosQ + start_q + offs_m, mask=row_ok, other=0).to(tl.int64)
    pos_ok = row_ok & (pos >= 0) & (pos < BIAS_I)
    bias_rows = Bias + h * sbh + pos * sbi
    k_base = K + start_k * skn + h * skh
    v_base = V + start_k * svn + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, len_k, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < len_k
        k = tl.load(
            k_base + offs_n[:, None] * skn + offs_d[None, :], mask=col_ok[:, None], other=0.0
        )
        v = tl.load(
            v_base + offs_n[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        bias = tl.load(
            bias_rows[:, None] + offs_n[None, :] * sbj,
            mask=pos_ok[:, None] & (col_ok & (offs_n < BIAS_J))[None, :],
            other=0.0,
        )
        s = tl.where(col_ok[None, :], s + bias.to(tl.float32), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row that has seen only -inf shifts by 0, so exp2(-inf - 0) = 0 instead of NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_ref) * 1.4426950408889634)
        p = tl.exp2((s - m_ref[:, None]) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    # l_i is 0 only with no key at all; NaN stays NaN
    alive = l_i != 0.0
    out = tl.where(alive[:, None], acc / tl.where(alive, l_i, 1.0)[:, None], 0.0)
    tl.store(
        Out + start_q * son + h * soh + offs_m[:, None] * son + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )


@triton.jit
def _probs_and_dlogits(
    q,
    k,
    v,
    do,
    lse,
    delta,
    Bias,
    Seed,
    h,
    bh,
    offs_m,
    offs_n,
    seqlen,
    key_real,
    sbh,
    sbi,
    sbj,
    N,
    qk_scale,
    p_drop,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Recompute one tile: (probabilities after dropout, gradient of the logits)."""
    s = _logits_tile(
        q,
        k,
        Bias,
        h,
        offs_m,
        offs_n,
        seqlen,
        key_real,
        key_real,
        sbh,
        sbi,
        sbj,
        qk_scale,
        HAS_BIAS,
        DOT_PRECISION,
        LOG2=True,
    )
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(tl.load(Seed), bh, offs_m, offs_n, N, p_drop)
        keep_scale = 1.0 / (1.0 - p_drop)
        p_used = tl.where(keep, p * keep_scale, 0.0)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    else:
        p_used = p
    ds = p * (
        dp - delta[:, None]
    )  # 0 at a masked key: p is 0 there and the wrapper passes its v as 0
    return p_used, ds


@triton.jit
def tupe_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    Bias,
    Mask,
    CuSeq,
    Seed,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    sqb,
    sqn,
    sqh,
    skb,
    skn,
    skh,
    svb,
    svn,
    svh,
    sdob,
    sdon,
    sdoh,
    sdkb,
    sdkn,
    sdkh,
    sdvb,
    sdvn,
    sdvh,
    sbh,
    sbi,
    sbj,
    smb,
    slh,
    H,
    N,
    TOTAL,
    scale,
    p_drop,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one key block.

    Tiles are held transposed (keys on rows) so that both accumulating products take their operands as loaded.
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start, seqlen = _seq_bounds(CuSeq, b, N, TOTAL, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen:
        return
    q_base = _head_base(Q, b, h, start, sqb, sqn, sqh, VARLEN)
    k_base = _head_base(K, b, h, start, skb, skn, skh, VARLEN)
    v_base = _head_base(V, b, h, start, svb, svn, svh, VARLEN)
    do_base = _head_base(DO, b, h, start, sdob, sdon, sdoh, VARLEN)
    dk_base = _head_base(DK, b, h, start, sdkb, sdkn, sdkh, VARLEN)
    dv_base = _head_base(DV, b, h, start, sdvb, sdvn, sdvh, VARLEN)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < seqlen
    key_ok = _real_tokens(Mask, b, offs_n, seqlen, smb, HAS_MASK)
    k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    qk_scale = scale * 1.4426950408889634
    if DROPOUT:
        seed = tl.load(Seed)
        keep_scale = 1.0 / (1.0 - p_drop)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for m0 in range(0, seqlen, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen
        # a masked query's +inf log-sum-exp makes its probabilities 0 (the wrapper passes its q as 0)
        q_t = tl.load(
            q_base + offs_m[None, :] * sqn + offs_d[:, None], mask=row_ok[None, :], other=0.0
        )
        do = tl.load(
            do_base + offs_m[:, None] * sdon + offs_d[None, :], mask=row_ok[:, None], other=0.0
        )
        lse = tl.load(Lse + h * slh + start + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + h * slh + start + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            bias_t = tl.load(
                Bias + h * sbh + offs_m[None, :] * sbi + offs_n[:, None] * sbj,
                mask=col_ok[:, None] & row_ok[None, :],
                other=0.0,
            )
            s_t += bias_t.to(tl.float32) * 1.4426950408889634
        p_t = tl.where(key_ok[:, None], tl.exp2(s_t - lse[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep_t = _dropout_keep(seed, bh, offs_m, offs_n, N, p_drop, TRANSPOSED=True)
            p_used = tl.where(keep_t, p_t * keep_scale, 0.0)
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        else:
            p_used = p_t
        dv += tl.dot(p_used.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    tl.store(
        dk_base + offs_n[:, None] * sdkn + offs_d[None, :],
        (dk * scale).to(DK.dtype.element_ty),
        mask=col_ok[:, None],
    )
    tl.store(
        dv_base + offs_n[:, None] * sdvn + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=col_ok[:, None],
    )


@triton.jit
def tupe_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    Bias,
    Mask,
    CuSeq,
    Seed,
    DO,
    Lse,
    Delta,
    DQ,
    DBias,
    sqb,
    sqn,
    sqh,
    skb,
    skn,
    skh,
    svb,
    svn,
    svh,
    sdob,
    sdon,
    sdoh,
    sdqb,
    sdqn,
    sdqh,
    sbh,
    sbi,
    sbj,
    smb,
    slh,
    sdbg,
    sdbh,
    sdbi,
    B,
    H,
    N,
    TOTAL,
    GROUPS,
    scale,
    p_drop,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ of one query block for the batch elements b = g, g + GROUPS, ...; with BIAS_GRAD, their summed logit
    gradient into DBias[g, h, rows of this block, :] (float32, owned by this program alone)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    qk_scale = scale * 1.4426950408889634
    db_base = DBias + g * sdbg + h * sdbh
    for step in range(0, tl.cdiv(B - g, GROUPS)):
        b = (
            g + step * GROUPS
        )  # a tensor (program_id arithmetic) in the compiler and the interpreter alike
        bh = b * H + h
        start, seqlen = _seq_bounds(CuSeq, b, N, TOTAL, VARLEN)
        if m0 < seqlen:
            q_base = _head_base(Q, b, h, start, sqb, sqn, sqh, VARLEN)
            dq_base = _head_base(DQ, b, h, start, sdqb, sdqn, sdqh, VARLEN)
            k_base = _head_base(K, b, h, start, skb, skn, skh, VARLEN)
            v_base = _head_base(V, b, h, start, svb, svn, svh, VARLEN)
            do_base = _head_base(DO, b, h, start, sdob, sdon, sdoh, VARLEN)
            row_ok = offs_m < seqlen
            q = tl.load(
                q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0
            )
            do = tl.load(
                do_base + offs_m[:, None] * sdon + offs_d[None, :], mask=row_ok[:, None], other=0.0
            )
            lse = tl.load(Lse + h * slh + start + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(Delta + h * slh + start + offs_m, mask=row_ok, other=0.0)
            dq = tl.zeros([BLOCK_M, D], tl.float32)
            for n0 in range(0, seqlen, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                col_ok = offs_n < seqlen
                k = tl.load(
                    k_base + offs_n[:, None] * skn + offs_d[None, :],
                    mask=col_ok[:, None],
                    other=0.0,
                )
                v = tl.load(
                    v_base + offs_n[:, None] * svn + offs_d[None, :],
                    mask=col_ok[:, None],
                    other=0.0,
                )
                col_real = _real_tokens(Mask, b, offs_n, seqlen, smb, HAS_MASK)
                p_used, ds = _probs_and_dlogits(
                    q,
                    k,
                    v,
                    do,
                    lse,
                    delta,
                    Bias,
                    Seed,
                    h,
                    bh,
                    offs_m,
                    offs_n,
                    seqlen,
                    col_real,
                    sbh,
                    sbi,
                    sbj,
                    N,
                    qk_scale,
                    p_drop,
                    HAS_BIAS,
                    DROPOUT,
                    DOT_PRECISION,
                )
                dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
                if BIAS_GRAD:
                    tile = db_base + offs_m[:, None] * sdbi + offs_n[None, :]
                    tile_ok = row_ok[:, None] & col_ok[None, :]
                    tl.store(tile, tl.load(tile, mask=tile_ok, other=0.0) + ds, mask=tile_ok)
                    # the next batch element's load of this tile may come from other threads of the program
                    tl.debug_barrier()
            tl.store(
                dq_base + offs_m[:, None] * sdqn + offs_d[None, :],
                (dq * scale).to(DQ.dtype.element_ty),
                mask=row_ok[:, None],
            )


@triton.jit
def dropout_keep_kernel(Seed, Keep, N, p_drop, BLOCK: tl.constexpr):
    """The keep-mask [B * H, N, N] the attention kernels draw (for tests and for users checking a run)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    keep = _dropout_keep(tl.load(Seed), bh, offs_m, offs_n, N, p_drop)
    ok = (offs_m[:, None] < N) & (offs_n[None, :] < N)
    tl.store(
        Keep + (bh.to(tl.int64) * N + offs_m[:, None]) * N + offs_n[None, :],
        keep.to(tl.int8),
        mask=ok,
    )


# ---------------------------------------------------------------------------------------------------------------
# Configurations. One per (head dim, dtype, target) and kernel, chosen for occupancy with no spills (the compile
# report builds every one for the target it serves and checks it); under the interpreter a small tile keeps tests
# fast. ``arch``: the compute capability as an integer (None: the current device's). sm_90 (H100 and H200: the same
# SM, register file and 228 KB of shared memory; the H200 differs in memory only) takes tiles whose products have
# 64 rows per warpgroup, the least that wgmma takes, wherever they fit without spills: the backward at every head
# dim, packed (varlen) included, and the forward at D=128; sm_80 keeps the tiles that fit its mma.sync.


def fwd_config(d, dtype_name, interpret=INTERPRET, arch=None):
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    if (
        dtype_name == "fp32"
    ):  # exact fp32 products run on the FMA units: small tiles keep them in registers
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if d <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    if device_arch(arch) >= 90:  # 196 registers, 112 KB of shared memory on sm_90
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}


def bwd_config(d, dtype_name, varlen=False, interpret=INTERPRET, arch=None):
    """The dK/dV kernel's tile: 32 queries a step keeps the backward's five live tiles in registers (the compile
    report's spill check). On sm_90, 64 keys a program (the rows of dK and dV: wgmma's 64) at every head dim, with
    8 warps at D=128."""
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    if dtype_name == "fp32":
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}
    if device_arch(arch) >= 90:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4 if d <= 64 else 8, "num_stages": 2}
    if d <= 64 and not varlen:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def dq_config(d, dtype_name, varlen=False, interpret=INTERPRET, arch=None):
    """The dQ kernel's tile: at D=64 in 16 bits, 64 query rows a program, the smallest M that wgmma takes on sm_90
    (at 32 rows it falls back to mma.sync); on sm_90 so at every head dim and packed too (8 warps at D=128);
    elsewhere the backward's shared tile."""
    if not interpret and dtype_name != "fp32" and device_arch(arch) >= 90:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4 if d <= 64 else 8, "num_stages": 2}
    if not interpret and d == 64 and dtype_name != "fp32" and not varlen:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if not interpret and dtype_name == "fp32":  # 8 warps leave ptxas spilling a few bytes on sm_90
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    return bwd_config(d, dtype_name, varlen, interpret, arch)


# float64 runs only under the interpreter (gradcheck); it takes the fp32 tiles and exact products
_DTYPE_NAME = {
    "torch.float32": "fp32",
    "torch.float16": "fp16",
    "torch.bfloat16": "bf16",
    "torch.float64": "fp32",
}


def _layout_strides(x, varlen):
    """(batch, token, head) strides of a [B, N, H, D] tensor, or of a packed [total, H, D] one (batch unused)."""
    return (0, x.stride(0), x.stride(1)) if varlen else (x.stride(0), x.stride(1), x.stride(2))


def _tokens(q, varlen):
    """Packed rows (the bound the kernels check packed offsets against); unused in the padded layout."""
    return q.shape[0] if varlen else q.shape[0] * q.shape[1]


def _optional_args(q, pos_bias, attention_mask, cu_seqlens, seed):
    """Pointers and strides of the optional inputs; absent ones point at q (never read: their flag is off)."""
    bias_strides = pos_bias.stride() if pos_bias is not None else (0, 0, 0)
    mask = attention_mask.view(torch.uint8) if attention_mask is not None else None
    return (
        pos_bias if pos_bias is not None else q,
        mask if mask is not None else q,
        cu_seqlens if cu_seqlens is not None else q,
        seed if seed is not None else q,
        bias_strides,
        mask.stride(0) if mask is not None else 0,
    )


def _chunk_views(c, b0, b1, seq_len, cu_seqlens, attention_mask, seed, per_batch, per_token):
    """Chunk ``c`` (batch elements b0..b1-1) of a launch: (cu_seqlens, attention_mask, seed, per_batch views,
    per_token views). Padded: ``per_batch`` tensors ([B, N, H, D]) and ``per_token`` ones ([H, B * N]) cut to the
    chunk; packed: cu_seqlens cut (its offsets stay absolute) and the tensors whole. The whole batch when it is one
    chunk; chunk c > 0 draws its dropout from seed + c."""
    if seed is not None and c:
        seed = seed + c
    if cu_seqlens is not None:
        return cu_seqlens[b0 : b1 + 1], attention_mask, seed, per_batch, per_token
    return (
        None,
        None if attention_mask is None else attention_mask[b0:b1],
        seed,
        [t[b0:b1] for t in per_batch],
        [t[:, b0 * seq_len : b1 * seq_len] for t in per_token],
    )


def attention_forward(
    q,
    k,
    v,
    pos_bias,
    attention_mask,
    cu_seqlens,
    seed,
    out,
    lse,
    *,
    batch,
    seq_len,
    scale,
    dropout_p,
):
    """Launch the forward. ``seq_len``: N (padded) or the longest sequence (packed). ``lse``: float32 [H, tokens]."""
    varlen = cu_seqlens is not None
    heads, d = q.shape[-2], q.shape[-1]
    name = _DTYPE_NAME[str(q.dtype)]
    cfg = fwd_config(d, name)
    for c, (b0, b1) in enumerate(batch_chunks(batch, heads)):
        cu_c, mask_c, seed_c, (q_c, k_c, v_c, out_c), (lse_c,) = _chunk_views(
            c, b0, b1, seq_len, cu_seqlens, attention_mask, seed, [q, k, v, out], [lse]
        )
        bias, mask, cu, seed_t, (sbh, sbi, sbj), smb = _optional_args(
            q_c, pos_bias, mask_c, cu_c, seed_c
        )
        grid = (triton.cdiv(seq_len, cfg["BLOCK_M"]), (b1 - b0) * heads)
        tupe_attn_fwd_kernel[grid](
            q_c,
            k_c,
            v_c,
            bias,
            mask,
            cu,
            seed_t,
            out_c,
            lse_c,
            *_layout_strides(q_c, varlen),
            *_layout_strides(k_c, varlen),
            *_layout_strides(v_c, varlen),
            *_layout_strides(out_c, varlen),
            sbh,
            sbi,
            sbj,
            smb,
            lse_c.stride(0),
            heads,
            seq_len,
            _tokens(q_c, varlen),
            scale,
            dropout_p,
            D=d,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            HAS_BIAS=pos_bias is not None,
            HAS_MASK=attention_mask is not None,
            VARLEN=varlen,
            DROPOUT=dropout_p > 0.0,
            DOT_PRECISION=dot_precision(name),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )


def attention_forward_subset(
    q,
    k,
    v,
    pos_bias,
    cu_seqlens_q,
    cu_seqlens_k,
    position_ids_q,
    out,
    *,
    max_seqlen_q,
    max_seqlen_k,
    scale,
):
    """Launch the query-subset forward into ``out`` (zeroed by the caller: rows in no sequence stay 0)."""
    heads, d = q.shape[-2], q.shape[-1]
    name = _DTYPE_NAME[str(q.dtype)]
    cfg = fwd_config(d, name)
    for b0, b1 in batch_chunks(cu_seqlens_q.shape[0] - 1, heads):
        # a chunk's offsets stay absolute: its slices of cu_seqlens address the whole packed tensors
        grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), (b1 - b0) * heads)
        tupe_attn_fwd_subset_kernel[grid](
            q,
            k,
            v,
            pos_bias,
            cu_seqlens_q[b0 : b1 + 1],
            cu_seqlens_k[b0 : b1 + 1],
            position_ids_q,
            out,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            out.stride(0),
            out.stride(1),
            *pos_bias.stride(),
            heads,
            max_seqlen_q,
            max_seqlen_k,
            q.shape[0],
            k.shape[0],
            pos_bias.shape[1],
            pos_bias.shape[2],
            scale,
            D=d,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            DOT_PRECISION=dot_precision(name),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )


def bias_grad_groups(batch, heads, seq_len, block_m, sm_count):
    """How many batch groups the dQ kernel splits into: enough programs to fill the device twice over (grid axis 2:
    at most 65535)."""
    programs = triton.cdiv(seq_len, block_m) * heads
    return max(1, min(batch, triton.cdiv(2 * sm_count, programs), MAX_GRID_YZ))


def lse_log2(lse):
    """The forward's (natural) log-sum-exp in the backward's log2 units. A row whose log-sum-exp overflows there (a
    row of logits near float32's lowest) gets +inf: probability 0, so no gradient (see the module notes)."""
    lse2 = lse * LOG2E
    return lse2.masked_fill_(lse2 == float("-inf"), float("inf"))


def attention_backward(
    q,
    k,
    v,
    pos_bias,
    attention_mask,
    cu_seqlens,
    seed,
    dout,
    lse,
    delta,
    dq,
    dk,
    dv,
    dbias_groups,
    *,
    batch,
    seq_len,
    scale,
    dropout_p,
):
    """Launch both backward kernels. ``lse``: the backward's log2 units (`lse_log2`). ``dbias_groups``: None, or a
    zeroed float32 [G, H, S, S] buffer that receives the bias gradient summed over the batch elements b with
    b % G == g."""
    varlen = cu_seqlens is not None
    heads, d = q.shape[-2], q.shape[-1]
    name = _DTYPE_NAME[str(q.dtype)]
    cfg = bwd_config(d, name, varlen)
    qcfg = dq_config(d, name, varlen)
    for c, (b0, b1) in enumerate(batch_chunks(batch, heads)):
        # a later chunk's dQ kernel adds its bias gradient into the same group buffers, after the earlier chunk's
        cu_c, mask_c, seed_c, (q_c, k_c, v_c, dout_c, dq_c, dk_c, dv_c), (lse_c, delta_c) = (
            _chunk_views(
                c,
                b0,
                b1,
                seq_len,
                cu_seqlens,
                attention_mask,
                seed,
                [q, k, v, dout, dq, dk, dv],
                [lse, delta],
            )
        )
        bias, mask, cu, seed_t, (sbh, sbi, sbj), smb = _optional_args(
            q_c, pos_bias, mask_c, cu_c, seed_c
        )
        flags = dict(
            D=d,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            HAS_BIAS=pos_bias is not None,
            HAS_MASK=attention_mask is not None,
            VARLEN=varlen,
            DROPOUT=dropout_p > 0.0,
            DOT_PRECISION=dot_precision(name),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        inputs = (
            *_layout_strides(q_c, varlen),
            *_layout_strides(k_c, varlen),
            *_layout_strides(v_c, varlen),
            *_layout_strides(dout_c, varlen),
        )
        tupe_attn_bwd_dkdv_kernel[(triton.cdiv(seq_len, cfg["BLOCK_N"]), (b1 - b0) * heads)](
            q_c,
            k_c,
            v_c,
            bias,
            mask,
            cu,
            seed_t,
            dout_c,
            lse_c,
            delta_c,
            dk_c,
            dv_c,
            *inputs,
            *_layout_strides(dk_c, varlen),
            *_layout_strides(dv_c, varlen),
            sbh,
            sbi,
            sbj,
            smb,
            lse_c.stride(0),
            heads,
            seq_len,
            _tokens(q_c, varlen),
            scale,
            dropout_p,
            **flags,
        )
        if dbias_groups is not None:
            groups, db, db_strides = dbias_groups.shape[0], dbias_groups, dbias_groups.stride()[:3]
        else:
            groups, db, db_strides = b1 - b0, lse_c, (0, 0, 0)
        flags.update(
            BLOCK_M=qcfg["BLOCK_M"],
            BLOCK_N=qcfg["BLOCK_N"],
            num_warps=qcfg["num_warps"],
            num_stages=qcfg["num_stages"],
        )
        tupe_attn_bwd_dq_kernel[(triton.cdiv(seq_len, qcfg["BLOCK_M"]), heads, groups)](
            q_c,
            k_c,
            v_c,
            bias,
            mask,
            cu,
            seed_t,
            dout_c,
            lse_c,
            delta_c,
            dq_c,
            db,
            *inputs,
            *_layout_strides(dq_c, varlen),
            sbh,
            sbi,
            sbj,
            smb,
            lse_c.stride(0),
            *db_strides,
            b1 - b0,
            heads,
            seq_len,
            _tokens(q_c, varlen),
            groups,
            scale,
            dropout_p,
            BIAS_GRAD=dbias_groups is not None,
            **flags,
        )


def dropout_keep_mask(seed, batch, heads, seq_len, dropout_p, device):
    """The keep-mask [B, H, N, N] (bool) the kernels draw from ``seed`` (N: the longest sequence when packed)."""
    keep = torch.empty(batch, heads, seq_len, seq_len, dtype=torch.int8, device=device)
    block = 16 if INTERPRET else 64
    if keep.numel():
        for c, (b0, b1) in enumerate(
            batch_chunks(batch, heads)
        ):  # the attention launches' chunks and seeds
            grid = (triton.cdiv(seq_len, block), triton.cdiv(seq_len, block), (b1 - b0) * heads)
            dropout_keep_kernel[grid](
                seed if c == 0 else seed + c, keep[b0:b1], seq_len, dropout_p, BLOCK=block
            )
    return keep.bool()


def dot_precision(dtype_name):
    """fp32 inputs take exact fp32 products (TF32 would miss the 1e-4 tolerance); 16-bit inputs ignore it."""
    return "ieee" if dtype_name == "fp32" else "tf32"


_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
_COMMON_SIG = {
    "sqb": "i64",
    "sqn": "i32",
    "sqh": "i32",
    "skb": "i64",
    "skn": "i32",
    "skh": "i32",
    "svb": "i64",
    "svn": "i32",
    "svh": "i32",
}


def _config(kind, dt, d, varlen, arch):
    if kind in ("fwd", "fwd_subset"):  # the query-subset forward takes the forward's tiles
        return fwd_config(d, dt, interpret=False, arch=arch)
    return (bwd_config if kind == "dkdv" else dq_config)(d, dt, varlen, False, arch)


def _specs(kind, dt, d, *, varlen=False, dropout=False):
    """The build of each configuration the launchers pick for sm_80 and sm_90: one spec serving both targets
    when they pick the same tile, else one per target."""
    cfg80, cfg90 = _config(kind, dt, d, varlen, 80), _config(kind, dt, d, varlen, 90)
    if cfg80 == cfg90:
        return [_spec(kind, dt, d, cfg80, (80, 90), varlen=varlen, dropout=dropout)]
    return [
        _spec(kind, dt, d, cfg80, (80,), varlen=varlen, dropout=dropout),
        _spec(kind, dt, d, cfg90, (90,), varlen=varlen, dropout=dropout),
    ]


def _spec(kind, dt, d, cfg, targets, *, varlen=False, dropout=False):
    ptr = _PTR[dt]
    common = {
        "Q": ptr,
        "K": ptr,
        "V": ptr,
        "Bias": ptr,
        "Mask": "*u8",
        "CuSeq": "*i32",
        "Seed": "*i64",
    }
    tail_ints = {"sbh": "i32", "sbi": "i32", "sbj": "i32", "smb": "i32", "slh": "i32"}
    flags = {
        "HAS_BIAS": True,
        "HAS_MASK": not varlen,
        "VARLEN": varlen,
        "DROPOUT": dropout,
        "DOT_PRECISION": dot_precision(dt),
        "D": d,
        "BLOCK_M": cfg["BLOCK_M"],
        "BLOCK_N": cfg["BLOCK_N"],
    }
    if kind == "fwd":
        fn = tupe_attn_fwd_kernel
        sig = {
            **common,
            "Out": ptr,
            "Lse": "*fp32",
            **_COMMON_SIG,
            "sob": "i64",
            "son": "i32",
            "soh": "i32",
            **tail_ints,
            "H": "i32",
            "N": "i32",
            "TOTAL": "i32",
            "scale": "fp32",
            "p_drop": "fp32",
        }
    elif kind == "dkdv":
        fn = tupe_attn_bwd_dkdv_kernel
        sig = {
            **common,
            "DO": ptr,
            "Lse": "*fp32",
            "Delta": "*fp32",
            "DK": ptr,
            "DV": ptr,
            **_COMMON_SIG,
            "sdob": "i64",
            "sdon": "i32",
            "sdoh": "i32",
            "sdkb": "i64",
            "sdkn": "i32",
            "sdkh": "i32",
            "sdvb": "i64",
            "sdvn": "i32",
            "sdvh": "i32",
            **tail_ints,
            "H": "i32",
            "N": "i32",
            "TOTAL": "i32",
            "scale": "fp32",
            "p_drop": "fp32",
        }
    else:
        fn = tupe_attn_bwd_dq_kernel
        sig = {
            **common,
            "DO": ptr,
            "Lse": "*fp32",
            "Delta": "*fp32",
            "DQ": ptr,
            "DBias": "*fp32",
            **_COMMON_SIG,
            "sdob": "i64",
            "sdon": "i32",
            "sdoh": "i32",
            "sdqb": "i64",
            "sdqn": "i32",
            "sdqh": "i32",
            **tail_ints,
            "sdbg": "i64",
            "sdbh": "i64",
            "sdbi": "i32",
            "B": "i32",
            "H": "i32",
            "N": "i32",
            "TOTAL": "i32",
            "GROUPS": "i32",
            "scale": "fp32",
            "p_drop": "fp32",
        }
        flags["BIAS_GRAD"] = True
    tag = ("varlen," if varlen else "") + ("dropout," if dropout else "")
    return {
        # torch passes a contiguous cache's unit column stride, which the runtime specialises to the constant 1
        "constexprs": {**flags, "sbj": 1},
        "name": f"tupe_attn_{kind}[{dt},D={d},{tag}M={cfg['BLOCK_M']},N={cfg['BLOCK_N']}]",
        "fn": fn,
        "signature": sig,
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
        "targets": targets,
        # at BERT shapes every pointer and stride but the unit ones is a multiple of 16, which the runtime
        # specialisation sees too
        "divisible": tuple(
            k
            for k in sig
            if k[0].isupper()
            and k not in ("Mask", "CuSeq", "Seed", "TOTAL")
            or k.startswith("s")
            and k != "scale"
        ),
        "must_not_spill": d <= 64
        or targets == (90,),  # the sm_90 tiles at D=128 were chosen to fit
        "matrix_instructions": dt != "fp32",
    }


# Every configuration the launchers can pick, for the target(s) it serves: each kernel for each 16-bit dtype and
# head dim, plus the fp32 (exact-product) builds, the packed layout (what the unpadded model runs) at D=64 and 128
# and dropout at the BERT head dim.
COMPILE_SPECS = [
    spec
    for kind in ("fwd", "dkdv", "dq")
    for args, flags in (
        [((dt, d), {}) for dt in ("bf16", "fp16") for d in (16, 32, 64, 128)]
        + [
            (("fp32", 64), {}),
            (("bf16", 64), {"varlen": True}),
            (("bf16", 128), {"varlen": True}),
            (("bf16", 64), {"dropout": True}),
        ]
    )
    for spec in _specs(kind, *args, **flags)
]


def _subset_spec(dt, d, cfg, targets):
    """The query-subset forward (``tupe_attn_fwd_subset_kernel``), packed, with int32 positions."""
    ptr = _PTR[dt]
    ints = (
        "sqn",
        "sqh",
        "skn",
        "skh",
        "svn",
        "svh",
        "son",
        "soh",
        "sbh",
        "sbi",
        "sbj",
        "H",
        "NQ",
        "NK",
        "TOTAL_Q",
        "TOTAL_K",
        "BIAS_I",
        "BIAS_J",
    )
    sig = {
        "Q": ptr,
        "K": ptr,
        "V": ptr,
        "Bias": ptr,
        "CuSeqQ": "*i32",
        "CuSeqK": "*i32",
        "PosQ": "*i32",
        "Out": ptr,
        **{k: "i32" for k in ints},
        "scale": "fp32",
    }
    return {
        "constexprs": {
            "D": d,
            "BLOCK_M": cfg["BLOCK_M"],
            "BLOCK_N": cfg["BLOCK_N"],
            "DOT_PRECISION": dot_precision(dt),
            "sbj": 1,
        },
        "name": f"tupe_attn_fwd_subset[{dt},D={d},subset,M={cfg['BLOCK_M']},N={cfg['BLOCK_N']}]",
        "fn": tupe_attn_fwd_subset_kernel,
        "signature": sig,
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
        "targets": targets,
        "divisible": tuple(
            k
            for k in sig
            if k in ("Q", "K", "V", "Bias", "Out") or k.startswith("s") and k != "scale"
        ),
        "must_not_spill": d <= 64 or targets == (90,),
        "matrix_instructions": dt != "fp32",
    }


def _subset_specs(dt, d):
    cfg80, cfg90 = _config("fwd_subset", dt, d, True, 80), _config("fwd_subset", dt, d, True, 90)
    if cfg80 == cfg90:
        return [_subset_spec(dt, d, cfg80, (80, 90))]
    return [_subset_spec(dt, d, cfg80, (80,)), _subset_spec(dt, d, cfg90, (90,))]


# the query-subset forward (token-level early exit, inference) at BERT's head dims, 16-bit and fp32
COMPILE_SPECS += [
    spec
    for dt, d in (("bf16", 64), ("fp16", 64), ("bf16", 128), ("fp32", 64))
    for spec in _subset_specs(dt, d)
]
