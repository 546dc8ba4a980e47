"""Token-level early exit for sequence labeling (Li et al., ACL 2021): per packed token the normalised entropy of its
logits, the maximum of that uncertainty over a window of its sequence, and the exit decision, in one launch.

One program per (sequence, block of positions). A block computes the uncertainty of BLOCK_E consecutive positions:
its CORE = BLOCK_E - 2 * HALF own positions plus HALF positions of halo on each side, recomputed rather than
exchanged between programs (C is small in sequence labeling, so the halo's entropies cost little), and the window
maximum is a masked [BLOCK_E, BLOCK_E] reduction in registers.

Every load and store is masked by the extents of the tensors it touches: the sequence offsets are clamped to the
fewest tokens of any per-token tensor (the launcher's minimum of their shapes), and the offsets' own loads stay
inside cu_seqlens (one program per sequence, from its shape), so offsets a caller failed to check give wrong
numbers, not accesses outside a buffer."""

import math

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .early_exit import entropy_finish, entropy_step

# token_threshold rules; effbert/ops/token_exit.py and csrc/include/effbert/token_exit.h hold the same table
RULE_NONE, RULE_AND, RULE_OR = 0, 1, 2


@triton.jit
def token_exit_kernel(
    x_ptr,
    cu_ptr,
    active_ptr,
    layer_in_ptr,
    keep_ptr,
    active_out_ptr,
    layer_out_ptr,
    u_ptr,
    total,
    cols,
    stride_x,
    log_c,
    threshold,
    token_threshold,
    layer,
    HALF: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    RULE: tl.constexpr,
    EXCLUDE_EXITED: tl.constexpr,
):
    seq = tl.program_id(0)
    CORE: tl.constexpr = BLOCK_E - 2 * HALF
    start = tl.load(cu_ptr + seq)
    end = tl.load(cu_ptr + seq + 1)
    start = tl.minimum(tl.maximum(start, 0), total)
    end = tl.minimum(tl.maximum(end, start), total)
    offs = tl.arange(0, BLOCK_E)
    pos = (
        tl.program_id(1) * CORE - HALF + offs
    )  # position inside the sequence; the core starts at lane HALF
    row = start + pos
    ok = (pos >= 0) & (row < end)
    base = x_ptr + row.to(tl.int64)[:, None] * stride_x

    # entropy in one pass over the classes (entropy_step's running state, as exit_entropy_kernel)
    m = tl.full([BLOCK_E], float("-inf"), tl.float32)
    a = tl.zeros([BLOCK_E], tl.float32)
    w = tl.zeros([BLOCK_E], tl.float32)
    bad = tl.zeros([BLOCK_E], tl.int32)  # NaN or +inf seen
    for c0 in range(0, cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        z = tl.load(
            base + offs_c[None, :], mask=ok[:, None] & (offs_c < cols)[None, :], other=float("-inf")
        ).to(tl.float32)
        bad += tl.sum(((z != z) | (z == float("inf"))).to(tl.int32), axis=1)
        m, a, w = entropy_step(z, offs_c, cols, m, a, w, BLOCK_C)
    u = entropy_finish(a, w) / log_c
    u = tl.where((bad > 0) | (m == float("-inf")), float("nan"), u)

    active = tl.load(active_ptr + row, mask=ok, other=0) != 0
    if HAS_KEEP:
        keep = tl.load(keep_ptr + row, mask=ok, other=1) != 0
    else:
        keep = (pos == 0) | (row == end - 1)  # [CLS] and [SEP]
    takes_part = ok & ~keep
    if EXCLUDE_EXITED:
        takes_part = takes_part & active
    # a NaN neighbour counts as +inf: an undefined prediction never lets its neighbours exit
    val = tl.where(takes_part, tl.where(u != u, float("inf"), u), float("-inf"))
    dist = offs[:, None] - offs[None, :]
    near = (dist <= HALF) & (dist >= -HALF)
    u_win = tl.max(tl.where(near, val[None, :], float("-inf")), axis=1)

    exits = u_win < threshold
    if RULE == 1:
        exits = exits & (u < token_threshold)
    elif RULE == 2:
        exits = exits | (u < token_threshold)
    core = ok & (offs >= HALF) & (offs < HALF + CORE)
    exits = exits & active & ~keep & core
    layer_in = tl.load(layer_in_ptr + row, mask=core, other=0)
    tl.store(u_ptr + row, u, mask=core)
    tl.store(active_out_ptr + row, (active & ~exits).to(tl.int8), mask=core)
    tl.store(layer_out_ptr + row, tl.where(exits, layer, layer_in), mask=core)


MAX_WINDOW = 65  # the window's halo lives in one tile of at most 128 positions


def token_exit_config(window, cols, interpret=INTERPRET):
    """Tile for a window and class count: 64 positions (halo included) up to window 33, else 128; at most 512
    logits in flight per program: a [64, 16] block took 120 registers on sm_80 where [64, 8] takes 64 (the AOT
    report), and sequence labeling's few classes (9 for CoNLL NER) need one or two blocks either way."""
    half = window // 2
    block_e = 64 if half <= 16 else 128
    block_c = min(triton.next_power_of_2(max(cols, 1)), 512 // block_e)
    return {
        "HALF": half,
        "BLOCK_E": block_e,
        "BLOCK_C": block_c,
        "num_warps": 1 if interpret else (4 if block_e == 64 else 8),
    }


def token_exit(
    x,
    cu_seqlens,
    max_seqlen,
    active,
    exit_layer,
    keep,
    active_out,
    exit_layer_out,
    u_out,
    *,
    total,
    threshold,
    window,
    token_threshold,
    rule,
    layer,
    exclude_exited,
):
    """Launch over packed logits [T, C] (last dimension contiguous). active / keep / active_out are bool tensors,
    passed as bytes; exit_layer / exit_layer_out int32; u_out float32. total: the fewest tokens of any of them (the
    launcher's minimum), which bounds every access. Each window width compiles its own kernel (HALF is a constant):
    a model uses one or two."""
    cols = x.shape[1]
    seqs = cu_seqlens.shape[0] - 1
    if total == 0 or seqs == 0 or max_seqlen == 0:
        return
    cfg = token_exit_config(window, cols)
    core = cfg["BLOCK_E"] - 2 * cfg["HALF"]
    grid = (seqs, triton.cdiv(max_seqlen, core))
    token_exit_kernel[grid](
        x,
        cu_seqlens,
        active.view(torch.uint8),
        exit_layer,
        (active if keep is None else keep).view(torch.uint8),
        active_out.view(torch.uint8),
        exit_layer_out,
        u_out,
        total,
        cols,
        x.stride(0),
        math.log(cols),
        threshold,
        0.0 if token_threshold is None else token_threshold,
        layer,
        HALF=cfg["HALF"],
        BLOCK_E=cfg["BLOCK_E"],
        BLOCK_C=cfg["BLOCK_C"],
        HAS_KEEP=keep is not None,
        RULE=rule,
        EXCLUDE_EXITED=bool(exclude_exited),
        num_warps=cfg["num_warps"],
    )


_DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}

# The configurations token_exit_config returns (both tiles, by window; one class block narrower than 16, where
# BLOCK_C follows C, and the widest of each tile), for each logits dtype, with the default keep and the published
# rule (the other constexprs only add or drop a few selects). HALF only moves masks, so windows 3 and 15 stand for
# every window of the 64-position tile.
COMPILE_SPECS = [
    {
        "name": f"token_exit[{dt},window={window},BLOCK_E={cfg['BLOCK_E']},BLOCK_C={cfg['BLOCK_C']}]",
        "fn": token_exit_kernel,
        "signature": {
            "x_ptr": ptr,
            "cu_ptr": "*i32",
            "active_ptr": "*u8",
            "layer_in_ptr": "*i32",
            "keep_ptr": "*u8",
            "active_out_ptr": "*u8",
            "layer_out_ptr": "*i32",
            "u_ptr": "*fp32",
            "total": "i32",
            "cols": "i32",
            "stride_x": "i32",
            "log_c": "fp32",
            "threshold": "fp32",
            "token_threshold": "fp32",
            "layer": "i32",
        },
        "constexprs": {
            "HALF": cfg["HALF"],
            "BLOCK_E": cfg["BLOCK_E"],
            "BLOCK_C": cfg["BLOCK_C"],
            "HAS_KEEP": False,
            "RULE": RULE_NONE,
            "EXCLUDE_EXITED": False,
        },
        "num_warps": cfg["num_warps"],
        "divisible": ("x_ptr", "u_ptr"),
        "must_not_spill": True,
        "matrix_instructions": False,
    }
    for dt, ptr in _DTYPES.items()
    for window, cols in ((3, 2), (3, 9), (15, 64), (65, 9))
    for cfg in [token_exit_config(window, cols, interpret=False)]
]
