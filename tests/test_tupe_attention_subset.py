"""``tupe_attention_varlen_subset`` (queries a subset of the tokens, keys and values all of them: token-level early
exit) against the float64 reference, on every backend that runs here; edge cases and bad arguments."""

import pytest
import torch

import effbert
from effbert import _ext, reference

from helpers import FP32_RTOL, assert_close

ON_GPU = torch.cuda.is_available()
KDEV = "cuda" if ON_GPU else "cpu"  # where the Triton case runs (the interpreter on a CPU)
H, D = 2, 16


def _backends():
    cases = [pytest.param("eager", "cpu", torch.float64, id="eager-f64")]
    if _ext.load("_C")[0] is not None:
        cases.append(pytest.param("cpu", "cpu", torch.float64, id="cpu-f64"))
        cases.append(pytest.param("cpu", "cpu", torch.float32, id="cpu-f32"))
    cases.append(
        pytest.param(
            "triton",
            KDEV,
            torch.float32,
            id="triton-f32",
            marks=[pytest.mark.gpu] if ON_GPU else [],
        )
    )
    return cases


BACKENDS = _backends()


def _rtol(dtype):
    return 1e-12 if dtype == torch.float64 else FP32_RTOL


def make_case(lens_k, active, *, device="cpu", bias_len=None):
    """Packed float64 inputs: ``lens_k`` tokens per sequence, ``active[b]`` the positions of sequence b's queries.
    Returns (q_full, k, v, cu_k, pos_bias, q, cu_q, position_ids_q): q_full has a query for every token, q its rows
    at the active positions."""
    total = sum(lens_k)
    q_full, k, v = (torch.randn(total, H, D, dtype=torch.float64, device=device) for _ in range(3))
    n = bias_len or max(max(lens_k), 1)
    pos_bias = torch.randn(H, n, n, dtype=torch.float64, device=device)
    cu_k = torch.tensor(
        [0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device
    )
    rows = [int(cu_k[b]) + p for b, ps in enumerate(active) for p in ps]
    q = q_full[torch.tensor(rows, dtype=torch.long, device=device)]
    cu_q = torch.tensor(
        [0] + torch.tensor([len(a) for a in active]).cumsum(0).tolist(),
        dtype=torch.int32,
        device=device,
    )
    position_ids_q = torch.tensor(
        [p for ps in active for p in ps], dtype=torch.int32, device=device
    )
    return q_full, k, v, cu_k, pos_bias, q, cu_q, position_ids_q


def random_active(lens_k, gen):
    """A random subset of each sequence's positions (sorted); sequence 0 keeps all, the last keeps none."""
    out = []
    for b, n in enumerate(lens_k):
        keep = (torch.rand(n, generator=gen) < 0.5).nonzero().squeeze(1).tolist()
        out.append(list(range(n)) if b == 0 else [] if b == len(lens_k) - 1 else keep)
    return out


def run(backend, device, dtype, q, k, v, cu_q, cu_k, pos_ids, pos_bias, **kw):
    args = [t.to(device) for t in (q, k, v)]
    args = [t.to(dtype) for t in args]
    return effbert.tupe_attention_varlen_subset(
        *args,
        cu_q.to(device),
        cu_k.to(device),
        pos_ids.to(device),
        pos_bias.to(device, torch.float32 if dtype != torch.float64 else torch.float64),
        backend=backend,
        **kw,
    )


def test_reference_is_full_attention_at_the_active_rows(seeded):
    """The loop reference against an independent path: the packed (all-queries) reference's output at the active
    rows, since a query's output does not depend on the other queries."""
    lens_k = [1, 2, 3, 7, 31]
    q_full, k, v, cu_k, pos_bias, q, cu_q, pos_ids = make_case(
        lens_k, random_active(lens_k, torch.Generator())
    )
    full = reference.tupe_attention_varlen(q_full, k, v, cu_k, max(lens_k), pos_bias, scale=0.3)
    sub = reference.tupe_attention_varlen_subset(q, k, v, cu_q, cu_k, pos_ids, pos_bias, scale=0.3)
    rows = cu_k[:-1].long().repeat_interleave((cu_q[1:] - cu_q[:-1]).long()) + pos_ids.long()
    torch.testing.assert_close(sub, full[rows], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
@pytest.mark.parametrize(
    "lens_k", [[1, 2, 3, 7, 31], [31, 7], [1]], ids=["odd", "two", "one-token"]
)
def test_against_reference(backend, device, dtype, lens_k, seeded):
    gen = torch.Generator().manual_seed(seeded)
    _, k, v, cu_k, pos_bias, q, cu_q, pos_ids = make_case(
        lens_k, random_active(lens_k, gen) if len(lens_k) > 1 else [[0]]
    )
    ref = reference.tupe_attention_varlen_subset(q, k, v, cu_q, cu_k, pos_ids, pos_bias, scale=0.2)
    out = run(backend, device, dtype, q, k, v, cu_q, cu_k, pos_ids, pos_bias, scale=0.2)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, rtol=_rtol(dtype))


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_all_queries_active_is_tupe_attention_varlen(backend, device, dtype, seeded):
    lens_k = [1, 2, 3, 7, 31]
    q_full, k, v, cu_k, pos_bias, *_ = make_case(lens_k, [[] for _ in lens_k])
    pos_ids = torch.cat([torch.arange(n) for n in lens_k]).int()
    cast = [t.to(device, dtype) for t in (q_full, k, v)]
    bias = pos_bias.to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    full = effbert.tupe_attention_varlen(*cast, cu_k.to(device), max(lens_k), bias, backend=backend)
    sub = effbert.tupe_attention_varlen_subset(
        *cast, cu_k.to(device), cu_k.to(device), pos_ids.to(device), bias, backend=backend
    )
    assert_close(sub, full.double(), rtol=_rtol(dtype) / 10)


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_one_query_per_sequence_and_sequences_without_queries(backend, device, dtype, seeded):
    lens_k = [3, 7, 1, 31, 2]
    for active in ([[2], [6], [0], [17], [1]], [[], [0, 6], [], [], [1]], [[] for _ in lens_k]):
        _, k, v, cu_k, pos_bias, q, cu_q, pos_ids = make_case(lens_k, active)
        ref = reference.tupe_attention_varlen_subset(q, k, v, cu_q, cu_k, pos_ids, pos_bias)
        out = run(backend, device, dtype, q, k, v, cu_q, cu_k, pos_ids, pos_bias)
        assert out.shape == (sum(map(len, active)), H, D)
        if out.numel():
            assert_close(out, ref, rtol=_rtol(dtype))


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_strided_bias_view_and_repeated_positions(backend, device, dtype, seeded):
    """A view of a larger cached table (bias rows longer than any sequence); two queries at one position."""
    lens_k = [7, 3]
    table = torch.randn(H, 40, 40, dtype=torch.float64)
    _, k, v, cu_k, _, q, cu_q, pos_ids = make_case(lens_k, [[4, 4, 0], [2]])
    view = table[:, 3:, 5:]
    ref = reference.tupe_attention_varlen_subset(q, k, v, cu_q, cu_k, pos_ids, view)
    out = run(
        backend, device, dtype, q, k, v, cu_q, cu_k, pos_ids, view, max_seqlen_q=5, max_seqlen_k=9
    )
    assert_close(out, ref, rtol=_rtol(dtype))


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 3], ids=["negative", "past-the-keys"])
def test_position_out_of_range_is_refused(backend, device, dtype, bad):
    _, k, v, cu_k, pos_bias, q, cu_q, pos_ids = make_case([7, 3], [[1, 5], [0, 2]])
    pos_ids[3] = bad  # sequence 1 has 3 keys, though the table has 7 rows
    with pytest.raises(
        ValueError, match=r"position_ids_q must be in \[0, that sequence's key count\): query 3"
    ):
        run(backend, device, dtype, q, k, v, cu_q, cu_k, pos_ids, pos_bias)


