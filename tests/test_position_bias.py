"""TUPE's positional term: T5 buckets against a plain loop, tupe_position_bias forward and every gradient."""

import math

import pytest
import torch

import effbert
from effbert import reference
from effbert.ops import BackendNotSupportedError

from helpers import FP32_RTOL, assert_close

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
BACKENDS = ["eager", "triton"]


def loop_buckets(n, num_buckets, max_distance):
    """T5's bucket rule written element by element."""
    half = num_buckets // 2
    exact = half // 2
    out = torch.empty(n, n, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            rel = j - i
            bucket = half if rel > 0 else 0
            dist = abs(rel)
            if dist < exact:
                bucket += dist
            else:
                far = exact + int(
                    torch.log(torch.tensor(dist / exact, dtype=torch.float32)).item()
                    / math.log(max_distance / exact)
                    * (half - exact)
                )
                bucket += min(far, half - 1)
            out[i, j] = bucket
    return out


@pytest.mark.parametrize(
    "n,num_buckets,max_distance", [(1, 32, 128), (7, 32, 128), (40, 8, 20), (300, 32, 128)]
)
def test_t5_buckets_match_the_loop(n, num_buckets, max_distance):
    got = effbert.t5_relative_buckets(n, num_buckets, max_distance)
    assert torch.equal(got, loop_buckets(n, num_buckets, max_distance))
    if n > 1:
        assert got.max() < num_buckets and got.min() >= 0


def test_reference_bias_matches_a_loop():
    n, h, dh = 5, 2, 3
    pq, pk = torch.randn(n, h, dh, dtype=torch.float64), torch.randn(n, h, dh, dtype=torch.float64)
    rel = torch.randn(8, h, dtype=torch.float64)
    buckets = effbert.t5_relative_buckets(n, 8, 20)
    row, col = torch.randn(h, dtype=torch.float64), torch.randn(h, dtype=torch.float64)
    got = reference.tupe_position_bias(
        pq, pk, scale=0.3, rel_table=rel, rel_buckets=buckets, cls_row=row, cls_col=col
    )
    for hh in range(h):
        for i in range(n):
            for j in range(n):
                want = 0.3 * float((pq[i, hh] * pk[j, hh]).sum()) + float(rel[buckets[i, j], hh])
                if i == 0:
                    want = float(row[hh])
                elif j == 0:
                    want = float(col[hh])
                assert abs(float(got[hh, i, j]) - want) < 1e-12


def make_inputs(n, h, dh, *, rel, cls, dtype=torch.float64, num_buckets=32):
    g = lambda *s: torch.randn(*s, dtype=dtype, device=DEVICE)  # noqa: E731
    args = {"pos_q": g(n, h, dh), "pos_k": g(n, h, dh)}
    if rel:
        args["rel_table"] = g(num_buckets, h)
        args["rel_buckets"] = effbert.t5_relative_buckets(n, num_buckets, 128, device=DEVICE)
    if cls:
        args["cls_row"], args["cls_col"] = g(h), g(h)
    return args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 64, 97])
