"""TNF note-dictionary kernels: the note mix at the input and the two passes of the note update.

The update runs on a plan the caller builds with torch (two sorts, no host sync):

* window means, one program per (sequence, column block): the 2M window boundaries of the sequence's span rows,
  sorted by position, are walked once while a running prefix sum P of the hidden states is kept in registers. At a
  row's ``lo`` boundary P is parked in ``means[r]``; at its ``hi`` boundary ``means[r] = (P - parked) / (hi - lo)``.
  Every token under an open window is read once however many windows cover it; tokens under no window are skipped.
* ordered fold, one program per slot segment after a stable sort of the rows by slot: Horner's rule
  over the segment in row order gives exactly the sequential EMA (occurrence r of m weighs gamma*(1-gamma)^(m-r),
  the old note (1-gamma)^m, and a first-ever update sets the note). One program owns a note row: no races.

Both update kernels read an error flag first (the first bad row, or M when every row is valid) and do nothing when
it is set, so a bad call leaves ``notes`` and ``counts`` untouched.

Every load is masked by the extent of the tensor it reads, passed by the launchers from that tensor's own shape
(the notes' width, the slots', lengths' and counts' lengths, the means' width), never by another tensor's: a caller
that skips the ops' checks gets wrong numbers, not reads outside a buffer.
"""

import triton
import triton.language as tl

from . import INTERPRET


@triton.jit(
    do_not_specialize=["tokens", "num_slots", "slot_len"]
)  # sizes that vary per batch: no recompiles
def note_mix_kernel(
    x_ptr,
    notes_ptr,
    slots_ptr,
    out_ptr,
    tokens,
    dim,
    num_slots,
    notes_dim,
    slot_len,
    stride_x,
    stride_out,
    lam,
    HAS_NOTES: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = x where slot < 0, else (1 - lam) * x + lam * notes[slot] (or (1 - lam) * x without notes: the
    backward). x and out: [tokens, dim]; notes: [num_slots, notes_dim] contiguous; slots: [slot_len]. A slot >=
    num_slots is never read; it gives NaN (the wrapper rejects such slots first); a token past the slots keeps x,
    a column past the notes mixes in 0."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * ROWS + tl.arange(0, ROWS)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = offs_t < tokens
    d_ok = offs_d < dim
    mask = t_ok[:, None] & d_ok[None, :]
    slot = tl.load(slots_ptr + offs_t, mask=t_ok & (offs_t < slot_len), other=-1)
    rare = slot >= 0
    if HAS_NOTES:
        valid = rare & (slot < num_slots)
    else:
        valid = rare
    x = tl.load(
        x_ptr + offs_t.to(tl.int64)[:, None] * stride_x + offs_d[None, :], mask=mask, other=0.0
    )
    xf = x.to(tl.float32)
    mixed = (1.0 - lam) * xf
    if HAS_NOTES:
        note = tl.load(
            notes_ptr + slot.to(tl.int64)[:, None] * notes_dim + offs_d[None, :],
            mask=mask & valid[:, None] & (offs_d < notes_dim)[None, :],
            other=0.0,
        )
        mixed += lam * note
    mixed = tl.where(valid[:, None], mixed, float("nan"))
    y = tl.where(rare[:, None], mixed, xf)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand: the interpreter's bf16 cast truncates (the GPU rounds; same bits).
        bits = y.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        yo = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        yo = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_out + offs_d[None, :], yo, mask=mask)


