"""TUPE attention against the float64 reference: forward, every gradient, padding, dropout, varlen, determinism,
the positional term end to end, torch.library and torch.compile, bad inputs."""

import pytest
import torch

import effbert
from effbert import reference
from effbert.ops import BackendNotSupportedError
from effbert.ops import attention as attention_ops
from effbert.reference.tupe_attention import pad_packed, unpad

from helpers import FP32_RTOL, assert_close

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
GRAD_RTOL = FP32_RTOL * 4  # gradients sum longer chains of products than the forward


def make_qkv(b, n, h, d, dtype=torch.float64):
    return [torch.randn(b, n, h, d, dtype=dtype, device=DEVICE) for _ in range(3)]


def padding_mask(b, n, *, dead_row=False):
    """Random lengths per sequence (at least 1), and optionally a sequence with no valid token at all."""
    lengths = torch.randint(1, n + 1, (b,))
    lengths[0] = (
        n  # one full sequence: with every length 1 the q and k gradients would all be exactly 0
    )
    mask = torch.arange(n)[None, :] < lengths[:, None]
    if dead_row and b > 1:
        mask[-1] = False
    return mask.to(DEVICE)


def run(fn, inputs, grad):
    """Output and input gradients of fn(*inputs) under grad (inputs are leaves requiring grad)."""
    out = fn(*inputs)
    out.backward(grad)
    return out, [t.grad for t in inputs]


def check_against_reference(
    backend, b, n, h, d, *, mask=None, bias=True, dtype=torch.float32, scale=None
):
    q, k, v = make_qkv(b, n, h, d)
    pos = torch.randn(h, n, n, dtype=torch.float64, device=DEVICE) if bias else None
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v)] + (
        [pos.clone().requires_grad_()] if bias else []
    )
    grad = torch.randn(b, n, h, d, dtype=torch.float64, device=DEVICE)

    def ref_fn(q_, k_, v_, p_=None):
        return reference.tupe_attention(q_, k_, v_, p_, attention_mask=mask, scale=scale)

    ref, ref_grads = run(ref_fn, leaves64, grad)
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    if bias:
        leaves[3] = leaves64[3].detach().float().requires_grad_()  # the cached table stays float32

    def fn(q_, k_, v_, p_=None):
        return effbert.tupe_attention(
            q_, k_, v_, p_, attention_mask=mask, scale=scale, backend=backend
        )

    out, grads = run(fn, leaves, grad.to(dtype))
    assert out.dtype == dtype and out.shape == (b, n, h, d)
    assert not torch.isnan(out).any()
    if (
        n == 1
    ):  # one key: the output is v, and the logits (so q, k and pos_bias) get a zero gradient
        for name, g in zip("q k pos_bias".split(), grads[:2] + grads[3:]):
            assert g.abs().max() < 1e-5, f"d {name} should be 0 with one key"
        grads, ref_grads = grads[2:3], ref_grads[2:3]
        names = ["v"]
    else:
        names = "q k v pos_bias".split()
    if dtype == torch.float32:
        assert_close(out, ref, what="output")
        for name, g, rg in zip(names, grads, ref_grads):
            assert_close(g, rg, rtol=GRAD_RTOL, what=f"d {name}")
    else:
        low = [t.detach().to(dtype).requires_grad_() for t in leaves64[:3]]
        if bias:
            low.append(leaves64[3].detach().float().requires_grad_())
        eager, eager_grads = run(ref_fn, low, grad.to(dtype))
        assert_close(out, ref, lowp_eager=eager, what="output")
        for name, g, rg, eg in zip(
            names, grads, ref_grads, eager_grads[2:3] if n == 1 else eager_grads
        ):
            assert_close(g, rg, lowp_eager=eg, rtol=GRAD_RTOL, what=f"d {name}")
    if mask is not None:  # padded queries output exactly 0 and send no gradient back
        assert (out[~mask] == 0).all()
        assert n == 1 or (grads[0][~mask] == 0).all()
    return out, grads


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("n", [1, 7, 64, 97, 129])
@pytest.mark.parametrize("padded", [False, True])
def test_forward_and_gradients_match_float64(backend, n, padded, seeded):
    if not ON_GPU and backend == "triton" and n == 129 and padded:
        pytest.skip("interpreter time: N=129 runs unpadded")
    b, h, d = 2, 2, 16
    mask = padding_mask(b, n) if padded else None
    check_against_reference(backend, b, n, h, d, mask=mask)


@pytest.mark.parametrize("d", [16, 32, 64, 128])
def test_head_dims(d, seeded):
    check_against_reference("triton", 1, 19, 1, d, mask=padding_mask(1, 19), scale=(2 * d) ** -0.5)


def test_no_bias_and_a_query_with_no_valid_key(seeded):
    mask = padding_mask(3, 23, dead_row=True)
    out, grads = check_against_reference("triton", 3, 23, 2, 16, mask=mask, bias=False)
    assert (out[-1] == 0).all() and not torch.isnan(grads[1]).any()


def test_fp16_within_twice_eager(seeded):
    check_against_reference("triton", 2, 41, 2, 32, mask=padding_mask(2, 41), dtype=torch.float16)


def test_huge_logits_and_minus_inf_bias_stay_finite(seeded):
    b, n, h, d = 2, 21, 2, 16
    q, k, v = (t * 30 for t in make_qkv(b, n, h, d))
    pos = torch.randn(h, n, n, dtype=torch.float64, device=DEVICE) * 1e3
    pos[:, :, 5] = float("-inf")  # a key nobody may attend to
    ref = reference.tupe_attention(q, k, v, pos)
    out = effbert.tupe_attention(q.float(), k.float(), v.float(), pos.float(), backend="triton")
    assert_close(out, ref)


def test_strided_views_of_a_fused_qkv_and_of_a_larger_cached_table(seeded):
    b, n, h, d = 2, 13, 2, 16
    qkv = torch.randn(b, n, 3, h, d, device=DEVICE)
    q, k, v = qkv.unbind(2)
    table = torch.randn(h, 40, 40, device=DEVICE)
    pos = table[:, :n, :n]  # rows of the cache are 40 wide
    ref = reference.tupe_attention(q.double(), k.double(), v.double(), pos.double())
    assert_close(effbert.tupe_attention(q, k, v, pos, backend="triton"), ref)


def test_bias_gradient_sums_the_batch_and_is_bitwise_reproducible(seeded):
    b, n, h, d = 5, 33, 2, 16  # odd batch: the two backward groups hold 3 and 2 elements
    q, k, v = (t.float() for t in make_qkv(b, n, h, d))
    pos = torch.randn(h, n, n, device=DEVICE)
    mask = padding_mask(b, n)
    grad = torch.randn(b, n, h, d, device=DEVICE)
    results = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, pos)]
        out = effbert.tupe_attention(
            *leaves, attention_mask=mask, deterministic=True, backend="triton"
        )
        out.backward(grad)
        results.append([out] + [t.grad for t in leaves])
    for first, second in zip(*results):
        assert torch.equal(first, second)
    # d pos_bias is the sum over the batch of each element's logit gradient
    per_element = []
    for i in range(b):
        p = pos.double().clone().requires_grad_()
        o = reference.tupe_attention(
            q[i : i + 1].double(),
            k[i : i + 1].double(),
            v[i : i + 1].double(),
            p,
            attention_mask=mask[i : i + 1],
        )
        o.backward(grad[i : i + 1].double())
        per_element.append(p.grad)
    assert_close(results[0][4], torch.stack(per_element).sum(0), rtol=GRAD_RTOL, what="d pos_bias")


