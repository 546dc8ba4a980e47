"""TNF ops (note_mix, note_update_) and NoteDictionary on every backend that runs here, against the loop reference."""

import os

import pytest
import torch

import effbert
from effbert import reference
from effbert.nn import NoteDictionary
from effbert.ops import notes as ops
from effbert.ops._dispatch import BackendNotSupportedError
from helpers import POISON, assert_close, backend_cases, require_backend

LOWP = [torch.float16, torch.bfloat16]


def large_matrix_cases():
    """backend_cases() for the large parametrized matrices: without the cuda_ext mark, so the GPU suite's
    compute-sanitizer steps (which run every cuda_ext test) stay within their time; the smaller tests keep it."""
    out = []
    for case in backend_cases():
        marks = [m for m in case.marks if m.name != "cuda_ext"]
        out.append(pytest.param(*case.values, id=case.id, marks=marks))
    return out


DTYPES = [torch.float32] + LOWP


def dt_id(d):
    return str(d).replace("torch.", "")


# ---- the references against the definition, by hand ----


def test_reference_update_matches_hand_computation():
    hidden = torch.arange(2 * 5 * 2, dtype=torch.float64).view(2, 5, 2)
    notes = torch.tensor([[1.0, 1.0], [5.0, -5.0], [0.0, 0.0]], dtype=torch.float64)
    counts = torch.tensor([3, 0, 7])
    spans = torch.tensor([[0, 1, 2, 0], [1, 4, 5, 1], [0, 0, 1, 1], [1, 2, 3, 0]])
    lengths = torch.tensor(
        [5, 4]
    )  # row 1's span [4, 5) lies past sequence 1's length: not used here
    spans = spans[[0, 2, 3]]
    g, w = 0.25, 1
    reference.note_update_(notes, counts, hidden, spans, window=w, gamma=g, lengths=lengths)
    # row (0, [1,2), slot 0): window [0, 3) of sequence 0; row (0, [0,1), slot 1): window [0, 2), first update of
    # slot 1 sets it; row (1, [2,3), slot 0): window [1, 4) of sequence 1 (length 4).
    c0 = hidden[0, 0:3].mean(0)
    c1 = hidden[0, 0:2].mean(0)
    c2 = hidden[1, 1:4].mean(0)
    slot0 = (1 - g) * ((1 - g) * torch.tensor([1.0, 1.0], dtype=torch.float64) + g * c0) + g * c2
    assert torch.allclose(notes[0], slot0)
    assert torch.allclose(notes[1], c1)
    assert torch.equal(notes[2], torch.zeros(2, dtype=torch.float64))
    assert counts.tolist() == [5, 1, 7]


def test_reference_mix_matches_definition(seeded):
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    notes = torch.randn(5, 4, dtype=torch.float64)
    slots = torch.tensor([[-1, 0, 4], [2, -7, 2]])
    out = reference.note_mix(x, notes, slots, 0.3)
    for b in range(2):
        for n in range(3):
            s = int(slots[b, n])
            want = x[b, n] if s < 0 else 0.7 * x[b, n] + 0.3 * notes[s]
            assert torch.allclose(out[b, n], want)


# ---- random cases ----


