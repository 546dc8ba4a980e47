"""TUPE positional term: P[h, i, j] = scale * <pos_q[i, h], pos_k[j, h]> + rel_table[buckets[i, j], h], with the
[CLS] row and column untied, written in one pass; and its backward.

The backward takes dP (float32, the batch- and layer-summed logit gradient) and produces, per head, d pos_q =
scale * dP' pos_k and d pos_k = scale * dP'^T pos_q (dP' is dP with the [CLS] row and column zeroed when they are
untied), plus per-row-block partial sums of dP' per relative bucket that the wrapper adds up in a fixed order.

Every load is masked by the extents of the tensor it reads, which the launchers pass from that tensor's own shape
(pos_k's rows and width, rel_table's rows and heads, rel_buckets' rows and columns, cls_row's and cls_col's
lengths), never by pos_q's: a caller that skips the ops' checks gets wrong numbers, not reads outside a buffer.
"""

import torch
import triton
import triton.language as tl

from . import INTERPRET


@triton.jit
def position_bias_fwd_kernel(
    PosQ,
    PosK,
    Rel,
    Buckets,
    ClsRow,
    ClsCol,
    Out,
    spq_n,
    spq_h,
    spk_n,
    spk_h,
    srel_b,
    srel_h,
    sbk_i,
    sbk_j,
    so_h,
    so_i,
    N,
    DH,
    NUM_BUCKETS,
    scale,
    NK,
    KH,
    DHK,
    REL_H,
    BK_I,
    BK_J,
    CLS_R,
    CLS_C,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_REL: tl.constexpr,
    HAS_CLS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """P [H, N, N] from pos_q [N, H, DH] (the grid's extents); the other inputs' own extents: pos_k [NK, KH, DHK],
    rel_table [NUM_BUCKETS, REL_H], rel_buckets [BK_I, BK_J], cls_row [CLS_R], cls_col [CLS_C]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    h = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ok_m = offs_m < N
    ok_n = offs_n < N
    k_rows = ok_n & (offs_n < NK) & (h < KH)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, DH, BLOCK_D):
        dd = d0 + offs_d
        pq = tl.load(
            PosQ + offs_m[:, None] * spq_n + h * spq_h + dd[None, :],
            mask=ok_m[:, None] & (dd < DH)[None, :],
            other=0.0,
        )
        pk = tl.load(
            PosK + offs_n[:, None] * spk_n + h * spk_h + dd[None, :],
            mask=k_rows[:, None] & (dd < DHK)[None, :],
            other=0.0,
        )
        acc += tl.dot(pq, tl.trans(pk), input_precision=DOT_PRECISION)
    acc = acc * scale
    ok = ok_m[:, None] & ok_n[None, :]
    if HAS_REL:
        bk_ok = ok & (offs_m < BK_I)[:, None] & (offs_n < BK_J)[None, :]
        bucket = tl.load(
            Buckets + offs_m[:, None] * sbk_i + offs_n[None, :] * sbk_j, mask=bk_ok, other=0
        )
        in_table = bk_ok & (bucket >= 0) & (bucket < NUM_BUCKETS) & (h < REL_H)
        acc += tl.load(Rel + bucket * srel_b + h * srel_h, mask=in_table, other=0.0).to(tl.float32)
    if HAS_CLS:
        cls_row = tl.load(ClsRow + h, mask=h < CLS_R, other=0.0).to(tl.float32)
        cls_col = tl.load(ClsCol + h, mask=h < CLS_C, other=0.0).to(tl.float32)
        acc = tl.where(offs_m[:, None] == 0, cls_row, acc)
        acc = tl.where((offs_n[None, :] == 0) & (offs_m[:, None] > 0), cls_col, acc)
    tl.store(
        Out + h * so_h + offs_m[:, None] * so_i + offs_n[None, :],
        acc.to(Out.dtype.element_ty),
        mask=ok,
    )


@triton.jit
def position_bias_bwd_kernel(
    DP,
    Other,
    Buckets,
    DOut,
    RelPart,
    sdp_h,
    sdp_r,
    sdp_c,
    so_n,
    so_h,
    sbk_r,
    sbk_c,
    sdo_n,
    sdo_h,
    srp_t,
    srp_h,
    N,
    DH,
    NUM_BUCKETS,
    scale,
    DP_H,
    DP_R,
    DP_C,
    ON,
    OH,
    ODH,
    BK_R,
    BK_C,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_REL: tl.constexpr,
    HAS_CLS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Rows r of one block of one head: DOut[r, h] = scale * sum_c dP'[r, c] Other[c, h] over every column c.

    Row/column roles come from the strides: (sdp_r, sdp_c) = (N, 1) gives d pos_q (Other = pos_k); (1, N) gives
    d pos_k (Other = pos_q). [CLS] masking is symmetric (row 0 and column 0), so it does not care which. With
    HAS_REL, also the sums of dP' per bucket over this row block into RelPart[row block, h, bucket]. N, DH: DOut's
    extents (the grid's); each input is read inside its own: dP [DP_H, DP_R, DP_C] (in the roles' order), Other
    [ON, OH, ODH], the buckets [BK_R, BK_C].
    """
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    ok_r = offs_r < N
    bucket_ids = tl.arange(0, 64)
    rel_acc = tl.zeros([64], tl.float32)
    for d0 in range(0, DH, BLOCK_D):
        dd = d0 + offs_d
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for c0 in range(0, N, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            ok_c = offs_c < N
            ok = ok_r[:, None] & ok_c[None, :]
            dp_ok = ok & (offs_r < DP_R)[:, None] & (offs_c < DP_C)[None, :] & (h < DP_H)
            g = tl.load(
                DP + h * sdp_h + offs_r[:, None] * sdp_r + offs_c[None, :] * sdp_c,
                mask=dp_ok,
                other=0.0,
            )
            if HAS_CLS:
                g = tl.where((offs_r[:, None] == 0) | (offs_c[None, :] == 0), 0.0, g)
            o_ok = (ok_c & (offs_c < ON) & (h < OH))[:, None] & (dd < ODH)[None, :]
            other = tl.load(
                Other + offs_c[:, None] * so_n + h * so_h + dd[None, :], mask=o_ok, other=0.0
            ).to(tl.float32)
            acc += tl.dot(g, other, input_precision=DOT_PRECISION)
            if HAS_REL:
                if d0 == 0:  # once per tile, not once per head-dim chunk
                    bk_ok = ok & (offs_r < BK_R)[:, None] & (offs_c < BK_C)[None, :]
                    bucket = tl.load(
                        Buckets + offs_r[:, None] * sbk_r + offs_c[None, :] * sbk_c,
                        mask=bk_ok,
                        other=-1,
                    )
                    for nb in range(0, NUM_BUCKETS):
                        part = tl.sum(tl.sum(tl.where(bucket == nb, g, 0.0), axis=1), axis=0)
                        rel_acc += tl.where(bucket_ids == nb, part, 0.0)
        tl.store(
            DOut + offs_r[:, None] * sdo_n + h * sdo_h + dd[None, :],
            (acc * scale).to(DOut.dtype.element_ty),
            mask=ok_r[:, None] & (dd < DH)[None, :],
        )
    if HAS_REL:
        tl.store(
            RelPart + pid * srp_t + h * srp_h + bucket_ids, rel_acc, mask=bucket_ids < NUM_BUCKETS
        )


MAX_BUCKETS = 64  # the per-program bucket accumulator's size (T5 uses 32)


def _config(interpret=INTERPRET):
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "num_warps": 1}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4}