@pytest.mark.parametrize("padded", [False, True])
def test_dropout_matches_the_reference_fed_the_same_mask(padded, seeded):
    b, n, h, d, p = 2, 37, 2, 16, 0.3
    q, k, v = make_qkv(b, n, h, d)
    pos = torch.randn(h, n, n, dtype=torch.float64, device=DEVICE)
    mask = padding_mask(b, n) if padded else None
    grad = torch.randn(b, n, h, d, dtype=torch.float64, device=DEVICE)
    torch.manual_seed(1234)
    leaves = [t.float().requires_grad_() for t in (q, k, v, pos)]
    out = effbert.tupe_attention(*leaves, attention_mask=mask, dropout_p=p, backend="triton")
    out.backward(grad.float())
    torch.manual_seed(1234)
    seed = attention_ops._draw_seed(torch.device(DEVICE))  # the same draw the call made
    keep = attention_ops.dropout_keep_mask(seed, b, h, n, p)
    assert 0.6 < keep.float().mean() < 0.8  # about 1 - p of the entries kept
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v, pos)]
    ref = reference.tupe_attention(*leaves64, attention_mask=mask, dropout_p=p, dropout_mask=keep)
    ref.backward(grad)
    assert_close(out, ref)
    for name, t, t64 in zip("q k v pos_bias".split(), leaves, leaves64):
        assert_close(t.grad, t64.grad, rtol=GRAD_RTOL, what=f"d {name}")
    # torch.manual_seed reproduces the whole run
    torch.manual_seed(1234)
    again = effbert.tupe_attention(
        *[t.detach() for t in leaves], attention_mask=mask, dropout_p=p, backend="triton"
    )
    assert torch.equal(again, out.detach())


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_varlen_equals_padded_on_the_real_tokens(backend, seeded):
    lengths = [5, 1, 17, 9]
    h, d, s = 2, 16, 20
    cu = torch.tensor(
        [0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE
    )
    total = int(cu[-1])
    q, k, v = (torch.randn(total, h, d, device=DEVICE) for _ in range(3))
    pos = torch.randn(h, s, s, device=DEVICE)  # a table longer than the longest sequence
    grad = torch.randn(total, h, d, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pos)]
    out = effbert.tupe_attention_varlen(*leaves[:3], cu, max(lengths), leaves[3], backend=backend)
    out.backward(grad)
    # the padded op on the same tokens
    padded = [pad_packed(t.double(), cu, max(lengths))[0].requires_grad_() for t in (q, k, v)]
    mask = pad_packed(q, cu, max(lengths))[1]
    p64 = pos.double().clone().requires_grad_()
    ref_pad = reference.tupe_attention(
        *padded, p64[:, : max(lengths), : max(lengths)], attention_mask=mask
    )
    ref_pad.backward(pad_packed(grad.double(), cu, max(lengths))[0])
    assert_close(out, unpad(ref_pad, cu))
    for name, t, p in zip("qkv", leaves, padded):
        assert_close(t.grad, unpad(p.grad, cu), rtol=GRAD_RTOL, what=f"d {name}")
    assert_close(leaves[3].grad, p64.grad, rtol=GRAD_RTOL, what="d pos_bias")
    assert (leaves[3].grad[:, max(lengths) :, :] == 0).all()


def test_positional_term_end_to_end_to_its_parameters(seeded):
    """P from tupe_position_bias fed to tupe_attention: gradients reach pos_q, pos_k, the relative table and the
    [CLS] scalars, summed over the batch."""
    b, n, h, d = 2, 29, 2, 16
    q, k, v = make_qkv(b, n, h, d)
    params64 = {
        "pos_q": torch.randn(n, h, d, dtype=torch.float64, device=DEVICE),
        "pos_k": torch.randn(n, h, d, dtype=torch.float64, device=DEVICE),
        "rel_table": torch.randn(32, h, dtype=torch.float64, device=DEVICE),
        "cls_row": torch.randn(h, dtype=torch.float64, device=DEVICE),
        "cls_col": torch.randn(h, dtype=torch.float64, device=DEVICE),
    }
    buckets = effbert.t5_relative_buckets(n, device=DEVICE)
    mask = padding_mask(b, n)
    grad = torch.randn(b, n, h, d, dtype=torch.float64, device=DEVICE)

    def run_with(backend, params, dtype):
        pos = effbert.tupe_position_bias(
            params["pos_q"],
            params["pos_k"],
            scale=(2 * d) ** -0.5,
            rel_table=params["rel_table"],
            rel_buckets=buckets,
            cls_row=params["cls_row"],
            cls_col=params["cls_col"],
            backend=backend,
        )
        out = effbert.tupe_attention(
            q.to(dtype),
            k.to(dtype),
            v.to(dtype),
            pos,
            attention_mask=mask,
            scale=(2 * d) ** -0.5,
            backend=backend,
        )
        out.backward(grad.to(dtype))
        return out

    ref_params = {k_: t.clone().requires_grad_() for k_, t in params64.items()}
    ref = run_with("eager", ref_params, torch.float64)
    params = {k_: t.float().requires_grad_() for k_, t in params64.items()}
    out = run_with("triton", params, torch.float32)
    assert_close(out, ref)
    for name in params:
        if name == "cls_row":  # a constant added to a whole softmax row: its gradient is exactly 0
            assert params[name].grad.abs().max() < 1e-5
            continue
        assert_close(params[name].grad, ref_params[name].grad, rtol=GRAD_RTOL, what=f"d {name}")


