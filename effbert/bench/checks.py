"""What ``effbert check`` runs: every op on this machine's backends against the float64
reference, through the one comparator (:mod:`effbert.reference.compare`), as rows of a table.

Each ``check_*`` function returns :class:`CheckRow` s: one per op, backend, device and dtype
that can run here (a backend that cannot serve the inputs is left out; ``effbert.ops.backends()``
says why). A row carries the :class:`~effbert.reference.compare.Comparison` of its worst output,
so a failing row names the worst index and both values. Decisions and random draws are exact: a
mismatch is an infinite error against a bound of 0.
"""

import dataclasses
import importlib
from typing import NamedTuple, Optional

import torch

from .. import ops as effbert_ops
from .. import reference
from ..ops import attention as attention_ops
from ..ops import early_exit as early_exit_ops
from ..ops import mc_bert as mc_ops
from ..ops import notes as notes_ops
from ..ops import position_bias as bias_ops
from ..reference.compare import Comparison, compare

__all__ = [
    "CheckRow",
    "ALL_DTYPES",
    "CHECKS",
    "KERNEL_MODULES",
    "TRITON_OPS",
    "check_exit_entropy",
    "check_tupe",
    "check_exit_decision",
    "check_multi_exit_loss",
    "check_notes",
    "check_mc_bert",
    "install_problems",
    "missing_gpu_rows",
]

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CheckRow(NamedTuple):
    """One line of the table: the op, the backend, the device type, the dtype's name, the shape
    label, the relative error and the bound it is held to; ``comparison``: the worst output's
    comparison (its index and both values), None where a row has none to give."""

    op: str
    backend: str
    device: str
    dtype: str
    shape: str
    error: float
    bound: float
    comparison: Optional[Comparison] = None


def _row(op, backend, device, dtype, shape, *comparisons):
    """The row of the worst of ``comparisons`` (a failing one first, then the largest error)."""
    worst = max(comparisons, key=lambda c: (not c.ok, c.error))
    return CheckRow(
        op,
        backend,
        device.type,
        str(dtype).replace("torch.", ""),
        shape,
        worst.error,
        worst.bound,
        worst,
    )


def _exact(what, out, want):
    """``out`` equal to ``want`` entry for entry: error 0, else infinite (bound 0), with the
    first differing entry."""
    c = compare(out.double(), want.double(), rtol=0.0, what=what)
    return c if c.error == 0 else dataclasses.replace(c, error=float("inf"))


def _devices():
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _dtypes(full, quick, one=torch.float32):
    """The dtypes a check runs: ``full``, or ``(one,)`` under ``--quick`` (each dtype is one more
    JIT compile of every Triton kernel on a GPU: about a second each)."""
    if not isinstance(quick, bool):
        raise ValueError(f"quick must be a bool, got {quick!r}")
    if one not in full:
        raise ValueError(f"one must be one of {full}, got {one}")
    return (one,) if quick else tuple(full)


def _serviceable(probe):
    try:
        probe()
        return True
    except Exception:
        return False  # not serviceable here; the backend table says why


def _tol(device):
    return 1e-4 if device.type == "cuda" else 1e-5


def check_exit_entropy(quick=False):
    """The entropy of each row's softmax (a NaN row gives NaN) against float64."""
    rows = []
    for device in _devices():
        for dtype in _dtypes(ALL_DTYPES, quick):
            for shape in ((97, 3), (33, 30522)):
                x = (torch.randn(shape) * 4).to(dtype).to(device)
                x[0, 1] = float("nan")  # NaN in, NaN out
                ref = reference.exit_entropy(x.double())
                for backend in ("cuda", "triton", "cpu", "eager"):
                    if not _serviceable(lambda: early_exit_ops.entropy_backend(x, backend)):
                        continue
                    out = early_exit_ops.entropy_into(
                        backend, x, torch.full((shape[0],), float("nan"), device=device)
                    )
                    rows.append(
                        _row(
                            "exit_entropy",
                            backend,
                            device,
                            dtype,
                            "x".join(map(str, shape)),
                            compare(out, ref, rtol=_tol(device), what="entropy"),
                        )
                    )
    return rows