def _bwd_config(interpret=INTERPRET):
    """Exact fp32 products plus the per-bucket sums: 32-wide tiles keep it all in registers."""
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "num_warps": 1}
    return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32, "num_warps": 4}


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def position_bias_forward(pos_q, pos_k, rel_table, rel_buckets, cls_row, cls_col, out, scale):
    """Write P [H, N, N] (out, contiguous) from pos_q/pos_k [N, H, Dh] (unit stride on Dh)."""
    n, heads, dh = pos_q.shape
    cfg = _config()
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), heads)
    rel = rel_table if rel_table is not None else pos_q
    buckets = rel_buckets if rel_buckets is not None else pos_q
    srel = rel_table.stride() if rel_table is not None else (0, 0)
    sbk = rel_buckets.stride() if rel_buckets is not None else (0, 0)
    cls_r = cls_row if cls_row is not None else pos_q
    cls_c = cls_col if cls_col is not None else pos_q
    position_bias_fwd_kernel[grid](
        pos_q,
        pos_k,
        rel,
        buckets,
        cls_r,
        cls_c,
        out,
        pos_q.stride(0),
        pos_q.stride(1),
        pos_k.stride(0),
        pos_k.stride(1),
        *srel,
        *sbk,
        out.stride(0),
        out.stride(1),
        n,
        dh,
        rel_table.shape[0] if rel_table is not None else 0,
        scale,
        *pos_k.shape,
        rel_table.shape[1] if rel_table is not None else 0,
        *(rel_buckets.shape if rel_buckets is not None else (0, 0)),
        cls_row.shape[0] if cls_row is not None else 0,
        cls_col.shape[0] if cls_col is not None else 0,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=min(cfg["BLOCK_D"], max(16, triton.next_power_of_2(dh))),
        HAS_REL=rel_table is not None,
        HAS_CLS=cls_row is not None,
        DOT_PRECISION=_precision(pos_q.dtype),
        num_warps=cfg["num_warps"],
    )
    return out