def test_unchecked_bad_position_stays_in_bounds():
    """check_offsets=False: the Triton kernel drops a position outside the table (no read out of bounds)."""
    _, k, v, cu_k, pos_bias, q, cu_q, pos_ids = make_case([7, 3], [[1, 5], [0, 2]])
    pos_ids[1] = 10**6
    out = run(
        "triton", KDEV, torch.float32, q, k, v, cu_q, cu_k, pos_ids, pos_bias, check_offsets=False
    )
    assert torch.isfinite(out).all()


def _bad_calls():
    def case(**change):
        def make():
            _, k, v, cu_k, pos_bias, q, cu_q, pos_ids = make_case([7, 3], [[1, 5], [0, 2]])
            args = dict(
                q=q,
                k=k,
                v=v,
                cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k,
                position_ids_q=pos_ids,
                pos_bias=pos_bias,
            )
            kw = {}
            for name, fn in change.items():
                if name in args:
                    args[name] = fn(args[name])
                else:
                    kw[name] = fn
            return list(args.values()), kw

        return make

    return [
        (
            "int64 offsets",
            case(cu_seqlens_q=lambda t: t.long()),
            TypeError,
            "cu_seqlens_q must have dtype",
        ),
        ("fewer key sequences", case(cu_seqlens_k=lambda t: t[:2]), ValueError, "same sequences"),
        (
            "offsets short of Tq",
            case(cu_seqlens_q=lambda t: torch.tensor([0, 2, 3], dtype=torch.int32)),
            ValueError,
            r"cu_seqlens_q must end at q.shape\[0\] = 4",
        ),
        (
            "decreasing key offsets",
            case(cu_seqlens_k=lambda t: torch.tensor([0, 5, 4], dtype=torch.int32)),
            ValueError,
            "cu_seqlens_k must start at 0 and never decrease",
        ),
        ("k of other heads", case(k=lambda t: t[:, :1]), ValueError, "k and v must be"),
        ("v of another dtype", case(v=lambda t: t.float()), TypeError, "v must have dtype"),
        (
            "positions too short",
            case(position_ids_q=lambda t: t[:3]),
            ValueError,
            r"position_ids_q must be \[Tq\]",
        ),
        (
            "float positions",
            case(position_ids_q=lambda t: t.float()),
            TypeError,
            "position_ids_q must have dtype",
        ),
        (
            "pos_bias too small",
            case(pos_bias=lambda t: t[:, :5, :5]),
            ValueError,
            "pos_bias must be at least",
        ),
        (
            "max_seqlen_k too small",
            case(max_seqlen_k=6),
            ValueError,
            "max_seqlen_k must be >= the longest",
        ),
        ("max_seqlen_q negative", case(max_seqlen_q=-1), ValueError, "max_seqlen_q must be an int"),
        ("scale inf", case(scale=float("inf")), ValueError, "scale must be"),
        ("backend", case(backend="gpu"), ValueError, "backend must be"),
        ("check_offsets", case(check_offsets=1), TypeError, "check_offsets must be a bool"),
    ]


