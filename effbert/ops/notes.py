"""TNF ops: ``note_mix`` (differentiable in ``x``) and ``note_update_`` (in place, no grad).

``note_update_`` runs in two passes on a plan built here with torch (two sorts, no host sync): window
means by a prefix-sum walk over each sequence, then the ordered EMA fold, one program per slot (effbert/kernels/notes.py).
Rows are validated before anything is written: on the host for CPU tensors; for CUDA tensors a check kernel sets an
error flag that makes both passes do nothing, and the wrapper raises after reading it. ``notes`` and ``counts`` are
left unchanged by any error.
"""

import numbers
from typing import Optional

import torch

from .. import _ext
from .. import reference
from .checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._dispatch import (
    Inputs,
    Support,
    cached_selection,
    declare,
    direct_call_ok,
    requested_backend,
    select_backend,
)

__all__ = ["note_mix", "note_update_", "note_window_means", "note_fold_"]

_KERNEL_DTYPES = FLOAT_DTYPES
_EAGER_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _dt(dtype):
    return str(dtype).replace("torch.", "")


# ---- argument checks ----


def _check_unit_interval(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_notes(notes, *, inplace):
    check_tensor(
        "notes", notes, ndim=2, dtypes=(torch.float32, torch.float64), shape_hint="[S, Dm]"
    )
    if inplace and not notes.is_contiguous():
        raise ValueError(
            f"notes must be contiguous (it is updated in place), got strides {notes.stride()}"
        )


def _check_mix_args(x, notes, slots, lam):
    check_tensor("x", x, ndim=3, dtypes=_EAGER_DTYPES, shape_hint="[B, N, Dm]")
    _check_notes(notes, inplace=False)
    check_tensor("slots", slots, ndim=2, dtypes=(torch.int64,), shape_hint="[B, N]")
    if tuple(slots.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"slots must be [B, N] = {tuple(x.shape[:2])} like x, got {tuple(slots.shape)}"
        )
    if notes.shape[1] != x.shape[2]:
        raise ValueError(
            f"notes must be [S, Dm] with Dm = {x.shape[2]} (x's last dimension), got "
            f"{tuple(notes.shape)}"
        )
    check_same_device(x=x, notes=notes, slots=slots)
    return _check_unit_interval("lam", lam)


def _check_window_args(hidden, spans, window, lengths):
    """The arguments both halves of an update share: span rows, sequence lengths, window."""
    check_tensor(
        "spans", spans, ndim=2, dtypes=(torch.int64,), shape_hint="[M, 4] (batch, start, end, slot)"
    )
    if spans.shape[1] != 4:
        raise ValueError(
            f"spans must be [M, 4] rows (batch, start, end, slot), got {tuple(spans.shape)}"
        )
    if lengths is not None:
        check_tensor("lengths", lengths, ndim=1, dtypes=(torch.int64,), shape_hint="[B]")
        if lengths.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"lengths must be [B] = [{hidden.shape[0]}], got {tuple(lengths.shape)}"
            )
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"window must be an integer >= 0, got {window!r}")


def _check_update_args(notes, counts, hidden, spans, window, gamma, lengths):
    _check_notes(notes, inplace=True)
    check_tensor("counts", counts, ndim=1, dtypes=(torch.int64,), shape_hint="[S]")
    if counts.shape[0] != notes.shape[0] or not counts.is_contiguous():
        raise ValueError(
            f"counts must be a contiguous [S] = [{notes.shape[0]}] tensor like notes, got shape "
            f"{tuple(counts.shape)} strides {counts.stride()}"
        )
    check_tensor("hidden", hidden, ndim=3, dtypes=_EAGER_DTYPES, shape_hint="[B, N, Dm]")
    if hidden.shape[2] != notes.shape[1]:
        raise ValueError(
            f"hidden must be [B, N, Dm] with Dm = {notes.shape[1]} (notes' width), got "
            f"{tuple(hidden.shape)}"
        )
    _check_window_args(hidden, spans, window, lengths)
    tensors = dict(notes=notes, counts=counts, hidden=hidden, spans=spans)
    if lengths is not None:
        tensors["lengths"] = lengths
    check_same_device(**tensors)
    return int(window), _check_unit_interval("gamma", gamma)


