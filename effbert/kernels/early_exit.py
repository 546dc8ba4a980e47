"""Early-exit kernels: the entropy of each row's softmax (DeeBERT / RomeBERT exit criterion) and the fused
per-layer exit decision of batched early exit.

Every load and store is masked by the extent of the tensor it touches, passed by the launchers from that tensor's
own shape (the row ids', the per-sample state's, the outputs', the labels' lengths), never by another tensor's: a
caller that skips the ops' checks gets wrong numbers, not accesses outside a buffer."""

import triton
import triton.language as tl

from . import INTERPRET


@triton.jit
def entropy_step(z, offs_c, cols, m, a, u, BLOCK_C: tl.constexpr):
    """Fold one [rows, BLOCK_C] block of logits ``z`` (-inf where masked) into each row's running entropy state:
    maximum m, a = sum of exp(z - m) over every element but one at the maximum, u = sum exp(z - m) * (m - z)
    (csrc/include/effbert/entropy.h). Every term is >= 0, so nothing cancels where H is tiny (large logits)."""
    cm = tl.max(z, axis=1)
    grows = cm > m  # this block holds the new maximum: the old one joins a, the new one is excluded
    m_new = tl.where(grows, cm, m)
    # While a row has seen only -inf, measure from 0 so no inf - inf appears; those terms are 0 anyway.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    gap = tl.where(m == float("-inf"), 0.0, m_ref - m)  # >= 0
    alpha = tl.exp(-gap)
    had = m > float("-inf")
    u = tl.where(grows, tl.where(had, alpha * (u + gap * (1.0 + a)), 0.0), u)
    a = tl.where(grows, tl.where(had, alpha * (1.0 + a), 0.0), a)
    first = tl.min(tl.where(z == cm[:, None], offs_c[None, :], cols + BLOCK_C), axis=1)
    d = m_ref[:, None] - z
    e = tl.exp(-d)
    keep = (z > float("-inf")) & ((offs_c[None, :] != first[:, None]) | (grows == 0)[:, None])
    a += tl.sum(tl.where(keep, e, 0.0), axis=1)
    u += tl.sum(tl.where(keep, e * d, 0.0), axis=1)
    return m_new, a, u


@triton.jit
def entropy_finish(a, u):
    """H = log1p(a) + u / (1 + a) from the running state. log1p(a) without libdevice: log(w) * a / (w - 1) with
    w = 1 + a rounded (w - 1 is exact), accurate to a few ulp where log(1 + a) alone would lose a tiny a."""
    w = 1.0 + a
    log1p_a = tl.where(w == 1.0, a, tl.log(w) * (a / (w - 1.0)))
    return log1p_a + u / w