@triton.jit(do_not_specialize=["rows", "batch", "seq", "num_slots", "window", "n_lengths"])
def note_check_rows_kernel(
    spans_ptr,
    lengths_ptr,
    flag_ptr,
    keys_ptr,
    rows,
    batch,
    seq,
    num_slots,
    window,
    n_lengths,
    CHECK_SPANS: tl.constexpr,
    CHECK_SLOTS: tl.constexpr,
    WRITE_KEYS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """flag = min(flag, first row that is out of range); the update kernels skip all work when flag < rows.

    WRITE_KEYS (with CHECK_SPANS): also the sort keys of the window boundaries, b * (seq + 1) + lo at keys[r] and
    b * (seq + 1) + hi at keys[rows + r], so the caller's plan is one sort away."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok_r = offs < rows
    base = spans_ptr + offs.to(tl.int64) * 4
    bad = tl.zeros([BLOCK], tl.int32) != 0
    if CHECK_SPANS:
        b = tl.load(base, mask=ok_r, other=0)
        start = tl.load(base + 1, mask=ok_r, other=0)
        end = tl.load(base + 2, mask=ok_r, other=1)
        b_ok = (
            (b >= 0) & (b < batch) & (b < n_lengths)
        )  # a batch index past the lengths is a bad row
        length = tl.load(lengths_ptr + b, mask=ok_r & b_ok, other=0)
        bad |= ~b_ok | (start < 0) | (start >= end) | (end > length) | (length > seq)
        if WRITE_KEYS:
            base_key = b * (seq + 1)
            tl.store(keys_ptr + offs, base_key + tl.maximum(start - window, 0), mask=ok_r)
            tl.store(keys_ptr + rows + offs, base_key + tl.minimum(end + window, length), mask=ok_r)
    if CHECK_SLOTS:
        slot = tl.load(base + 3, mask=ok_r, other=0)
        bad |= (slot < 0) | (slot >= num_slots)
    bad &= ok_r
    first = tl.min(tl.where(bad, offs, rows), axis=0)
    tl.atomic_min(flag_ptr, first)


@triton.jit(do_not_specialize=["rows", "seq", "window", "n_lengths"])
def note_window_means_kernel(
    hidden_ptr,
    spans_ptr,
    lengths_ptr,
    ev_off_ptr,
    ev_idx_ptr,
    flag_ptr,
    means_ptr,
    rows,
    seq,
    dim,
    window,
    n_lengths,
    stride_b,
    stride_n,
    BLOCK_D: tl.constexpr,
):
    """means[r] = mean(hidden[b, lo_r:hi_r]) for the rows of sequence b = program_id(0), by one prefix-sum walk.

    The boundaries of sequence b are ev_idx[ev_off[b]:ev_off[b + 1]], sorted by position: r < rows is row r's lo
    boundary, rows + r its hi boundary; positions come from the span row, its sequence's length and the window.
    """
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    e0 = tl.load(ev_off_ptr + b).to(tl.int32)
    e1 = tl.load(ev_off_ptr + b + 1).to(tl.int32)
    valid = tl.load(flag_ptr) >= rows
    e1 = tl.where(valid, e1, e0)
    length = tl.load(lengths_ptr + b, mask=b < n_lengths, other=0)
    row_base = hidden_ptr + b.to(tl.int64) * stride_b + offs_d
    p = tl.zeros([BLOCK_D], tl.float32)
    t = e0 * 0  # int32 tensors: their type must not change across loop iterations
    open_rows = e0 * 0
    for e in range(e0, e1):
        ev = tl.load(ev_idx_ptr + e)
        is_hi = ev >= rows
        r = tl.where(is_hi, ev - rows, ev)
        lo = tl.maximum(tl.load(spans_ptr + r * 4 + 1) - window, 0)
        hi = tl.minimum(tl.load(spans_ptr + r * 4 + 2) + window, length)
        pos = tl.where(is_hi, hi, lo)
        pos = tl.minimum(tl.maximum(pos, 0), seq).to(
            tl.int32
        )  # the flag guarantees this; never read outside
        # No window open: the tokens before this boundary belong to no row, so skip them.
        t = tl.where(open_rows > 0, t, pos)
        ptr = row_base + t.to(tl.int64) * stride_n
        # Four token rows in flight per step: the loads do not depend on the running sum.
        for _ in range(0, (pos - t) // 4):
            h0 = tl.load(ptr, mask=d_ok, other=0.0).to(tl.float32)
            h1 = tl.load(ptr + stride_n, mask=d_ok, other=0.0).to(tl.float32)
            h2 = tl.load(ptr + 2 * stride_n, mask=d_ok, other=0.0).to(tl.float32)
            h3 = tl.load(ptr + 3 * stride_n, mask=d_ok, other=0.0).to(tl.float32)
            p += (h0 + h1) + (h2 + h3)
            ptr += 4 * stride_n
        for _ in range(0, (pos - t) % 4):
            p += tl.load(ptr, mask=d_ok, other=0.0).to(tl.float32)
            ptr += stride_n
        t = pos
        out = means_ptr + r * dim + offs_d
        if is_hi:
            parked = tl.load(out, mask=d_ok, other=0.0)
            inv = 1.0 / tl.maximum(hi - lo, 1).to(tl.float32)
            tl.store(out, (p - parked) * inv, mask=d_ok)
            open_rows -= 1
            # Restart the running sum when no window is open: keeps P small, so P(hi) - P(lo) loses nothing.
            p = tl.where(open_rows == 0, 0.0, p)
        else:
            tl.store(out, p, mask=d_ok)  # park P(lo)
            open_rows += 1


@triton.jit(do_not_specialize=["rows", "num_slots", "n_counts"])
def note_fold_kernel(
    notes_ptr,
    counts_ptr,
    means_ptr,
    order_ptr,
    sorted_slots_ptr,
    flag_ptr,
    rows,
    dim,
    num_slots,
    gamma,
    n_counts,
    means_dim,
    BLOCK_D: tl.constexpr,
):
    """Fold the rows of one slot segment (rows sorted by slot, stable) into notes[slot], in row order.

    Program i works only when sorted row i is the first of its slot's segment, so exactly one program reads and
    writes each note row and count: no races. It walks every column block itself for the same reason. notes:
    [num_slots, dim]; counts: [n_counts] (a slot past them is skipped); means: [rows, means_dim] (columns past
    them fold in 0)."""
    i = tl.program_id(0)
    slot = tl.load(sorted_slots_ptr + i)
    prev = tl.load(sorted_slots_ptr + i - 1, mask=i > 0, other=-1)
    ok = (
        (tl.load(flag_ptr) >= rows)
        & ((i == 0) | (prev != slot))
        & (slot >= 0)
        & (slot < num_slots)
        & (slot < n_counts)
    )
    # Segment length: the rows that follow with the same slot.
    m = (i * 0).to(tl.int32)
    go = ok
    while go:
        m += 1
        nxt = tl.load(sorted_slots_ptr + i + m, mask=i + m < rows, other=-1)
        go = (i + m < rows) & (nxt == slot)
    n = tl.load(counts_ptr + slot, mask=m > 0, other=0)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < dim
        note_row = notes_ptr + slot * dim + offs_d
        acc = tl.load(note_row, mask=d_ok & (m > 0), other=0.0)
        for k in range(0, m):
            r = tl.load(order_ptr + i + k)
            c = tl.load(
                means_ptr + r * means_dim + offs_d, mask=d_ok & (offs_d < means_dim), other=0.0
            )
            first = (n == 0) & (k == 0)
            acc = tl.where(first, c, (1.0 - gamma) * acc + gamma * c)
        tl.store(note_row, acc, mask=d_ok & (m > 0))
    tl.store(counts_ptr + slot, n + m, mask=m > 0)


def _block_d(dim):
    # Two column blocks only: each distinct block is one more compile on the GPU, and narrow rows are rare.
    return 64 if dim <= 64 else 256


def note_mix_config(dim, interpret=INTERPRET):
    block_d = _block_d(dim)
    rows = max(1, 4096 // block_d) if not interpret else max(1, 256 // block_d)
    return {"BLOCK_D": block_d, "ROWS": rows, "num_warps": 1 if interpret else 4}


def note_update_config(dim, elem_size=4, interpret=INTERPRET):
    """One 16-byte load per thread per token row: 2 warps for fp32 rows of 256, 1 warp for 16-bit ones."""
    block_d = _block_d(dim)
    return {
        "BLOCK_D": block_d,
        "num_warps": 1 if interpret else max(1, block_d * elem_size // (16 * 32)),
    }


def note_mix(x2, notes, slots1, lam, out2):
    """x2, out2: [T, Dm] with unit column stride; slots1: [T] int64; notes: [S, Dm] float32 contiguous or None
    (then the backward scaling)."""
    tokens, dim = x2.shape
    if tokens == 0 or dim == 0:
        return out2
    cfg = note_mix_config(dim)
    grid = (triton.cdiv(tokens, cfg["ROWS"]), triton.cdiv(dim, cfg["BLOCK_D"]))
    has_notes = notes is not None
    note_mix_kernel[grid](
        x2,
        notes if has_notes else x2,
        slots1,
        out2,
        tokens,
        dim,
        notes.shape[0] if has_notes else 0,
        notes.shape[1] if has_notes else 0,
        slots1.shape[0],
        x2.stride(0),
        out2.stride(0),
        float(lam),
        HAS_NOTES=has_notes,
        ROWS=cfg["ROWS"],
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
    )
    return out2


def note_check_rows(
    spans, lengths, flag, batch, seq, num_slots, check_spans, check_slots, keys=None, window=0
):
    rows = spans.shape[0]
    if rows == 0:
        return flag
    block = 128
    note_check_rows_kernel[(triton.cdiv(rows, block),)](
        spans,
        lengths if lengths is not None else spans,
        flag,
        keys if keys is not None else spans,
        rows,
        batch,
        seq,
        num_slots,
        window,
        lengths.shape[0] if lengths is not None else 0,
        CHECK_SPANS=check_spans,
        CHECK_SLOTS=check_slots,
        WRITE_KEYS=keys is not None,
        BLOCK=block,
    )
    return flag


def note_window_means(hidden, spans, lengths, window, plan, flag, means):
    """hidden: [B, N, Dm] with unit column stride; spans [M, 4] and lengths [B] int64 contiguous; plan: ev_off
    [B+1] and ev_idx [2M] int64 (the boundaries sorted by sequence and position)."""
    batch, seq, dim = hidden.shape
    rows = means.shape[0]
    if rows == 0 or dim == 0:
        return means
    cfg = note_update_config(dim, hidden.element_size())
    grid = (batch, triton.cdiv(dim, cfg["BLOCK_D"]))
    note_window_means_kernel[grid](
        hidden,
        spans,
        lengths,
        plan["ev_off"],
        plan["ev_idx"],
        flag,
        means,
        rows,
        seq,
        dim,
        window,
        lengths.shape[0],
        hidden.stride(0),
        hidden.stride(1),
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
    )
    return means


def note_fold(notes, counts, means, plan, flag, gamma):
    """plan: order and sorted_slots, [M] int64 each (a stable sort of the rows' slots)."""
    rows = means.shape[0]
    num_slots, dim = notes.shape
    if rows == 0 or dim == 0:
        return notes
    cfg = note_update_config(dim)
    note_fold_kernel[(rows,)](
        notes,
        counts,
        means,
        plan["order"],
        plan["sorted_slots"],
        flag,
        rows,
        dim,
        num_slots,
        float(gamma),
        counts.shape[0],
        means.shape[1],
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
    )
    return notes


_DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
_DIMS = (64, 768, 4096)

COMPILE_SPECS = (
    [
        {
            "name": f"note_mix[{dt},{'fwd' if has_notes else 'bwd'},D={cfg['BLOCK_D']}]",
            "fn": note_mix_kernel,
            "signature": {
                "x_ptr": ptr,
                "notes_ptr": "*fp32",
                "slots_ptr": "*i64",
                "out_ptr": ptr,
                "tokens": "i32",
                "dim": "i32",
                "num_slots": "i32",
                "notes_dim": "i32",
                "slot_len": "i32",
                "stride_x": "i32",
                "stride_out": "i32",
                "lam": "fp32",
            },
            "constexprs": {"HAS_NOTES": has_notes, "ROWS": cfg["ROWS"], "BLOCK_D": cfg["BLOCK_D"]},
            "num_warps": cfg["num_warps"],
            "divisible": (
                "x_ptr",
                "notes_ptr",
                "slots_ptr",
                "out_ptr",
                "dim",
                "notes_dim",
                "stride_x",
                "stride_out",
            ),
            "must_not_spill": True,
            "matrix_instructions": False,
        }
        for dt, ptr in _DTYPES.items()
        for has_notes in (True, False)
        for dim in (64, 768)  # 768 and 4096 give the same block
        for cfg in [note_mix_config(dim, interpret=False)]
    ]
    + [
        {
            "name": f"note_window_means[{dt},D={cfg['BLOCK_D']}]",
            "fn": note_window_means_kernel,
            "signature": {
                "hidden_ptr": ptr,
                "spans_ptr": "*i64",
                "lengths_ptr": "*i64",
                "ev_off_ptr": "*i64",
                "ev_idx_ptr": "*i64",
                "flag_ptr": "*i32",
                "means_ptr": "*fp32",
                "rows": "i32",
                "seq": "i32",
                "dim": "i32",
                "window": "i32",
                "n_lengths": "i32",
                "stride_b": "i32",
                "stride_n": "i32",
            },
            "constexprs": {"BLOCK_D": cfg["BLOCK_D"]},
            "num_warps": cfg["num_warps"],
            "divisible": ("hidden_ptr", "means_ptr", "dim", "stride_b", "stride_n"),
            "must_not_spill": True,
            "matrix_instructions": False,
        }
        for dt, ptr in _DTYPES.items()
        for dim in (64, 768)
        for cfg in [note_update_config(dim, 4 if dt == "fp32" else 2, interpret=False)]
    ]
    + [
        {
            "name": f"note_fold[D={cfg['BLOCK_D']}]",
            "fn": note_fold_kernel,
            "signature": {
                "notes_ptr": "*fp32",
                "counts_ptr": "*i64",
                "means_ptr": "*fp32",
                "order_ptr": "*i64",
                "sorted_slots_ptr": "*i64",
                "flag_ptr": "*i32",
                "rows": "i32",
                "dim": "i32",
                "num_slots": "i32",
                "gamma": "fp32",
                "n_counts": "i32",
                "means_dim": "i32",
            },
            "constexprs": {"BLOCK_D": cfg["BLOCK_D"]},
            "num_warps": cfg["num_warps"],
            "divisible": ("notes_ptr", "means_ptr", "dim", "means_dim"),
            "must_not_spill": True,
            "matrix_instructions": False,
        }
        for dim in (64, 768)
        for cfg in [note_update_config(dim, interpret=False)]
    ]
    + [
        {
            "name": "note_check_rows",
            "fn": note_check_rows_kernel,
            "signature": {
                "spans_ptr": "*i64",
                "lengths_ptr": "*i64",
                "flag_ptr": "*i32",
                "keys_ptr": "*i64",
                "rows": "i32",
                "batch": "i32",
                "seq": "i32",
                "num_slots": "i32",
                "window": "i32",
                "n_lengths": "i32",
            },
            "constexprs": {
                "CHECK_SPANS": True,
                "CHECK_SLOTS": True,
                "WRITE_KEYS": True,
                "BLOCK": 128,
            },
            "num_warps": 4,
            "must_not_spill": True,
            "matrix_instructions": False,
        }
    ]
)