def _row_problem(row, batch, seq, num_slots, lengths, check_spans=True, check_slots=True):
    """What is wrong with one span row (a tuple of ints), or None."""
    b, start, end, slot = row
    if check_spans:
        if not 0 <= b < batch:
            return f"batch index {b} out of range [0, {batch})"
        length = seq if lengths is None else int(lengths[b])
        if not 0 <= length <= seq:
            return f"lengths[{b}] = {length} out of range [0, {seq}]"
        if start >= end:
            return (
                f"start {start} >= end {end} (spans are [start, end_exclusive), at least one token)"
            )
        if start < 0 or end > length:
            return f"span [{start}, {end}) outside the sequence's {length} tokens"
    if check_slots and not 0 <= slot < num_slots:
        return f"slot {slot} out of range [0, {num_slots})"
    return None


def _raise_bad_row(spans, r, batch, seq, num_slots, lengths, check_spans, check_slots):
    row = tuple(int(v) for v in spans[r].tolist())
    lengths_host = None if lengths is None else lengths.cpu()
    why = _row_problem(row, batch, seq, num_slots, lengths_host, check_spans, check_slots)
    raise ValueError(f"spans row {r} = {row}: {why or 'out of range'}")


def _validate_rows_host(spans, batch, seq, num_slots, lengths, check_spans=True, check_slots=True):
    """Vectorised range check of every row; raises naming the first bad row. Syncs on CUDA tensors."""
    if spans.shape[0] == 0:
        return
    if lengths is not None:
        bad_len = (lengths < 0) | (lengths > seq)
        if bool(bad_len.any()):
            b = int(torch.nonzero(bad_len)[0])
            raise ValueError(f"lengths[{b}] = {int(lengths[b])} out of range [0, {seq}]")
    b, start, end, slot = spans.unbind(1)
    bad = torch.zeros_like(b, dtype=torch.bool)
    if check_spans:
        b_ok = (b >= 0) & (b < batch)
        length = (
            torch.full_like(b, seq)
            if lengths is None
            else lengths[b.clamp(0, max(batch - 1, 0))]
            if batch > 0
            else torch.zeros_like(b)
        )
        bad |= ~b_ok | (start < 0) | (start >= end) | (end > length)
    if check_slots:
        bad |= (slot < 0) | (slot >= num_slots)
    if bool(bad.any()):
        _raise_bad_row(
            spans,
            int(torch.nonzero(bad)[0]),
            batch,
            seq,
            num_slots,
            lengths,
            check_spans,
            check_slots,
        )


# Public names for effbert.nn (data-parallel updates validate before their collectives).
check_update_args = _check_update_args
validate_rows = _validate_rows_host


# ---- plans: the sorting the kernels need, done with torch ----


def boundary_keys(spans, lengths, batch, seq, window):
    """Sort keys of every row's window boundaries: ``b * (seq + 1) + lo`` for row r at r, ``... + hi`` at M + r."""
    b, start, end = spans[:, 0], spans[:, 1], spans[:, 2]
    length = (
        lengths.index_select(0, b.clamp(0, max(batch - 1, 0))) if batch > 0 else torch.zeros_like(b)
    )
    base = b * (seq + 1)
    return torch.cat(
        [base + (start - window).clamp_min(0), base + torch.minimum(end + window, length)]
    )


def means_plan(key, batch, seq):
    """Every row's two window boundaries sorted by (sequence, position), as indices (r: row r's lo boundary,
    M + r: its hi boundary), with per-sequence offsets, from their ``boundary_keys``."""
    key_sorted, ev_idx = torch.sort(
        key, stable=True
    )  # a row's lo boundary sorts before its hi boundary
    ev_off = torch.searchsorted(
        key_sorted, torch.arange(0, (batch + 1) * (seq + 1), seq + 1, device=key.device)
    )
    return {"ev_off": ev_off, "ev_idx": ev_idx}


def fold_plan(slots):
    """Rows sorted by slot, stable: row order is kept within a slot."""
    sorted_slots, order = torch.sort(slots, stable=True)
    return {"order": order, "sorted_slots": sorted_slots}


# ---- backends ----


def _extension(backend):
    return "_cuda" if backend == "cuda" else "_C"