def test_gradcheck_float64_eager_and_triton():
    b, n, h, d = 1, 5, 1, 16
    q, k, v = (t.requires_grad_() for t in make_qkv(b, n, h, d))
    pos = torch.randn(h, n, n, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = torch.tensor([[True, True, True, False, True]], device=DEVICE)
    # float64 kernels run under the interpreter only; they keep the softmax statistics in float32, so the finite
    # differences take a larger step and a tolerance above float32 rounding
    tolerances = {"eager": dict(atol=1e-6), "triton": dict(eps=1e-3, atol=1e-4, rtol=1e-3)}
    for backend in ["eager"] + ([] if ON_GPU else ["triton"]):

        def fn(q_, k_, v_, p_, backend=backend):
            return effbert.tupe_attention(q_, k_, v_, p_, attention_mask=mask, backend=backend)

        assert torch.autograd.gradcheck(fn, (q, k, v, pos), **tolerances[backend])


def test_opcheck_and_compile_fullgraph(seeded):
    b, n, h, d = 2, 9, 2, 16
    q, k, v = (t.float() for t in make_qkv(b, n, h, d))
    pos = torch.randn(h, n, n, device=DEVICE)
    mask = padding_mask(b, n)
    torch.library.opcheck(
        torch.ops.effbert.tupe_attention,
        (q, k, v, pos, mask, None, n, 0.25, 0.0, None),
        test_utils=("test_schema", "test_faketensor"),
    )

    def fn(q_, k_, v_, p_):
        return effbert.tupe_attention(q_, k_, v_, p_, attention_mask=mask, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pos)]
    out = compiled(*leaves)
    out.sum().backward()
    leaves64 = [t.double().requires_grad_() for t in (q, k, v, pos)]
    ref = reference.tupe_attention(*leaves64, attention_mask=mask)
    ref.sum().backward()
    assert_close(out, ref)
    for t, t64 in zip(leaves, leaves64):
        assert_close(t.grad, t64.grad, rtol=GRAD_RTOL)


def _packed(lengths, extra_rows=0, h=2, d=16):
    cu = torch.tensor(
        [0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE
    )
    total = int(cu[-1]) + extra_rows
    return cu, [torch.randn(total, h, d, device=DEVICE) for _ in range(3)]


BAD_OFFSETS = [  # (cu_seqlens, max_seqlen, message) against 15 packed rows
    ([0, 5, 6, 16], 10, "cu_seqlens must end at most at the packed length 15"),
    ([0, 5, 6, 13, 99], 86, "cu_seqlens must end at most at the packed length 15"),
    ([0, 7, 6, 13], 7, "cu_seqlens must start at 0 and never decrease"),
    ([1, 5, 6, 13], 7, "cu_seqlens must start at 0 and never decrease"),
    ([0, 5, 6, 13], 6, r"max_seqlen must be >= the longest sequence \(7\)"),
]


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_varlen_compiles_with_inductor_and_keeps_its_checks(backend, seeded):
    """torch.compile with inductor (not only aot_eager), forward and backward, packed rows with two trailing rows
    in no sequence (zeros, zero gradient); the compiled function still refuses bad offsets by name."""
    cu, (q, k, v) = _packed([5, 1, 7], extra_rows=2)
    pos = torch.randn(
        2, 90, 90, device=DEVICE
    )  # long enough for every max_seqlen below: only the offsets are bad
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pos)]
    grad = torch.randn_like(q)

    def fn(q_, k_, v_, p_, cu_, max_seqlen):
        return effbert.tupe_attention_varlen(q_, k_, v_, cu_, max_seqlen, p_, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    out = compiled(*leaves, cu, 7)
    out.backward(grad)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, pos)]
    ref = reference.tupe_attention_varlen(*leaves64[:3], cu, 7, leaves64[3])
    ref.backward(grad.double())
    assert (ref[13:] == 0).all()
    assert_close(out, ref)
    for name, t, t64 in zip(["q", "k", "v", "pos_bias"], leaves, leaves64):
        assert_close(t.grad, t64.grad, rtol=GRAD_RTOL, what=f"d {name}")
    assert (out[13:] == 0).all() and all((t.grad[13:] == 0).all() for t in leaves[:3])
    for bad, max_seqlen, message in BAD_OFFSETS:
        with pytest.raises(ValueError, match=message):
            compiled(
                *[t.detach() for t in leaves],
                torch.tensor(bad, dtype=torch.int32, device=DEVICE),
                max_seqlen,
            )


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_varlen_rows_after_the_last_sequence_are_zero(backend, seeded):
    cu, (q, k, v) = _packed([4, 3], extra_rows=3)
    out = effbert.tupe_attention_varlen(q, k, v, cu, 4, backend=backend)
    ref = reference.tupe_attention_varlen(q.double(), k.double(), v.double(), cu, 4)
    assert (out[7:] == 0).all()
    assert_close(out, ref)