@pytest.mark.parametrize("rel,cls", [(True, True), (False, False), (True, False), (False, True)])
def test_forward_and_every_gradient(backend, n, rel, cls, seeded):
    if backend == "triton" and not ON_GPU and (n == 97 or n != 7 and not (rel and cls)):
        pytest.skip(
            "interpreter time: every combination of terms at N=7, N=1 and 64 with all terms on, N=97 on "
            "the GPU"
        )
    h, dh = 3, 24  # Dh not a power of two: the kernels mask the head-dim tail
    args64 = {
        k: (v.requires_grad_() if v.is_floating_point() else v)
        for k, v in make_inputs(n, h, dh, rel=rel, cls=cls).items()
    }
    ref = reference.tupe_position_bias(**args64, scale=0.125)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    args = {
        k: (v.detach().float().requires_grad_() if v.is_floating_point() else v)
        for k, v in args64.items()
    }
    out = effbert.tupe_position_bias(**args, scale=0.125, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (h, n, n)
    assert_close(out, ref, what="P")
    out.backward(grad.float())
    for name, t in args.items():
        if t.is_floating_point():
            assert_close(t.grad, args64[name].grad, rtol=FP32_RTOL * 4, what=f"d {name}")


@pytest.mark.parametrize("backend", ["eager", "cpu", "triton"])
@pytest.mark.parametrize("rel,cls", [(True, True), (False, False), (False, True)])
def test_zero_positions_give_an_empty_bias(backend, rel, cls):
    """N = 0: an empty [H, 0, 0] on every backend (the eager path raised IndexError with [CLS] untying), and zero
    gradients for every float input."""
    args = {
        k: (v.float().requires_grad_() if v.is_floating_point() else v)
        for k, v in make_inputs(0, 3, 8, rel=rel, cls=cls).items()
    }
    out = effbert.tupe_position_bias(**args, scale=0.5, backend=backend)
    assert out.shape == (3, 0, 0) and out.dtype == torch.float32
    (out.sum() + sum(t.sum() * 0 for t in args.values() if t.is_floating_point())).backward()
    for name, t in args.items():
        if t.is_floating_point():
            assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all(), name


def test_triton_takes_at_most_64_buckets():
    """The Triton backward sums the relative buckets in a 64-wide register array: a bigger table is refused by
    name (auto takes the eager path), where it used to give a wrong gradient for buckets 64 and up."""
    a = make_inputs(5, 2, 8, rel=True, cls=False, dtype=torch.float32, num_buckets=100)
    a["rel_buckets"] = a["rel_buckets"] % 25 + 60  # buckets 60..84: past the kernel's 64
    with pytest.raises(BackendNotSupportedError, match="at most 64 relative buckets"):
        effbert.tupe_position_bias(**a, scale=1.0, backend="triton")
    with pytest.raises(ValueError, match="num_buckets must be an int in"):
        torch.ops.effbert.tupe_position_bias_backward(
            torch.zeros(2, 5, 5, device=DEVICE),
            a["pos_q"],
            a["pos_k"],
            a["rel_buckets"],
            100,
            False,
            1.0,
        )


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []))
def test_low_precision_within_twice_eager(dtype):
    args64 = make_inputs(64, 2, 32, rel=True, cls=True)
    ref = reference.tupe_position_bias(**args64, scale=0.125)
    low = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in args64.items()}
    eager = reference.tupe_position_bias(**low, scale=0.125)
    out = effbert.tupe_position_bias(**low, scale=0.125, backend="triton")
    assert out.dtype == dtype
    assert_close(out, ref, lowp_eager=eager)


def test_gradcheck_eager_float64():
    args = {
        k: (v.requires_grad_() if v.is_floating_point() else v)
        for k, v in make_inputs(5, 2, 3, rel=True, cls=True, num_buckets=8).items()
    }
    args["rel_buckets"] = effbert.t5_relative_buckets(5, 8, 20, device=DEVICE)
    names = [k for k, v in args.items() if v.is_floating_point()]

    def fn(*xs):
        kw = dict(args, **dict(zip(names, xs)))
        return effbert.tupe_position_bias(**kw, scale=0.5, backend="eager")

    assert torch.autograd.gradcheck(fn, tuple(args[k] for k in names))


def test_opcheck_and_compile():
    args = {
        k: (v.float() if v.is_floating_point() else v)
        for k, v in make_inputs(7, 2, 16, rel=True, cls=True).items()
    }
    op_args = (
        args["pos_q"],
        args["pos_k"],
        args["rel_table"],
        args["rel_buckets"],
        args["cls_row"],
        args["cls_col"],
        0.25,
    )
    torch.library.opcheck(
        torch.ops.effbert.tupe_position_bias, op_args, test_utils=("test_schema", "test_faketensor")
    )

    def fn(pq, pk):
        return effbert.tupe_position_bias(
            pq,
            pk,
            scale=0.25,
            rel_table=args["rel_table"],
            rel_buckets=args["rel_buckets"],
            cls_row=args["cls_row"],
            cls_col=args["cls_col"],
            backend="triton",
        )

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    pq = args["pos_q"].clone().requires_grad_()
    out = compiled(pq, args["pos_k"])
    out.sum().backward()
    ref_pq = args["pos_q"].double().requires_grad_()
    ref = reference.tupe_position_bias(
        ref_pq,
        args["pos_k"].double(),
        scale=0.25,
        rel_table=args["rel_table"].double(),
        rel_buckets=args["rel_buckets"],
        cls_row=args["cls_row"].double(),
        cls_col=args["cls_col"].double(),
    )
    ref.sum().backward()
    assert_close(out, ref)
    assert_close(pq.grad, ref_pq.grad, rtol=FP32_RTOL * 4, what="d pos_q")


