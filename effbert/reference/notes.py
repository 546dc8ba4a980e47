"""References for the TNF family: ``note_mix`` and ``note_update_`` (DESIGN.md, "TNF").

``note_update_`` is literally the sequential definition, a Python loop over span rows; the kernels must match it.
"""

import torch


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def note_mix(x, notes, slots, lam):
    """``x`` where ``slots < 0``, else ``(1 - lam) * x + lam * notes[slots]``; same dtype as ``x``.

    Computed in float64 when ``x`` or ``notes`` is float64, else in float32, and rounded once to ``x.dtype``.
    """
    ct = _compute_dtype(x, notes)
    if notes.shape[0] == 0:  # an empty table: no slot can be >= 0, nothing to mix
        return x.clone()
    rare = slots >= 0
    gathered = (
        notes.to(ct)
        .index_select(0, slots.clamp_min(0).reshape(-1))
        .view(*slots.shape, notes.shape[1])
    )
    mixed = (1.0 - lam) * x.to(ct) + lam * gathered
    return torch.where(rare.unsqueeze(-1), mixed, x.to(ct)).to(x.dtype)


def note_mix_backward(grad, slots, lam):
    """Gradient of ``note_mix`` with respect to ``x``: scaled by ``1 - lam`` at rare positions."""
    ct = _compute_dtype(grad)
    scale = torch.where(slots >= 0, 1.0 - lam, 1.0).to(ct).unsqueeze(-1)
    return (grad.to(ct) * scale).to(grad.dtype)


def window_bounds(start, end, window, length):
    """The window ``[lo, hi)`` of a span ``[start, end)`` in a sequence of ``length`` real tokens."""
    return max(0, start - window), min(length, end + window)


def note_window_means(hidden, spans, *, window, lengths=None):
    """``c[r] = mean(hidden[b, lo:hi])`` for every span row ``r = (b, start, end, slot)``; float32 (float64 for
    float64 ``hidden``) ``[M, Dm]``."""
    ct = _compute_dtype(hidden)
    B, N, Dm = hidden.shape
    out = torch.empty(spans.shape[0], Dm, dtype=ct, device=hidden.device)
    for r, (b, start, end, _slot) in enumerate(spans.tolist()):
        length = N if lengths is None else int(lengths[b])
        lo, hi = window_bounds(start, end, window, length)
        out[r] = hidden[b, lo:hi].to(ct).mean(0)
    return out


def note_fold_(notes, counts, means, slots, *, gamma):
    """The ordered EMA fold of precomputed window means into ``notes``, one row at a time."""
    for r, slot in enumerate(slots.tolist()):
        c = means[r].to(notes.dtype)
        if int(counts[slot]) == 0:
            notes[slot] = c
        else:
            notes[slot] = (1.0 - gamma) * notes[slot] + gamma * c
        counts[slot] += 1


def note_update_(notes, counts, hidden, spans, *, window, gamma, lengths=None):
    """In place, row by row: ``c = mean(hidden[b, lo:hi])``; the first update of a slot sets its note, later ones
    fold in ``(1 - gamma) * note + gamma * c``; ``counts[slot] += 1``."""
    means = note_window_means(hidden, spans, window=window, lengths=lengths)
    note_fold_(notes, counts, means, spans[:, 3], gamma=gamma)