@pytest.mark.parametrize("bad,max_seqlen,message", BAD_OFFSETS)
def test_registered_op_checks_the_offsets(bad, max_seqlen, message):
    """torch.ops.effbert.tupe_attention called directly (no public wrapper): bad offsets raise before any kernel
    reads through them (an offset past the packed length used to read and write out of bounds)."""
    _, (q, k, v) = _packed([5, 1, 7], extra_rows=2)
    cu = torch.tensor(bad, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        torch.ops.effbert.tupe_attention(q, k, v, None, None, cu, max_seqlen, 0.25, 0.0, None)
    with pytest.raises(ValueError, match="q, k and v must have one shape"):
        torch.ops.effbert.tupe_attention(q, k[:3], v, None, None, cu, max_seqlen, 0.25, 0.0, None)
    with pytest.raises(ValueError, match="seed must be given"):
        torch.ops.effbert.tupe_attention(q, k, v, None, None, cu, max_seqlen, 0.25, 0.1, None)


def test_backward_op_stays_inside_its_buffers_with_bad_offsets():
    """The backward op bounds packed offsets in the kernels: a sequence whose offsets leave the buffer is skipped
    (zero gradient), the others are unaffected."""
    cu, (q, k, v) = _packed([5, 1, 7])
    out, lse = torch.ops.effbert.tupe_attention(q, k, v, None, None, cu, 7, 0.25, 0.0, None)
    dout = torch.randn_like(q)
    good = torch.ops.effbert.tupe_attention_backward(
        dout, q, k, v, out, lse, None, None, cu, 7, 0.25, 0.0, None, False
    )
    bad = cu.clone()
    bad[2] = 1000  # sequences 1 and 2 now claim rows far past the buffer
    grads = torch.ops.effbert.tupe_attention_backward(
        dout, q, k, v, out, lse, None, None, bad, 7, 0.25, 0.0, None, False
    )
    for g, g_ok in zip(grads[:3], good[:3]):
        assert torch.equal(g[:5], g_ok[:5]) and (g[5:] == 0).all()


def _nan_pattern_case(where, value, b=2, n=9, h=2, d=16):
    q, k, v = (t.float() for t in make_qkv(b, n, h, d))
    pos = torch.randn(h, n, n, device=DEVICE)
    target = {"q": q, "k": k, "bias": pos}[where]
    if where == "bias":
        target[1, 3, 4] = value
    else:
        target[1, 3, 1, 2] = value
    return q, k, v, pos


@pytest.mark.parametrize(
    "where,value",
    [("q", float("nan")), ("k", float("nan")), ("bias", float("nan")), ("bias", float("inf"))],
)
def test_nan_in_gives_nan_out_on_every_backend(where, value):
    """NaN in q, k or the bias (or +inf in the bias) gives NaN, and NaN gradients, where eager does: the "row with
    no valid key gives 0" rule must not swallow a NaN row (the Triton path used to return 0)."""
    q, k, v, pos = _nan_pattern_case(where, value)
    mask = padding_mask(2, 9)
    mask[1, :5] = True  # the poisoned token is real
    results = {}
    for backend in ("eager", "triton"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, pos)]
        out = effbert.tupe_attention(*leaves, attention_mask=mask, backend=backend)
        out.backward(torch.ones_like(out))
        results[backend] = [out] + [t.grad for t in leaves]
    assert torch.isnan(results["eager"][0]).any()
    assert torch.equal(torch.isnan(results["triton"][0]), torch.isnan(results["eager"][0])), (
        "output NaN pattern"
    )
    for name, a, b in zip(
        ["d q", "d k", "d v", "d pos_bias"], results["triton"][1:], results["eager"][1:]
    ):
        # every NaN eager has is NaN here too (the kernels may also give NaN where only a masked pair meets it)
        assert torch.isnan(a)[torch.isnan(b)].all(), f"{name}: a NaN gradient came back finite"
        assert torch.isnan(b).any(), name


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_a_bias_row_of_float32_lowest_is_softmaxed_not_dropped(backend, seeded):
    """transformers' "masked" value (float32's lowest finite) on a whole bias row: the reference softmaxes the row
    (uniform weights); scaling it by log2(e) in the kernel used to overflow to -inf and return 0 for the row."""
    b, n, h, d = 2, 11, 2, 16
    q, k, v = make_qkv(b, n, h, d)
    pos = torch.randn(h, n, n, dtype=torch.float64, device=DEVICE)
    pos[:, 4, :] = torch.finfo(torch.float32).min
    pos[0, 6, :5] = torch.finfo(torch.float32).min  # and part of a row: those keys get no weight
    ref = reference.tupe_attention(q, k, v, pos)
    assert_close(ref[:, 4], v.mean(1))  # uniform over the keys
    out = effbert.tupe_attention(q.float(), k.float(), v.float(), pos.float(), backend=backend)
    assert_close(out, ref)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_values_at_masked_positions_never_reach_real_tokens(backend, value, seeded):
    """inf or NaN in q, k and v at padded positions (and in a bias column only padded keys use): the real tokens'
    outputs and every gradient equal those of clean inputs (an inf in v at a padded key used to make every real
    output NaN on eager and Triton)."""
    b, n, h, d = 2, 13, 2, 16
    q, k, v = make_qkv(b, n, h, d)
    pos = torch.randn(h, n, n, dtype=torch.float64, device=DEVICE)
    mask = padding_mask(b, n)
    mask[:, 10:] = (
        False  # positions 10 and up are padding in every sequence: the bias there is unused
    )
    mask[1, 9:] = False
    grad = torch.randn(b, n, h, d, dtype=torch.float64, device=DEVICE)
    clean = [t.clone().requires_grad_() for t in (q, k, v, pos)]
    ref = reference.tupe_attention(*clean, attention_mask=mask)
    ref.backward(grad)
    dirty = [t.clone() for t in (q, k, v)]
    for t in dirty:
        t[~mask] = value
    dirty_pos = pos.clone()
    dirty_pos[:, :, 11] = value  # a key column only padding uses
    dtype = torch.float64 if backend == "eager" else torch.float32
    leaves = [t.to(dtype).requires_grad_() for t in dirty + [dirty_pos]]
    out = effbert.tupe_attention(*leaves, attention_mask=mask, backend=backend)
    out.backward(grad.to(dtype))
    assert_close(out, ref)
    for name, t, t_ref in zip(["q", "k", "v", "pos_bias"], leaves, clean):
        if name == "pos_bias":  # the bias is shared: entries no batch element uses get 0 in both
            assert_close(t.grad, t_ref.grad, rtol=GRAD_RTOL, what="d pos_bias")
        else:
            assert_close(t.grad, t_ref.grad, rtol=GRAD_RTOL, what=f"d {name}")


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_empty_sizes_give_empty_results_on_every_backend(backend):
    """N = 0 and B = 0 (padded), and zero packed tokens: empty outputs and gradients, never an internal error (the
    eager reference used to fail on N = 0)."""
    for shape in ((2, 0, 2, 16), (0, 5, 2, 16)):
        q = torch.randn(*shape, device=DEVICE, requires_grad=True)
        pos = torch.randn(2, shape[1], shape[1], device=DEVICE, requires_grad=True)
        out = effbert.tupe_attention(q, q, q, pos, backend=backend)
        out.sum().backward()
        assert out.shape == shape and q.grad.shape == shape and (pos.grad == 0).all()
    q = torch.randn(0, 2, 16, device=DEVICE, requires_grad=True)
    out = effbert.tupe_attention_varlen(
        q, q, q, torch.zeros(3, dtype=torch.int32, device=DEVICE), 1, backend=backend
    )
    out.sum().backward()
    assert out.shape == (0, 2, 16) and q.grad.shape == (0, 2, 16)


def test_bad_inputs_name_the_argument():
    q, k, v = (t.float() for t in make_qkv(2, 8, 2, 16))
    pos = torch.randn(2, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        effbert.tupe_attention(q[0], k, v)
    with pytest.raises(ValueError, match="q, k and v must have one shape"):
        effbert.tupe_attention(q, k[:, :7], v)
    with pytest.raises(TypeError, match="q, k and v must have one dtype"):
        effbert.tupe_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q must have dtype"):
        effbert.tupe_attention(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="pos_bias must be"):
        effbert.tupe_attention(q, k, v, pos[:1])
    with pytest.raises(ValueError, match="pos_bias must be"):
        effbert.tupe_attention(q, k, v, pos[:, :7, :7])
    with pytest.raises(TypeError, match="attention_mask must be bool or 0/1 integers"):
        effbert.tupe_attention(q, k, v, attention_mask=torch.ones(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="attention_mask must hold 0/1 values"):
        effbert.tupe_attention(q, k, v, attention_mask=torch.full((2, 8), 2, device=DEVICE))
    with pytest.raises(ValueError, match="attention_mask must be \\[B, N\\]"):
        effbert.tupe_attention(
            q, k, v, attention_mask=torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
        )
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout_p must be in \\[0, 1\\)"):
            effbert.tupe_attention(q, k, v, dropout_p=p)
    with pytest.raises(BackendNotSupportedError, match="head dims"):
        q24 = torch.randn(2, 8, 2, 24, device=DEVICE)
        effbert.tupe_attention(q24, q24, q24, backend="triton")
    flat = q.reshape(16, 2, 16)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="never decrease"):
        effbert.tupe_attention_varlen(
            flat, flat, flat, torch.tensor([0, 9, 8, 16], dtype=torch.int32, device=DEVICE), 9
        )
    with pytest.raises(ValueError, match="must end at most at the packed length 16"):
        effbert.tupe_attention_varlen(
            flat, flat, flat, torch.tensor([0, 8, 17], dtype=torch.int32, device=DEVICE), 9
        )
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        effbert.tupe_attention_varlen(flat, flat, flat, cu.long(), 8)
    with pytest.raises(ValueError, match="max_seqlen must be >= the longest sequence"):
        effbert.tupe_attention_varlen(flat, flat, flat, cu, 7)
    with pytest.raises(ValueError, match="backend must be one of"):
        effbert.tupe_attention(q, k, v, backend="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,n", [(4, 512), (16, 128), (3, 200)])
def test_gpu_bert_shapes_low_precision(dtype, b, n):
    check_against_reference(
        "triton", b, n, 12, 64, mask=padding_mask(b, n), dtype=dtype, scale=128**-0.5
    )


@pytest.mark.gpu
def test_gpu_fp32_and_dropout_statistics():
    check_against_reference("triton", 2, 257, 4, 64, mask=padding_mask(2, 257))
    q = torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.bfloat16)
    kept = effbert.tupe_attention(q, q, torch.ones_like(q), dropout_p=0.25)
    # with v = 1 each output is the kept probability mass rescaled: its mean over many rows is 1
    assert abs(kept.float().mean().item() - 1.0) < 0.02


