"""Benchmark cases of the TNF family: ``note_mix`` and ``note_update_`` at BERT-base pretraining shapes.

Batches follow the issue: 20% of sentences hold one or more rare words (1 to 3 occurrences of 1 to 3 pieces), slots
drawn from a small pool so they repeat, window 16, Dm 768.

Floors (the fewest bytes each op must move; both are memory-bound, FLOPs are not counted):
* note_mix: read x and write out (``2 * B * N * Dm`` elements), read the slots (8 bytes a token) and each distinct
  note row used once (``Dm * 4`` bytes).
* note_update_: read the hidden states under the union of the windows once (``Dm`` elements per token), read and
  write each touched note row (``2 * Dm * 4`` bytes) and count, read the span rows (32 bytes each).
"""

import torch

import effbert
from effbert import reference
from effbert.ops import notes as ops

from .case import Case, provider_reasons

WINDOW = 16
GAMMA = 0.1
LAM = 0.5
SLOTS = 4096
POOL = 300  # rare words in play in one batch: slots repeat


def make_spans(batch, seq, lengths, seed=0):
    """Span rows for one batch: 20% of sentences hold 1-3 rare words of 1-3 pieces; slots from a small pool."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(SLOTS, generator=g)[:POOL]
    rows = []
    for b in range(batch):
        if torch.rand((), generator=g) >= 0.2:
            continue
        L = int(lengths[b])
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            width = int(torch.randint(1, 4, (), generator=g))
            start = int(torch.randint(0, max(1, L - width + 1), (), generator=g))
            slot = int(pool[int(torch.randint(0, POOL, (), generator=g))])
            rows.append([b, start, min(L, start + width), slot])
    return torch.tensor(rows, dtype=torch.int64).view(-1, 4)


def union_window_tokens(spans, lengths, window):
    """Tokens under at least one window (each is read once by an ideal kernel)."""
    covered = set()
    for b, start, end, _ in spans.tolist():
        covered.update(
            (b, t) for t in range(max(0, start - window), min(int(lengths[b]), end + window))
        )
    return len(covered)


def plain_torch_mix(x, notes, slots, lam):
    """What a user writes without effbert: gather every token's note (an embedding lookup), then a where."""
    gathered = torch.nn.functional.embedding(slots.clamp_min(0), notes).to(x.dtype)
    return torch.where((slots >= 0).unsqueeze(-1), (1 - lam) * x + lam * gathered, x)


def window_token_rows(spans, lengths, window, seq):
    """The hidden-state rows each span's window reads, flattened: ``(rows [T] int64, owner [T]
    int64, width [M])``, ``rows`` indexing ``hidden.view(B * seq, Dm)``, ``owner`` the span row each
    belongs to, ``width = hi - lo`` (window ``[lo, hi) = [max(0, start - window), min(length, end +
    window))``, as ``reference.window_bounds``)."""
    b, start, end, _ = spans.unbind(1)
    lo = (start - window).clamp_min(0)
    hi = torch.minimum(end + window, lengths[b])
    width = hi - lo
    owner = torch.repeat_interleave(torch.arange(spans.shape[0], device=spans.device), width)
    first = torch.cumsum(width, 0) - width  # where each span's tokens start in the flat list
    offset = torch.arange(owner.shape[0], device=spans.device) - first[owner]
    return (b * seq + lo)[owner] + offset, owner, width