def _tupe_inputs(device, b, n, h, d):
    pq, pk = (torch.randn(n, h, d, dtype=torch.float64, device=device) for _ in range(2))
    table = torch.randn(32, h, dtype=torch.float64, device=device)
    cls = torch.randn(h, dtype=torch.float64, device=device)
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64, device=device) for _ in range(3))
    mask = torch.arange(n, device=device)[None, :] < torch.tensor([[n], [50], [1]], device=device)
    kw = dict(
        scale=(2 * d) ** -0.5,
        rel_table=table,
        cls_row=cls,
        cls_col=-cls,
        rel_buckets=reference.t5_relative_buckets(n, device=device),
    )
    return pq, pk, q, k, v, mask, kw


def check_tupe(quick=False):
    """tupe_position_bias, then tupe_attention fed its P (with padding), forward, against float64
    (``quick``: bf16 on a GPU, the dtype BERT trains in, and fp32 on the CPU)."""
    rows = []
    b, n, h, d = 3, 97, 4, 64
    for device in _devices():
        pq, pk, q, k, v, mask, kw = _tupe_inputs(device, b, n, h, d)
        pos_ref = reference.tupe_position_bias(pq, pk, **kw)
        att_ref = reference.tupe_attention(q, k, v, pos_ref, attention_mask=mask, scale=kw["scale"])
        for dtype in _dtypes(
            (torch.float32, torch.bfloat16),
            quick,
            torch.bfloat16 if device.type == "cuda" else torch.float32,
        ):
            tol = _tol(device) if dtype == torch.float32 else 3e-2
            for backend in ("triton", "eager"):
                low = lambda t: t.to(dtype)  # noqa: E731
                if not _serviceable(lambda: bias_ops.position_bias_backend(low(pq), backend)):
                    continue
                pos = effbert_ops.tupe_position_bias(
                    low(pq),
                    low(pk),
                    backend=backend,
                    **dict(
                        kw,
                        rel_table=low(kw["rel_table"]),
                        cls_row=low(kw["cls_row"]),
                        cls_col=low(kw["cls_col"]),
                    ),
                )
                rows.append(
                    _row(
                        "tupe_position_bias",
                        backend,
                        device,
                        dtype,
                        f"{n}x{h}x{d}",
                        compare(pos, pos_ref, rtol=tol, what="P"),
                    )
                )
                if not _serviceable(lambda: attention_ops.attention_backend(low(q), backend)):
                    continue
                out = effbert_ops.tupe_attention(
                    low(q),
                    low(k),
                    low(v),
                    pos_ref.float(),
                    attention_mask=mask,
                    scale=kw["scale"],
                    backend=backend,
                )
                rows.append(
                    _row(
                        "tupe_attention",
                        backend,
                        device,
                        dtype,
                        f"{b}x{n}x{h}x{d}",
                        compare(out, att_ref, rtol=tol, what="attention"),
                    )
                )
    return rows


# ---- batched early exit ----


def _decision_results(exits, cnt, criterion, out_layer, nxt, count, st_cnt):
    """The exact comparisons of one fused decision with the reference's: which rows exited, the
    compacted ids of those that go on, the patience counters."""
    n = int((~exits).sum())
    found = [_exact("exited", out_layer.cpu().eq(2), exits)]
    if int(count) != n:
        found.append(Comparison("rows going on", float("inf"), 0.0, (), float(count), float(n)))
    else:
        found.append(_exact("next ids", nxt[:n].cpu(), torch.nonzero(~exits).flatten()))
    if criterion == "patience":
        found.append(_exact("patience counter", st_cnt.cpu(), cnt))
    return found