def test_modules_fused_equal_eager_and_the_cache_follows_the_parameters(seeded):
    from effbert.nn import TupePositionBias, TupeSelfAttention

    hidden, heads, n, b = 32, 2, 11, 2
    pos_fused = TupePositionBias(hidden, heads, max_positions=16, backend="triton").to(DEVICE)
    with torch.no_grad():  # non-zero relative table and [CLS] scalars, so every term is exercised
        for p in (pos_fused.rel_table, pos_fused.cls_row, pos_fused.cls_col):
            p.normal_()
    attn_fused = TupeSelfAttention(hidden, heads, backend="triton").to(DEVICE)
    pos_eager = TupePositionBias(hidden, heads, max_positions=16, backend="eager").to(DEVICE)
    attn_eager = TupeSelfAttention(hidden, heads, backend="eager").to(DEVICE)
    pos_eager.load_state_dict(pos_fused.state_dict())
    attn_eager.load_state_dict(attn_fused.state_dict())
    x = torch.randn(b, n, hidden, device=DEVICE)
    mask = padding_mask(b, n)
    outs = []
    for pos_mod, attn_mod in ((pos_fused, attn_fused), (pos_eager, attn_eager)):
        y = attn_mod(x, pos_mod(n), attention_mask=mask)
        y.square().sum().backward()
        named = list(pos_mod.named_parameters()) + list(attn_mod.named_parameters())
        outs.append((y, {name: p.grad for name, p in named}))
    assert_close(outs[0][0], outs[1][0].double())
    for name, g_fused in outs[0][1].items():
        if (
            name == "cls_row"
        ):  # exactly 0 in exact arithmetic: a constant added to a whole softmax row
            assert g_fused.abs().max() < 1e-4
            continue
        assert_close(g_fused, outs[1][1][name].double(), rtol=GRAD_RTOL * 10, what=f"d {name}")
    with pytest.raises(ValueError, match="seq_len must be an int in \\[1, 16\\]"):
        pos_fused(17)


def test_position_bias_cache_is_opt_in_and_cannot_be_corrupted(seeded):
    """Caching P across calls is off by default (a .data edit is invisible to torch's version counters); with
    cache=True a caller's in-place edit of the returned P never reaches later calls, and an in-place edit, a
    replacement or a load_state_dict of any parameter drops the cache."""
    from effbert.nn import TupePositionBias

    n = 9
    mod = TupePositionBias(32, 2, max_positions=16, backend="eager").to(DEVICE).eval()
    with torch.no_grad():
        for p in (mod.rel_table, mod.cls_row, mod.cls_col):
            p.normal_()
        first = mod(n)
        mod.query.weight.data.mul_(
            2.0
        )  # not seen by version counters: without a cache it simply takes effect
        assert not torch.equal(mod(n), first)
        assert torch.equal(mod(n), mod.compute(n))

    cached = (
        TupePositionBias(32, 2, max_positions=16, backend="eager", cache=True).to(DEVICE).eval()
    )
    with torch.no_grad():
        truth = cached.compute(n)
        p1 = cached(n)
        p1.fill_(123.0)  # a caller's in-place edit of the returned tensor
        assert torch.equal(cached(n), truth)
        cached.cls_row.add_(1.0)  # in place
        assert torch.allclose(cached(n)[:, 0, :], truth[:, 0, :] + 1.0)
        other = TupePositionBias(32, 2, max_positions=16, backend="eager").to(DEVICE)
        cached.load_state_dict(other.state_dict())  # loading
        assert torch.equal(cached(n), other.compute(n))
        cached.key.weight = torch.nn.Parameter(torch.randn_like(cached.key.weight))  # replaced
        assert torch.equal(cached(n), cached.compute(n))
        cached.query.weight.data.mul_(3.0)
        cached.clear_cache()  # the documented step after a .data edit
        assert torch.equal(cached(n), cached.compute(n))
    with pytest.raises(TypeError, match="cache must be a bool"):
        TupePositionBias(32, 2, cache="yes")


# --- the CPU backend: PyTorch's fused CPU attention per sequence (effbert/ops/_attention_cpu.py) --


def cpu_case(b, n, h, d, mask, *, bias=True, dtype=torch.float32, poison=False, scale=None):
    """The cpu backend's output and gradients (q, k, v, pos_bias) against the float64 reference, on CPU tensors."""
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(3))
    pos = torch.randn(h, n, n, dtype=torch.float64) if bias else None
    grad = torch.randn(b, n, h, d, dtype=torch.float64)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)] + (
        [pos.clone().requires_grad_()] if bias else []
    )
    ref = reference.tupe_attention(
        *ref_leaves[:3], ref_leaves[3] if bias else None, attention_mask=mask, scale=scale
    )
    ref.backward(grad)
    if (
        poison
    ):  # padded keys' and queries' values must never reach a real token, forwards or backwards
        for t, bad in zip((q, k, v), (float("nan"), float("inf"), float("inf"))):
            t[~mask] = bad
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)] + (
        [pos.to(dtype).requires_grad_()] if bias else []
    )
    out = effbert.tupe_attention(
        *leaves[:3], leaves[3] if bias else None, attention_mask=mask, scale=scale, backend="cpu"
    )
    out.backward(grad.to(dtype))
    assert out.dtype == dtype and out.shape == (b, n, h, d)
    rtol = FP32_RTOL if dtype == torch.float32 else 1e-12
    assert_close(out, ref, rtol=rtol, what="cpu output")
    for name, t, r in zip("q k v pos_bias".split(), leaves, ref_leaves):
        if n == 1 and name != "v":  # one key: these gradients are exactly 0 in exact arithmetic
            assert t.grad.abs().max() < 1e-5
            continue
        assert_close(t.grad, r.grad, rtol=rtol * 4, what=f"cpu d {name}")
    if mask is not None:
        assert (out[~mask] == 0).all() and (leaves[0].grad[~mask] == 0).all()
    return out, leaves