@pytest.mark.parametrize("what,make,exc,pattern", [pytest.param(*c, id=c[0]) for c in _bad_calls()])
def test_bad_arguments_are_named(what, make, exc, pattern):
    args, kw = make()
    with pytest.raises(exc, match=pattern):
        effbert.tupe_attention_varlen_subset(*args, backend=kw.pop("backend", "eager"), **kw)


def test_forward_only():
    _, k, v, cu_k, pos_bias, q, cu_q, pos_ids = make_case([7, 3], [[1, 5], [0, 2]])
    with pytest.raises(RuntimeError, match="forward only"):
        effbert.tupe_attention_varlen_subset(
            q.requires_grad_(), k, v, cu_q, cu_k, pos_ids, pos_bias
        )
    with torch.no_grad():
        effbert.tupe_attention_varlen_subset(q, k, v, cu_q, cu_k, pos_ids, pos_bias)


def test_torch_compile_fullgraph(seeded):
    """Traced with the sizes given: the registered op runs, checks included, in the graph."""
    _, k, v, cu_k, pos_bias, q, cu_q, pos_ids = make_case([7, 3], [[1, 5], [0, 2]])

    def fn(q_, k_, v_, cq, ck, p, b):
        return effbert.tupe_attention_varlen_subset(
            q_, k_, v_, cq, ck, p, b, max_seqlen_q=2, max_seqlen_k=7, backend="eager"
        )

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ref = reference.tupe_attention_varlen_subset(q, k, v, cu_q, cu_k, pos_ids, pos_bias)
    torch.testing.assert_close(compiled(q, k, v, cu_q, cu_k, pos_ids, pos_bias), ref)
    bad = pos_ids.clone()
    bad[0] = 7
    with pytest.raises(ValueError, match="position_ids_q must be in"):
        compiled(q, k, v, cu_q, cu_k, bad, pos_bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision(dtype, seeded):
    """fp16/bf16 Triton on the GPU: within 2x the eager reference's error in the same precision."""
    lens_k = [1, 2, 3, 7, 31, 129]
    _, k, v, cu_k, pos_bias, q, cu_q, pos_ids = make_case(
        lens_k, random_active(lens_k, torch.Generator()), device="cuda"
    )
    ref = reference.tupe_attention_varlen_subset(q, k, v, cu_q, cu_k, pos_ids, pos_bias)
    low = [t.to(dtype) for t in (q, k, v)]
    lowp = reference.tupe_attention_varlen_subset(*low, cu_q, cu_k, pos_ids, pos_bias.float())
    out = effbert.tupe_attention_varlen_subset(
        *low, cu_q, cu_k, pos_ids, pos_bias.float(), backend="triton"
    )
    assert_close(out, ref, lowp_eager=lowp)


def test_backends_that_cannot_serve_say_why():
    from effbert.ops import BackendNotSupportedError

    _, k, v, cu_k, pos_bias, q, cu_q, pos_ids = make_case([7, 3], [[1, 5], [0, 2]])
    with pytest.raises(
        BackendNotSupportedError, match="no cuda kernel for tupe_attention_varlen_subset"
    ):
        effbert.tupe_attention_varlen_subset(q, k, v, cu_q, cu_k, pos_ids, pos_bias, backend="cuda")
    half = [t.half() for t in (q, k, v)]
    with pytest.raises(BackendNotSupportedError, match="the CPU path takes fp32/fp64"):
        effbert.tupe_attention_varlen_subset(*half, cu_q, cu_k, pos_ids, pos_bias, backend="cpu")