def check_exit_decision(quick=False):
    """The fused decision on each backend against the reference: the error is 0 when every exit,
    layer, compacted id and patience counter matches, inf otherwise (decisions are exact, not
    approximate)."""
    rows = []
    for device in _devices():
        for dtype in _dtypes(ALL_DTYPES, quick):
            for criterion, kw in (
                ("entropy", dict(threshold=0.5)),
                ("max_prob", dict(threshold=0.6)),
                ("patience", dict(patience=1)),
            ):
                batch, c = 97, 3
                x = (torch.randn(batch, c) * 2).to(dtype)
                x[5, 1] = float("nan")  # never exits early
                prev = torch.randint(0, c, (batch,)).float()
                exits, _, cnt = reference.exit_decision(
                    x.double(),
                    2,
                    criterion,
                    prev=prev.double(),
                    counter=torch.zeros(batch, dtype=torch.long),
                    **kw,
                )
                for backend in ("cuda", "triton", "cpu", "eager"):
                    xd = x.to(device)
                    if not _serviceable(lambda: early_exit_ops.decision_backend(xd, backend)):
                        continue
                    i32 = dict(dtype=torch.int32, device=device)
                    st_prev, st_cnt = prev.clone().to(device), torch.zeros(batch, **i32)  # in place
                    out_logits = torch.full((batch, c), float("nan"), dtype=dtype, device=device)
                    out_layer = torch.zeros(batch, **i32)
                    nxt, loc, count = (
                        torch.zeros(batch, **i32),
                        torch.zeros(batch, **i32),
                        torch.zeros(1, **i32),
                    )
                    early_exit_ops.exit_decision(
                        xd,
                        torch.arange(batch, **i32),
                        st_prev,
                        st_cnt,
                        out_logits,
                        out_layer,
                        nxt,
                        loc,
                        count,
                        layer=2,
                        criterion=criterion,
                        backend=backend,
                        **kw,
                    )
                    rows.append(
                        _row(
                            "exit_decision",
                            backend,
                            device,
                            dtype,
                            f"{batch}x{c},{criterion}",
                            *_decision_results(
                                exits, cnt, criterion, out_layer, nxt, count, st_cnt
                            ),
                        )
                    )
    return rows


def check_multi_exit_loss(quick=False):
    """RomeBERT's loss and its gradient (the fused kernel where it runs) against autograd of the
    reference (float32 only, ``quick`` or not)."""
    _dtypes((torch.float32,), quick)
    rows = []
    for device in _devices():
        z = (torch.randn(4, 33, 5) * 2).to(device)
        y = torch.randint(0, 5, (33,), device=device)
        z64 = z.double().requires_grad_()
        ref = reference.multi_exit_distillation_loss(z64, y)
        ref.backward()
        for backend in ("triton", "eager"):
            if not _serviceable(lambda: early_exit_ops.loss_backend(z, backend)):
                continue
            z1 = z.clone().requires_grad_()
            loss = early_exit_ops.multi_exit_distillation_loss(z1, y, backend=backend)
            loss.backward()
            tol = _tol(device)
            rows.append(
                _row(
                    "multi_exit_loss",
                    backend,
                    device,
                    torch.float32,
                    "4x33x5",
                    compare(loss, ref, rtol=tol, what="loss"),
                    compare(z1.grad, z64.grad, rtol=tol, what="gradient"),
                )
            )
    return rows


def _notes_inputs(device, dtype, B, N, D, S):
    x = torch.randn(B, N, D).to(dtype).to(device)
    notes = torch.randn(S, D, device=device)
    slots = torch.randint(-1, S, (B, N), device=device)
    lengths = torch.tensor([97, 50, 1, 97, 80], device=device)
    spans = torch.tensor(
        [
            [0, 0, 3, 2],
            [1, 47, 50, 2],
            [2, 0, 1, 7],
            [3, 90, 97, 2],
            [4, 10, 11, 0],
            [0, 40, 42, 7],
            [3, 5, 9, 2],
        ],
        device=device,
    )
    counts0 = torch.tensor([0, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0], device=device)
    return x, notes, slots, lengths, spans, counts0


