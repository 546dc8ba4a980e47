"""exit_entropy on every backend that runs here against the float64 reference."""

import math

import pytest
import torch

import effbert
from effbert import reference
from effbert.ops import early_exit as ops
from effbert.ops._dispatch import BackendNotSupportedError
from helpers import POISON, assert_close, backend_cases, require_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (7, 3), (97, 2), (129, 97), (5, 4096), (3, 50_000)]


def loop_entropy(row):
    """The definition, one float at a time."""
    m = max(row)
    z = [math.exp(v - m) for v in row]
    total = sum(z)
    return -sum((e / total) * math.log(e / total) for e in z if e > 0)


def test_reference_matches_definition(seeded):
    x = torch.randn(6, 9, dtype=torch.float64) * 3
    ref = reference.exit_entropy(x)
    for r in range(6):
        assert ref[r].item() == pytest.approx(loop_entropy(x[r].tolist()), rel=1e-12)
    assert reference.exit_entropy(torch.zeros(1, 9, dtype=torch.float64)).item() == pytest.approx(
        math.log(9)
    )


def run(backend, x):
    """The backend's result written into a poisoned buffer, so an unwritten element cannot pass."""
    out = torch.full((x.shape[0],), POISON, dtype=torch.float32, device=x.device)
    ops.entropy_into(backend, x, out)
    via_api = effbert.exit_entropy(x, backend=backend)
    assert torch.equal(torch.isnan(out), torch.isnan(via_api))
    assert torch.allclose(out, via_api, equal_nan=True, rtol=0, atol=0), (
        "public API and kernel disagree"
    )
    return out


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_random_rows(backend, device, dtype, shape, seeded):
    require_backend(backend, device)
    x = (torch.randn(shape) * 4).to(dtype).to(device)
    out = run(backend, x)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    assert_close(out, reference.exit_entropy(x.double()), what=f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_huge_one_hot_and_special_rows(backend, device, dtype, seeded):
    require_backend(backend, device)
    c = 37
    rows = [
        1e4 * torch.randn(c),  # magnitudes of 1e4: naive exp overflows
        1e4 + torch.randn(c),  # large common offset: softmax is shift-invariant
        -1e4 + torch.randn(c),
        torch.full((c,), -1e4).index_fill_(0, torch.tensor([5]), 1e4),  # one-hot-like: entropy ~ 0
        torch.zeros(c),  # uniform: log C
        torch.randn(c).index_fill_(
            0, torch.tensor([0, 3, 30]), float("-inf")
        ),  # zero-probability classes
        torch.full((c,), float("-inf")),  # no finite logit: undefined -> NaN
        torch.randn(c).index_fill_(0, torch.tensor([7]), float("nan")),  # NaN in -> NaN out
        torch.randn(c).index_fill_(
            0, torch.tensor([2]), float("inf")
        ),  # +inf: softmax undefined -> NaN
        torch.randn(c) * 2,
    ]
    x = torch.stack(rows).to(dtype).to(device)
    out = run(backend, x)
    ref = reference.exit_entropy(x.double())
    assert torch.isnan(out[6:9]).all() and not torch.isnan(out[[0, 1, 2, 3, 4, 5, 9]]).any()
    assert out[3].item() == pytest.approx(0.0, abs=1e-6)
    assert out[4].item() == pytest.approx(math.log(c), rel=1e-6)
    assert_close(out, ref, what=f"{backend} special rows")


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4], ids=lambda s: f"scale{s:g}")
@pytest.mark.parametrize("cols", [2, 37, 1000])
def test_float32_relative_error_per_row_at_any_scale(backend, device, scale, cols, seeded):
    """Each row's float32 entropy within 1e-5 of float64, relative to that row's own value (not to the batch's
    norm): at scale 30 the entropy is tiny and the textbook formula cancels. Values below float32's smallest
    normal number cannot hold 1e-5 relative precision, so they get that as an absolute bound."""
    require_backend(backend, device)
    x = (torch.randn(64, cols, dtype=torch.float64) * scale).float()
    # rows whose entropy is tiny but normal in float32: the top logit ahead of the rest by 20..80 nats
    x[:8] = torch.randn(8, cols) + torch.linspace(20, 80, 8)[:, None] * torch.nn.functional.one_hot(
        torch.randint(cols, (8,)), cols
    )
    x = x.to(device)
    out = run(backend, x)
    ref = reference.exit_entropy(x.double()).cpu()
    err = (out.double().cpu() - ref).abs()
    bound = 1e-5 * ref.abs() + torch.finfo(torch.float32).tiny
    worst = int((err / bound).argmax())
    assert (err <= bound).all(), (
        f"{backend} scale {scale}: row {worst} gives {out[worst].item():.9e}, float64 "
        f"{ref[worst].item():.9e} (relative error {err[worst] / ref[worst]:.2e})"
    )