def _mix_into(backend, x2, notes, slots1, lam, out2):
    """out2 = mix of x2 [T, Dm] (unit column stride) with notes [S, Dm] contiguous float32, or the backward scaling
    when notes is None."""
    if backend == "eager":
        if notes is None:
            out2.copy_(reference.note_mix_backward(x2, slots1, lam))
        else:
            out2.copy_(reference.note_mix(x2.unsqueeze(0), notes, slots1.unsqueeze(0), lam)[0])
        return out2
    if backend == "triton":
        from ..kernels import notes as kernels

        return kernels.note_mix(x2, notes, slots1, lam, out2)
    tokens, dim = x2.shape
    if tokens == 0 or dim == 0:
        return out2
    args = (
        x2.data_ptr(),
        _ext.dtype_code(x2.dtype),
        tokens,
        dim,
        x2.stride(0),
        0 if notes is None else notes.data_ptr(),
        0 if notes is None else notes.shape[0],
        slots1.data_ptr(),
        float(lam),
        out2.data_ptr(),
        out2.stride(0),
    )
    _ext.launch(_extension(backend), "note_mix", x2.device, *args)
    return out2


def _new_flag(rows, device):
    return torch.full((1,), rows, dtype=torch.int32, device=device)


def _check_rows_device(
    backend,
    spans,
    lengths,
    flag,
    batch,
    seq,
    num_slots,
    check_spans,
    check_slots,
    keys=None,
    window=0,
):
    """The device-side check of every row (flag = first bad row); with ``keys`` ([2M] int64) it also writes the
    window boundaries' sort keys, which saves the plan a dozen small launches."""
    if backend == "triton":
        from ..kernels import notes as kernels

        kernels.note_check_rows(
            spans, lengths, flag, batch, seq, num_slots, check_spans, check_slots, keys, window
        )
    else:
        _ext.launch(
            "_cuda",
            "note_check_rows",
            spans.device,
            spans.data_ptr(),
            0 if lengths is None else lengths.data_ptr(),
            flag.data_ptr(),
            0 if keys is None else keys.data_ptr(),
            spans.shape[0],
            batch,
            seq,
            num_slots,
            window,
            check_spans,
            check_slots,
        )


def _means_into(backend, hidden, spans, lengths, window, plan, flag, means):
    """spans: contiguous int64 [M, 4]; lengths: int64 [B] (always given here)."""
    if backend == "triton":
        from ..kernels import notes as kernels

        return kernels.note_window_means(hidden, spans, lengths, window, plan, flag, means)
    batch, seq, dim = hidden.shape
    rows = means.shape[0]
    if rows == 0 or dim == 0:
        return means
    args = (
        hidden.data_ptr(),
        _ext.dtype_code(hidden.dtype),
        batch,
        seq,
        dim,
        hidden.stride(0),
        hidden.stride(1),
        spans.data_ptr(),
        lengths.data_ptr(),
        window,
        plan["ev_off"].data_ptr(),
        plan["ev_idx"].data_ptr(),
        flag.data_ptr(),
        rows,
        means.data_ptr(),
    )
    _ext.launch(_extension(backend), "note_window_means", hidden.device, *args)
    return means


def _fold_into(backend, notes, counts, means, plan, flag, gamma):
    if backend == "triton":
        from ..kernels import notes as kernels

        return kernels.note_fold(notes, counts, means, plan, flag, gamma)
    rows = means.shape[0]
    num_slots, dim = notes.shape
    if rows == 0 or dim == 0:
        return notes
    args = (
        notes.data_ptr(),
        counts.data_ptr(),
        num_slots,
        dim,
        means.data_ptr(),
        plan["order"].data_ptr(),
        plan["sorted_slots"].data_ptr(),
        flag.data_ptr(),
        rows,
        float(gamma),
    )
    _ext.launch(_extension(backend), "note_fold", notes.device, *args)
    return notes


def _host_checks(backend, device, requested=None):
    """CPU tensors and the eager and C++ CPU backends validate on the host; CUDA kernels validate on the device.
    ``requested=False`` (tests) takes the device path wherever a device-side check exists (triton, cuda)."""
    if backend in ("eager", "cpu"):
        return True
    return device.type != "cuda" if requested is None else requested


# ---- dispatch ----

_KERNELS = Support(dtypes=_KERNEL_DTYPES, tensor_dtypes={"notes": (torch.float32,)})
declare(
    ("note_mix", "note_update_", "note_window_means"),
    {"triton": _KERNELS, "cuda": _KERNELS, "cpu": _KERNELS, "eager": Support()},
)