def check_notes(quick=False):
    """note_mix and note_update_ (TNF) on every backend here against the float64 loop
    reference; a 16-bit note_mix is held to twice the eager error in its dtype."""
    rows = []
    B, N, D, S = 5, 97, 129, 11
    for device in _devices():
        tol = _tol(device)
        for dtype in _dtypes(ALL_DTYPES, quick):
            x, notes, slots, lengths, spans, counts0 = _notes_inputs(device, dtype, B, N, D, S)
            mix_ref = reference.note_mix(x.double(), notes.double(), slots, 0.5)
            n64, c64 = notes.double().cpu(), counts0.clone().cpu()
            reference.note_update_(
                n64, c64, x.double().cpu(), spans.cpu(), window=16, gamma=0.1, lengths=lengths.cpu()
            )
            lowp = None if dtype == torch.float32 else reference.note_mix(x, notes, slots, 0.5)
            for backend in ("cuda", "triton", "cpu", "eager"):
                if not _serviceable(lambda: notes_ops.mix_backend(x, notes, backend)):
                    continue
                out = notes_ops.mix_into(
                    backend, x, notes, slots, 0.5, torch.full_like(x, float("nan"))
                )
                rows.append(
                    _row(
                        "note_mix",
                        backend,
                        device,
                        dtype,
                        f"{B}x{N}x{D}",
                        compare(out, mix_ref, rtol=tol, lowp_eager=lowp, what="mix"),
                    )
                )
                upd, cnt = notes.clone(), counts0.clone()
                notes_ops.update_into(backend, upd, cnt, x, spans, 16, 0.1, lengths)
                rows.append(
                    _row(
                        "note_update_",
                        backend,
                        device,
                        dtype,
                        f"{B}x{N}x{D}",
                        _exact("counts", cnt.cpu(), c64),
                        compare(upd, n64, rtol=tol, what="notes"),
                    )
                )
    return rows


def _mc_loss_rows(device, dtype, rows):
    M, V, D, K = 33, 101, 65, 10  # odd sizes; small enough for the Triton interpreter
    h, e = torch.randn(M, D).to(dtype).to(device), (torch.randn(V, D) * 0.3).to(dtype).to(device)
    b = torch.randn(V, device=device)
    c, y = torch.randint(0, V, (M, K), device=device), torch.randint(0, K, (M,), device=device)
    ref_in = [t.double().requires_grad_() for t in (h, e, b)]
    ref = reference.mc_candidate_loss(*ref_in, c, y)
    ref.backward()
    # 16-bit inputs: float32 math, so the only error is rounding the gradients to 16 bits once
    low = _tol(device) if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 1e-2)
    for backend in ("triton", "eager"):
        if not _serviceable(lambda: mc_ops.loss_backend(h, e, b, backend)):
            continue
        leaves = [t.clone().requires_grad_() for t in (h, e, b)]
        out = effbert_ops.mc_candidate_loss(*leaves, c, y, backend=backend)
        out.backward()
        grads = [
            compare(t.grad, r.grad, rtol=low, what=f"d{name}")
            for t, r, name in zip(leaves, ref_in, ("hidden", "embeddings", "bias"))
        ]
        rows.append(
            _row(
                "mc_candidate_loss",
                backend,
                device,
                dtype,
                f"{M}x{K}x{D}",
                compare(out, ref, rtol=low, what="loss"),
                *grads,
            )
        )


