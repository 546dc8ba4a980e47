"""MC-BERT kernels: the controller's K draws per position and the main model's multi-choice head.

* ``mc_sample_kernel``: one program per row walks the vocabulary once in blocks. Each block of logits is read once
  and scored against the noise of all K draws at once: draw k of row m at token v uses word ``k % 4`` of
  ``philox(seed, v, m, k // 4, 0)``, so one Philox call serves four draws. The running maximum of
  ``logit + gumbel`` and its token stay in registers; only the ``[M, K]`` ids are written. The seed is read from a
  device tensor drawn from torch's generator: no host sync, reproducible under ``torch.manual_seed``.
* ``mc_sample_fused_kernel``: the same draws from ``hidden @ weight.T + bias`` (the controller's output layer),
  computed one ``[BLOCK_M, BLOCK_V]`` tile at a time with ``tl.dot`` and consumed in registers: the ``[M, V]``
  logits never reach memory (as a fused linear cross-entropy avoids them).
* ``mc_candidate_fwd_kernel``: one program per row gathers the K candidate embedding rows once, scores them, and
  writes the row's loss and (for training) the gradient of that loss with respect to the hidden state and the K
  scores: the forward and the backward of the gather in one pass, as a fused linear cross-entropy does.
* ``mc_candidate_scatter_kernel`` and ``mc_candidate_fold_kernel``: the embedding-row and bias gradients,
  scatter-added without atomics. The caller sorts the flattened candidates (stable) and cuts each token's segment
  into pieces of at most ``CHUNK`` entries; one program sums each piece in order, a short segment's program writes
  its row, a long segment's pieces are added up in order by one more program. One writer per row, a fixed order:
  bitwise reproducible (the approach of the TNF note fold in ``notes.py``), and the reject option, which every row
  names, is summed by M / CHUNK programs at once instead of one.

A row holding +inf (and no NaN) draws uniformly among its +inf entries: from the first block holding one, the
finite entries drop out and each +inf entry scores its Gumbel noise alone, which is Gumbel-max on the limit of the
softmax as those logits grow together.

Every load is masked by the extent of the tensor it reads, passed by the launcher from that tensor's own shape
(``weight``'s width, ``bias``' length, ``candidates``' and ``hidden``'s rows, ...), never by another tensor's: a
caller that skips the ops' checks gets wrong numbers, not reads outside a buffer. The one unmasked load is the
seed's single element, which the registered ops check is there.
"""

import triton
import triton.language as tl

from . import INTERPRET

_INV_2_23 = 1.0 / 8388608.0


@triton.jit
def _gumbel(bits):
    # uint32 -> uniform in (0, 1) from the top 23 bits, centred (never 0 or 1), then -log(-log(u))
    u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    return -tl.log(-tl.log(u))


@triton.jit
def _update_best(best, best_idx, score, offs_v):
    """Per draw (rows of ``score [KG, BLOCK_V]``): the block maximum and its lowest index, merged into the running
    best (an earlier block wins ties: lowest index overall)."""
    blk = tl.max(score, axis=1)
    is_max = score == blk[:, None]
    idx = tl.min(tl.where(is_max, offs_v[None, :], 2147483647), axis=1)
    take = blk > best
    return tl.where(take, blk, best), tl.where(take, idx, best_idx)