def _inputs(*float_tensors):
    """``Inputs`` of ``(label, tensor)`` pairs, on the first one's device."""
    return Inputs(float_tensors[0][1].device, tuple((label, t.dtype) for label, t in float_tensors))


def mix_backend(x, notes, backend="auto"):
    """The backend ``note_mix(x, notes, ...)`` would run (raises if none can serve)."""
    return cached_selection(
        "note_mix",
        backend,
        (x.device, x.dtype, notes.dtype),
        lambda: _inputs(("x", x), ("notes", notes)),
    )


def update_backend(notes, hidden, backend="auto"):
    """The backend ``note_update_(notes, counts, hidden, ...)`` would run (raises if none can serve)."""
    return cached_selection(
        "note_update_",
        backend,
        (hidden.device, hidden.dtype, notes.dtype),
        lambda: _inputs(("hidden", hidden), ("notes", notes)),
    )


def _as_rows(t):
    """[B, N, Dm] -> [B*N, Dm] with a unit column stride and rows that do not overlap (a view when possible; a
    broadcast view, whose rows share memory, is copied once). Sizes are explicit: Dm may be 0."""
    t2 = t.reshape(t.shape[0] * t.shape[1], t.shape[2])
    if (t2.shape[1] > 1 and t2.stride(1) != 1) or (t2.shape[0] > 1 and t2.stride(0) < t2.shape[1]):
        t2 = t2.contiguous()
    return t2


def mix_into(backend, x, notes, slots, lam, out):
    """Run one concrete backend into a caller-provided ``out`` shaped like ``x`` (tests poison it first)."""
    rows = x.shape[0] * x.shape[1]
    if out.is_contiguous():
        out2 = out.view(rows, x.shape[-1])
    else:
        out2 = torch.empty(out.shape, dtype=out.dtype, device=out.device).view(rows, x.shape[-1])
    notes_c = notes if backend == "eager" else notes.contiguous()
    _mix_into(backend, _as_rows(x), notes_c, slots.reshape(-1).contiguous(), lam, out2)
    if out2.data_ptr() != out.data_ptr():
        out.copy_(out2.view(out.shape))
    return out


def check_slots_range(slots, num_slots):
    """Slots past the notes are an error. One reduction and, on CUDA tensors, one value read back."""
    if slots.numel() and int(slots.max()) >= num_slots:
        idx = tuple(int(i) for i in torch.nonzero(slots >= num_slots)[0].tolist())
        raise ValueError(
            f"slots{list(idx)} = {int(slots[idx])} out of range: notes has {num_slots} slots "
            "(negative = not a rare word)"
        )


def _note_mix_impl(x, notes, slots, lam, backend):
    check_slots_range(slots, notes.shape[0])
    name = mix_backend(x, notes, backend)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return mix_into(name, x, notes, slots, lam, out)


def _note_mix_backward_impl(grad, slots, lam, backend):
    name = select_backend("note_mix", backend, _inputs(("x", grad)))
    out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    _mix_into(
        name,
        _as_rows(grad),
        None,
        slots.reshape(-1).contiguous(),
        lam,
        out.view(grad.shape[0] * grad.shape[1], grad.shape[-1]),
    )
    return out


@torch.library.custom_op("effbert::note_mix", mutates_args=())
def _note_mix_op(
    x: torch.Tensor, notes: torch.Tensor, slots: torch.Tensor, lam: float, backend: str
) -> torch.Tensor:
    # callable directly and run on real tensors under torch.compile: checked here too (the slots' range in the impl)
    lam = _check_mix_args(x, notes, slots, lam)
    requested_backend(backend)
    return _note_mix_impl(x, notes, slots, lam, backend)