def plain_torch_update_(notes, counts, hidden, spans, window, gamma, lengths):
    """The best plain PyTorch version: gather only the tokens under the windows (one
    ``index_select``), sum each window with ``index_add_``, then the ordered EMA as per-row weights
    folded in with ``index_add_`` (occurrence r of m weighs gamma (1 - gamma)^(m - r)). An earlier
    version took prefix sums over the whole batch (``hidden.cumsum(1)``): it read and wrote every
    token, not the ~2% under a window, and torch's CPU cumsum over a middle dimension is strided: at
    B=32, N=128, Dm=256 (22 span rows) it took 7.0 ms of process CPU time against 0.6 ms for the
    reference's Python loop and 0.3-0.9 ms for this version (a loaded machine; 68 ms against 1.3 ms
    at B=256)."""
    B, N, D = hidden.shape
    slot = spans[:, 3]
    rows, owner, width = window_token_rows(spans, lengths, window, N)
    # float64 for float64 hidden states, else float32, as the reference computes
    ct = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    picked = hidden.reshape(B * N, D).index_select(0, rows).to(ct)
    c = torch.zeros(spans.shape[0], D, dtype=ct, device=hidden.device).index_add_(0, owner, picked)
    c = (c / width.unsqueeze(1)).to(notes.dtype)
    sorted_slots, order = torch.sort(slot, stable=True)
    first_of = torch.searchsorted(sorted_slots, sorted_slots)
    m_sorted = torch.searchsorted(sorted_slots, sorted_slots, right=True) - first_of
    r_sorted = torch.arange(slot.shape[0], device=slot.device) - first_of + 1
    r = torch.empty_like(r_sorted).scatter_(0, order, r_sorted)
    m = torch.empty_like(m_sorted).scatter_(0, order, m_sorted)
    fresh = counts[slot] == 0
    keep = 1.0 - gamma
    weight = gamma * keep ** (m - r).double()
    weight = torch.where(fresh & (r == 1), keep ** (m - 1).double(), weight).to(notes.dtype)
    touched = torch.unique(slot)
    old_scale = torch.where(
        counts[touched] == 0,
        0.0,
        keep ** torch.bincount(slot, minlength=notes.shape[0])[touched].double(),
    ).to(notes.dtype)
    notes.index_copy_(0, touched, notes.index_select(0, touched) * old_scale.unsqueeze(1))
    notes.index_add_(0, slot, weight.unsqueeze(1) * c)
    counts.index_add_(0, slot, torch.ones_like(slot))
    return notes


def _mix_cases(device, shapes, dtypes):
    providers = {
        "effbert-cuda": lambda x, n, s: effbert.note_mix(x, n, s, LAM, backend="cuda"),
        "effbert-triton": lambda x, n, s: effbert.note_mix(x, n, s, LAM, backend="triton"),
        "effbert-cpu": lambda x, n, s: effbert.note_mix(x, n, s, LAM, backend="cpu"),
        "eager-reference": lambda x, n, s: effbert.note_mix(x, n, s, LAM, backend="eager"),
        "torch": lambda x, n, s: plain_torch_mix(x, n, s, LAM),
    }
    out = []
    for B, N, D in shapes:
        lengths = torch.full((B,), N)
        spans = make_spans(B, N, lengths)
        slots_cpu = torch.full((B, N), -1, dtype=torch.int64)
        for b, s, e, slot in spans.tolist():
            slots_cpu[b, s:e] = slot
        distinct = int(torch.unique(spans[:, 3]).numel()) if spans.numel() else 0
        for dtype in dtypes:
            nbytes = 2 * B * N * D * dtype.itemsize + B * N * 8 + distinct * D * 4

            def make_inputs(B=B, N=N, D=D, dtype=dtype, slots_cpu=slots_cpu):
                return (
                    torch.randn(B, N, D, device=device, dtype=dtype),
                    torch.randn(SLOTS, D, device=device),
                    slots_cpu.to(device),
                )

            for name, fn in providers.items():
                reasons = []
                if name.startswith("effbert-"):
                    probe_x = torch.empty(1, 1, 1, device=device, dtype=dtype)
                    probe_n = torch.empty(1, 1, device=device)
                    reasons = provider_reasons(
                        lambda b=name.split("-", 1)[1]: ops.mix_backend(probe_x, probe_n, b)
                    )
                out.append(
                    Case(
                        op="note_mix",
                        params={"B": B, "N": N, "Dm": D},
                        dtype=str(dtype).replace("torch.", ""),
                        mode="forward",
                        provider=name,
                        fn=fn,
                        make_inputs=make_inputs,
                        reference=lambda x, n, s: reference.note_mix(
                            x.double(), n.double(), s, LAM
                        ),
                        bytes=nbytes,
                        flops=0,
                        rtol=1e-2 if dtype != torch.float32 else 1e-4,
                        skip_reasons=reasons,
                        baseline="torch",
                    )
                )
    return out


