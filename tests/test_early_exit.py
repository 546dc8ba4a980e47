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
    assert reference.exit_entropy(torch.zeros(1, 9, dtype=torch.float64)).item() == pytest.approx(math.log(9))


def run(backend, x):
    """The backend's result written into a poisoned buffer, so an unwritten element cannot pass."""
    out = torch.full((x.shape[0],), POISON, dtype=torch.float32, device=x.device)
    ops.entropy_into(backend, x, out)
    via_api = effbert.exit_entropy(x, backend=backend)
    assert torch.equal(torch.isnan(out), torch.isnan(via_api))
    assert torch.allclose(out, via_api, equal_nan=True, rtol=0, atol=0), "public API and kernel disagree"
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
        torch.randn(c).index_fill_(0, torch.tensor([0, 3, 30]), float("-inf")),  # zero-probability classes
        torch.full((c,), float("-inf")),  # no finite logit: undefined -> NaN
        torch.randn(c).index_fill_(0, torch.tensor([7]), float("nan")),  # NaN in -> NaN out
        torch.randn(c).index_fill_(0, torch.tensor([2]), float("inf")),  # +inf: softmax undefined -> NaN
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
        "misaligned start": base.reshape(-1)[1:1 + 9 * 31].view(9, 31),
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
    # The output is float32 by contract, so finite differences need a larger step than gradcheck's default.
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: effbert.exit_entropy(t, backend="eager"), (x,), eps=1e-3, atol=2e-4,
                                    rtol=1e-3)


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
    with pytest.raises(BackendNotSupportedError, match=r"'cpu' cannot serve.*fp32/fp16/bf16 logits, got float64"):
        effbert.exit_entropy(torch.randn(2, 3, dtype=torch.float64), backend="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_tensor_without_cuda_backend():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 3, device="cuda")
    with pytest.raises(BackendNotSupportedError, match=r"'cuda' cannot serve.*torch sees no CUDA device"):
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
        module.exit_entropy(x.data_ptr(), 7, 2, 3, 3, out.data_ptr())
    with pytest.raises(ValueError, match="cols must be >= 1"):
        module.exit_entropy(x.data_ptr(), 0, 2, 0, 3, out.data_ptr())
    with pytest.raises(ValueError, match="row_stride"):
        module.exit_entropy(x.data_ptr(), 0, 2, 3, 1, out.data_ptr())
    with pytest.raises(ValueError, match="non-null"):
        module.exit_entropy(0, 0, 2, 3, 3, out.data_ptr())


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

    monkeypatch.setattr(_ext, "load", lambda name: (None, f"effbert.{name} is not available (test)"))
    _dispatch.refresh()
    try:
        with pytest.raises(BackendNotSupportedError, match=r"'cuda' cannot serve.*not available"):
            effbert.exit_entropy(torch.randn(2, 3, device="cuda"), backend="cuda")
        assert ops.entropy_backend(torch.randn(2, 3, device="cuda")) == "triton"
    finally:
        monkeypatch.undo()
        _dispatch.refresh()