@_note_mix_op.register_fake
def _(x, notes, slots, lam, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _mix_setup_context(ctx, inputs, output):
    _, _, slots, lam, backend = inputs
    ctx.save_for_backward(slots)
    ctx.lam = lam
    ctx.backend = backend


def _mix_backward(ctx, grad):
    (slots,) = ctx.saved_tensors
    return (
        torch.ops.effbert.note_mix_backward(grad.contiguous(), slots, ctx.lam, ctx.backend),
        None,
        None,
        None,
        None,
    )


def _check_mix_backward_args(grad, slots, lam, backend):
    check_tensor("grad", grad, ndim=3, dtypes=_EAGER_DTYPES, shape_hint="[B, N, Dm]")
    check_tensor("slots", slots, ndim=2, dtypes=(torch.int64,), shape_hint="[B, N]")
    if tuple(slots.shape) != tuple(grad.shape[:2]):
        raise ValueError(
            f"slots must be [B, N] = {tuple(grad.shape[:2])} like grad, got {tuple(slots.shape)}"
        )
    check_same_device(grad=grad, slots=slots)
    requested_backend(backend)
    return _check_unit_interval("lam", lam)


@torch.library.custom_op("effbert::note_mix_backward", mutates_args=())
def _note_mix_backward_op(
    grad: torch.Tensor, slots: torch.Tensor, lam: float, backend: str
) -> torch.Tensor:
    lam = _check_mix_backward_args(grad, slots, lam, backend)
    return _note_mix_backward_impl(grad, slots, lam, backend)


@_note_mix_backward_op.register_fake
def _(grad, slots, lam, backend):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


_note_mix_op.register_autograd(_mix_backward, setup_context=_mix_setup_context)


def note_mix(x, notes, slots, lam, *, backend="auto"):
    """Mix the notes of rare words into their input embeddings.

    ``x``: ``[B, N, Dm]`` (fp32, fp16, bf16; float64 on the eager backend); ``notes``: ``[S, Dm]`` float32;
    ``slots``: int64 ``[B, N]``, the note slot of each token or a negative number for a token that is not (part
    of) a rare word; ``lam`` in ``[0, 1]``. Returns ``x`` where ``slots < 0``, else
    ``(1 - lam) * x + lam * notes[slots]``, in ``x``'s dtype. Differentiable in ``x`` only: notes are a buffer.
    A slot ``>= S`` is an error (checked on the host; on CUDA tensors this reads one flag back).
    """
    lam = _check_mix_args(x, notes, slots, lam)
    requested_backend(backend)
    if direct_call_ok(x, notes, slots):
        return _note_mix_impl(x, notes, slots, lam, backend)
    return torch.ops.effbert.note_mix(x, notes, slots, lam, backend)


# ---- the update ----


def _dims(hidden, notes):
    batch, seq, _ = hidden.shape
    return batch, seq, notes.shape[0]


def _raise_from_flag(flag, spans, batch, seq, num_slots, lengths, check_spans, check_slots):
    bad = int(flag.item())
    if bad < spans.shape[0]:
        _raise_bad_row(spans, bad, batch, seq, num_slots, lengths, check_spans, check_slots)


def window_means_into(backend, hidden, spans, window, lengths, means, *, host_check=None):
    """Window means of every span row into a caller-provided float32 ``means [M, Dm]`` (float64 on eager)."""
    batch, seq, dim = hidden.shape
    window = min(
        window, seq
    )  # a wider window covers the same tokens; keeps the kernels' int32 arithmetic safe
    if dim == 0:  # nothing to average: the reference, with its host checks, on every backend
        backend, host_check = "eager", True
    host_check = _host_checks(backend, hidden.device, host_check)
    if host_check:
        _validate_rows_host(spans, batch, seq, 0, lengths, check_spans=True, check_slots=False)
    if backend == "eager":
        means.copy_(reference.note_window_means(hidden, spans, window=window, lengths=lengths))
        return means
    spans_c = spans.contiguous()
    flag = _new_flag(spans.shape[0], hidden.device)
    if lengths is None:  # the kernels always read a length per sequence
        lengths = torch.full((batch,), seq, dtype=torch.int64, device=hidden.device)
    lengths = lengths.contiguous()
    if host_check:
        keys = boundary_keys(spans_c, lengths, batch, seq, window)
    else:
        keys = torch.empty(2 * spans.shape[0], dtype=torch.int64, device=hidden.device)
        _check_rows_device(
            backend, spans_c, lengths, flag, batch, seq, 0, True, False, keys, window
        )
    plan = means_plan(keys, batch, seq)
    h = hidden if hidden.shape[2] <= 1 or hidden.stride(2) == 1 else hidden.contiguous()
    _means_into(backend, h, spans_c, lengths, window, plan, flag, means)
    if not host_check:
        _raise_from_flag(flag, spans, batch, seq, 0, lengths, True, False)
    return means


def fold_into(backend, notes, counts, means, slots, gamma, *, host_check=None, flag=None):
    """The ordered EMA fold of ``means [M, Dm]`` into ``notes`` for ``slots [M]`` (in place)."""
    rows = slots.shape[0]
    if (
        notes.shape[1] == 0
    ):  # empty notes: only counts move, as the reference moves them, on every backend
        backend, host_check, flag = "eager", True, None
    host_check = _host_checks(backend, notes.device, host_check)
    spans_view = (
        torch.stack([torch.zeros_like(slots)] * 3 + [slots], 1) if rows else slots.new_empty(0, 4)
    )
    if host_check:
        _validate_rows_host(
            spans_view, 1, 1, notes.shape[0], None, check_spans=False, check_slots=True
        )
    if backend == "eager":
        reference.note_fold_(notes, counts, means, slots, gamma=gamma)
        return notes
    own_flag = flag is None
    if own_flag:
        flag = _new_flag(rows, notes.device)
        if not host_check:
            _check_rows_device(
                backend, spans_view.contiguous(), None, flag, 1, 1, notes.shape[0], False, True
            )
    plan = fold_plan(slots.contiguous())
    _fold_into(backend, notes, counts, means.contiguous(), plan, flag, gamma)
    if own_flag and not host_check:
        _raise_from_flag(flag, spans_view, 1, 1, notes.shape[0], None, False, True)
    return notes


def update_into(backend, notes, counts, hidden, spans, window, gamma, lengths, *, host_check=None):
    """One concrete backend of ``note_update_``. ``host_check=False`` forces the device-side checks (tests)."""
    batch, seq, num_slots = _dims(hidden, notes)
    rows = spans.shape[0]
    window = min(
        window, seq
    )  # a wider window covers the same tokens; keeps the kernels' int32 arithmetic safe
    if (
        notes.shape[1] == 0
    ):  # hidden size 0: only counts move, as the reference moves them, on every backend
        backend, host_check = "eager", True
    host_check = _host_checks(backend, hidden.device, host_check)
    if host_check:
        _validate_rows_host(spans, batch, seq, num_slots, lengths)
    if backend == "eager":
        reference.note_update_(
            notes, counts, hidden, spans, window=window, gamma=gamma, lengths=lengths
        )
        return notes
    if rows == 0:
        return notes
    spans_c = spans.contiguous()
    flag = _new_flag(rows, hidden.device)
    if lengths is None:  # the kernels always read a length per sequence
        lengths = torch.full((batch,), seq, dtype=torch.int64, device=hidden.device)
    lengths = lengths.contiguous()
    if host_check:
        keys = boundary_keys(spans_c, lengths, batch, seq, window)
    else:
        # One check of every row before either pass (both skip all work when it fails); it writes the sort keys.
        keys = torch.empty(2 * rows, dtype=torch.int64, device=hidden.device)
        _check_rows_device(
            backend, spans_c, lengths, flag, batch, seq, num_slots, True, True, keys, window
        )
    means = torch.empty(rows, notes.shape[1], dtype=torch.float32, device=hidden.device)
    plan = means_plan(keys, batch, seq)
    h = hidden if hidden.shape[2] <= 1 or hidden.stride(2) == 1 else hidden.contiguous()
    _means_into(backend, h, spans_c, lengths, window, plan, flag, means)
    _fold_into(backend, notes, counts, means, fold_plan(spans_c[:, 3].contiguous()), flag, gamma)
    if not host_check:
        _raise_from_flag(flag, spans, batch, seq, num_slots, lengths, True, True)
    return notes


def _note_update_impl(notes, counts, hidden, spans, window, gamma, lengths, backend):
    name = update_backend(notes, hidden, backend)
    if name != "eager" and notes.dtype != torch.float32:
        raise AssertionError("unreachable: dispatch rejects non-float32 notes for kernels")
    update_into(name, notes, counts, hidden, spans, window, gamma, lengths)


@torch.library.custom_op("effbert::note_update_", mutates_args=("notes", "counts"))
def _note_update_op(
    notes: torch.Tensor,
    counts: torch.Tensor,
    hidden: torch.Tensor,
    spans: torch.Tensor,
    window: int,
    gamma: float,
    lengths: Optional[torch.Tensor],
    backend: str,
) -> None:
    # callable directly and run on real tensors under torch.compile: every argument is checked here, and the rows'
    # ranges before anything is written (update_into), so a bad call leaves notes and counts as they were
    window, gamma = _check_update_args(notes, counts, hidden, spans, window, gamma, lengths)
    requested_backend(backend)
    _note_update_impl(notes, counts, hidden, spans, window, gamma, lengths, backend)


@_note_update_op.register_fake
def _(notes, counts, hidden, spans, window, gamma, lengths, backend):
    return None


def note_update_(notes, counts, hidden, spans, *, window, gamma, lengths=None, backend="auto"):
    """Fold the window means of rare-word occurrences into their notes, in place (DESIGN.md, "TNF").

    ``notes``: float32 ``[S, Dm]`` contiguous; ``counts``: int64 ``[S]``; ``hidden``: ``[B, N, Dm]`` fp32/fp16/bf16;
    ``spans``: int64 ``[M, 4]`` rows ``(batch, start, end_exclusive, slot)``; ``lengths``: optional int64 ``[B]``.
    For each row in order: ``c = mean(hidden[b, max(0, start - window):min(L_b, end + window)])``; a slot's first
    update sets its note to ``c``, later ones give ``(1 - gamma) * note + gamma * c``; ``counts[slot] += 1``.
    Bad rows raise ``ValueError`` naming the row, and leave ``notes`` and ``counts`` unchanged.
    """
    window, gamma = _check_update_args(notes, counts, hidden, spans, window, gamma, lengths)
    requested_backend(backend)
    with torch.no_grad():
        if direct_call_ok(notes, counts, hidden, spans, *(() if lengths is None else (lengths,))):
            _note_update_impl(notes, counts, hidden, spans, window, gamma, lengths, backend)
        else:
            torch.ops.effbert.note_update_(
                notes, counts, hidden, spans, window, gamma, lengths, backend
            )


def note_window_means(hidden, spans, *, window, lengths=None, backend="auto"):
    """The window mean of every span row, float32 ``[M, Dm]``: the first half of ``note_update_`` (data-parallel
    ranks exchange these before the fold)."""
    check_tensor("hidden", hidden, ndim=3, dtypes=_EAGER_DTYPES, shape_hint="[B, N, Dm]")
    _check_window_args(hidden, spans, window, lengths)
    check_same_device(
        hidden=hidden, spans=spans, **({} if lengths is None else {"lengths": lengths})
    )
    name = select_backend("note_window_means", backend, _inputs(("hidden", hidden)))
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    means = torch.empty(spans.shape[0], hidden.shape[2], dtype=dtype, device=hidden.device)
    with torch.no_grad():
        return window_means_into(name, hidden.detach(), spans, int(window), lengths, means)


def note_fold_(notes, counts, means, slots, *, gamma, backend="auto"):
    """Fold precomputed window means ``[M, Dm]`` into ``notes`` for ``slots [M]``, in row order, in place: the
    second half of ``note_update_``."""
    _check_notes(notes, inplace=True)
    check_tensor("counts", counts, ndim=1, dtypes=(torch.int64,), shape_hint="[S]")
    if counts.shape[0] != notes.shape[0] or not counts.is_contiguous():
        raise ValueError(
            f"counts must be a contiguous [S] = [{notes.shape[0]}] tensor like notes, got shape "
            f"{tuple(counts.shape)}"
        )
    check_tensor(
        "means", means, ndim=2, dtypes=(torch.float32, torch.float64), shape_hint="[M, Dm]"
    )
    check_tensor("slots", slots, ndim=1, dtypes=(torch.int64,), shape_hint="[M]")
    if means.shape[0] != slots.shape[0] or means.shape[1] != notes.shape[1]:
        raise ValueError(
            f"means must be [M, Dm] = [{slots.shape[0]}, {notes.shape[1]}], got {tuple(means.shape)}"
        )
    gamma = _check_unit_interval("gamma", gamma)
    check_same_device(notes=notes, counts=counts, means=means, slots=slots)
    name = update_backend(notes, means, backend)
    with torch.no_grad():
        m = means if name == "eager" else means.float()
        fold_into(name, notes, counts, m, slots, gamma)