def test_reference_float64_in_float64_out_and_exact_small_entropy():
    # Two classes with logits (0, -40): H = log1p(e) + e * 40 / (1 + e), e = exp(-40), worked out by hand.
    e = math.exp(-40.0)
    want = math.log1p(e) + 40.0 * e / (1.0 + e)
    x = torch.tensor([[0.0, -40.0]], dtype=torch.float64)
    out = effbert.exit_entropy(x, backend="eager")
    assert out.dtype == torch.float64
    assert out.item() == pytest.approx(want, rel=1e-14)
    assert reference.exit_entropy(x.float()).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_empty_batch(backend, device):
    require_backend(backend, device)
    out = effbert.exit_entropy(torch.empty(0, 5, device=device), backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("backend,device", backend_cases())
def test_strided_layouts(backend, device, seeded):
    require_backend(backend, device)
    base = torch.randn(40, 70, device=device)
    views = {
        "row slice of a wider tensor": base[3:30, 5:66],
        "every other row": base[::2, :13],
        "transposed": base[:20, :9].t(),
        "broadcast rows": torch.randn(1, 11, device=device).expand(6, 11),
        "misaligned start": base.reshape(-1)[1 : 1 + 9 * 31].view(9, 31),
    }
    for name, v in views.items():
        assert_close(run(backend, v), reference.exit_entropy(v.double()), what=f"{backend} {name}")


@pytest.mark.parametrize("backend,device", backend_cases())
def test_gradient_matches_autograd_of_reference(backend, device, seeded):
    require_backend(backend, device)
    x = torch.randn(9, 13, device=device)
    x[2, 4] = float("-inf")  # a zero-probability class gets zero gradient, not NaN
    x1 = x.clone().requires_grad_()
    # The reference's autograd gives NaN through a -inf logit; a finite stand-in with exactly zero probability in
    # float64 has the same true gradient.
    x2 = x.double().nan_to_num(neginf=-1e4).requires_grad_()
    w = torch.randn(9, device=device)
    (effbert.exit_entropy(x1, backend=backend) * w).sum().backward()
    h = reference.exit_entropy(x2)
    (h * w.double()).sum().backward()
    g_ref = x2.grad
    assert x1.grad[2, 4].item() == 0.0
    assert_close(x1.grad, g_ref, what=f"{backend} gradient")


def test_gradcheck_float64_eager():
    # float64 in, float64 out: gradcheck's default step and tolerances hold.
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: effbert.exit_entropy(t, backend="eager"), (x,))