@triton.jit
def exit_entropy_kernel(
    x_ptr,
    out_ptr,
    rows,
    cols,
    stride_row,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
):
    """out[r] = H(softmax(x[r, :cols])) for ROWS rows per program, one pass over each row (``entropy_step``)."""
    pid = tl.program_id(0)
    offs_r = pid * ROWS + tl.arange(0, ROWS)
    row_ok = offs_r < rows
    row_base = x_ptr + offs_r.to(tl.int64)[:, None] * stride_row
    m = tl.full([ROWS], float("-inf"), tl.float32)
    a = tl.zeros([ROWS], tl.float32)
    u = tl.zeros([ROWS], tl.float32)
    bad = tl.zeros([ROWS], tl.int32)  # NaN or +inf seen: the softmax is undefined
    for c0 in range(0, cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (offs_c < cols)[None, :]
        z = tl.load(row_base + offs_c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        bad += tl.sum(((z != z) | (z == float("inf"))).to(tl.int32), axis=1)
        m, a, u = entropy_step(z, offs_c, cols, m, a, u, BLOCK_C)
    h = entropy_finish(a, u)
    h = tl.where((bad > 0) | (m == float("-inf")), float("nan"), h)
    tl.store(out_ptr + offs_r, h, mask=row_ok)


def exit_entropy_config(cols, interpret=INTERPRET):
    """Block shape for a row length: long rows stream 4096 columns at a time; short rows are packed 2048 elements
    to a program (more spills registers: the compile report checks every shape this returns)."""
    block_c = min(triton.next_power_of_2(max(cols, 1)), 4096)
    rows = max(1, min(64, 2048 // block_c))
    num_warps = 8 if block_c >= 2048 else 4
    return {"BLOCK_C": block_c, "ROWS": rows, "num_warps": 1 if interpret else num_warps}


def exit_entropy(x, out):
    """Launch over a [rows, cols] tensor whose last dimension is contiguous; writes float32 `out[rows]`."""
    rows, cols = x.shape
    if rows == 0:
        return out
    cfg = exit_entropy_config(cols)
    grid = (triton.cdiv(rows, cfg["ROWS"]),)
    exit_entropy_kernel[grid](
        x,
        out,
        rows,
        cols,
        x.stride(0),
        BLOCK_C=cfg["BLOCK_C"],
        ROWS=cfg["ROWS"],
        num_warps=cfg["num_warps"],
    )
    return out


_DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}

# Every configuration exit_entropy_config can return, for each input dtype.
COMPILE_SPECS = [
    {
        "name": f"exit_entropy[{dt},C<={cfg['BLOCK_C'] if cols < 4096 else 'any'},rows={cfg['ROWS']}]",
        "fn": exit_entropy_kernel,
        "signature": {
            "x_ptr": ptr,
            "out_ptr": "*fp32",
            "rows": "i32",
            "cols": "i32",
            "stride_row": "i32",
        },
        "constexprs": {"BLOCK_C": cfg["BLOCK_C"], "ROWS": cfg["ROWS"]},
        "num_warps": cfg["num_warps"],
        "divisible": (
            "x_ptr",
            "out_ptr",
            "cols",
            "stride_row",
        ),  # the runtime specialisation for C % 16 == 0
        "must_not_spill": True,
        "matrix_instructions": False,
    }
    for dt, ptr in _DTYPES.items()
    for cols in (2, 16, 64, 256, 1024, 2048, 4096)
    for cfg in [exit_entropy_config(cols, interpret=False)]
]


# ---- the fused exit decision: one launch per layer ----

# Criterion codes; csrc/include/effbert/exit_decision.h and effbert/ops/early_exit.py hold the same table.
ENTROPY, MAX_PROB, PATIENCE, PATIENCE_REGRESSION = 0, 1, 2, 3


@triton.jit
def exit_decision_kernel(
    x_ptr,
    ids_ptr,
    prev_ptr,
    counter_ptr,
    out_logits_ptr,
    out_layer_ptr,
    next_rows_ptr,
    next_local_ptr,
    count_ptr,
    rows,
    cols,
    batch,
    stride_x,
    stride_out,
    layer,
    threshold,
    patience,
    out_cols,
    next_len,
    CRITERION: tl.constexpr,
    LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """A single program walks the active rows in tiles of BLOCK_R, in order: per row the criterion (and the patience
    state at its batch id), exiting rows' logits and layer written at their ids, and a running scan of the keep flags
    that packs continuing rows (batch ids and local positions) into next_rows / next_local in batch order.

    rows: the fewest rows of x and ids (the launcher's minimum); x: cols columns; batch: the fewest rows of prev,
    counter, out_logits and out_layer (an id at or past it is skipped); out_logits: out_cols columns (an exiting
    row's logits past them are not copied); next_rows and next_local: at least next_len entries each (continuing
    rows past them are counted, not written)."""
    kept = tl.program_id(0) * 0  # int32 running count of continuing rows
    store_cols = tl.minimum(cols, out_cols)
    for r0 in range(0, rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        row_ok = offs_r < rows
        ids = tl.load(ids_ptr + offs_r, mask=row_ok, other=0)
        row_ok = (
            row_ok & (ids >= 0) & (ids < batch)
        )  # an id outside the batch is skipped, never written through
        row_base = x_ptr + offs_r.to(tl.int64)[:, None] * stride_x
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_R], tl.float32)
        t = tl.zeros([BLOCK_R], tl.float32)
        bad = tl.zeros([BLOCK_R], tl.int32)
        amax = tl.zeros([BLOCK_R], tl.int32)
        for c0 in range(0, cols, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (offs_c < cols)[None, :]
            z = tl.load(row_base + offs_c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            bad += tl.sum(((z != z) | (z == float("inf"))).to(tl.int32), axis=1)
            cmax = tl.max(z, axis=1)
            # first column of this chunk holding its maximum; a later chunk wins only when strictly larger
            first = tl.min(tl.where(z == cmax[:, None], offs_c[None, :], cols), axis=1)
            amax = tl.where(cmax > m, first, amax)
            m_new = tl.maximum(m, cmax)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            shift = m - m_ref
            alpha = tl.exp(shift)
            t = tl.where(s > 0, alpha * (t + shift * s), 0.0)
            s = s * alpha
            d = z - m_ref[:, None]
            e = tl.exp(d)
            s += tl.sum(e, axis=1)
            t += tl.sum(tl.where(e > 0, e * d, 0.0), axis=1)
            m = m_new
        if CRITERION == 3:
            v = tl.load(x_ptr + offs_r.to(tl.int64) * stride_x, mask=row_ok, other=0.0).to(
                tl.float32
            )
            undefined = ~(tl.abs(v) < float("inf"))
            pred = v
        else:
            undefined = (bad > 0) | (s <= 0)
            pred = amax.to(tl.float32)
        if CRITERION == 0:
            h = tl.maximum(tl.log(s) - t / s, 0.0)
            exits = h < threshold
        elif CRITERION == 1:
            exits = (1.0 / s) >= threshold
        else:
            pred = tl.where(undefined, float("nan"), pred)
            prev = tl.load(prev_ptr + ids, mask=row_ok, other=float("nan"))
            cnt = tl.load(counter_ptr + ids, mask=row_ok, other=0)
            if CRITERION == 3:
                same = tl.abs(pred - prev) < threshold
            else:
                same = pred == prev
            same = same & (layer > 1)
            cnt = tl.where(same, cnt + 1, 0)
            tl.store(prev_ptr + ids, pred, mask=row_ok)
            tl.store(counter_ptr + ids, cnt, mask=row_ok)
            exits = cnt >= patience
        exits = exits & ~undefined
        if LAST:
            exits = row_ok
        exits = exits & row_ok
        # exiting rows: their logits (same dtype, copied as loaded) and their layer at their batch ids
        out_base = out_logits_ptr + ids.to(tl.int64)[:, None] * stride_out
        for c0 in range(0, cols, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = exits[:, None] & (offs_c < store_cols)[None, :]
            z = tl.load(row_base + offs_c[None, :], mask=mask)
            tl.store(out_base + offs_c[None, :], z, mask=mask)
        tl.store(out_layer_ptr + ids, tl.zeros([BLOCK_R], tl.int32) + layer, mask=exits)
        keep = row_ok & ~exits
        slot = kept + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(next_rows_ptr + slot, ids, mask=keep & (slot < next_len))
        tl.store(next_local_ptr + slot, offs_r, mask=keep & (slot < next_len))
        kept += tl.sum(keep.to(tl.int32), axis=0)
    tl.store(count_ptr, kept)


def exit_decision_config(cols, interpret=INTERPRET):
    """One program; tiles of up to 1024 elements (an off-ramp row is a handful of classes; 64-class tiles of 2048
    elements spill under the per-thread register cap)."""
    block_c = min(triton.next_power_of_2(max(cols, 1)), 64)
    block_r = max(16, min(1024, 1024 // block_c))
    if interpret:
        block_r = min(block_r, 64)
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": 1 if interpret else 4}


def exit_decision(
    x,
    ids,
    prev,
    counter,
    out_logits,
    out_layer,
    next_rows,
    next_local,
    count,
    *,
    criterion,
    layer,
    threshold,
    patience,
    last,
):
    """Launch over the active rows ``x [R, C]`` (unit column stride); everything else as the op documents."""
    rows, cols = x.shape
    cfg = exit_decision_config(cols)
    batch = min(prev.shape[0], counter.shape[0], out_logits.shape[0], out_layer.shape[0])
    exit_decision_kernel[(1,)](
        x,
        ids,
        prev,
        counter,
        out_logits,
        out_layer,
        next_rows,
        next_local,
        count,
        min(rows, ids.shape[0]),
        cols,
        batch,
        x.stride(0),
        out_logits.stride(0),
        layer,
        threshold,
        patience,
        out_logits.shape[1],
        min(next_rows.shape[0], next_local.shape[0]),
        CRITERION=criterion,
        LAST=bool(last),
        BLOCK_R=cfg["BLOCK_R"],
        BLOCK_C=cfg["BLOCK_C"],
        num_warps=cfg["num_warps"],
    )
    return count


COMPILE_SPECS += [
    {
        "name": f"exit_decision[{dt},crit={crit},last={int(last)},C<={cfg['BLOCK_C']}]",
        "fn": exit_decision_kernel,
        "signature": {
            "x_ptr": ptr,
            "ids_ptr": "*i32",
            "prev_ptr": "*fp32",
            "counter_ptr": "*i32",
            "out_logits_ptr": ptr,
            "out_layer_ptr": "*i32",
            "next_rows_ptr": "*i32",
            "next_local_ptr": "*i32",
            "count_ptr": "*i32",
            "rows": "i32",
            "cols": "i32",
            "batch": "i32",
            "stride_x": "i32",
            "stride_out": "i32",
            "layer": "i32",
            "threshold": "fp32",
            "patience": "i32",
            "out_cols": "i32",
            "next_len": "i32",
        },
        "constexprs": {
            "CRITERION": crit,
            "LAST": last,
            "BLOCK_R": cfg["BLOCK_R"],
            "BLOCK_C": cfg["BLOCK_C"],
        },
        "num_warps": cfg["num_warps"],
        "divisible": ("x_ptr", "out_logits_ptr"),
        "must_not_spill": True,
        "matrix_instructions": False,
    }
    # Every criterion and both tile shapes in fp32; the 16-bit dtypes change only the loads and stores, so they are
    # covered on one criterion each (a full cross product would triple the report's time for no new code path).
    for dt, ptr in _DTYPES.items()
    for crit in (
        (ENTROPY, MAX_PROB, PATIENCE, PATIENCE_REGRESSION) if dt == "fp32" else (PATIENCE,)
    )
    for last in ((False, True) if dt == "fp32" else (False,))
    for cols in ((1,) if crit == PATIENCE_REGRESSION else (2, 64) if dt == "fp32" else (2,))
    for cfg in [exit_decision_config(cols, interpret=False)]
]


# ---- RomeBERT's multi-exit loss and its gradient in one launch ----


@triton.jit
def multi_exit_loss_kernel(
    z_ptr,
    labels_ptr,
    loss_ptr,
    grad_ptr,
    n_layers,
    batch,
    cols,
    stride_l,
    stride_b,
    gamma,
    temperature,
    n_labels,
    BLOCK_C: tl.constexpr,
):
    """One program per sample: the teacher's softened distribution once, then for every exit its cross-entropy,
    its distillation term and d(loss)/d(logits), all from one read of each logit row.

    loss[b] = CE_L + sum_{i<L} (1 - gamma) CE_i + (gamma / C) T^2 KL(p_T || q_i);  grad[i, b] = w_i (softmax(z_i) -
    onehot) + (gamma / C) T (q_i - p_T) for i < L (the teacher is detached), with p_T = softmax(z_L / T),
    q_i = softmax(z_i / T). The 1/C makes the caller's batch mean KLDivLoss's mean over B * C (RomeBERT's KDLoss).
    A sample past the labels' n_labels, or a label outside [0, C), gets a NaN loss (the wrappers reject both).
    """
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    cmask = offs < cols
    y = tl.load(labels_ptr + b, mask=b < n_labels, other=-1).to(tl.int32)
    onehot = (offs == y).to(tl.float32)
    inv_t = 1.0 / temperature
    b64 = b.to(tl.int64)
    stride_l64 = stride_l.to(tl.int64)  # L * B * C may pass 2**31
    batch64 = batch.to(tl.int64)
    row = z_ptr + b64 * stride_b
    zt = tl.load(row + (n_layers - 1) * stride_l64 + offs, mask=cmask, other=float("-inf")).to(
        tl.float32
    )
    zt = zt * inv_t
    mt = tl.max(zt, axis=0)
    et = tl.exp(zt - mt)
    st = tl.sum(et, axis=0)
    pt = et / st
    log_pt = zt - mt - tl.log(st)
    total = 0.0
    for l in range(0, n_layers):
        z = tl.load(row + l * stride_l64 + offs, mask=cmask, other=float("-inf")).to(tl.float32)
        m = tl.max(z, axis=0)
        e = tl.exp(z - m)
        s = tl.sum(e, axis=0)
        ce = m + tl.log(s) - tl.sum(tl.where(offs == y, z, 0.0), axis=0)
        p = e / s
        zq = z * inv_t
        mq = tl.max(zq, axis=0)
        eq = tl.exp(zq - mq)
        sq = tl.sum(eq, axis=0)
        log_q = zq - mq - tl.log(sq)
        q = eq / sq
        kl = tl.sum(tl.where(pt > 0, pt * (log_pt - log_q), 0.0), axis=0)
        student = l < n_layers - 1
        w_ce = tl.where(student, 1.0 - gamma, 1.0)
        w_kd = tl.where(student, gamma / cols, 0.0)
        total += w_ce * ce + w_kd * temperature * temperature * kl
        g = w_ce * (p - onehot) + w_kd * temperature * (q - pt)
        tl.store(grad_ptr + (l * batch64 + b64) * cols + offs, g, mask=cmask)
    tl.store(loss_ptr + b, tl.where((y >= 0) & (y < cols), total, float("nan")))


MULTI_EXIT_LOSS_MAX_C = 8192  # one row in registers; off-ramps are a handful of classes


def multi_exit_loss_config(cols, interpret=INTERPRET):
    block_c = triton.next_power_of_2(max(cols, 1))
    return {"BLOCK_C": block_c, "num_warps": 1 if interpret else (4 if block_c <= 1024 else 8)}


def multi_exit_loss(z, labels, loss_rows, grad, gamma, temperature):
    """``z [L, B, C]`` (unit column stride) and int64 ``labels [B]``; writes float32 ``loss_rows [B]`` and the
    contiguous float32 ``grad [L, B, C]`` of sum(loss_rows)."""
    depth, batch, cols = z.shape
    if batch == 0:
        return loss_rows, grad
    cfg = multi_exit_loss_config(cols)
    multi_exit_loss_kernel[(batch,)](
        z,
        labels,
        loss_rows,
        grad,
        depth,
        batch,
        cols,
        z.stride(0),
        z.stride(1),
        float(gamma),
        float(temperature),
        labels.shape[0],
        BLOCK_C=cfg["BLOCK_C"],
        num_warps=cfg["num_warps"],
    )
    return loss_rows, grad


COMPILE_SPECS += [
    {
        "name": f"multi_exit_loss[{dt},C<={cfg['BLOCK_C']}]",
        "fn": multi_exit_loss_kernel,
        "signature": {
            "z_ptr": ptr,
            "labels_ptr": "*i64",
            "loss_ptr": "*fp32",
            "grad_ptr": "*fp32",
            "n_layers": "i32",
            "batch": "i32",
            "cols": "i32",
            "stride_l": "i32",
            "stride_b": "i32",
            "gamma": "fp32",
            "temperature": "fp32",
            "n_labels": "i32",
        },
        "constexprs": {"BLOCK_C": cfg["BLOCK_C"]},
        "num_warps": cfg["num_warps"],
        "divisible": ("z_ptr", "grad_ptr"),
        "must_not_spill": True,
        "matrix_instructions": False,
    }
    for dt, ptr in _DTYPES.items()
    for cols in ((2, 1024, MULTI_EXIT_LOSS_MAX_C) if dt == "fp32" else (2,))
    for cfg in [multi_exit_loss_config(cols, interpret=False)]
]
