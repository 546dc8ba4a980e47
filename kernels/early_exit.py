"""Early-exit kernels: the entropy of each row's softmax (DeeBERT / RomeBERT exit criterion)."""

import triton
import triton.language as tl

from . import INTERPRET


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
    """out[r] = H(softmax(x[r, :cols])) for ROWS rows per program, one pass over each row.

    Running state per row: maximum m, S = sum exp(z - m), T = sum exp(z - m) * (z - m); H = log S - T / S.
    """
    pid = tl.program_id(0)
    offs_r = pid * ROWS + tl.arange(0, ROWS)
    row_ok = offs_r < rows
    row_base = x_ptr + offs_r.to(tl.int64)[:, None] * stride_row
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    t = tl.zeros([ROWS], tl.float32)
    bad = tl.zeros([ROWS], tl.int32)  # NaN or +inf seen: the softmax is undefined
    for c0 in range(0, cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (offs_c < cols)[None, :]
        z = tl.load(row_base + offs_c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        bad += tl.sum(((z != z) | (z == float("inf"))).to(tl.int32), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # While a row has seen only -inf, shift by 0 so no inf - inf appears; those terms are 0 anyway.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = m - m_ref  # <= 0, -inf before the first finite element
        alpha = tl.exp(shift)
        t = tl.where(s > 0, alpha * (t + shift * s), 0.0)
        s = s * alpha
        d = z - m_ref[:, None]
        e = tl.exp(d)
        s += tl.sum(e, axis=1)
        t += tl.sum(tl.where(e > 0, e * d, 0.0), axis=1)
        m = m_new
    h = tl.maximum(tl.log(s) - t / s, 0.0)
    h = tl.where((bad > 0) | (s <= 0), float("nan"), h)
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
        x, out, rows, cols, x.stride(0), BLOCK_C=cfg["BLOCK_C"], ROWS=cfg["ROWS"], num_warps=cfg["num_warps"]
    )
    return out


_DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}

# Every configuration exit_entropy_config can return, for each input dtype.
COMPILE_SPECS = [
    {
        "name": f"exit_entropy[{dt},C<={cfg['BLOCK_C'] if cols < 4096 else 'any'},rows={cfg['ROWS']}]",
        "fn": exit_entropy_kernel,
        "signature": {"x_ptr": ptr, "out_ptr": "*fp32", "rows": "i32", "cols": "i32", "stride_row": "i32"},
        "constexprs": {"BLOCK_C": cfg["BLOCK_C"], "ROWS": cfg["ROWS"]},
        "num_warps": cfg["num_warps"],
        "divisible": ("x_ptr", "out_ptr", "cols", "stride_row"),  # the runtime specialisation for C % 16 == 0
        "must_not_spill": True,
        "matrix_instructions": False,
    }
    for dt, ptr in _DTYPES.items()
    for cols in (2, 16, 64, 256, 1024, 2048, 4096)
    for cfg in [exit_entropy_config(cols, interpret=False)]
]