@triton.jit(do_not_specialize=["rows", "vocab"])
def mc_sample_kernel(
    logits_ptr,
    seed_ptr,
    out_ptr,
    rows,
    vocab,
    stride_l,
    K: tl.constexpr,
    KG: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """out[m, k] = argmax_v(logits[m, v] + gumbel(philox(seed, v, m, k // 4, 0)[k % 4])); -1 for a row holding NaN
    or no logit above -inf; among the +inf entries only (by their noise) for a row holding +inf."""
    m = tl.program_id(0)
    seed = tl.load(seed_ptr)
    offs_g = tl.arange(0, KG)
    row = logits_ptr + m.to(tl.int64) * stride_l
    neg = float("-inf")
    b0 = tl.full([KG], neg, tl.float32)
    b1 = tl.full([KG], neg, tl.float32)
    b2 = tl.full([KG], neg, tl.float32)
    b3 = tl.full([KG], neg, tl.float32)
    i0 = tl.full([KG], -1, tl.int32)
    i1 = tl.full([KG], -1, tl.int32)
    i2 = tl.full([KG], -1, tl.int32)
    i3 = tl.full([KG], -1, tl.int32)
    nan_seen = tl.zeros([BLOCK_V], tl.int32)
    inf_seen = m * 0  # a +inf logit has been seen: from then on only +inf entries can win
    c1 = tl.full([KG, BLOCK_V], 0, tl.int32) + m
    c2 = tl.broadcast_to(offs_g[:, None], [KG, BLOCK_V])
    c3 = tl.zeros([KG, BLOCK_V], tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        ok = offs_v < vocab
        x = tl.load(row + offs_v, mask=ok, other=neg).to(tl.float32)
        nan_seen |= (x != x).to(tl.int32)
        x = tl.where(x != x, neg, x)
        # +inf: from the first block holding one, only the +inf entries count, each scoring its noise alone (the
        # finite bests so far are dropped once)
        pinf = x == float("inf")
        blk_inf = tl.max(pinf.to(tl.int32), axis=0)
        fresh = blk_inf > inf_seen
        b0 = tl.where(fresh, neg, b0)
        b1 = tl.where(fresh, neg, b1)
        b2 = tl.where(fresh, neg, b2)
        b3 = tl.where(fresh, neg, b3)
        inf_seen = tl.maximum(inf_seen, blk_inf)
        x = tl.where(pinf, 0.0, tl.where(inf_seen > 0, neg, x))
        c0 = tl.broadcast_to(offs_v[None, :], [KG, BLOCK_V])
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
        b0, i0 = _update_best(b0, i0, x[None, :] + _gumbel(r0), offs_v)
        if K > 1:
            b1, i1 = _update_best(b1, i1, x[None, :] + _gumbel(r1), offs_v)
        if K > 2:
            b2, i2 = _update_best(b2, i2, x[None, :] + _gumbel(r2), offs_v)
        if K > 3:
            b3, i3 = _update_best(b3, i3, x[None, :] + _gumbel(r3), offs_v)
    bad = tl.max(nan_seen, axis=0) > 0
    out_row = out_ptr + m.to(tl.int64) * K
    for j in tl.static_range(4):
        if j == 0:
            idx = i0
        elif j == 1:
            idx = i1
        elif j == 2:
            idx = i2
        else:
            idx = i3
        idx = tl.where(bad, -1, idx).to(tl.int64)  # i stays -1 when no logit beat -inf
        k = offs_g * 4 + j
        tl.store(out_row + k, idx, mask=k < K)


@triton.jit(do_not_specialize=["rows", "vocab", "bias_len"])
def mc_sample_fused_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    seed_ptr,
    out_ptr,
    rows,
    vocab,
    dim,
    w_dim,
    bias_len,
    stride_h,
    stride_w,
    K: tl.constexpr,
    KP: tl.constexpr,  # >= 4 * ceil(K / 4): every draw of the last Philox block has a column
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """mc_sample_kernel's draws from logits = hidden @ weight.T + bias, computed a [BLOCK_M, BLOCK_V] tile at a time
    and never stored: the same Philox counters (token, row, k // 4, 0), so the same ids as sampling the logits.
    ``dim``/``w_dim``: hidden's and weight's widths, ``bias_len``: bias' length (each load masked by its own; the op
    makes them agree)."""
    pid = tl.program_id(0)
    seed = tl.load(seed_ptr)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < rows
    offs_k = tl.arange(0, KP)
    offs_d0 = tl.arange(0, BLOCK_D)
    neg = float("-inf")
    best = tl.full([BLOCK_M, KP], neg, tl.float32)
    best_idx = tl.full([BLOCK_M, KP], -1, tl.int32)
    inf_seen = tl.zeros(
        [BLOCK_M], tl.int32
    )  # a row has met a +inf logit: from then on only those count
    nan_seen = tl.zeros([BLOCK_M], tl.int32)
    h_rows = hidden_ptr + offs_m.to(tl.int64)[:, None] * stride_h
    c1 = tl.broadcast_to(offs_m[:, None], [BLOCK_M, BLOCK_V])
    c3 = tl.zeros([BLOCK_M, BLOCK_V], tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < vocab
        w_cols = weight_ptr + offs_v.to(tl.int64)[None, :] * stride_w
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + offs_d0
            d_ok = offs_d < dim
            h = tl.load(h_rows + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(
                w_cols + offs_d[:, None], mask=(offs_d < w_dim)[:, None] & v_ok[None, :], other=0.0
            )
            acc = tl.dot(h, w, acc)
        x = (
            acc
            + tl.load(bias_ptr + offs_v, mask=v_ok & (offs_v < bias_len), other=0.0).to(tl.float32)[
                None, :
            ]
        )
        nan_seen |= tl.max((x != x).to(tl.int32), axis=1)
        x = tl.where(v_ok[None, :] & (x == x), x, neg)
        # +inf, as in mc_sample_kernel: a row's first block holding one drops its finite bests, and from then on
        # only its +inf entries count, each scoring its noise alone
        is_inf = x == float("inf")
        blk_inf = tl.max(is_inf.to(tl.int32), axis=1)
        best = tl.where((blk_inf > inf_seen)[:, None], neg, best)
        inf_seen = tl.maximum(inf_seen, blk_inf)
        x = tl.where(is_inf, 0.0, tl.where(inf_seen[:, None] > 0, neg, x))
        c0 = tl.broadcast_to(offs_v[None, :], [BLOCK_M, BLOCK_V])
        for g in range(0, (K + 3) // 4):  # a loop, not unrolled: one Philox block live at a time
            r0, r1, r2, r3 = tl.philox(seed, c0, c1, c3 + g, c3)
            for j in tl.static_range(4):  # draws k >= K land in columns the store masks off
                if j == 0:
                    bits = r0
                elif j == 1:
                    bits = r1
                elif j == 2:
                    bits = r2
                else:
                    bits = r3
                score = x + _gumbel(bits)
                blk = tl.max(score, axis=1)
                idx = tl.min(tl.where(score == blk[:, None], offs_v[None, :], 2147483647), axis=1)
                col = offs_k[None, :] == 4 * g + j
                take = col & (blk[:, None] > best)
                best = tl.where(take, blk[:, None], best)
                best_idx = tl.where(take, idx[:, None], best_idx)
    best_idx = tl.where(nan_seen[:, None] > 0, -1, best_idx).to(tl.int64)
    tl.store(
        out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :],
        best_idx,
        mask=m_ok[:, None] & (offs_k[None, :] < K),
    )


@triton.jit(do_not_specialize=["rows", "vocab", "bias_len", "cand_rows", "label_len"])
def mc_candidate_fwd_kernel(
    hidden_ptr,
    emb_ptr,
    bias_ptr,
    cand_ptr,
    labels_ptr,
    loss_ptr,
    dh_ptr,
    dscore_ptr,
    rows,
    vocab,
    dim,
    e_dim,
    bias_len,
    cand_rows,
    label_len,
    stride_h,
    stride_e,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    """loss[m] = logsumexp_k(s) - s[label], s[k] = <h[m], E[c[m, k]]> + bias[c[m, k]]; with NEED_GRAD also
    dscore[m, k] = softmax(s)[k] - [k == label] and dh[m] = sum_k dscore[m, k] E[c[m, k]]. ``rows``/``dim``:
    hidden's shape, ``vocab``/``e_dim``: embedding's, ``bias_len``, ``cand_rows``, ``label_len``: the others'
    extents; every load is masked by its own tensor's. An id outside [0, vocab) (or past bias) is never read: it
    scores NaN; a row past candidates or labels, or a label outside [0, K), gives a NaN loss (the wrappers reject
    all of these first)."""
    m = tl.program_id(0)
    offs_k = tl.arange(0, KP)
    k_ok = offs_k < K
    row_ok = m < cand_rows
    cand = tl.load(cand_ptr + m.to(tl.int64) * K + offs_k, mask=k_ok & row_ok, other=-1)
    c_ok = (cand >= 0) & (cand < vocab) & (cand < bias_len)
    ld = k_ok & c_ok
    e_rows = emb_ptr + cand.to(tl.int64) * stride_e
    h_row = hidden_ptr + m.to(tl.int64) * stride_h
    offs_d0 = tl.arange(0, BLOCK_D)
    if ONE_BLOCK:
        d_ok = offs_d0 < dim
        h = tl.load(h_row + offs_d0, mask=d_ok, other=0.0).to(tl.float32)
        e = tl.load(
            e_rows[:, None] + offs_d0[None, :],
            mask=ld[:, None] & (offs_d0 < e_dim)[None, :],
            other=0.0,
        )
        e = e.to(tl.float32)
        s = tl.sum(e * h[None, :], axis=1)
    else:
        s = tl.zeros([KP], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + offs_d0
            d_ok = offs_d < dim
            h = tl.load(h_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            e = tl.load(
                e_rows[:, None] + offs_d[None, :],
                mask=ld[:, None] & (offs_d < e_dim)[None, :],
                other=0.0,
            )
            s += tl.sum(e.to(tl.float32) * h[None, :], axis=1)
    s += tl.load(bias_ptr + cand, mask=ld, other=0.0).to(tl.float32)
    s = tl.where(c_ok, s, float("nan"))
    s = tl.where(k_ok, s, float("-inf"))
    label = tl.load(labels_ptr + m, mask=m < label_len, other=-1)
    mx = tl.max(s, axis=0)
    p = tl.exp(s - mx)
    denom = tl.sum(p, axis=0)
    lse = mx + tl.log(denom)
    s_label = tl.sum(tl.where(offs_k == label, s, 0.0), axis=0)
    label_ok = (label >= 0) & (label < K)
    tl.store(loss_ptr + m, tl.where(label_ok, lse - s_label, float("nan")))
    if NEED_GRAD:
        g = p / denom - (offs_k == label).to(tl.float32)
        g = tl.where(k_ok, g, 0.0)
        tl.store(dscore_ptr + m.to(tl.int64) * K + offs_k, g, mask=k_ok)
        dh_row = dh_ptr + m.to(tl.int64) * dim
        if ONE_BLOCK:
            dh = tl.sum(g[:, None] * e, axis=0)
            tl.store(dh_row + offs_d0, dh.to(dh_ptr.dtype.element_ty), mask=d_ok)
        else:
            for d0 in range(0, dim, BLOCK_D):
                offs_d = d0 + offs_d0
                d_ok = offs_d < dim
                e = tl.load(
                    e_rows[:, None] + offs_d[None, :],
                    mask=ld[:, None] & (offs_d < e_dim)[None, :],
                    other=0.0,
                )
                dh = tl.sum(g[:, None] * e.to(tl.float32), axis=0)
                tl.store(dh_row + offs_d, dh.to(dh_ptr.dtype.element_ty), mask=d_ok)


@triton.jit(do_not_specialize=["entries", "vocab", "h_rows", "n_dscore", "parts"])
def mc_candidate_scatter_kernel(
    hidden_ptr,
    dscore_ptr,
    order_ptr,
    sorted_ptr,
    seg_first_ptr,
    seg_end_ptr,
    piece_id_ptr,
    demb_ptr,
    dbias_ptr,
    part_ptr,
    part_bias_ptr,
    entries,
    vocab,
    dim,
    h_rows,
    n_dscore,
    parts,
    stride_h,
    K: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Sum one piece of a token's segment of sorted entries: at most CHUNK entries, in order. Program (i, d-block)
    works only when sorted entry i starts a piece (its offset in the segment is a multiple of CHUNK). A segment of one
    piece writes dE[v] and dbias[v] itself; a longer one parks its pieces' sums in part[piece_id[i]], and
    ``mc_candidate_fold_kernel`` adds them up in order. One writer per row, a fixed order: no atomics, bitwise
    reproducible, and a token that every row names (the reject option) costs CHUNK-long serial sums, not M-long.
    ``entries``: the plan's length; ``h_rows``, ``n_dscore``, ``parts``: hidden's rows, dscore's elements and the
    partial-sum buffers' rows, each load and store masked by its own (an entry past hidden or dscore adds 0)."""
    i = tl.program_id(0)
    pid_d = tl.program_id(1)
    first = tl.load(seg_first_ptr + i)
    seg_end = tl.minimum(tl.load(seg_end_ptr + i), entries)
    tok = tl.load(sorted_ptr + i)
    ok = ((i - first) % CHUNK == 0) & (tok >= 0) & (tok < vocab)
    n = tl.where(ok, tl.minimum(seg_end - i, CHUNK), 0).to(tl.int32)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    acc = tl.zeros([BLOCK_D], tl.float32)
    acc_b = tl.zeros([1], tl.float32)
    for j in range(0, n):
        e = tl.load(order_ptr + i + j)
        e_ok = (e >= 0) & (e < n_dscore) & (e // K < h_rows)
        g = tl.load(dscore_ptr + e, mask=e_ok, other=0.0)
        h = tl.load(hidden_ptr + (e // K) * stride_h + offs_d, mask=d_ok & e_ok, other=0.0).to(
            tl.float32
        )
        acc += g * h
        acc_b += g
    single = (seg_end - first) <= CHUNK
    tok64 = tok.to(tl.int64)
    piece = tl.load(piece_id_ptr + i).to(tl.int64)
    piece_ok = (piece >= 0) & (piece < parts)
    one = tl.arange(0, 1)
    tl.store(
        demb_ptr + tok64 * dim + offs_d,
        acc.to(demb_ptr.dtype.element_ty),
        mask=d_ok & (n > 0) & single,
    )
    tl.store(dbias_ptr + tok64 + one, acc_b, mask=(n > 0) & single & (pid_d == 0))
    tl.store(part_ptr + piece * dim + offs_d, acc, mask=d_ok & (n > 0) & ~single & piece_ok)
    tl.store(part_bias_ptr + piece + one, acc_b, mask=(n > 0) & ~single & (pid_d == 0) & piece_ok)


@triton.jit(do_not_specialize=["entries", "vocab", "parts"])
def mc_candidate_fold_kernel(
    sorted_ptr,
    seg_first_ptr,
    seg_end_ptr,
    piece_id_ptr,
    demb_ptr,
    dbias_ptr,
    part_ptr,
    part_bias_ptr,
    entries,
    vocab,
    dim,
    parts,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dE[v] = the sum, in order, of the pieces of a segment longer than CHUNK (program at its first entry);
    ``parts``: the partial-sum buffers' rows (a piece past them adds 0)."""
    i = tl.program_id(0)
    pid_d = tl.program_id(1)
    first = tl.load(seg_first_ptr + i)
    length = tl.load(seg_end_ptr + i) - first
    tok = tl.load(sorted_ptr + i)
    ok = (i == first) & (length > CHUNK) & (tok >= 0) & (tok < vocab)
    pieces = tl.where(ok, (length + CHUNK - 1) // CHUNK, 0).to(tl.int32)
    p0 = tl.load(piece_id_ptr + i).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    one = tl.arange(0, 1)
    acc = tl.zeros([BLOCK_D], tl.float32)
    acc_b = tl.zeros([1], tl.float32)
    for p in range(0, pieces):
        p_ok = (p0 + p >= 0) & (p0 + p < parts)
        acc += tl.load(part_ptr + (p0 + p) * dim + offs_d, mask=d_ok & p_ok, other=0.0)
        acc_b += tl.load(part_bias_ptr + p0 + p + one, mask=p_ok, other=0.0)
    tok64 = tok.to(tl.int64)
    tl.store(
        demb_ptr + tok64 * dim + offs_d, acc.to(demb_ptr.dtype.element_ty), mask=d_ok & (pieces > 0)
    )
    tl.store(dbias_ptr + tok64 + one, acc_b, mask=(pieces > 0) & (pid_d == 0))


def _pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def sample_config(vocab, num_samples, interpret=INTERPRET):
    kg = _pow2((num_samples + 3) // 4)
    block_v = min(1024 // kg if not interpret else 128, _pow2(vocab))
    return {"KG": kg, "BLOCK_V": max(16, block_v), "num_warps": 1 if interpret else 8}


def sample_fused_config(dim, interpret=INTERPRET):
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_D": 16, "num_warps": 1}
    # [16, 32] tiles: the four Philox words, the scores and the running best of a tile stay in registers
    return {
        "BLOCK_M": 16,
        "BLOCK_V": 32,
        "BLOCK_D": 64 if dim >= 64 else max(16, _pow2(dim)),
        "num_warps": 4,
    }


def candidate_config(dim, num_candidates, interpret=INTERPRET):
    kp = max(2, _pow2(num_candidates))
    block_d = min(_pow2(dim), 1024 if not interpret else 256, max(16, 8192 // kp))
    return {
        "KP": kp,
        "BLOCK_D": max(16, block_d),
        "ONE_BLOCK": dim <= max(16, block_d),
        "num_warps": 1 if interpret else (8 if kp * block_d >= 8192 else 4),
    }


def scatter_config(dim, interpret=INTERPRET):
    block_d = min(_pow2(dim), 256)
    return {"BLOCK_D": max(16, block_d), "num_warps": 1 if interpret else max(1, block_d // 128)}


def mc_sample(logits, num_samples, seed, out):
    """logits: [M, V] with unit column stride; seed: int64 [1] on the device; out: int64 [M, K] contiguous."""
    rows, vocab = logits.shape
    if rows == 0:
        return out
    cfg = sample_config(vocab, num_samples)
    mc_sample_kernel[(rows,)](
        logits,
        seed,
        out,
        rows,
        vocab,
        logits.stride(0),
        K=num_samples,
        KG=cfg["KG"],
        BLOCK_V=cfg["BLOCK_V"],
        num_warps=cfg["num_warps"],
    )
    return out


def mc_sample_fused(hidden, weight, bias, num_samples, seed, out):
    """hidden [M, D], weight [V, D] with unit column strides, same dtype; bias [V] contiguous; seed int64 [1];
    out int64 [M, K] contiguous."""
    rows, dim = hidden.shape
    if rows == 0:
        return out
    cfg = sample_fused_config(dim)
    mc_sample_fused_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]),)](
        hidden,
        weight,
        bias,
        seed,
        out,
        rows,
        weight.shape[0],
        dim,
        weight.shape[1],
        bias.shape[0],
        hidden.stride(0),
        weight.stride(0),
        K=num_samples,
        KP=_pow2(4 * ((num_samples + 3) // 4)),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_V=cfg["BLOCK_V"],
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
    )
    return out


def mc_candidate_forward(hidden, embedding, bias, candidates, labels, loss, dh, dscore):
    """hidden [M, D], embedding [V, D] with unit column strides; bias [V], candidates [M, K], labels [M]
    contiguous; loss float32 [M]; dh [M, D] and dscore float32 [M, K] contiguous, or None (no gradient)."""
    rows, dim = hidden.shape
    if rows == 0:
        return loss
    k = candidates.shape[1]
    cfg = candidate_config(dim, k)
    need_grad = dh is not None
    mc_candidate_fwd_kernel[(rows,)](
        hidden,
        embedding,
        bias,
        candidates,
        labels,
        loss,
        dh if need_grad else loss,
        dscore if need_grad else loss,
        rows,
        embedding.shape[0],
        dim,
        embedding.shape[1],
        bias.shape[0],
        candidates.shape[0],
        labels.shape[0],
        hidden.stride(0),
        embedding.stride(0),
        K=k,
        KP=cfg["KP"],
        BLOCK_D=cfg["BLOCK_D"],
        ONE_BLOCK=cfg["ONE_BLOCK"],
        NEED_GRAD=need_grad,
        num_warps=cfg["num_warps"],
    )
    return loss


SCATTER_CHUNK = 64


def mc_candidate_scatter(hidden, dscore, plan, demb, dbias):
    """demb [V, D] float32 and dbias [V] float32, contiguous and zeroed; dscore float32 [M, K] (already scaled by
    the upstream gradient); plan: ``scatter_plan`` of the candidates."""
    rows, dim = hidden.shape
    entries = plan["sorted"].shape[
        0
    ]  # one program per entry of the plan (the candidates', like dscore's)
    if entries == 0:
        return demb
    cfg = scatter_config(dim)
    grid = (entries, triton.cdiv(dim, cfg["BLOCK_D"]))
    part, part_bias = plan["part"], plan["part_bias"]
    mc_candidate_scatter_kernel[grid](
        hidden,
        dscore,
        plan["order"],
        plan["sorted"],
        plan["seg_first"],
        plan["seg_end"],
        plan["piece_id"],
        demb,
        dbias,
        part,
        part_bias,
        entries,
        demb.shape[0],
        dim,
        rows,
        dscore.numel(),
        part.shape[0],
        hidden.stride(0),
        K=dscore.shape[1],
        CHUNK=SCATTER_CHUNK,
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
    )
    mc_candidate_fold_kernel[grid](
        plan["sorted"],
        plan["seg_first"],
        plan["seg_end"],
        plan["piece_id"],
        demb,
        dbias,
        part,
        part_bias,
        entries,
        demb.shape[0],
        dim,
        part.shape[0],
        CHUNK=SCATTER_CHUNK,
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
    )
    return demb


_DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}

COMPILE_SPECS = (
    [
        {
            "name": f"mc_sample[{dt},K={k}]",
            "fn": mc_sample_kernel,
            "signature": {
                "logits_ptr": ptr,
                "seed_ptr": "*i64",
                "out_ptr": "*i64",
                "rows": "i32",
                "vocab": "i32",
                "stride_l": "i32",
            },
            "constexprs": {"K": k, "KG": cfg["KG"], "BLOCK_V": cfg["BLOCK_V"]},
            "num_warps": cfg["num_warps"],
            "divisible": ("logits_ptr", "out_ptr", "stride_l"),
            "must_not_spill": True,
            "matrix_instructions": False,
        }
        for dt, ptr in _DTYPES.items()
        for k in (10,)
        for cfg in [sample_config(30522, k, interpret=False)]
    ]
    + [
        {
            "name": f"mc_sample_fused[{dt},K={k},D=256]",
            "fn": mc_sample_fused_kernel,
            "signature": {
                "hidden_ptr": ptr,
                "weight_ptr": ptr,
                "bias_ptr": "*fp32",
                "seed_ptr": "*i64",
                "out_ptr": "*i64",
                "rows": "i32",
                "vocab": "i32",
                "dim": "i32",
                "w_dim": "i32",
                "bias_len": "i32",
                "stride_h": "i32",
                "stride_w": "i32",
            },
            "constexprs": {
                "K": k,
                "KP": _pow2(4 * ((k + 3) // 4)),
                "BLOCK_M": cfg["BLOCK_M"],
                "BLOCK_V": cfg["BLOCK_V"],
                "BLOCK_D": cfg["BLOCK_D"],
            },
            "num_warps": cfg["num_warps"],
            "divisible": (
                "hidden_ptr",
                "weight_ptr",
                "out_ptr",
                "dim",
                "w_dim",
                "stride_h",
                "stride_w",
            ),
            "must_not_spill": True,
            "matrix_instructions": True,
        }
        for dt, ptr in (("fp16", "*fp16"), ("bf16", "*bf16"))
        for k in (10,)
        for cfg in [sample_fused_config(256, interpret=False)]
    ]
    + [
        {
            "name": f"mc_candidate_fwd[{dt},K={k},D={dim},{'train' if grad else 'eval'}]",
            "fn": mc_candidate_fwd_kernel,
            "signature": {
                "hidden_ptr": ptr,
                "emb_ptr": ptr,
                "bias_ptr": "*fp32",
                "cand_ptr": "*i64",
                "labels_ptr": "*i64",
                "loss_ptr": "*fp32",
                "dh_ptr": ptr,
                "dscore_ptr": "*fp32",
                "rows": "i32",
                "vocab": "i32",
                "dim": "i32",
                "e_dim": "i32",
                "bias_len": "i32",
                "cand_rows": "i32",
                "label_len": "i32",
                "stride_h": "i32",
                "stride_e": "i32",
            },
            "constexprs": {
                "K": k,
                "KP": cfg["KP"],
                "BLOCK_D": cfg["BLOCK_D"],
                "ONE_BLOCK": cfg["ONE_BLOCK"],
                "NEED_GRAD": grad,
            },
            "num_warps": cfg["num_warps"],
            "divisible": (
                "hidden_ptr",
                "emb_ptr",
                "dh_ptr",
                "dim",
                "e_dim",
                "stride_h",
                "stride_e",
            ),
            "must_not_spill": True,
            "matrix_instructions": False,
        }
        for dt, ptr in _DTYPES.items()
        for k in (10,)
        for dim in (768,)
        for grad in (True, False)
        for cfg in [candidate_config(dim, k, interpret=False)]
    ]
    + [
        {
            "name": f"mc_candidate_scatter[{dt},D=768]",
            "fn": mc_candidate_scatter_kernel,
            "signature": {
                "hidden_ptr": ptr,
                "dscore_ptr": "*fp32",
                "order_ptr": "*i64",
                "sorted_ptr": "*i64",
                "seg_first_ptr": "*i64",
                "seg_end_ptr": "*i64",
                "piece_id_ptr": "*i64",
                "demb_ptr": "*fp32",
                "dbias_ptr": "*fp32",
                "part_ptr": "*fp32",
                "part_bias_ptr": "*fp32",
                "entries": "i32",
                "vocab": "i32",
                "dim": "i32",
                "h_rows": "i32",
                "n_dscore": "i32",
                "parts": "i32",
                "stride_h": "i32",
            },
            "constexprs": {"K": 10, "CHUNK": SCATTER_CHUNK, "BLOCK_D": cfg["BLOCK_D"]},
            "num_warps": cfg["num_warps"],
            "divisible": ("hidden_ptr", "demb_ptr", "part_ptr", "dim", "stride_h"),
            "must_not_spill": True,
            "matrix_instructions": False,
        }
        for dt, ptr in _DTYPES.items()
        for cfg in [scatter_config(768, interpret=False)]
    ]
    + [
        {
            "name": "mc_candidate_fold[D=768]",
            "fn": mc_candidate_fold_kernel,
            "signature": {
                "sorted_ptr": "*i64",
                "seg_first_ptr": "*i64",
                "seg_end_ptr": "*i64",
                "piece_id_ptr": "*i64",
                "demb_ptr": "*fp32",
                "dbias_ptr": "*fp32",
                "part_ptr": "*fp32",
                "part_bias_ptr": "*fp32",
                "entries": "i32",
                "vocab": "i32",
                "dim": "i32",
                "parts": "i32",
            },
            "constexprs": {"CHUNK": SCATTER_CHUNK, "BLOCK_D": cfg["BLOCK_D"]},
            "num_warps": cfg["num_warps"],
            "divisible": ("demb_ptr", "part_ptr", "dim"),
            "must_not_spill": True,
            "matrix_instructions": False,
        }
        for cfg in [scatter_config(768, interpret=False)]
    ]
)