def test_bad_inputs_name_the_argument():
    a = make_inputs(6, 2, 8, rel=True, cls=True, dtype=torch.float32)
    pq, pk = a["pos_q"], a["pos_k"]
    with pytest.raises(ValueError, match="pos_q must have 3 dimensions"):
        effbert.tupe_position_bias(pq[0], pk, scale=1.0)
    with pytest.raises(ValueError, match="pos_k must have pos_q's shape"):
        effbert.tupe_position_bias(pq, pk[:5], scale=1.0)
    with pytest.raises(TypeError, match="pos_k must have dtype"):
        effbert.tupe_position_bias(pq, pk.double(), scale=1.0)
    with pytest.raises(ValueError, match="scale must be a finite float"):
        effbert.tupe_position_bias(pq, pk, scale=float("nan"))
    with pytest.raises(ValueError, match="rel_table and rel_buckets must be given together"):
        effbert.tupe_position_bias(pq, pk, scale=1.0, rel_table=a["rel_table"])
    with pytest.raises(ValueError, match="rel_buckets must index"):
        effbert.tupe_position_bias(
            pq, pk, scale=1.0, rel_table=a["rel_table"][:4], rel_buckets=a["rel_buckets"]
        )
    with pytest.raises(ValueError, match="rel_buckets must be \\[N, N\\]"):
        effbert.tupe_position_bias(
            pq, pk, scale=1.0, rel_table=a["rel_table"], rel_buckets=a["rel_buckets"][:3]
        )
    with pytest.raises(ValueError, match="cls_row must be \\[H=2\\]"):
        effbert.tupe_position_bias(
            pq, pk, scale=1.0, cls_row=a["cls_row"][:1], cls_col=a["cls_col"]
        )
    with pytest.raises(ValueError, match="num_buckets must be an even int"):
        effbert.t5_relative_buckets(8, num_buckets=7)
    with pytest.raises(BackendNotSupportedError, match="no cuda kernel"):
        effbert.tupe_position_bias(pq, pk, scale=1.0, backend="cuda")


@pytest.mark.gpu
def test_gpu_bert_size_bf16_with_every_term():
    args64 = make_inputs(512, 12, 64, rel=True, cls=True)
    ref = reference.tupe_position_bias(**args64, scale=0.125)
    low = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in args64.items()}
    eager = reference.tupe_position_bias(**low, scale=0.125)
    assert_close(
        effbert.tupe_position_bias(**low, scale=0.125, backend="triton"), ref, lowp_eager=eager
    )


def test_forward_kernel_reads_only_inside_each_input(seeded):
    """Below the op's checks (the kernel launcher itself), with pos_k holding fewer positions than pos_q (its rows
    past them NaN in memory) and cls_row/cls_col holding fewer heads: each load is masked by its own tensor's
    extents, as if those were zero-padded."""
    from effbert.kernels import position_bias as kernels

    n, h, dh = 6, 2, 16
    pos_q = torch.randn(n, h, dh, device=DEVICE)
    store = torch.full((n, h, dh), float("nan"), device=DEVICE)
    store[:4] = torch.randn(4, h, dh, device=DEVICE)
    cls_store = torch.tensor([0.5, float("nan")], device=DEVICE)
    rel = torch.randn(32, h, device=DEVICE)
    buckets = effbert.t5_relative_buckets(n, device=DEVICE)
    got = torch.full((h, n, n), float("nan"), device=DEVICE)
    kernels.position_bias_forward(
        pos_q, store[:4], rel, buckets, cls_store[:1], cls_store[:1], got, 0.3
    )
    padded = torch.cat([store[:4], torch.zeros(2, h, dh, device=DEVICE)])
    cls = torch.tensor([0.5, 0.0], device=DEVICE)
    want = reference.tupe_position_bias(
        pos_q, padded, scale=0.3, rel_table=rel, rel_buckets=buckets, cls_row=cls, cls_col=cls
    )
    assert_close(got, want)