def make_update_case(
    *,
    batch,
    seq,
    dim,
    slots,
    rows,
    dtype,
    device,
    window,
    lengths=True,
    one_slot=False,
    edges=False,
    fresh=False,
):
    """Valid random rows: spans inside each sequence's real tokens, slots repeating."""
    hidden = torch.randn(batch, seq, dim).to(dtype)
    lens = torch.randint(1, seq + 1, (batch,)) if lengths else torch.full((batch,), seq)
    b = torch.randint(0, batch, (rows,))
    length = lens[b]
    start = (torch.rand(rows) * length).long().clamp_max(length - 1)
    span_len = torch.randint(1, 4, (rows,))
    end = torch.minimum(start + span_len, length)
    if edges and rows:
        start[: rows // 2] = 0  # spans at the first token
        end[: rows // 2] = 1
        end[rows // 2 :] = length[rows // 2 :]  # and ending at the last real token
        start[rows // 2 :] = (length[rows // 2 :] - 2).clamp_min(0)
    slot = torch.zeros(rows, dtype=torch.int64) if one_slot else torch.randint(0, slots, (rows,))
    spans = torch.stack([b, start, end, slot], 1)
    notes = torch.randn(slots, dim)
    counts = torch.zeros(slots, dtype=torch.int64) if fresh else torch.randint(0, 3, (slots,))
    return (
        hidden.to(device),
        spans.to(device),
        (lens.to(device) if lengths else None),
        notes.to(device),
        counts.to(device),
    )


UPDATE_CASES = {
    # name: (batch, seq, dim, slots, rows, window, extra)
    "random": (3, 13, 37, 6, 9, 2, {}),
    "many-repeats-one-slot": (4, 9, 19, 3, 23, 1, {"one_slot": True}),
    "edges": (3, 11, 8, 4, 10, 3, {"edges": True}),
    "window-larger-than-sequence": (2, 7, 16, 5, 6, 64, {}),
    "window-0": (2, 10, 33, 4, 7, 0, {}),
    "no-lengths": (2, 9, 24, 4, 6, 2, {"lengths": False}),
    "first-ever": (3, 12, 17, 5, 11, 2, {"fresh": True}),
    "M=0": (2, 5, 8, 3, 0, 2, {}),
    "N=1": (3, 1, 9, 2, 4, 5, {}),
    "Dm=4096": (2, 6, 4096, 3, 5, 2, {}),
}


def run_reference(notes, counts, hidden, spans, window, gamma, lengths):
    n64, c64 = notes.double().cpu(), counts.clone().cpu()
    reference.note_update_(
        n64,
        c64,
        hidden.double().cpu(),
        spans.cpu(),
        window=window,
        gamma=gamma,
        lengths=None if lengths is None else lengths.cpu(),
    )
    return n64, c64


@pytest.mark.parametrize("backend,device", large_matrix_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("case", list(UPDATE_CASES), ids=str)
def test_update_against_loop_reference(backend, device, dtype, case, seeded):
    require_backend(backend, device)
    batch, seq, dim, slots, rows, window, extra = UPDATE_CASES[case]
    hidden, spans, lengths, notes, counts = make_update_case(
        batch=batch,
        seq=seq,
        dim=dim,
        slots=slots,
        rows=rows,
        dtype=dtype,
        device=device,
        window=window,
        **extra,
    )
    gamma = 0.3
    n64, c64 = run_reference(notes, counts, hidden, spans, window, gamma, lengths)
    before = notes.clone()
    effbert.note_update_(
        notes, counts, hidden, spans, window=window, gamma=gamma, lengths=lengths, backend=backend
    )
    assert torch.equal(counts.cpu(), c64), "counts"
    assert_close(notes, n64, what=f"{backend} {case} notes")
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[spans[:, 3].cpu()] = False
    assert torch.equal(notes.cpu()[untouched], before.cpu()[untouched]), (
        "a slot with no row changed"
    )


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
def test_window_means_poisoned(backend, device, dtype, seeded):
    require_backend(backend, device)
    hidden, spans, lengths, _, _ = make_update_case(
        batch=3, seq=17, dim=41, slots=4, rows=12, dtype=dtype, device=device, window=3
    )
    means = torch.full((12, 41), POISON, device=device)
    ops.window_means_into(backend, hidden, spans, 3, lengths, means)
    ref = reference.note_window_means(
        hidden.double().cpu(), spans.cpu(), window=3, lengths=lengths.cpu()
    )
    assert_close(means, ref, what=f"{backend} window means")
    via_api = effbert.ops.note_window_means(
        hidden, spans, window=3, lengths=lengths, backend=backend
    )
    assert_close(via_api, ref, what=f"{backend} note_window_means")


@pytest.mark.parametrize("backend,device", backend_cases())
def test_fold_of_precomputed_means(backend, device, seeded):
    require_backend(backend, device)
    notes = torch.randn(5, 23, device=device)
    counts = torch.tensor([0, 4, 0, 1, 2], device=device)
    means = torch.randn(14, 23, device=device)
    slots = torch.tensor([1, 0, 1, 1, 4, 0, 2, 1, 1, 0, 4, 4, 1, 0], device=device)
    n64, c64 = notes.double().cpu(), counts.clone().cpu()
    reference.note_fold_(n64, c64, means.double().cpu(), slots.cpu(), gamma=0.2)
    effbert.ops.note_fold_(notes, counts, means, slots, gamma=0.2, backend=backend)
    assert torch.equal(counts.cpu(), c64)
    assert_close(notes, n64, what=f"{backend} fold")


@pytest.mark.parametrize("backend,device", backend_cases())
def test_update_strided_hidden_and_gamma_edges(backend, device, seeded):
    require_backend(backend, device)
    base = torch.randn(3, 15, 50, device=device)
    hidden = base[:, 2:13, 5:45]  # row strides of the wider tensor
    spans = torch.tensor([[0, 0, 3, 1], [2, 8, 11, 1], [1, 4, 5, 0], [0, 9, 10, 0]], device=device)
    for gamma in (0.0, 1.0):
        notes = torch.randn(2, 40, device=device)
        counts = torch.tensor([1, 0], device=device)
        n64, c64 = run_reference(notes, counts, hidden, spans, 2, gamma, None)
        effbert.note_update_(notes, counts, hidden, spans, window=2, gamma=gamma, backend=backend)
        assert torch.equal(counts.cpu(), c64)
        assert_close(notes, n64, what=f"{backend} gamma={gamma}")


# ---- note_mix ----

MIX_SHAPES = [(1, 1, 1), (2, 7, 33), (3, 97, 16), (1, 5, 768), (1, 3, 4096), (0, 4, 8)]


@pytest.mark.parametrize("backend,device", large_matrix_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("shape", MIX_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_mix_against_reference(backend, device, dtype, shape, lam, seeded):
    require_backend(backend, device)
    B, N, D = shape
    x = torch.randn(shape).to(dtype).to(device)
    notes = torch.randn(7, D, device=device)
    slots = torch.randint(-2, 7, (B, N), device=device)
    out = torch.full_like(x, POISON)
    ops.mix_into(backend, x, notes, slots, lam, out)
    ref = reference.note_mix(x.double(), notes.double(), slots, lam)
    lowp = reference.note_mix(x, notes, slots, lam) if dtype in LOWP else None
    assert_close(out, ref, lowp_eager=lowp, what=f"{backend} mix")
    common = slots < 0
    assert torch.equal(out[common], x[common]), (
        "tokens that are not rare words must pass through unchanged"
    )
    via_api = effbert.note_mix(x, notes, slots, lam, backend=backend)
    assert torch.equal(via_api, out)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_mix_gradient(backend, device, lam, seeded):
    require_backend(backend, device)
    x = torch.randn(3, 11, 13, device=device, requires_grad=True)
    notes = torch.randn(4, 13, device=device)
    slots = torch.randint(-1, 4, (3, 11), device=device)
    w = torch.randn(3, 11, 13, device=device)
    (effbert.note_mix(x, notes, slots, lam, backend=backend) * w).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (reference.note_mix(x64, notes.double(), slots, lam) * w.double()).sum().backward()
    assert_close(x.grad, x64.grad, what=f"{backend} grad")
    assert notes.grad is None


def test_mix_gradcheck_float64_eager():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    notes = torch.randn(3, 4, dtype=torch.float64)
    slots = torch.tensor([[0, -1, 2], [1, 1, -1]])
    assert torch.autograd.gradcheck(
        lambda t: effbert.note_mix(t, notes, slots, 0.4, backend="eager"), (x,)
    )


@pytest.mark.parametrize("backend,device", backend_cases())
def test_opcheck(backend, device, seeded):
    require_backend(backend, device)
    x = torch.randn(2, 5, 8, device=device, requires_grad=True)
    notes = torch.randn(3, 8, device=device)
    slots = torch.randint(-1, 3, (2, 5), device=device)
    torch.library.opcheck(torch.ops.effbert.note_mix.default, (x, notes, slots, 0.5, backend))
    hidden = torch.randn(2, 6, 8, device=device)
    spans = torch.tensor([[0, 1, 3, 2], [1, 0, 2, 2], [1, 4, 6, 0]], device=device)
    counts = torch.tensor([0, 1, 1], device=device)
    torch.library.opcheck(
        torch.ops.effbert.note_update_.default,
        (notes, counts, hidden, spans, 2, 0.1, None, backend),
    )


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend, seeded):
    notes = torch.randn(4, 6)
    slots = torch.tensor([[0, -1, 3, 3, -1]])

    def f(x):
        return effbert.note_mix(x * 2.0, notes, slots, 0.25).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    x = torch.randn(1, 5, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = compiled(x)
    out.backward()
    f(x_ref).backward()
    assert_close(out, f(x_ref.detach()), what="compiled forward")
    assert_close(x.grad, x_ref.grad, what="compiled gradient")


def test_update_under_torch_compile():
    def step(notes, counts, hidden, spans):
        effbert.note_update_(notes, counts, hidden * 1.0, spans, window=1, gamma=0.5)
        return notes.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    hidden = torch.randn(2, 4, 3)
    spans = torch.tensor([[0, 1, 2, 0], [1, 0, 1, 0]])
    notes, counts = torch.zeros(1, 3), torch.zeros(1, dtype=torch.int64)
    n64, c64 = run_reference(notes, counts, hidden, spans, 1, 0.5, None)
    compiled(notes, counts, hidden, spans)
    assert torch.equal(counts, c64)
    assert_close(notes, n64, what="compiled update")


def test_auto_backends_on_cpu():
    x, notes = torch.randn(1, 2, 3), torch.zeros(2, 3)
    assert ops.mix_backend(x, notes) == "cpu"
    assert ops.mix_backend(x.double(), notes) == "eager"
    assert ops.update_backend(notes, x) == "cpu"
    assert ops.update_backend(notes.double(), x) == "eager"


# ---- bad inputs: a clear error, notes and counts unchanged ----


def _good():
    hidden = torch.randn(2, 6, 4)
    spans = torch.tensor([[0, 1, 3, 1], [1, 0, 2, 0], [1, 4, 6, 2]])
    notes = torch.randn(3, 4)
    counts = torch.tensor([0, 2, 1])
    lengths = torch.tensor([6, 6])
    return hidden, spans, notes, counts, lengths


def _bad_row(r, col, value):
    def edit(h, s, n, c, lengths):
        s = s.clone()
        s[r, col] = value
        return h, s, n, c, lengths

    return edit


BAD_ROWS = [
    (_bad_row(1, 3, 3), r"spans row 1 .*slot 3 out of range \[0, 3\)"),
    (_bad_row(2, 3, -1), r"spans row 2 .*slot -1 out of range"),
    (_bad_row(0, 0, 2), r"spans row 0 .*batch index 2 out of range \[0, 2\)"),
    (_bad_row(0, 0, -1), r"spans row 0 .*batch index -1"),
    (_bad_row(2, 2, 7), r"spans row 2 .*span \[4, 7\) outside the sequence's 6 tokens"),
    (_bad_row(1, 1, -1), r"spans row 1 .*span \[-1, 2\) outside"),
    (_bad_row(0, 1, 3), r"spans row 0 .*start 3 >= end 3"),
    (_bad_row(2, 1, 6), r"spans row 2 .*start 6 >= end 6"),
]


def _lengths_cut(h, s, n, c, lengths):
    return h, s, n, c, torch.tensor([6, 5])  # row 2 ends at 6 > 5


@pytest.mark.parametrize(
    "backend,device", backend_cases()
)  # under compute-sanitizer too: no write outside
@pytest.mark.parametrize(
    "edit,pattern", BAD_ROWS + [(_lengths_cut, r"spans row 2 .*outside the sequence's 5")]
)
def test_bad_rows_raise_and_leave_notes_unchanged(backend, device, edit, pattern):
    require_backend(backend, device)
    hidden, spans, notes, counts, lengths = (t.to(device) for t in edit(*_good()))
    n0, c0 = notes.clone(), counts.clone()
    with pytest.raises(ValueError, match=pattern):
        effbert.note_update_(
            notes, counts, hidden, spans, window=2, gamma=0.5, lengths=lengths, backend=backend
        )
    assert torch.equal(notes, n0) and torch.equal(counts, c0)


@pytest.mark.parametrize("edit,pattern", BAD_ROWS)
def test_device_side_checks_leave_notes_unchanged(edit, pattern):
    """The path CUDA tensors take: no host check; the check kernel flags the row, both passes do nothing, the
    wrapper raises. Under the interpreter the Triton kernels run it on the CPU."""
    hidden, spans, notes, counts, lengths = edit(*_good())
    n0, c0 = notes.clone(), counts.clone()
    with pytest.raises(ValueError, match=pattern):
        ops.update_into("triton", notes, counts, hidden, spans, 2, 0.5, lengths, host_check=False)
    assert torch.equal(notes, n0) and torch.equal(counts, c0)


@pytest.mark.parametrize(
    "case", ["random", "many-repeats-one-slot", "edges", "window-larger-than-sequence", "M=0"]
)
def test_device_side_path_on_valid_rows(case, seeded):
    """The CUDA-tensor path (check kernel writing the boundary keys, no host check), run by the Triton kernels
    under the interpreter: the same result as the loop reference."""
    batch, seq, dim, slots, rows, window, extra = UPDATE_CASES[case]
    hidden, spans, lengths, notes, counts = make_update_case(
        batch=batch,
        seq=seq,
        dim=dim,
        slots=slots,
        rows=rows,
        dtype=torch.float32,
        device="cpu",
        window=window,
        **extra,
    )
    n64, c64 = run_reference(notes, counts, hidden, spans, window, 0.3, lengths)
    ops.update_into("triton", notes, counts, hidden, spans, window, 0.3, lengths, host_check=False)
    assert torch.equal(counts, c64)
    assert_close(notes, n64, what=f"device path {case}")
    means = torch.full((rows, dim), POISON)
    ops.window_means_into("triton", hidden, spans, window, lengths, means, host_check=False)
    assert_close(
        means,
        reference.note_window_means(hidden.double(), spans, window=window, lengths=lengths),
        what="device path means",
    )


def test_bad_lengths():
    hidden, spans, notes, counts, _ = _good()
    n0 = notes.clone()
    with pytest.raises(ValueError, match=r"lengths\[1\] = 9 out of range \[0, 6\]"):
        effbert.note_update_(
            notes, counts, hidden, spans, window=1, gamma=0.5, lengths=torch.tensor([6, 9])
        )
    with pytest.raises(ValueError, match=r"lengths must be \[B\]"):
        effbert.note_update_(
            notes, counts, hidden, spans, window=1, gamma=0.5, lengths=torch.tensor([6])
        )
    with pytest.raises(TypeError, match=r"lengths must have dtype"):
        effbert.note_update_(
            notes, counts, hidden, spans, window=1, gamma=0.5, lengths=torch.tensor([6.0, 6.0])
        )
    assert torch.equal(notes, n0)


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (
            lambda a: a.update(notes=a["notes"].half()),
            TypeError,
            r"notes must have dtype in \(float32, float64\)",
        ),
        (lambda a: a.update(notes=torch.randn(4, 3).t()), ValueError, r"notes must be contiguous"),
        (
            lambda a: a.update(counts=a["counts"].int()),
            TypeError,
            r"counts must have dtype in \(int64\)",
        ),
        (
            lambda a: a.update(counts=torch.zeros(2, dtype=torch.int64)),
            ValueError,
            r"counts must be a contiguous",
        ),
        (lambda a: a.update(hidden=a["hidden"].long()), TypeError, r"hidden must have dtype"),
        (
            lambda a: a.update(hidden=torch.randn(2, 6, 5)),
            ValueError,
            r"hidden must be \[B, N, Dm\] with Dm = 4",
        ),
        (
            lambda a: a.update(spans=a["spans"].int()),
            TypeError,
            r"spans must have dtype in \(int64\)",
        ),
        (lambda a: a.update(spans=a["spans"][:, :3]), ValueError, r"spans must be \[M, 4\]"),
        (lambda a: a.update(window=-1), ValueError, r"window must be an integer >= 0"),
        (lambda a: a.update(window=1.5), ValueError, r"window must be an integer"),
        (lambda a: a.update(gamma=1.5), ValueError, r"gamma must be in \[0, 1\]"),
        (
            lambda a: a.update(hidden=a["hidden"].to("meta")),
            ValueError,
            r"tensors must be on one device",
        ),
        (lambda a: a.update(backend="gpu"), ValueError, r"backend must be one of"),
    ],
)
def test_bad_update_arguments(change, exc, pattern):
    hidden, spans, notes, counts, _ = _good()
    args = dict(
        notes=notes, counts=counts, hidden=hidden, spans=spans, window=2, gamma=0.5, backend="auto"
    )
    change(args)
    passed_notes, passed_counts = args["notes"], args["counts"]
    n0, c0 = passed_notes.clone(), passed_counts.clone()
    with pytest.raises(exc, match=pattern):
        effbert.note_update_(
            args.pop("notes"), args.pop("counts"), args.pop("hidden"), args.pop("spans"), **args
        )
    assert torch.equal(passed_notes, n0) and torch.equal(passed_counts, c0)


@pytest.mark.parametrize(
    "x,notes,slots,lam,exc,pattern",
    [
        (
            torch.randn(2, 3),
            torch.randn(4, 3),
            torch.zeros(2, 3, dtype=torch.int64),
            0.5,
            ValueError,
            r"x must have 3 dimensions \[B, N, Dm\]",
        ),
        (
            torch.randn(1, 2, 3),
            torch.randn(4, 5),
            torch.zeros(1, 2, dtype=torch.int64),
            0.5,
            ValueError,
            r"notes must be \[S, Dm\] with Dm = 3",
        ),
        (
            torch.randn(1, 2, 3),
            torch.randn(4, 3),
            torch.zeros(1, 2, dtype=torch.int32),
            0.5,
            TypeError,
            r"slots must have dtype in \(int64\)",
        ),
        (
            torch.randn(1, 2, 3),
            torch.randn(4, 3),
            torch.zeros(2, 1, dtype=torch.int64),
            0.5,
            ValueError,
            r"slots must be \[B, N\] = \(1, 2\)",
        ),
        (
            torch.randn(1, 2, 3),
            torch.randn(4, 3),
            torch.tensor([[0, 4]]),
            0.5,
            ValueError,
            r"slots\[0, 1\] = 4 out of range: notes has 4 slots",
        ),
        (
            torch.randn(1, 2, 3),
            torch.randn(4, 3),
            torch.tensor([[0, 1]]),
            1.5,
            ValueError,
            r"lam must be in \[0, 1\]",
        ),
        (
            torch.randn(1, 2, 3).long(),
            torch.randn(4, 3),
            torch.tensor([[0, 1]]),
            0.5,
            TypeError,
            r"x must have dtype",
        ),
        (
            torch.randn(1, 2, 3),
            torch.randn(4, 3).half(),
            torch.tensor([[0, 1]]),
            0.5,
            TypeError,
            r"notes must have dtype",
        ),
    ],
)
def test_bad_mix_arguments(x, notes, slots, lam, exc, pattern):
    with pytest.raises(exc, match=pattern):
        effbert.note_mix(x, notes, slots, lam)


def test_explicit_backend_that_cannot_serve_lists_reasons():
    with pytest.raises(
        BackendNotSupportedError, match=r"'cpu' cannot serve.*float32 notes, got float64"
    ):
        effbert.note_mix(
            torch.randn(1, 2, 3),
            torch.randn(2, 3, dtype=torch.float64),
            torch.tensor([[0, 1]]),
            0.5,
            backend="cpu",
        )


def test_native_extension_rejects_bad_plans():
    """Direct misuse of effbert._C raises instead of following a bad index."""
    module, why = effbert._ext.load("_C")
    assert module is not None, why
    assert "notes" in module.families
    notes = torch.zeros(2, 4)
    counts = torch.zeros(2, dtype=torch.int64)
    means = torch.randn(1, 4)
    order = torch.zeros(1, dtype=torch.int64)
    bad_slot = torch.tensor([5])
    flag = torch.tensor([1], dtype=torch.int32)
    with pytest.raises(ValueError, match="slot 5 out of range"):
        module.note_fold(
            notes.data_ptr(),
            counts.data_ptr(),
            2,
            4,
            means.data_ptr(),
            order.data_ptr(),
            bad_slot.data_ptr(),
            flag.data_ptr(),
            1,
            0.5,
            1,
        )
    assert torch.equal(notes, torch.zeros(2, 4))
    hidden = torch.randn(1, 3, 4)
    spans = torch.tensor([[0, 0, 2, 0]])
    lengths = torch.tensor([3])
    off = torch.tensor([0, 2])
    bad_idx = torch.tensor([0, 9])
    with pytest.raises(ValueError, match=r"boundary index 9 out of range \[0, 2\)"):
        module.note_window_means(
            hidden.data_ptr(),
            0,
            1,
            3,
            4,
            12,
            4,
            spans.data_ptr(),
            lengths.data_ptr(),
            1,
            off.data_ptr(),
            bad_idx.data_ptr(),
            flag.data_ptr(),
            1,
            means.data_ptr(),
            1,
        )
    bad_len, good_idx = torch.tensor([4]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"lengths\[0\] = 4 out of range"):
        module.note_window_means(
            hidden.data_ptr(),
            0,
            1,
            3,
            4,
            12,
            4,
            spans.data_ptr(),
            bad_len.data_ptr(),
            1,
            off.data_ptr(),
            good_idx.data_ptr(),
            flag.data_ptr(),
            1,
            means.data_ptr(),
            1,
        )
    x = torch.randn(1, 4)
    seven, zero = (
        torch.tensor([7]),
        torch.tensor([0]),
    )  # kept alive: the extension takes raw addresses
    with pytest.raises(ValueError, match=r"slots\[0\] = 7 out of range"):
        module.note_mix(
            x.data_ptr(), 0, 1, 4, 4, notes.data_ptr(), 2, seven.data_ptr(), 0.5, x.data_ptr(), 4, 1
        )
    with pytest.raises(ValueError, match="dtype code"):
        module.note_mix(
            x.data_ptr(), 9, 1, 4, 4, notes.data_ptr(), 2, zero.data_ptr(), 0.5, x.data_ptr(), 4, 1
        )


def test_half_and_bf16_rounding_of_cpu_extension(seeded):
    """The host conversions in notes.h round to nearest even like torch, subnormals, overflow and NaN included."""
    x = torch.cat(
        [
            torch.randn(2000) * 10,
            torch.tensor([65519.0, 65520.0, 1e6, 3e-8, 6e-5, -0.0, float("inf"), float("nan")]),
            torch.randn(100) * 1e-6,
        ]
    )
    slots = torch.full((1, x.numel()), -1)
    for dtype in LOWP:
        notes = torch.zeros(1, 1)
        # lam = 0 on rare tokens gives (1 - 0) * x: a float32 value rounded by the kernel's store.
        xx = x.view(1, -1, 1).to(dtype)
        out = torch.empty_like(xx)
        ops.mix_into(
            "cpu",
            x.view(1, -1, 1).float().to(dtype),
            notes,
            torch.zeros_like(slots).view(1, -1),
            0.0,
            out,
        )
        assert torch.equal(out.isnan(), xx.isnan())
        assert torch.equal(out[~xx.isnan()], xx[~xx.isnan()])
    # float32 -> half by the kernel itself: mix a float32 note into a zero half input with lam = 1.
    vals = x[~x.isnan()]
    notes = vals.view(-1, 1)
    n = vals.numel()
    for dtype in LOWP:
        out = torch.empty(1, n, 1, dtype=dtype)
        ops.mix_into(
            "cpu", torch.zeros(1, n, 1, dtype=dtype), notes, torch.arange(n).view(1, n), 1.0, out
        )
        assert torch.equal(out.view(-1), vals.to(dtype)), f"{dtype} rounding differs from torch"


# ---- NoteDictionary ----


def test_note_dictionary_mix_only_seen_slots_and_state_dict(seeded):
    nd = NoteDictionary(5, 6, window=1, gamma=0.5, lam=0.4)
    hidden = torch.randn(2, 7, 6)
    spans = torch.tensor([[0, 1, 2, 3], [1, 3, 5, 1], [0, 4, 5, 3]])
    nd.update(hidden, spans)
    assert nd.counts.tolist() == [0, 1, 0, 2, 0]
    x = torch.randn(2, 7, 6, requires_grad=True)
    slots = torch.tensor([[-1, 3, 0, 1, -1, 4, 3], [1, 1, -1, 2, 0, 0, 3]])
    out = nd.mix(x, slots)
    seen = torch.where(nd.counts[slots.clamp_min(0)] > 0, slots, -1)
    assert_close(
        out, reference.note_mix(x.double(), nd.notes.double(), seen, 0.4), what="mix of seen slots"
    )
    assert torch.equal(out[0, 2], x[0, 2]) and torch.equal(
        out[0, 5], x[0, 5]
    )  # slots 0 and 4: no note yet
    out.sum().backward()
    assert x.grad is not None and nd.notes.grad is None
    state = nd.state_dict()
    assert set(state) == {"notes", "counts"}
    other = NoteDictionary(5, 6)
    other.load_state_dict(state)
    assert torch.equal(other.notes, nd.notes) and torch.equal(other.counts, nd.counts)
    with pytest.raises(ValueError, match=r"slots\[0, 0\] = 5 out of range"):
        nd.mix(x, torch.full((2, 7), 5))
    with pytest.raises(ValueError, match=r"gamma must be a real number in \[0, 1\]"):
        NoteDictionary(3, 4, gamma=2.0)


def test_note_dictionary_update_equals_op(seeded):
    hidden, spans, lengths, _, _ = make_update_case(
        batch=3, seq=10, dim=8, slots=4, rows=9, dtype=torch.float32, device="cpu", window=2
    )
    nd = NoteDictionary(4, 8, window=2, gamma=0.3)
    nd.update(hidden, spans, lengths)
    n64, c64 = run_reference(
        torch.zeros(4, 8), torch.zeros(4, dtype=torch.int64), hidden, spans, 2, 0.3, lengths
    )
    assert torch.equal(nd.counts, c64)
    assert_close(nd.notes, n64, what="NoteDictionary.update")


def _dp_worker(rank, world, init_file, out_dir, batches):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        nd = NoteDictionary(6, 5, window=2, gamma=0.25)
        for step in batches[rank]:
            hidden, spans, lengths = step
            nd.update(hidden, spans, lengths, process_group=dist.group.WORLD)
        # One rank with a bad row: every rank raises, no rank changes its notes.
        before = nd.notes.clone()
        hidden, spans, lengths = batches[rank][0]
        if rank == 1:
            spans = spans.clone()
            spans[0, 3] = 99
        try:
            nd.update(hidden, spans, lengths, process_group=dist.group.WORLD)
            raised = ""
        except ValueError as exc:
            raised = str(exc)
        torch.save(
            {
                "notes": nd.notes,
                "counts": nd.counts,
                "raised": raised,
                "unchanged": torch.equal(before, nd.notes),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_ranks_stay_identical(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(1234)
    world = 2
    batches = []
    for rank in range(world):
        steps = []
        for rows in (
            (5, 0) if rank == 0 else (3, 4)
        ):  # a rank with no rows in a step still takes part
            hidden, spans, lengths, _, _ = make_update_case(
                batch=2,
                seq=9,
                dim=5,
                slots=6,
                rows=rows,
                dtype=torch.float32,
                device="cpu",
                window=2,
            )
            steps.append((hidden, spans, lengths))
        batches.append(steps)
    mp.spawn(
        _dp_worker,
        args=(world, str(tmp_path / "init"), str(tmp_path), batches),
        nprocs=world,
        join=True,
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert torch.equal(results[0]["notes"], results[1]["notes"])
    assert torch.equal(results[0]["counts"], results[1]["counts"])
    # One process applying both ranks' rows in rank order, step by step.
    notes, counts = torch.zeros(6, 5, dtype=torch.float64), torch.zeros(6, dtype=torch.int64)
    for step in range(2):
        for rank in range(world):
            hidden, spans, lengths = batches[rank][step]
            reference.note_update_(
                notes, counts, hidden.double(), spans, window=2, gamma=0.25, lengths=lengths
            )
    assert torch.equal(results[0]["counts"], counts)
    assert_close(results[0]["notes"], notes, what="data-parallel notes")
    assert "slot 99 out of range" in results[1]["raised"]
    assert "rank(s) [1] passed bad span rows" in results[0]["raised"]
    assert results[0]["unchanged"] and results[1]["unchanged"]


# ---- GPU-only checks (run by the GPU suite) ----

# Only the CUDA-extension cases carry cuda_ext: the GPU suite runs those under compute-sanitizer.
DEVICE_BACKENDS = [pytest.param("cuda", marks=pytest.mark.cuda_ext), "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_bad_rows_on_device_leave_notes_unchanged(backend):
    hidden, spans, notes, counts, lengths = (t.cuda() for t in _good())
    spans[1, 3] = 1000
    n0, c0 = notes.clone(), counts.clone()
    with pytest.raises(ValueError, match=r"spans row 1 .*slot 1000 out of range"):
        effbert.note_update_(
            notes, counts, hidden, spans, window=2, gamma=0.5, lengths=lengths, backend=backend
        )
    torch.cuda.synchronize()
    assert torch.equal(notes, n0) and torch.equal(counts, c0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
def test_pretraining_shapes_on_device(backend, dtype, seeded):
    hidden, spans, lengths, notes, counts = make_update_case(
        batch=32, seq=512, dim=768, slots=500, rows=300, dtype=dtype, device="cuda", window=16
    )
    n64, c64 = run_reference(notes, counts, hidden, spans, 16, 0.1, lengths)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        effbert.note_update_(
            notes, counts, hidden, spans, window=16, gamma=0.1, lengths=lengths, backend=backend
        )
    stream.synchronize()
    assert torch.equal(counts.cpu(), c64)
    assert_close(notes, n64, what=f"{backend} update at BERT-base shapes")


@pytest.mark.slow
def test_bench_family_runs_and_checks(tmp_path):
    """The notes benchmark cases run on this machine, every provider checked against the reference first."""
    import json

    from effbert.commands import bench as bench_command

    assert (
        bench_command.main(["--quick", "--no-progress", "--op", "notes", "--out", str(tmp_path)])
        == 0
    )
    data = json.loads((tmp_path / "bench.json").read_text())
    ok = [c for c in data["cases"] if c["status"] == "ok"]
    assert {c["op"] for c in ok} == {"note_mix", "note_update_"}
    assert {c["provider"] for c in ok} >= {"effbert-cpu", "torch"}
    assert all(c["bytes"] > 0 and c["ms"] > 0 for c in ok)
    assert not [c for c in data["cases"] if c["status"] in ("wrong", "error")]


@pytest.mark.parametrize("backend,device", backend_cases())
def test_degenerate_sizes_agree_on_every_backend(backend, device):
    """An empty note table, a hidden size of 0, N = 0 and broadcast views: the reference's result (and the same
    counts) on every backend, never an internal error (the eager mix used to fail on an empty table, every backend on
    a hidden size of 0, and the C++ build on a broadcast x; the kernels left counts unchanged at hidden size 0)."""
    require_backend(backend, device)
    dev = torch.device(device)
    x = torch.randn(2, 3, 4, device=dev)
    never = torch.full((2, 3), -1, dtype=torch.int64, device=dev)
    out = effbert.note_mix(x, torch.zeros(0, 4, device=dev), never, 0.5, backend=backend)
    assert torch.equal(out, x)
    slots = torch.tensor([[1, -1, 2], [0, 0, -1]], device=dev)
    out = effbert.note_mix(
        torch.randn(2, 3, 0, device=dev), torch.zeros(5, 0, device=dev), slots, 0.5, backend=backend
    )
    assert out.shape == (2, 3, 0)
    assert effbert.note_mix(
        x[:, :0], torch.randn(5, 4, device=dev), slots[:, :0], 0.5, backend=backend
    ).shape == (2, 0, 4)
    notes = torch.randn(5, 4, device=dev)
    for xv, nv, sv in (
        (torch.randn(1, 1, 4, device=dev).expand(2, 3, 4), notes, slots),
        (x, notes, torch.tensor([1, -1, 2], device=dev).expand(2, 3)),
        (x, torch.randn(1, 4, device=dev).expand(5, 4), slots),
    ):
        want = reference.note_mix(xv.double(), nv.double(), sv, 0.5)
        assert_close(effbert.note_mix(xv, nv, sv, 0.5, backend=backend), want)
    # hidden size 0: the update still counts every row, as the reference does
    notes0, counts = torch.zeros(3, 0, device=dev), torch.zeros(3, dtype=torch.int64, device=dev)
    spans = torch.tensor([[0, 0, 1, 1], [1, 1, 3, 1], [1, 0, 1, 2]], device=dev)
    effbert.note_update_(
        notes0,
        counts,
        torch.randn(2, 3, 0, device=dev),
        spans,
        window=1,
        gamma=0.1,
        backend=backend,
    )
    assert counts.tolist() == [0, 2, 1]
    # an empty table with no rows: nothing changes; a row into it is refused by name
    empty, counts = torch.zeros(0, 4, device=dev), torch.zeros(0, dtype=torch.int64, device=dev)
    effbert.note_update_(empty, counts, x, spans[:0], window=1, gamma=0.1, backend=backend)
    with pytest.raises(
        ValueError, match=r"spans row 0 = \(0, 0, 1, 1\): slot 1 out of range \[0, 0\)"
    ):
        effbert.note_update_(empty, counts, x, spans[:1], window=1, gamma=0.1, backend=backend)


def test_mix_kernel_reads_only_inside_notes_and_slots(seeded):
    """Below the op's checks (the kernel launcher itself), with notes narrower than x (their storage going on with
    NaN) and fewer slots than tokens: each load is masked by its own tensor's extent (a column past the notes
    mixes in 0, a token past the slots keeps x)."""
    from effbert.kernels import notes as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(7, 16, device=device)
    store = torch.full((3 * 16,), float("nan"), device=device)
    store[:24] = torch.randn(24, device=device)
    notes = store[:24].view(
        3, 8
    )  # contiguous, as the kernel takes them; its storage goes on with NaN
    slots = torch.tensor([0, -1, 2, 1, 0, 2, 1], device=device)
    out = torch.full_like(x, float("nan"))
    kernels.note_mix(x, notes, slots[:5], 0.25, out)
    padded = torch.cat([notes, torch.zeros(3, 8, device=device)], 1)
    want = reference.note_mix(x[None, :5], padded, slots[None, :5], 0.25)[0]
    assert torch.isfinite(out).all()
    assert_close(out[:5], want)
    assert torch.equal(out[5:], x[5:])