def _mc_sample_rows(device, rows, K=10):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0, 0.5]] * 64, device=device)
    p = torch.softmax(logits[0].double(), 0).cpu()
    for backend in ("triton", "eager"):
        if not _serviceable(lambda: mc_ops.sample_backend(logits, backend)):
            continue
        draws = effbert_ops.mc_sample(logits, 40, backend=backend)
        freq = torch.bincount(draws.reshape(-1).cpu(), minlength=6).double() / draws.numel()
        bound = float(5 * (p * (1 - p) / draws.numel()).sqrt().max())
        i = int((freq - p).abs().argmax())
        rows.append(
            _row(
                "mc_sample (freq.)",
                backend,
                device,
                torch.float32,
                "64x6x40",
                Comparison(
                    "frequency",
                    float((freq - p).abs().max()),
                    bound,
                    (i,),
                    float(freq[i]),
                    float(p[i]),
                ),
            )
        )
        if backend == "triton":
            x = torch.randn(33, 257, device=device)
            seed = mc_ops.new_seed(device)
            from ..kernels import mc_bert as mc_kernels  # the op draws its own seed: a known one

            out = mc_kernels.mc_sample(
                x, K, seed, torch.full((33, K), -7, dtype=torch.int64, device=device)
            )
            want = reference.mc_sample_gumbel(x, K, int(seed))
            rows.append(
                _row(
                    "mc_sample (bits)",
                    backend,
                    device,
                    torch.float32,
                    f"33x257x{K}",
                    _exact("draws", out.cpu(), want),
                )
            )


def check_mc_bert(quick=False):
    """mc_candidate_loss (loss and the three gradients) against float64; mc_sample: the Triton
    draws bit for bit against the Philox/Gumbel reference, every backend's draw frequencies
    against the softmax."""
    rows = []
    for device in _devices():
        for dtype in _dtypes(ALL_DTYPES, quick):
            _mc_loss_rows(device, dtype, rows)
        _mc_sample_rows(device, rows)
    return rows


CHECKS = [
    check_exit_entropy,
    check_tupe,
    check_notes,
    check_exit_decision,
    check_multi_exit_loss,
    check_mc_bert,
]

# the ops each check covers: on a GPU every one must have a Triton row on cuda, or the install is
# not serving
KERNEL_MODULES = ("tupe_attention", "position_bias", "notes", "early_exit", "mc_bert")
TRITON_OPS = (
    "exit_entropy",
    "tupe_position_bias",
    "tupe_attention",
    "note_mix",
    "note_update_",
    "exit_decision",
    "multi_exit_loss",
    "mc_candidate_loss",
)


def install_problems():
    """What makes this install unfit to check, as one-line messages (empty when none): the Triton
    kernels (``effbert.kernels``) missing or broken while triton itself imports, or the C++ CPU
    extension (``effbert._C``, which every ``pip install`` builds) missing."""
    problems = []
    try:
        import triton  # noqa: F401
    except ImportError:
        triton = None  # the backend table says so; a machine without triton runs the other backends
    if triton is not None:
        for name in KERNEL_MODULES:
            try:
                importlib.import_module(f"effbert.kernels.{name}")
            except Exception as exc:  # noqa: BLE001 - whatever breaks the import: unfit
                problems.append(
                    f"the Triton kernels cannot be imported (effbert.kernels.{name}: "
                    f"{type(exc).__name__}: {exc}); reinstall effbert "
                    "(pip install -e .)"
                )
                break
    from .. import _ext

    module, why = _ext.load("_C")
    if module is None:
        problems.append(f"the install failed or never ran: {why}")
    return problems


def missing_gpu_rows(rows, cuda_available):
    """On a machine with CUDA, the ops of TRITON_OPS that have no Triton row on cuda (a check that
    passed there on the eager backend alone proved nothing about the kernels). ``rows``: tuples
    that start ``(op, backend, device, ...)``. Empty without CUDA. Raises ``ValueError`` for a
    ``cuda_available`` that is not a bool."""
    if not isinstance(cuda_available, bool):
        raise ValueError(f"cuda_available must be a bool, got {cuda_available!r}")
    if not cuda_available:
        return []
    served = {op for op, backend, device, *_ in rows if backend == "triton" and device == "cuda"}
    return [op for op in TRITON_OPS if op not in served]