def position_bias_backward(dp, pos_q, pos_k, rel_buckets, num_buckets, has_cls, scale):
    """(d pos_q, d pos_k, per-bucket sums of dP' [num_buckets, H] or None) from dp float32 [H, N, N]."""
    n, heads, dh = pos_q.shape
    cfg = _bwd_config()
    block_d = min(cfg["BLOCK_D"], max(16, triton.next_power_of_2(dh)))
    d_q = torch.empty_like(pos_q, memory_format=torch.contiguous_format)
    d_k = torch.empty_like(pos_k, memory_format=torch.contiguous_format)
    tiles = triton.cdiv(n, cfg["BLOCK_M"])
    has_rel = rel_buckets is not None
    rel_part = torch.zeros(tiles, heads, max(num_buckets, 1), dtype=torch.float32, device=dp.device)
    buckets = rel_buckets if has_rel else dp
    sbk = rel_buckets.stride() if has_rel else (0, 0)
    common = dict(
        BLOCK_R=cfg["BLOCK_M"],
        BLOCK_C=cfg["BLOCK_N"],
        BLOCK_D=block_d,
        HAS_CLS=has_cls,
        DOT_PRECISION="ieee",
        num_warps=cfg["num_warps"],
    )
    # d pos_q: rows are query positions i, columns key positions j
    bk_shape = rel_buckets.shape if has_rel else (0, 0)
    position_bias_bwd_kernel[(tiles, heads)](
        dp,
        pos_k,
        buckets,
        d_q,
        rel_part,
        dp.stride(0),
        dp.stride(1),
        dp.stride(2),
        pos_k.stride(0),
        pos_k.stride(1),
        sbk[0],
        sbk[1],
        d_q.stride(0),
        d_q.stride(1),
        rel_part.stride(0),
        rel_part.stride(1),
        n,
        dh,
        num_buckets,
        scale,
        dp.shape[0],
        dp.shape[1],
        dp.shape[2],
        *pos_k.shape,
        *bk_shape,
        HAS_REL=has_rel,
        **common,
    )
    # d pos_k: the same kernel over dP transposed (rows are key positions)
    position_bias_bwd_kernel[(tiles, heads)](
        dp,
        pos_q,
        buckets,
        d_k,
        rel_part,
        dp.stride(0),
        dp.stride(2),
        dp.stride(1),
        pos_q.stride(0),
        pos_q.stride(1),
        0,
        0,
        d_k.stride(0),
        d_k.stride(1),
        0,
        0,
        n,
        dh,
        0,
        scale,
        dp.shape[0],
        dp.shape[2],
        dp.shape[1],
        *pos_q.shape,
        0,
        0,
        HAS_REL=False,
        **common,
    )
    # contiguous [num_buckets, H], as the op's fake promises (torch.compile checks the strides)
    rel_sum = rel_part.sum(0).t()[:num_buckets].contiguous() if has_rel else None
    return d_q, d_k, rel_sum