@pytest.mark.parametrize("n", [1, 7, 64, 97, 129])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cpu_backend_forward_and_gradients_match_float64(n, padded, dtype, seeded):
    b = 4
    mask = None
    if padded:
        lengths = torch.tensor(
            [n, max(1, n // 2), max(1, n // 2), max(1, n - 1)]
        )  # two of one length: one call
        mask = torch.arange(n)[None, :] < lengths[:, None]
    cpu_case(b, n, 2, 16, mask, dtype=dtype)


def test_cpu_backend_holes_dead_rows_no_bias_and_poisoned_padding(seeded):
    n = 23
    mask = (
        torch.arange(n)[None, :] < torch.tensor([23, 9, 0, 17])[:, None]
    )  # a sequence with no real token
    mask[3, 4] = False  # a hole inside a sequence: not right padding
    out, leaves = cpu_case(4, n, 2, 16, mask, poison=True)
    assert (out[2] == 0).all()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    cpu_case(4, n, 2, 32, mask, bias=False, poison=True, scale=0.3)


def test_cpu_backend_nan_in_a_real_token_gives_nan(seeded):
    q, k, v = (torch.randn(2, 9, 2, 16) for _ in range(3))
    k[0, 3, 1, 5] = float("nan")
    out = effbert.tupe_attention(q, k, v, torch.randn(2, 9, 9), backend="cpu")
    assert (
        torch.isnan(out[0, :, 1]).all()
        and torch.isfinite(out[0, :, 0]).all()
        and torch.isfinite(out[1]).all()
    )


def test_cpu_backend_varlen_equals_padded_and_auto_picks_it(seeded):
    lengths = [5, 1, 17, 9, 9]
    h, d, s = 2, 16, 20
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), h, d) for _ in range(3))
    pos = torch.randn(h, s, s)
    out = effbert.tupe_attention_varlen(q, k, v, cu, max(lengths), pos, backend="cpu")
    padded = [pad_packed(t.double(), cu, max(lengths))[0] for t in (q, k, v)]
    mask = pad_packed(q, cu, max(lengths))[1]
    ref = reference.tupe_attention(
        *padded, pos.double()[:, : max(lengths), : max(lengths)], attention_mask=mask
    )
    assert_close(out, unpad(ref, cu))
    assert attention_ops.attention_backend(q) == "cpu"
    assert attention_ops.attention_backend(q.half()) == "eager"  # fp16 on the CPU: the reference
    with pytest.raises(BackendNotSupportedError, match="fp32/fp64"):
        effbert.tupe_attention(*(t[None].half() for t in (q, k, v)), backend="cpu")


def test_cpu_backend_builds_no_batch_by_heads_square_tensor(seeded):
    """Every tensor an aten op makes during the forward and backward is smaller than [B, H, N, N]: the bias is read
    as the shared [H, N, N] and nothing materialises per sample and head pair."""
    from torch.utils._python_dispatch import TorchDispatchMode

    b, n, h, d = 6, 48, 3, 4
    biggest = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(result):
                if isinstance(t, torch.Tensor):
                    biggest.append((t.numel(), str(func)))
            return result

    q, k, v = (torch.randn(b, n, h, d, requires_grad=True) for _ in range(3))
    pos = torch.randn(h, n, n, requires_grad=True)
    mask = torch.arange(n)[None, :] < torch.tensor([48, 30, 30, 12, 5, 40])[:, None]
    with Sizes():
        effbert.tupe_attention(q, k, v, pos, attention_mask=mask, backend="cpu").sum().backward()
    assert max(biggest)[0] < b * h * n * n, max(biggest)
    biggest.clear()
    with Sizes():
        effbert.tupe_attention(q, k, v, pos, attention_mask=mask, backend="eager")
    assert max(biggest)[0] >= b * h * n * n  # the test can see one: the reference builds them


def _zero_filled_elements(fn):
    """Elements that ``fn()`` zero-fills (aten fill_ and zero_, as the torch profiler records them)."""
    import math

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return sum(
        math.prod(e.input_shapes[0])
        for e in prof.events()
        if e.name in ("aten::fill_", "aten::zero_")
        and e.input_shapes
        and e.input_shapes[0]
        and not (e.cpu_parent is not None and e.cpu_parent.name == "aten::zero_")
    )  # zero_ may call fill_