def _update_cases(device, shapes, dtypes, quick):
    def run(backend):
        def fn(notes, counts, hidden, spans, lengths, notes0, counts0):
            effbert.note_update_(
                notes,
                counts,
                hidden,
                spans,
                window=WINDOW,
                gamma=GAMMA,
                lengths=lengths,
                backend=backend,
            )
            return notes

        return fn

    def torch_fn(notes, counts, hidden, spans, lengths, notes0, counts0):
        return plain_torch_update_(notes, counts, hidden, spans, WINDOW, GAMMA, lengths)

    def ref(notes, counts, hidden, spans, lengths, notes0, counts0):
        n, c = notes0.double().cpu(), counts0.clone().cpu()
        reference.note_update_(
            n,
            c,
            hidden.double().cpu(),
            spans.cpu(),
            window=WINDOW,
            gamma=GAMMA,
            lengths=lengths.cpu(),
        )
        return n

    providers = {
        "effbert-cuda": run("cuda"),
        "effbert-triton": run("triton"),
        "effbert-cpu": run("cpu"),
        "eager-reference": run("eager"),
        "torch": torch_fn,
    }
    out = []
    for B, N, D in shapes:
        g = torch.Generator().manual_seed(1)
        lengths_cpu = torch.randint(N // 2, N + 1, (B,), generator=g)
        spans_cpu = make_spans(B, N, lengths_cpu, seed=1)
        touched = int(torch.unique(spans_cpu[:, 3]).numel()) if spans_cpu.numel() else 0
        tokens = union_window_tokens(spans_cpu, lengths_cpu, WINDOW)
        for dtype in dtypes:
            nbytes = (
                tokens * D * dtype.itemsize + touched * (2 * D * 4 + 16) + spans_cpu.shape[0] * 32
            )

            def make_inputs(
                B=B, N=N, D=D, dtype=dtype, spans_cpu=spans_cpu, lengths_cpu=lengths_cpu
            ):
                notes = torch.randn(SLOTS, D, device=device)
                counts = torch.randint(
                    0, 2, (SLOTS,), device=device
                )  # half the slots never updated yet
                return (
                    notes,
                    counts,
                    torch.randn(B, N, D, device=device, dtype=dtype),
                    spans_cpu.to(device),
                    lengths_cpu.to(device),
                    notes.clone(),
                    counts.clone(),
                )

            for name, fn in providers.items():
                reasons = []
                if name.startswith("effbert-"):
                    probe_h = torch.empty(1, 1, 1, device=device, dtype=dtype)
                    probe_n = torch.empty(1, 1, device=device)
                    reasons = provider_reasons(
                        lambda b=name.split("-", 1)[1]: ops.update_backend(probe_n, probe_h, b)
                    )
                if name == "eager-reference" and quick and device.type == "cpu":
                    reasons = ["skipped in --quick on the CPU (a Python loop over rows)"]
                out.append(
                    Case(
                        op="note_update_",
                        params={"B": B, "N": N, "Dm": D, "M": spans_cpu.shape[0]},
                        dtype=str(dtype).replace("torch.", ""),
                        mode="forward",
                        provider=name,
                        fn=fn,
                        make_inputs=make_inputs,
                        reference=ref,
                        bytes=nbytes,
                        flops=0,
                        rtol=1e-4,
                        skip_reasons=reasons,
                        baseline="torch",
                    )
                )
    return out


def cases(device, quick):
    if device.type == "cuda":
        shapes = [(256, 128, 768), (32, 512, 768)] if not quick else [(256, 128, 768)]
        dtypes = [torch.bfloat16, torch.float32] if not quick else [torch.bfloat16]
    else:
        shapes = [(32, 128, 256)] if not quick else [(8, 64, 64)]
        dtypes = [torch.float32]
    return _mix_cases(device, shapes, dtypes) + _update_cases(device, shapes, dtypes, quick)