_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}

COMPILE_SPECS = [
    {
        "name": f"position_bias_fwd[{dt}]",
        "fn": position_bias_fwd_kernel,
        "signature": {
            "PosQ": p,
            "PosK": p,
            "Rel": p,
            "Buckets": "*i64",
            "ClsRow": p,
            "ClsCol": p,
            "Out": p,
            **{
                k: "i32"
                for k in (
                    "spq_n",
                    "spq_h",
                    "spk_n",
                    "spk_h",
                    "srel_b",
                    "srel_h",
                    "sbk_i",
                    "sbk_j",
                    "so_h",
                    "so_i",
                    "N",
                    "DH",
                    "NUM_BUCKETS",
                )
            },
            "scale": "fp32",
            **{k: "i32" for k in ("NK", "KH", "DHK", "REL_H", "BK_I", "BK_J", "CLS_R", "CLS_C")},
        },
        "constexprs": {
            "BLOCK_M": 64,
            "BLOCK_N": 64,
            "BLOCK_D": 64,
            "HAS_REL": True,
            "HAS_CLS": True,
            "DOT_PRECISION": _precision(torch.float32 if dt == "fp32" else torch.float16),
            "srel_h": 1,
            "sbk_j": 1,
        },
        "num_warps": 4,
        "divisible": (
            "PosQ",
            "PosK",
            "Out",
            "spq_n",
            "spq_h",
            "spk_n",
            "spk_h",
            "so_h",
            "so_i",
            "sbk_i",
        ),
        "must_not_spill": True,
        "matrix_instructions": dt != "fp32",
    }
    for dt, p in _PTR.items()
] + [
    {
        "name": f"position_bias_bwd[{dt},{'rel' if rel else 'plain'}]",
        "fn": position_bias_bwd_kernel,
        "signature": {
            "DP": "*fp32",
            "Other": p,
            "Buckets": "*i64",
            "DOut": p,
            "RelPart": "*fp32",
            **{
                k: "i32"
                for k in (
                    "sdp_h",
                    "sdp_r",
                    "sdp_c",
                    "so_n",
                    "so_h",
                    "sbk_r",
                    "sbk_c",
                    "sdo_n",
                    "sdo_h",
                    "srp_t",
                    "srp_h",
                    "N",
                    "DH",
                    "NUM_BUCKETS",
                )
            },
            "scale": "fp32",
            **{k: "i32" for k in ("DP_H", "DP_R", "DP_C", "ON", "OH", "ODH", "BK_R", "BK_C")},
        },
        "constexprs": {
            "BLOCK_R": 32,
            "BLOCK_C": 32,
            "BLOCK_D": 32,
            "HAS_REL": rel,
            "HAS_CLS": True,
            "DOT_PRECISION": "ieee",
        },
        "num_warps": 4,
        "divisible": ("DP", "Other", "DOut", "sdp_h", "so_n", "so_h", "sdo_n", "sdo_h"),
        "must_not_spill": True,
        "matrix_instructions": False,  # float32 gradients, exact products
    }
    for dt, p in _PTR.items()
    for rel in (True, False)
]