@pytest.mark.parametrize("backend,device", backend_cases())
def test_opcheck(backend, device, seeded):
    require_backend(backend, device)
    x = torch.randn(5, 11, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.effbert.exit_entropy.default, (x, backend))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend, seeded):
    def f(logits):
        return effbert.exit_entropy(logits * 2.0).sum()

    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    x = torch.randn(6, 10, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = compiled(x)
    out.backward()
    f(x_ref).backward()
    assert_close(out, f(x_ref.detach()), what="compiled forward")
    assert_close(x.grad, x_ref.grad, what="compiled gradient")


def test_auto_picks_fastest_available_on_cpu():
    x = torch.randn(3, 4)
    assert ops.entropy_backend(x) == "cpu"
    assert ops.entropy_backend(x.double()) == "eager"  # float64 only on the reference


def test_env_var_forces_backend(monkeypatch):
    x = torch.randn(3, 4)
    monkeypatch.setenv("EFFBERT_BACKEND", "eager")
    assert ops.entropy_backend(x) == "eager"
    assert ops.entropy_backend(x, "cpu") == "cpu"  # an explicit argument wins over the variable
    monkeypatch.setenv("EFFBERT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="EFFBERT_BACKEND"):
        effbert.exit_entropy(x)


# ---- bad inputs: each a clear error naming the argument ----


@pytest.mark.parametrize(
    "bad,exc,pattern",
    [
        (torch.randn(3), ValueError, r"logits must have 2 dimensions \[B, C\]"),
        (torch.randn(2, 3, 4), ValueError, r"logits must have 2 dimensions"),
        (torch.randint(0, 5, (3, 4)), TypeError, r"logits must have dtype in .*got int64"),
        (torch.zeros(3, 4, dtype=torch.bool), TypeError, r"logits must have dtype"),
        (torch.zeros(3, 4, dtype=torch.complex64), TypeError, r"logits must have dtype"),
        (torch.empty(3, 0), ValueError, r"at least one class"),
        ([[1.0, 2.0]], TypeError, r"logits must be a torch.Tensor"),
    ],
)
def test_bad_inputs(bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        effbert.exit_entropy(bad)


def test_bad_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of"):
        effbert.exit_entropy(torch.randn(2, 3), backend="gpu")


def test_explicit_backend_that_cannot_serve_lists_reasons():
    with pytest.raises(
        BackendNotSupportedError, match=r"'cpu' cannot serve.*fp32/fp16/bf16 logits, got float64"
    ):
        effbert.exit_entropy(torch.randn(2, 3, dtype=torch.float64), backend="cpu")


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_tensor_without_cuda_backend():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 3, device="cuda")
    with pytest.raises(
        BackendNotSupportedError, match=r"'cuda' cannot serve.*torch sees no CUDA device"
    ):
        ops.entropy_backend(x, "cuda")
    with pytest.raises(BackendNotSupportedError, match=r"'cpu' cannot serve.*inputs are on cuda"):
        ops.entropy_backend(x, "cpu")


def test_triton_on_cpu_tensor_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("with CUDA the triton backend is available; this checks the CPU-only message")
    with pytest.raises(BackendNotSupportedError, match=r"'triton' cannot serve.*TRITON_INTERPRET"):
        effbert.exit_entropy(torch.randn(2, 3), backend="triton")


def test_native_extension_rejects_bad_arguments():
    """Direct misuse of effbert._C raises ValueError instead of touching memory."""
    module, why = effbert._ext.load("_C")
    assert module is not None, why
    x = torch.randn(2, 3)
    out = torch.empty(2)
    with pytest.raises(ValueError, match="dtype code"):
        module.exit_entropy(x.data_ptr(), 7, 2, 3, 3, out.data_ptr(), 1)
    with pytest.raises(ValueError, match="cols must be >= 1"):
        module.exit_entropy(x.data_ptr(), 0, 2, 0, 3, out.data_ptr(), 1)
    with pytest.raises(ValueError, match="row_stride"):
        module.exit_entropy(x.data_ptr(), 0, 2, 3, 1, out.data_ptr(), 1)
    with pytest.raises(ValueError, match="non-null"):
        module.exit_entropy(0, 0, 2, 3, 3, out.data_ptr(), 1)


# ---- GPU-only checks (run by the GPU suite) ----


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_on_side_stream_and_large_batch(seeded):
    x = torch.randn(4096, 30522, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = effbert.exit_entropy(x, backend="cuda")
    stream.synchronize()
    assert_close(out, reference.exit_entropy(x.double()), what="cuda vocab rows on a side stream")


@pytest.mark.gpu
def test_cuda_backend_missing_is_reported(monkeypatch):
    from effbert import _ext

    from effbert.ops import _dispatch

    monkeypatch.setattr(
        _ext, "load", lambda name: (None, f"effbert.{name} is not available (test)")
    )
    _dispatch.refresh()
    try:
        with pytest.raises(BackendNotSupportedError, match=r"'cuda' cannot serve.*not available"):
            effbert.exit_entropy(torch.randn(2, 3, device="cuda"), backend="cuda")
        assert ops.entropy_backend(torch.randn(2, 3, device="cuda")) == "triton"
    finally:
        monkeypatch.undo()
        _dispatch.refresh()


# ==== batched early exit: criteria references and the fused per-layer decision ====

CRIT_PARAMS = [
    ("entropy", dict(threshold=0.6), 3),
    ("max_prob", dict(threshold=0.55), 5),
    ("patience", dict(patience=2), 3),
    ("patience", dict(patience=1, threshold=0.4), 1),  # PABEE's regression rule
]
CRIT_IDS = ["entropy", "max_prob", "patience", "patience-regression"]


def test_criteria_references_match_definitions(seeded):
    x = torch.randn(8, 5, dtype=torch.float64) * 2
    x[3, 1] = float("nan")
    p = reference.exit_max_prob(x)
    for r in range(8):
        if r == 3:
            assert math.isnan(p[r].item())
            continue
        row = x[r].tolist()
        m = max(row)
        assert p[r].item() == pytest.approx(1.0 / sum(math.exp(v - m) for v in row), rel=1e-12)
    # entropy / max_prob: exit below / at-or-above the threshold; a NaN row never exits early but does at the end
    ex, _, _ = reference.exit_decision(x, 1, "entropy", threshold=1.0)
    h = reference.exit_entropy(x)
    assert ex.tolist() == [(not math.isnan(v)) and v < 1.0 for v in h.tolist()]
    ex, _, _ = reference.exit_decision(x, 4, "max_prob", threshold=0.5, last=True)
    assert ex.all()


def test_patience_reference_counts_repeats():
    # one sample, argmax sequence 0 0 1 1 1 1: counter 0 1 0 1 2 3
    preds = [0, 0, 1, 1, 1, 1]
    prev = counter = None
    counters, exits = [], []
    for layer, k in enumerate(preds, 1):
        z = torch.zeros(1, 3, dtype=torch.float64)
        z[0, k] = 1.0
        ex, prev, counter = reference.exit_decision(
            z, layer, "patience", patience=2, prev=prev, counter=counter
        )
        counters.append(int(counter[0]))
        exits.append(bool(ex[0]))
    assert counters == [0, 1, 0, 1, 2, 3]
    assert exits == [False, False, False, False, True, True]
    # regression: |delta| < threshold counts as unchanged; NaN resets
    values = [1.0, 1.05, 1.5, 1.52, float("nan"), 1.52, 1.53]
    prev = counter = None
    counters = []
    for layer, v in enumerate(values, 1):
        _, prev, counter = reference.exit_decision(
            torch.tensor([[v]], dtype=torch.float64),
            layer,
            "patience",
            patience=5,
            threshold=0.1,
            prev=prev,
            counter=counter,
        )
        counters.append(int(counter[0]))
    assert counters == [0, 1, 0, 1, 0, 0, 1]


def _decision_case(dtype, rows, batch, classes, device, nan_rows=True):
    x = (torch.randn(rows, classes) * 2).to(dtype)
    if nan_rows and rows > 2:
        x[1, 0] = float("nan")
        x[rows - 1, classes - 1] = float("nan")
    ids = torch.randperm(batch)[:rows].to(torch.int32)
    return x.to(device), ids.to(device)


def _reference_step(x, ids, prev, counter, layer, criterion, kw, last):
    """The decision from the reference, on float64 copies of the state."""
    ids64 = ids.long().cpu()
    exits, pred, cnt = reference.exit_decision(
        x.double().cpu(),
        layer,
        criterion,
        prev=prev[ids64].double().cpu(),
        counter=counter[ids64].long().cpu(),
        last=last,
        **kw,
    )
    return exits, pred, cnt


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("crit", range(4), ids=CRIT_IDS)
@pytest.mark.parametrize("rows,batch", [(1, 1), (7, 9), (97, 129)], ids=lambda v: str(v))
def test_decision_kernels_against_reference(backend, device, dtype, crit, rows, batch, seeded):
    require_backend(backend, device)
    criterion, kw, classes = CRIT_PARAMS[crit]
    if rows == 97 and crit == 1:
        classes = 97  # several column chunks
    i32 = dict(dtype=torch.int32, device=device)
    prev = torch.full((batch,), float("nan"), device=device)
    counter = torch.zeros(batch, **i32)
    # a plausible state from earlier layers: some predictions already on record
    prev[: batch // 2] = (
        torch.randint(0, classes, (batch // 2,)).float() if classes > 1 else torch.randn(batch // 2)
    )
    counter[: batch // 2] = torch.randint(0, 2, (batch // 2,), dtype=torch.int32)
    for layer, last in ((1, False), (3, False), (4, True)):
        x, ids = _decision_case(dtype, rows, batch, classes, device)
        if criterion == "patience" and classes > 1 and layer == 3:
            x[2:6] = 0  # all-equal rows: argmax 0, a repeat for rows whose previous argmax was 0
            x[2:6, 0] = 1
        out_logits = torch.full((batch, classes), POISON, dtype=dtype, device=device)
        out_layer = torch.full((batch,), -1, **i32)
        next_rows = torch.full((rows,), -7, **i32)
        next_local = torch.full((rows,), -7, **i32)
        count = torch.full((1,), -1, **i32)
        want_exits, want_pred, want_cnt = _reference_step(
            x, ids, prev, counter, layer, criterion, kw, last
        )
        ops.exit_decision(
            x,
            ids,
            prev,
            counter,
            out_logits,
            out_layer,
            next_rows,
            next_local,
            count,
            layer=layer,
            criterion=criterion,
            last=last,
            backend=backend,
            **kw,
        )
        ids64 = ids.long().cpu()
        n = int(want_exits.logical_not().sum())
        assert int(count) == n
        assert next_rows[:n].cpu().tolist() == ids64[~want_exits].tolist(), (
            "continuing rows not in batch order"
        )
        assert next_local[:n].cpu().tolist() == torch.nonzero(~want_exits).flatten().tolist()
        exited = ids64[want_exits]
        assert (out_layer.cpu()[exited] == layer).all()
        untouched = torch.ones(batch, dtype=torch.bool)
        untouched[exited] = False
        assert (out_layer.cpu()[untouched] == -1).all(), "a row that did not exit was written"
        assert torch.equal(
            out_logits.cpu()[exited].view(torch.int16 if dtype != torch.float32 else torch.int32),
            x.cpu()[want_exits].view(torch.int16 if dtype != torch.float32 else torch.int32),
        ), "exiting logits are not copied bit for bit"
        assert torch.isnan(out_logits.cpu()[untouched]).all()
        if criterion == "patience":
            got_prev, got_cnt = prev.cpu()[ids64], counter.cpu()[ids64]
            assert got_cnt.tolist() == want_cnt.tolist()
            assert torch.equal(torch.isnan(got_prev), torch.isnan(want_pred))
            assert torch.equal(
                got_prev[~torch.isnan(got_prev)].double(),
                want_pred[~torch.isnan(want_pred)].float().double(),
            )


@pytest.mark.parametrize("backend,device", backend_cases())
def test_decision_all_or_nothing_and_empty(backend, device, seeded):
    require_backend(backend, device)
    batch, c = 11, 4
    st = ops.BatchedExit(
        batch, depth=3, criterion="max_prob", threshold=1.0 / c, device=device, backend=backend
    )
    x = torch.randn(batch, c, device=device)
    assert st.step(x, 1).numel() == 0  # max prob >= 1/C always: everyone leaves at layer 1
    assert st.active == 0 and st.exit_layer.tolist() == [1] * batch
    assert torch.equal(st.logits, x)
    st = ops.BatchedExit(
        batch, depth=3, criterion="entropy", threshold=1e-9, device=device, backend=backend
    )
    for layer in (1, 2):
        assert st.step(torch.randn(batch, c, device=device), layer) is None  # nobody is that sure
    st.step(torch.randn(batch, c, device=device), 3)
    assert st.exit_layer.tolist() == [3] * batch
    # no active rows left: a step over zero rows writes nothing and reports zero
    count = torch.full((1,), -1, dtype=torch.int32, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    ops.exit_decision(
        torch.empty(0, c, device=device),
        torch.empty(0, **i32),
        st.prev,
        st.counter,
        st.logits,
        st.exit_layer,
        torch.empty(0, **i32),
        torch.empty(0, **i32),
        count,
        layer=2,
        criterion="entropy",
        threshold=0.5,
        backend=backend,
    )
    assert int(count) == 0 and st.exit_layer.tolist() == [3] * batch


def test_patience_warmup_layers_need_no_row_count(monkeypatch):
    """The first `patience` layers cannot exit anyone, so the step never reads the count back."""
    st = ops.BatchedExit(5, depth=6, criterion="patience", patience=3, backend="cpu")
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or real_item(t))
    for layer in (1, 2, 3):
        assert st.step(torch.randn(5, 3), layer) is None
    assert reads == []
    st.step(torch.randn(5, 3), 4)
    assert reads == [1]


def test_decision_opcheck(seeded):
    i32 = dict(dtype=torch.int32)
    batch, rows, c = 9, 6, 3
    args = (
        torch.randn(rows, c),
        torch.randperm(batch)[:rows].to(torch.int32),
        torch.full((batch,), float("nan")),
        torch.zeros(batch, **i32),
        torch.zeros(batch, c),
        torch.zeros(batch, **i32),
        torch.zeros(rows, **i32),
        torch.zeros(rows, **i32),
        torch.zeros(1, **i32),
        2,
        3,
        0.0,
        1,
        False,
        "cpu",
    )
    torch.library.opcheck(
        torch.ops.effbert.exit_decision.default, args, test_utils=("test_schema", "test_faketensor")
    )


def test_decision_under_torch_compile(seeded):
    batch, c = 7, 3
    st = ops.BatchedExit(batch, depth=2, criterion="entropy", threshold=0.8, backend="cpu")
    ref = ops.BatchedExit(batch, depth=2, criterion="entropy", threshold=0.8, backend="eager")
    x = torch.randn(batch, c)
    ref.step(x, 1)

    def f(logits):
        ops.exit_decision(
            logits * 1.0,
            st.row_ids,
            st.prev,
            st.counter,
            st.logits,
            st.exit_layer,
            st._spare,
            st._local,
            st.count,
            layer=1,
            criterion="entropy",
            threshold=0.8,
            backend="cpu",
        )
        return st.count + 0

    st.logits = torch.full((batch, c), float("nan"))
    count = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert int(count) == ref.active  # the rows the reference kept (all of them when nobody exited)
    assert torch.equal(st.exit_layer, ref.exit_layer)


# ---- bad inputs of the decision: each a clear error naming the argument ----


@pytest.mark.parametrize(
    "criterion,kw,classes,exc,pattern",
    [
        (
            "entropy",
            dict(threshold=-0.1),
            3,
            ValueError,
            r"threshold must be >= 0 for criterion 'entropy'",
        ),
        ("entropy", dict(), 3, ValueError, r"needs a threshold"),
        ("max_prob", dict(threshold=1.5), 3, ValueError, r"threshold must be in \(0, 1\]"),
        ("max_prob", dict(threshold=0.0), 3, ValueError, r"threshold must be in \(0, 1\]"),
        ("max_prob", dict(threshold=float("nan")), 3, ValueError, r"threshold must be finite"),
        ("entropy", dict(threshold="0.3"), 3, TypeError, r"threshold must be a float"),
        (
            "entropy",
            dict(threshold=0.3, patience=2),
            3,
            ValueError,
            r"patience applies to criterion 'patience'",
        ),
        ("patience", dict(patience=-2), 3, ValueError, r"patience must be >= 0"),
        ("patience", dict(patience=2**31 - 1), 3, ValueError, r"patience must be < 2\*\*31 - 1"),
        ("patience", dict(patience=1.5), 3, TypeError, r"patience must be an int"),
        ("patience", dict(), 3, TypeError, r"patience must be an int"),
        (
            "patience",
            dict(patience=2, threshold=0.1),
            3,
            ValueError,
            r"one-column \(regression\) head",
        ),
        (
            "patience",
            dict(patience=2),
            1,
            ValueError,
            r"threshold must be > 0 for criterion 'patience'",
        ),
        ("patience", dict(patience=2, threshold=-1.0), 1, ValueError, r"threshold must be > 0"),
        ("deebert", dict(threshold=0.1), 3, ValueError, r"criterion must be one of"),
    ],
)
def test_bad_criterion_arguments(criterion, kw, classes, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ops.check_criterion(criterion, classes=classes, **kw)
    batch = 4
    i32 = dict(dtype=torch.int32)
    with pytest.raises(exc, match=pattern):
        ops.exit_decision(
            torch.randn(batch, classes),
            torch.arange(batch, **i32),
            torch.zeros(batch),
            torch.zeros(batch, **i32),
            torch.zeros(batch, classes),
            torch.zeros(batch, **i32),
            torch.zeros(batch, **i32),
            torch.zeros(batch, **i32),
            torch.zeros(1, **i32),
            layer=1,
            criterion=criterion,
            **kw,
        )


def _decision_args(batch=5, rows=4, c=3):
    i32 = dict(dtype=torch.int32)
    return dict(
        logits=torch.randn(rows, c),
        row_ids=torch.arange(rows, **i32),
        prev=torch.zeros(batch),
        counter=torch.zeros(batch, **i32),
        out_logits=torch.zeros(batch, c),
        out_layer=torch.zeros(batch, **i32),
        next_rows=torch.zeros(rows, **i32),
        next_local=torch.zeros(rows, **i32),
        count=torch.zeros(1, **i32),
    )


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (dict(logits=torch.randn(4)), ValueError, r"logits must have 2 dimensions \[R, C\]"),
        (dict(logits=torch.randn(4, 3).long()), TypeError, r"logits must have dtype"),
        (dict(logits=torch.randn(4, 0)), ValueError, r"at least one class"),
        (
            dict(logits=torch.randn(6, 3), row_ids=torch.arange(6, dtype=torch.int32)),
            ValueError,
            r"logits has 6 rows but the batch \(out_logits\) has 5",
        ),
        (dict(out_logits=torch.zeros(5, 4)), ValueError, r"out_logits must be \[B, 3\]"),
        (
            dict(out_logits=torch.zeros(5, 3).half()),
            TypeError,
            r"out_logits must have dtype in \(float32\)",
        ),
        (dict(row_ids=torch.arange(4)), TypeError, r"row_ids must have dtype in \(int32\)"),
        (
            dict(row_ids=torch.arange(3, dtype=torch.int32)),
            ValueError,
            r"row_ids must be a contiguous \[4\]",
        ),
        (dict(prev=torch.zeros(4)), ValueError, r"prev must be a contiguous \[5\]"),
        (dict(counter=torch.zeros(5)), TypeError, r"counter must have dtype in \(int32\)"),
        (
            dict(next_rows=torch.zeros(2, dtype=torch.int32)),
            ValueError,
            r"next_rows must be a contiguous int32",
        ),
        (
            dict(count=torch.zeros(2, dtype=torch.int32)),
            ValueError,
            r"count must be a contiguous \[1\]",
        ),
    ],
)
def test_bad_decision_tensors(change, exc, pattern):
    args = _decision_args()
    args.update(change)
    with pytest.raises(exc, match=pattern):
        ops.exit_decision(*args.values(), layer=1, criterion="entropy", threshold=0.5)


def test_bad_layer_and_native_ids():
    args = _decision_args()
    with pytest.raises(ValueError, match=r"layer must be an int >= 1"):
        ops.exit_decision(*args.values(), layer=0, criterion="entropy", threshold=0.5)
    # the C++ CPU build refuses an id outside the batch before it changes any state
    args["row_ids"] = torch.tensor([0, 1, 9, 2], dtype=torch.int32)
    before = args["out_layer"].clone()
    with pytest.raises(ValueError, match=r"row_ids\[2\] = 9 outside"):
        ops.exit_decision(
            *args.values(), layer=1, criterion="max_prob", threshold=0.01, backend="cpu"
        )
    assert torch.equal(args["out_layer"], before)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("bad_id", [9, 5, -1])
@pytest.mark.parametrize("through_op", [False, True], ids=["public", "registered-op"])
def test_row_id_outside_the_batch_raises_on_every_backend(backend, device, bad_id, through_op):
    """An id outside [0, B) names row_ids and leaves every buffer as it was, on every backend and when the
    registered op is called directly (eager and Triton used to drop the sample silently)."""
    require_backend(backend, device)
    args = {k: v.to(device) for k, v in _decision_args().items()}
    args["row_ids"] = torch.tensor([0, 1, bad_id, 2], dtype=torch.int32, device=device)
    before = {k: v.clone() for k, v in args.items()}
    with pytest.raises(ValueError, match=rf"row_ids\[2\] = {bad_id} outside \[0, 5\)"):
        if through_op:
            torch.ops.effbert.exit_decision(*args.values(), 2, 1, 3.0, 1, False, backend)
        else:
            ops.exit_decision(
                *args.values(), layer=1, criterion="patience", patience=1, backend=backend
            )
    for k, v in args.items():
        assert torch.equal(v, before[k]), f"{k} changed before the error"


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_patience_ties_take_the_first_class(backend, device, dtype):
    """The patience prediction is torch.argmax's: the first maximal class, also when the ties sit in different
    column blocks of a kernel."""
    c = 97
    x = torch.zeros(4, c)
    x[1, [5, 70]] = 3.0
    x[2, [64, 90]] = 2.0
    x[3, [96, 1, 33]] = 1.0
    x = x.to(dtype).to(device)
    first = [0, 5, 64, 1]
    assert x.float().cpu().argmax(-1).tolist() == first
    batch = 4
    i32 = dict(dtype=torch.int32, device=device)
    prev = torch.tensor(first, dtype=torch.float32, device=device)
    counter = torch.zeros(batch, **i32)
    out_layer = torch.zeros(batch, **i32)
    count = torch.full((1,), -1, **i32)
    ops.exit_decision(
        x,
        torch.arange(batch, **i32),
        prev,
        counter,
        torch.zeros(batch, c, dtype=dtype, device=device),
        out_layer,
        torch.zeros(batch, **i32),
        torch.zeros(batch, **i32),
        count,
        layer=2,
        criterion="patience",
        patience=1,
        backend=backend,
    )
    assert int(count) == 0 and out_layer.tolist() == [2] * 4 and counter.tolist() == [1] * 4
    assert prev.tolist() == first


def test_cpu_kernels_use_torchs_thread_count_not_the_hardwares(monkeypatch):
    """The C++ CPU kernels start at most torch.get_num_threads() threads (passed in by every launch), so a process
    limited to one thread, or sharing the machine, never gets more from effbert."""
    module, why = effbert._ext.load("_C")
    assert module is not None, why
    big = 1 << 30  # enough work for every thread allowed
    assert module.parallel_threads_used(64, big, 1) == 1
    assert module.parallel_threads_used(64, big, 2) == 2
    assert (
        module.parallel_threads_used(64, big, 5) == 5
    )  # what torch allows, even above this machine's cores
    assert module.parallel_threads_used(3, big, 8) == 3  # never more threads than items
    assert module.parallel_threads_used(64, 1000, 8) == 1  # small work stays on the calling thread
    seen = []

    class Recording:
        def __getattr__(self, entry):
            def call(*args):
                seen.append((entry, args[-1]))
                return getattr(module, entry)(*args)

            return call

    monkeypatch.setattr(
        effbert._ext, "load", lambda name: (Recording(), None) if name == "_C" else (None, "no")
    )
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            x = torch.randn(4, 1000)
            assert_close(effbert.exit_entropy(x, backend="cpu"), reference.exit_entropy(x.double()))
            effbert.note_mix(
                torch.randn(2, 3, 8),
                torch.randn(4, 8),
                torch.tensor([[0, -1, 1], [3, -1, -1]]),
                0.5,
                backend="cpu",
            )
            assert seen and all(t == threads for _, t in seen), seen
            assert {"exit_entropy", "note_mix"} <= {e for e, _ in seen}
            seen.clear()
    finally:
        torch.set_num_threads(before)


def test_decision_kernel_touches_only_its_tensors():
    """Below the op's checks (the kernel launcher itself), with patience state shorter than the batch (views whose
    memory goes on with sentinels): a row whose id lies past prev/counter is skipped, nothing is written past
    any tensor, and continuing rows past next_rows' length are counted, not written."""
    from effbert.kernels import early_exit as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    i32 = dict(dtype=torch.int32, device=device)
    batch, c = 9, 3
    logits = torch.randn(6, c, device=device)
    ids = torch.tensor([0, 6, 2, 7, 3, 1], **i32)
    prev_store = torch.full((batch,), 123.0, device=device)
    prev_store[:5] = float("nan")
    counter_store = torch.full((batch,), 77, **i32)
    counter_store[:5] = 0
    next_store = torch.full((batch,), -5, **i32)
    out_logits, out_layer = torch.zeros(batch, c, device=device), torch.zeros(batch, **i32)
    next_local, count = torch.zeros(batch, **i32), torch.zeros(1, **i32)
    kernels.exit_decision(
        logits,
        ids,
        prev_store[:5],
        counter_store[:5],
        out_logits,
        out_layer,
        next_store[:2],
        next_local,
        count,
        criterion=kernels.PATIENCE,
        layer=1,
        threshold=0.0,
        patience=3,
        last=False,
    )
    assert (prev_store[5:] == 123.0).all() and (counter_store[5:] == 77).all()
    assert (next_store[2:] == -5).all() and next_store[:2].tolist() == [0, 2]
    assert int(count) == 4  # ids 6 and 7 are past the state: skipped