@pytest.mark.parametrize("layout", ["right-padded", "holes", "packed"])
def test_cpu_backward_zero_fills_no_gradient_per_sequence(layout, seeded):
    """The backward of the CPU path zero-fills about the input's size once, not once per sequence: cutting each
    sequence out of q, k, v or pos_bias by slicing or indexing, or writing its result into a zero tensor in place,
    makes autograd build a zero gradient of the whole tensor per sequence (most of the backward's time on a padded
    batch). Eight sequences: that pattern fills about 9x the inputs."""
    b, n, h, d = 8, 32, 2, 16
    lengths = torch.tensor([n // 2 + i for i in range(b)]) % n + 1
    mask = torch.arange(n)[None, :] < lengths[:, None]
    if layout == "holes":
        mask[:, 0] = False
    shape = (
        (int(lengths.sum()) + 3, h, d) if layout == "packed" else (b, n, h, d)
    )  # + rows of no sequence
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pos = torch.randn(h, n, n, dtype=torch.float64, requires_grad=True)
    if layout == "packed":
        cu = torch.zeros(b + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        out = effbert.tupe_attention_varlen(q, k, v, cu, n, pos, backend="cpu")
    else:
        out = effbert.tupe_attention(q, k, v, pos, attention_mask=mask, backend="cpu")
    grad = torch.randn_like(out)
    inputs = sum(t.numel() for t in (q, k, v, pos))
    filled = _zero_filled_elements(lambda: out.backward(grad))
    assert filled <= 2 * inputs, (filled, inputs)
    # the count sees autograd's own zero gradients: one slice's backward fills all of q
    assert _zero_filled_elements(lambda: q[:1].sum().backward()) >= q.numel()


@pytest.mark.parametrize("layout", ["packed", "packed-unchecked", "strided-rows"])
def test_cpu_backend_gradients_match_float64_packed_and_strided(layout, seeded):
    """Gradients of the packed path (empty sequences, rows before and after every sequence) and of a padded batch
    whose rows are not back to back in memory (each row cut on its own), against the float64 reference."""
    h, d = 2, 16
    if layout == "strided-rows":
        n = 19
        lengths = torch.tensor([19, 7, 0, 12, 7])
        mask = torch.arange(n)[None, :] < lengths[:, None]
        q, k, v = (
            torch.randn(n, len(lengths), h, d, dtype=torch.float64).transpose(0, 1).requires_grad_()
            for _ in range(3)
        )  # [B, N, H, D] views of [N, B, H, D]: rows interleaved
        pos = torch.randn(h, n, n, dtype=torch.float64, requires_grad=True)
        out = effbert.tupe_attention(q, k, v, pos, attention_mask=mask, backend="cpu")
        grad = torch.randn_like(out)
        out.backward(grad)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pos)]
        ref = reference.tupe_attention(*leaves, attention_mask=mask)
        ref.backward(grad)
        assert_close(out, ref, rtol=1e-12)
        for t, r in zip((q, k, v, pos), leaves):
            assert_close(t.grad, r.grad, rtol=1e-10)
        assert (q.grad[~mask] == 0).all()
        return
    lengths = [5, 0, 17, 9, 9, 1]
    lead = (
        2 if layout == "packed-unchecked" else 0
    )  # offsets starting past row 0: only without the check
    cu = torch.tensor([lead] + (lead + torch.tensor(lengths).cumsum(0)).tolist(), dtype=torch.int32)
    total = int(cu[-1]) + 3
    q, k, v = (torch.randn(total, h, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pos = torch.randn(h, 20, 20, dtype=torch.float64, requires_grad=True)
    out = effbert.tupe_attention_varlen(
        q, k, v, cu, max(lengths), pos, backend="cpu", check_offsets=layout == "packed"
    )
    grad = torch.randn_like(out)
    out.backward(grad)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pos)]
    rows = slice(lead, int(cu[-1]))
    cu0 = cu - lead
    ref = reference.tupe_attention_varlen(
        *(t[rows] for t in leaves[:3]), cu0, max(lengths), leaves[3]
    )
    ref.backward(grad[rows])
    assert_close(out[rows], ref, rtol=1e-12)
    assert (out[:lead] == 0).all() and (out[int(cu[-1]) :] == 0).all()
    for t, r in zip((q, k, v), leaves):
        assert_close(t.grad[rows], r.grad[rows], rtol=1e-10)
        assert (t.grad[:lead] == 0).all() and (t.grad[int(cu[-1]) :] == 0).all()
    assert_close(pos.grad, leaves[3].grad, rtol=1e-10)


@pytest.mark.parametrize("backend", ["eager", "triton", "cpu"])
def test_integer_attention_mask_equals_the_bool_mask(backend, seeded):
    """attention_mask takes 0/1 integers as well as bools (True/1 = real token), as transformers' tokenizers give."""
    if backend == "cpu" and DEVICE != "cpu":
        pytest.skip("the cpu backend serves CPU tensors")
    q, k, v = (torch.randn(2, 7, 2, 16, device=DEVICE) for _ in range(3))
    pos = torch.randn(2, 7, 7, device=DEVICE)
    mask = torch.arange(7, device=DEVICE)[None, :] < torch.tensor([7, 4], device=DEVICE)[:, None]
    with_bool = effbert.tupe_attention(q, k, v, pos, attention_mask=mask, backend=backend)
    with_int = effbert.tupe_attention(q, k, v, pos, attention_mask=mask.long(), backend=backend)
    assert torch.equal(with_bool, with_int)
    assert (with_int[1, 4:] == 0).all()


@pytest.mark.parametrize("backend", ["eager", "triton", "cpu"])
@pytest.mark.parametrize("bad,max_seqlen,message", BAD_OFFSETS)
def test_varlen_refuses_bad_offsets_on_every_backend(backend, bad, max_seqlen, message):
    """The public varlen function checks the offsets' values whichever backend serves it (the CPU backend slices
    by them, so a bad offset would silently cut or drop rows)."""
    if backend == "cpu" and DEVICE != "cpu":
        pytest.skip("the cpu backend serves CPU tensors")
    _, (q, k, v) = _packed([5, 1, 7], extra_rows=2)
    cu = torch.tensor(bad, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        effbert.tupe_attention_varlen(q, k, v, cu, max_seqlen, backend=backend)


@pytest.mark.parametrize("n", [1, 7, 97, 129, 161])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_cpu_backend_inference_road_matches_float64(n, dtype, grad_mode, seeded):
    """Without autograd or dropout, a sequence of at most MATH_MAX_LEN tokens with a bias runs through baddbmm,
    an in-place softmax and bmm (padded batch, packed batch, and a strided view of a larger bias alike); longer
    ones keep the fused kernel. Both equal the float64 reference; padded queries stay 0."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from effbert.ops import _attention_cpu

    b, h, d = 3, 2, 16
    lengths = torch.tensor([n, max(1, n // 2), max(1, n - 3)])
    mask = torch.arange(n)[None, :] < lengths[:, None]
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(3))
    big = torch.randn(h, n + 5, n + 5, dtype=torch.float64)
    pos = big[:, :n, :n]  # a strided view of a larger cached table
    ref = reference.tupe_attention(q, k, v, pos, attention_mask=mask)
    cu = torch.tensor([0] + lengths.cumsum(0).tolist(), dtype=torch.int32)
    packed = [torch.cat([t[i, : int(lengths[i])] for i in range(b)]) for t in (q, k, v)]
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    ctx = torch.no_grad if grad_mode == "no_grad" else torch.inference_mode
    with ctx(), Ops():
        out = effbert.tupe_attention(
            *(t.to(dtype) for t in (q, k, v)), pos.to(dtype), attention_mask=mask, backend="cpu"
        )
        out_packed = effbert.tupe_attention_varlen(
            *(t.to(dtype) for t in packed), cu, n, pos.to(dtype), backend="cpu"
        )
    rtol = FP32_RTOL if dtype == torch.float32 else 1e-12
    assert_close(out, ref, rtol=rtol, what="cpu inference output")
    assert (out[~mask] == 0).all()
    assert_close(out_packed, unpad(ref, cu), rtol=rtol, what="cpu inference packed output")
    # the padded batch calls once per length (a length shared by several rows: one fused call over them), the
    # packed batch once per sequence
    short = [int(x) for x in lengths if x <= _attention_cpu.MATH_MAX_LEN]
    expected = sum(
        1 for x in set(short) if short.count(x) == 1 and int((lengths == x).sum()) == 1
    ) + len(short)
    assert sum("baddbmm" in f for f in seen) == expected, (n, sorted(set(seen)))


def test_self_attention_cpu_inference_projects_qkv_as_three_gemms(seeded):
    """TupeSelfAttention on the CPU without autograd runs its fused QKV projection as three GEMMs over row blocks of
    the fused weight (faster on few tokens); the result equals the fused projection's, padded and packed, and the
    training path keeps one GEMM."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from effbert.nn import TupeSelfAttention

    calls = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "addmm" in str(func) or "mm.default" in str(func):
                calls.append(tuple(args[2].shape) if "addmm" in str(func) else tuple(args[1].shape))
            return func(*args, **(kwargs or {}))

    attn = TupeSelfAttention(32, 4).double().eval()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    pos = torch.randn(4, 9, 9, dtype=torch.float64)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 5])[:, None]
    expected = attn(x, pos, mask)  # with autograd: the fused projection
    with torch.no_grad(), Ops():
        out = attn(x, pos, mask)
    assert_close(out, expected, rtol=1e-12, what="three-GEMM projection")
    assert calls[:3] == [(32, 32)] * 3, calls  # the first matmuls: q, k, v, 32 wide each
    calls.clear()
    with Ops():
        attn(x, pos, mask)
    assert calls[0] == (32, 96), calls  # one fused GEMM when gradients are wanted


def test_cpu_varlen_unchecked_offsets_leave_no_row_unwritten(seeded):
    """With check_offsets=False the CPU path still writes every row: offsets that do not start at 0 leave the rows
    before them at 0 (never uninitialised memory), and the sequence they name equals the reference."""
    h, d = 2, 16
    q, k, v = (torch.randn(7, h, d) for _ in range(3))
    pos = torch.randn(h, 4, 4)
    cu = torch.tensor([2, 5], dtype=torch.int32)
    torch.full(
        (7, h, d), float("nan")
    )  # freed at once: an uninitialised output would likely reuse its NaNs
    out = effbert.tupe_attention_varlen(q, k, v, cu, 3, pos, backend="cpu", check_offsets=False)
    assert (out[:2] == 0).all() and (out[5:] == 0).all()
    ref = reference.tupe_attention(
        *(t[None, 2:5].double() for t in (q, k, v)), pos[:, :3, :3].double()
    )[0]
    assert_close(out[2:5], ref)


def test_batch_chunks_keep_batch_times_heads_within_cudas_grid_axis():
    from effbert.kernels import MAX_GRID_YZ, batch_chunks

    assert batch_chunks(5461, 12) == [(0, 5461)]  # 65532 programs a column: one launch, as always
    chunks = batch_chunks(8192, 12)  # 98304 > 65535: what failed on grid.y
    assert chunks == [(0, 5461), (5461, 8192)]
    assert all((b1 - b0) * 12 <= MAX_GRID_YZ for b0, b1 in chunks)
    assert batch_chunks(0, 12) == [] and batch_chunks(3, 0) == [(0, 3)]
    assert len(batch_chunks(200_000, 1)) == 4 and batch_chunks(200_000, 1)[-1] == (196_605, 200_000)
    for args, message in (
        ((-1, 2), "batch must be a non-negative integer, got -1"),
        ((2.0, 2), "batch must be a non-negative integer, got 2.0"),
        ((2, True), "heads must be a non-negative integer, got True"),
        ((2, MAX_GRID_YZ + 1), f"heads must be at most {MAX_GRID_YZ}"),
    ):
        with pytest.raises(ValueError, match=message):
            batch_chunks(*args)


class _RecordGrid:
    """Stands in for a Triton kernel: records the grid of each launch, runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def test_attention_launchers_split_batch_times_heads_above_65535(monkeypatch):
    """B * H = 70000 rows of grid axis 1 fail on a GPU: every TUPE attention launcher splits the batch into
    launches of at most 65535 rows there (and one launch when it fits)."""
    from effbert.kernels import MAX_GRID_YZ
    from effbert.kernels import tupe_attention as kernels

    fwd, dkdv, dq, keep = (_RecordGrid() for _ in range(4))
    for name, fake in (
        ("tupe_attn_fwd_kernel", fwd),
        ("tupe_attn_bwd_dkdv_kernel", dkdv),
        ("tupe_attn_bwd_dq_kernel", dq),
        ("dropout_keep_kernel", keep),
    ):
        monkeypatch.setattr(kernels, name, fake)
    b, n, h, d = 35_000, 3, 2, 16
    q = torch.zeros(b, n, h, d)
    lse = torch.zeros(h, b * n)
    kernels.attention_forward(
        q, q, q, None, None, None, None, q, lse, batch=b, seq_len=n, scale=0.25, dropout_p=0.0
    )
    kernels.attention_backward(
        q,
        q,
        q,
        None,
        None,
        None,
        None,
        q,
        lse,
        lse,
        q,
        q,
        q,
        None,
        batch=b,
        seq_len=n,
        scale=0.25,
        dropout_p=0.0,
    )
    kernels.dropout_keep_mask(torch.zeros(1, dtype=torch.int64), 35_000, 2, 1, 0.5, "cpu")
    rows = [(0, 32_767), (32_767, 35_000)]  # 65535 // 2 batch elements a launch
    assert [g[1] for g in fwd.grids] == [(b1 - b0) * h for b0, b1 in rows]
    assert [g[1] for g in dkdv.grids] == [(b1 - b0) * h for b0, b1 in rows]
    # no bias gradient: one batch group per batch element of the launch, on axis 2
    assert [g[1:] for g in dq.grids] == [(h, b1 - b0) for b0, b1 in rows]
    assert [g[2] for g in keep.grids] == [(b1 - b0) * h for b0, b1 in rows]
    assert all(max(g[1:]) <= MAX_GRID_YZ for g in fwd.grids + dkdv.grids + dq.grids + keep.grids)
    fwd.grids.clear()
    kernels.attention_forward(
        q[:9],
        q[:9],
        q[:9],
        None,
        None,
        None,
        None,
        q[:9],
        lse[:, :27],
        batch=9,
        seq_len=n,
        scale=0.25,
        dropout_p=0.0,
    )
    assert len(fwd.grids) == 1 and fwd.grids[0][1] == 9 * h


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_a_batch_split_into_several_launches_equals_the_reference(layout, monkeypatch, seeded):
    """The split above, run for real under a grid limit of 5 rows (2 heads: two batch elements a launch): output
    and every gradient, the bias gradient summed over all launches, and dropout drawn per launch the way
    dropout_keep_mask draws it."""
    import effbert.kernels

    monkeypatch.setattr(effbert.kernels, "MAX_GRID_YZ", 5)
    b, n, h, d, p = 5, 7, 2, 16, 0.25
    q, k, v = make_qkv(b, n, h, d)
    pos = torch.randn(h, n, n, dtype=torch.float64, device=DEVICE)
    mask = padding_mask(b, n)
    grad = torch.randn(b, n, h, d, dtype=torch.float64, device=DEVICE)
    torch.manual_seed(99)
    seed = attention_ops._draw_seed(torch.device(DEVICE))
    keep = attention_ops.dropout_keep_mask(seed, b, h, n, p)
    assert not torch.equal(keep[0], keep[2])  # the second launch draws from its own seed
    leaves = [t.float().requires_grad_() for t in (q, k, v, pos)]
    torch.manual_seed(99)
    if layout == "padded":
        out = effbert.tupe_attention(*leaves, attention_mask=mask, dropout_p=p, backend="triton")
        out.backward(grad.float())
    else:
        cu = torch.tensor([0] + mask.sum(1).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        packed = [unpad(t, cu) for t in leaves[:3]]
        out = pad_packed(
            effbert.tupe_attention_varlen(*packed, cu, n, leaves[3], dropout_p=p, backend="triton"),
            cu,
            n,
        )[0]
        out.backward(grad.float())
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v, pos)]
    ref = reference.tupe_attention(*leaves64, attention_mask=mask, dropout_p=p, dropout_mask=keep)
    ref.backward(grad)
    real = mask[:, :, None, None]
    assert_close(out * real, ref * real)
    for name, t, t64 in zip("q k v pos_bias".split(), leaves, leaves64):
        g, g64 = (t.grad, t64.grad) if name == "pos_bias" else (t.grad * real, t64.grad * real)
        assert_close(g, g64, rtol=GRAD_RTOL, what=f"d {name}")
