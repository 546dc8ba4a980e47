"""token_exit_decision on every backend that runs here against the float64 reference, the rule's corner cases, the
packed and padded forms, and its argument checks."""

import math

import pytest
import torch
import torch.nn.functional as F

import effbert
from effbert import _ext
from effbert.ops import token_exit as ops
from effbert.ops._dispatch import BackendNotSupportedError
from effbert.reference import token_exit as reference
from helpers import FP32_RTOL, backend_cases, require_backend

LENGTHS = [1, 2, 3, 7, 31]  # odd sequence lengths, packed together
i32 = torch.int32


def offsets(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=i32, device=device)


def make_logits(total, cols, device, dtype=torch.float32):
    """Half the tokens confident (one large logit), half not: u spread over [0, 1]."""
    x = torch.randn(total, cols, dtype=torch.float64) * 2
    sure = torch.rand(total) < 0.5
    x[sure, 0] += torch.rand(int(sure.sum()), dtype=torch.float64) * 12
    return x.to(dtype).to(device)


def safe_threshold(logits, cu, window, q=0.5, **kw):
    """A threshold near the q-quantile of the window maxima, at least 1e-3 away from every u and window maximum, so
    that float32 rounding cannot flip a decision the float64 reference makes."""
    total = logits.shape[0]
    _, _, u = reference.token_exit_decision(
        logits.double().cpu(),
        cu.cpu(),
        torch.ones(total, dtype=torch.bool),
        torch.zeros(total, dtype=i32),
        threshold=0.0,
        window=window,
        layer=1,
    )
    values = torch.sort(u[torch.isfinite(u)]).values
    thr = float(torch.quantile(values, q)) if values.numel() else 0.5
    for _ in range(200):
        if values.numel() == 0 or float((values - thr).abs().min()) > 1e-3:
            return thr
        thr += 2.3e-3
    raise AssertionError("no safe threshold found")


def run(backend, logits, cu, active, exit_layer, keep=None, **params):
    """The backend's result written into poisoned outputs, so an unwritten element cannot pass; the public API must
    give the same."""
    total = logits.shape[0]
    out = (
        torch.ones(total, dtype=torch.bool, device=logits.device),
        torch.full((total,), -7, dtype=i32, device=logits.device),
        torch.full((total,), float("nan"), dtype=torch.float32, device=logits.device),
    )
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    p = (
        dict(window=3, token_threshold=None, token_rule="and", exclude_exited=False, layer=1)
        | params
    )
    ops.run_into(backend, logits, cu, max_seqlen, active, exit_layer, keep, out, **p)
    via_api = effbert.token_exit_decision(
        logits, active, exit_layer, cu_seqlens=cu, keep=keep, backend=backend, **p
    )
    assert torch.equal(out[0], via_api[0]) and torch.equal(out[1], via_api[1])
    assert torch.equal(out[2].isnan(), via_api[2].isnan())
    return out


def check(backend, device, logits, cu, active, exit_layer, keep=None, slack=0.0, **params):
    """The backend against the float64 reference. ``slack`` > 0: decisions of tokens whose window maximum lies
    within ``slack`` of the threshold are not compared (float32 rounding may flip them; for inputs too large for
    `safe_threshold` to find a gap)."""
    got = run(backend, logits, cu, active, exit_layer, keep, **params)
    p = (
        dict(window=3, token_threshold=None, token_rule="and", exclude_exited=False, layer=1)
        | params
    )
    x64, cu_h, active_h = logits.double().cpu(), cu.cpu(), active.cpu()
    want = reference.token_exit_decision(
        x64, cu_h, active_h, exit_layer.cpu(), keep=None if keep is None else keep.cpu(), **p
    )
    compared = torch.ones(logits.shape[0], dtype=torch.bool)
    if slack:
        keep_h = reference.default_keep(cu_h, logits.shape[0]) if keep is None else keep.cpu()
        takes_part = ~keep_h & (active_h if p["exclude_exited"] else True)
        u_win = reference.window_max(
            reference.token_uncertainty(x64), cu_h, takes_part, p["window"]
        )
        compared = ~((u_win - p["threshold"]).abs() <= slack)
    assert torch.equal(got[0].cpu()[compared], want[0][compared]), (
        "active differs from the reference"
    )
    assert torch.equal(got[1].cpu()[compared], want[1][compared]), (
        "exit_layer differs from the reference"
    )
    err = (got[2].double().cpu() - want[2]).abs()
    assert torch.equal(got[2].isnan().cpu(), want[2].isnan())
    assert float(err.nan_to_num().max()) <= FP32_RTOL, (
        f"u: max abs error {float(err.nan_to_num().max()):.3e}"
    )
    return got, want


# ---- the reference against the definition ----


def test_reference_uncertainty_is_normalised_entropy(seeded):
    x = torch.randn(6, 9, dtype=torch.float64) * 3
    p = torch.softmax(x, -1)
    want = -(p * p.log()).sum(-1) / math.log(9)
    assert torch.allclose(reference.token_uncertainty(x), want, rtol=1e-12, atol=0)
    assert reference.token_uncertainty(
        torch.zeros(1, 4, dtype=torch.float64)
    ).item() == pytest.approx(1.0)


def test_reference_window_is_max_pool_per_sequence(seeded):
    """Two sequences packed: each token's window maximum matches max_pool1d over its own sequence (without [CLS]
    and [SEP]), never its neighbour sequence's tokens."""
    lengths, window = [6, 9], 5
    cu = offsets(lengths)
    x = make_logits(sum(lengths), 4, "cpu", torch.float64)
    u = reference.token_uncertainty(x)
    for start, end in zip(cu.tolist(), cu.tolist()[1:]):
        inner = u[start + 1 : end - 1]
        pooled = F.max_pool1d(inner[None, None], window, 1, window // 2)[0, 0]
        for i, t in enumerate(range(start + 1, end - 1)):
            thr = float(pooled[i])
            # exits iff u_win < threshold: just above the maximum it exits, at it it does not
            a, _, _ = reference.token_exit_decision(
                x,
                cu,
                torch.ones(15, dtype=torch.bool),
                torch.zeros(15, dtype=i32),
                threshold=thr + 1e-12,
                window=window,
                layer=1,
            )
            assert not a[t]
            a, _, _ = reference.token_exit_decision(
                x,
                cu,
                torch.ones(15, dtype=torch.bool),
                torch.zeros(15, dtype=i32),
                threshold=thr,
                window=window,
                layer=1,
            )
            assert a[t]


# ---- every backend against the reference ----


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("window", [1, 3, 5])
@pytest.mark.parametrize("exclude_exited", [False, True])
def test_matches_reference(backend, device, window, exclude_exited, seeded):
    require_backend(backend, device)
    cu = offsets(LENGTHS, device)
    total = cu[-1].item()
    x = make_logits(total, 5, device)
    active = (torch.rand(total) < 0.8).to(device)
    exit_layer = torch.where(active.cpu(), -1, 1).to(i32).to(device)
    kw = dict(window=window, exclude_exited=exclude_exited, layer=2)
    for q in (
        0.3,
        0.5,
        0.7,
        0.85,
        0.95,
    ):  # the window maxima sit above u: the lowest quantile that exits some
        thr = safe_threshold(x, cu, window, q)
        still = reference.token_exit_decision(
            x.double().cpu(), cu.cpu(), active.cpu(), exit_layer.cpu(), threshold=thr, **kw
        )[0]
        if 0 < int((active.cpu() & ~still).sum()) < int(active.sum()) - 10:
            break
    else:
        raise AssertionError("no threshold exits some tokens and keeps others")
    check(backend, device, x, cu, active, exit_layer, threshold=thr, **kw)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_and_many_classes(backend, device, dtype, seeded):
    """fp16/bf16 logits and a class count over one column block (the kernels loop over C)."""
    require_backend(backend, device)
    cu = offsets([3, 7, 12], device)
    x = make_logits(22, 70, device, dtype)
    active = torch.ones(22, dtype=torch.bool, device=device)
    thr = safe_threshold(x, cu, 3)
    check(
        backend,
        device,
        x,
        cu,
        active,
        torch.zeros(22, dtype=i32, device=device),
        threshold=thr,
        layer=3,
    )


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("rule", ["and", "or"])
def test_token_threshold(backend, device, rule, seeded):
    require_backend(backend, device)
    cu = offsets(LENGTHS, device)
    total = cu[-1].item()
    x = make_logits(total, 6, device)
    active = torch.ones(total, dtype=torch.bool, device=device)
    thr = safe_threshold(x, cu, 5)
    tok = safe_threshold(x, cu, 1, q=0.3)
    got, _ = check(
        backend,
        device,
        x,
        cu,
        active,
        torch.zeros(total, dtype=i32, device=device),
        threshold=thr,
        window=5,
        token_threshold=tok,
        token_rule=rule,
        layer=4,
    )
    plain, _ = check(
        backend,
        device,
        x,
        cu,
        active,
        torch.zeros(total, dtype=i32, device=device),
        threshold=thr,
        window=5,
        layer=4,
    )
    exits, exits_plain = ~got[0].cpu(), ~plain[0].cpu()
    if rule == "and":
        assert not (exits & ~exits_plain).any(), "'and' only adds a condition"
    else:
        assert not (exits_plain & ~exits).any(), "'or' only adds a way out"


@pytest.mark.parametrize("backend,device", backend_cases())
def test_every_token_exits_at_layer_1(backend, device, seeded):
    """A threshold above every u: every token but [CLS] and [SEP] exits at layer 1."""
    require_backend(backend, device)
    cu = offsets(LENGTHS, device)
    total = cu[-1].item()
    x = make_logits(total, 4, device)
    got, _ = check(
        backend,
        device,
        x,
        cu,
        torch.ones(total, dtype=torch.bool, device=device),
        torch.zeros(total, dtype=i32, device=device),
        threshold=1.5,
        layer=1,
    )
    keep = reference.default_keep(cu.cpu(), total)
    assert torch.equal(got[0].cpu(), keep), "exactly the kept tokens go on"
    assert torch.equal(got[1].cpu(), (~keep).to(i32)), (
        "the exited tokens get layer 1, the kept ones keep 0"
    )


@pytest.mark.parametrize("backend,device", backend_cases())
def test_no_token_exits(backend, device, seeded):
    require_backend(backend, device)
    cu = offsets(LENGTHS, device)
    total = cu[-1].item()
    x = make_logits(total, 4, device)
    active = torch.ones(total, dtype=torch.bool, device=device)
    layers = torch.zeros(total, dtype=i32, device=device)
    got, _ = check(
        backend, device, x, cu, active, layers, threshold=0.0, layer=5
    )  # u >= 0: never below 0
    assert got[0].all() and (got[1] == 0).all()


@pytest.mark.parametrize("backend,device", backend_cases())
def test_inactive_tokens_stay_inactive_and_keep_their_layer(backend, device, seeded):
    require_backend(backend, device)
    cu = offsets(LENGTHS, device)
    total = cu[-1].item()
    x = make_logits(total, 4, device)
    active = (torch.arange(total) % 3 != 0).to(device)
    layers = torch.where(active.cpu(), 0, 2).to(i32).to(device)
    got, _ = check(backend, device, x, cu, active, layers, threshold=1.5, layer=3)
    gone = ~active.cpu()
    assert not got[0].cpu()[gone].any()
    assert (got[1].cpu()[gone] == 2).all(), "an earlier exit layer was overwritten"


@pytest.mark.parametrize("backend,device", backend_cases())
def test_kept_tokens_never_exit(backend, device, seeded):
    """[CLS] and [SEP] by default; an explicit keep mask instead when given."""
    require_backend(backend, device)
    cu = offsets(LENGTHS, device)
    total = cu[-1].item()
    x = torch.zeros(total, 4, device=device)
    x[:, 0] = 30.0  # every token sure of itself: u about 0
    ones = torch.ones(total, dtype=torch.bool, device=device)
    zeros = torch.zeros(total, dtype=i32, device=device)
    got, _ = check(backend, device, x, cu, ones, zeros, threshold=0.1)
    assert torch.equal(got[0].cpu(), reference.default_keep(cu.cpu(), total))
    keep = (torch.arange(total) % 4 == 1).to(device)
    got, _ = check(backend, device, x, cu, ones, zeros, keep=keep, threshold=0.1)
    assert torch.equal(got[0].cpu(), keep.cpu())


@pytest.mark.parametrize("backend,device", backend_cases())
def test_exclude_exited(backend, device):
    """An uncertain neighbour that has exited blocks a token by default (the published code) but not with
    exclude_exited=True (the rule that code meant)."""
    require_backend(backend, device)
    cu = offsets([5], device)
    x = torch.zeros(5, 3, device=device)
    x[:, 0] = 30.0
    x[1] = 0.0  # token 1: u = 1, already exited
    active = torch.tensor([True, False, True, True, True], device=device)
    layers = torch.tensor([0, 1, 0, 0, 0], dtype=i32, device=device)
    got, _ = check(backend, device, x, cu, active, layers, threshold=0.5, layer=2)
    assert got[0].cpu().tolist() == [True, False, True, False, True]
    assert got[1].cpu().tolist() == [0, 1, 0, 2, 0]
    got, _ = check(
        backend, device, x, cu, active, layers, threshold=0.5, layer=2, exclude_exited=True
    )
    assert got[0].cpu().tolist() == [True, False, False, False, True]
    assert got[1].cpu().tolist() == [0, 1, 2, 2, 0]


@pytest.mark.parametrize("backend,device", backend_cases())
def test_nan_logits_never_exit_and_block_their_window(backend, device):
    require_backend(backend, device)
    cu = offsets([7], device)
    x = torch.zeros(7, 3, device=device)
    x[:, 0] = 30.0
    x[3, 1] = float("nan")
    got, _ = check(
        backend,
        device,
        x,
        cu,
        torch.ones(7, dtype=torch.bool, device=device),
        torch.zeros(7, dtype=i32, device=device),
        threshold=0.5,
    )
    assert got[0].cpu().tolist() == [True, False, True, True, True, False, True]
    assert torch.isnan(got[2][3])


@pytest.mark.parametrize("backend,device", backend_cases())
def test_packed_equals_padded(backend, device, seeded):
    """The padded form (right padding and a hole in a row) gives the packed result at the real tokens; active and
    exit_layer pass through, and u is NaN, at padding."""
    require_backend(backend, device)
    rows, n, c = 3, 9, 5
    mask = torch.zeros(rows, n, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, :] = True
    mask[2, [0, 1, 3, 4, 5]] = True
    mask = mask.to(device)
    x = make_logits(rows * n, c, device).view(rows, n, c)
    active = (torch.rand(rows, n) < 0.9).to(device)
    layers = torch.where(active.cpu(), 0, 1).to(i32).to(device)
    lengths = mask.sum(1).cpu().tolist()
    cu = offsets(lengths, device)
    flat = mask.flatten()
    thr = safe_threshold(x.reshape(-1, c)[flat], cu, 3)
    kw = dict(threshold=thr, layer=2, backend=backend)
    pa, pl, pu = effbert.token_exit_decision(x, active, layers, attention_mask=mask, **kw)
    ka, kl, ku = effbert.token_exit_decision(
        x.reshape(-1, c)[flat], active.flatten()[flat], layers.flatten()[flat], cu_seqlens=cu, **kw
    )
    assert torch.equal(pa.flatten()[flat], ka) and torch.equal(pl.flatten()[flat], kl)
    assert torch.equal(pu.flatten()[flat], ku)
    assert torch.equal(pa.flatten()[~flat], active.flatten()[~flat])
    assert torch.equal(pl.flatten()[~flat], layers.flatten()[~flat])
    assert pu.flatten()[~flat].isnan().all()
    int_mask = effbert.token_exit_decision(x, active, layers, attention_mask=mask.long(), **kw)
    assert torch.equal(int_mask[0], pa)


def test_float64_on_the_eager_backend(seeded):
    cu = offsets(LENGTHS)
    x = make_logits(44, 4, "cpu", torch.float64)
    a, layer, u = effbert.token_exit_decision(
        x,
        torch.ones(44, dtype=torch.bool),
        torch.zeros(44, dtype=i32),
        cu_seqlens=cu,
        threshold=0.5,
        layer=1,
    )
    assert u.dtype == torch.float64
    with pytest.raises(BackendNotSupportedError, match="fp32/fp16/bf16 logits, got float64"):
        effbert.token_exit_decision(
            x,
            torch.ones(44, dtype=torch.bool),
            torch.zeros(44, dtype=i32),
            cu_seqlens=cu,
            threshold=0.5,
            layer=1,
            backend="triton",
        )


def test_outputs_are_not_differentiable_and_inputs_untouched(seeded):
    cu = offsets([4, 5])
    x = torch.randn(9, 3, requires_grad=True)
    active = torch.ones(9, dtype=torch.bool)
    layers = torch.zeros(9, dtype=i32)
    a, layer, u = effbert.token_exit_decision(
        x, active, layers, cu_seqlens=cu, threshold=2.0, layer=1
    )
    assert not u.requires_grad
    assert active.all() and (layers == 0).all(), "the inputs were modified"


def test_backend_selection(monkeypatch):
    from effbert.ops import _dispatch

    x = torch.randn(4, 3)
    assert ops.token_exit_backend(x) in ("cpu", "eager")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _dispatch.refresh()
    with pytest.raises(BackendNotSupportedError, match="window <= 65, got 67"):
        ops.token_exit_backend(x, window=67, backend="triton")
    assert ops.token_exit_backend(x, window=65, backend="triton") == "triton"
    with pytest.raises(BackendNotSupportedError, match="window <= 1025, got 1027"):
        ops.token_exit_backend(x, window=1027, backend="cuda")
    with pytest.raises(BackendNotSupportedError, match="inputs are on cpu"):
        ops.token_exit_backend(x, backend="cuda")


# ---- argument checks ----


def _good(**over):
    kw = dict(
        logits=torch.randn(9, 3),
        active=torch.ones(9, dtype=torch.bool),
        exit_layer=torch.zeros(9, dtype=i32),
        cu_seqlens=offsets([4, 5]),
        threshold=0.5,
        layer=1,
    )
    kw.update(over)
    return kw


BAD = [
    ("even window", dict(window=4), ValueError, "window must be an odd int"),
    ("zero window", dict(window=0), ValueError, "window must be an odd int"),
    ("inf threshold", dict(threshold=float("inf")), ValueError, "threshold must be a finite"),
    (
        "nan token_threshold",
        dict(token_threshold=float("nan")),
        ValueError,
        "token_threshold must be",
    ),
    ("layer 0", dict(layer=0), ValueError, "layer must be an int >= 1"),
    ("rule", dict(token_rule="xor"), ValueError, "token_rule must be one of"),
    ("one class", dict(logits=torch.randn(9, 1)), ValueError, "C >= 2"),
    (
        "int logits",
        dict(logits=torch.zeros(9, 3, dtype=torch.int64)),
        TypeError,
        "logits must have dtype",
    ),
    (
        "active too short",
        dict(active=torch.ones(8, dtype=torch.bool)),
        ValueError,
        "active must be",
    ),
    (
        "uint8 active",
        dict(active=torch.ones(9, dtype=torch.uint8)),
        TypeError,
        "active must have dtype",
    ),
    (
        "int64 exit_layer",
        dict(exit_layer=torch.zeros(9, dtype=torch.int64)),
        TypeError,
        "exit_layer must have",
    ),
    ("keep too long", dict(keep=torch.ones(10, dtype=torch.bool)), ValueError, "keep must be"),
    (
        "int64 offsets",
        dict(cu_seqlens=torch.tensor([0, 4, 9])),
        TypeError,
        "cu_seqlens must have dtype",
    ),
    (
        "decreasing offsets",
        dict(cu_seqlens=torch.tensor([0, 5, 4, 9], dtype=i32)),
        ValueError,
        "never decrease",
    ),
    (
        "offsets past T",
        dict(cu_seqlens=torch.tensor([0, 4, 12], dtype=i32)),
        ValueError,
        "end at the token count",
    ),
    (
        "offsets short of T",
        dict(cu_seqlens=torch.tensor([0, 4, 8], dtype=i32)),
        ValueError,
        "end at the token",
    ),
    (
        "offset not at 0",
        dict(cu_seqlens=torch.tensor([2, 4, 9], dtype=i32)),
        ValueError,
        "start at 0",
    ),
    ("max_seqlen too small", dict(max_seqlen=3), ValueError, "max_seqlen must be >="),
    (
        "both layouts",
        dict(attention_mask=torch.ones(1, 9, dtype=torch.bool)),
        ValueError,
        "not both or neither",
    ),
    ("backend", dict(backend="gpu"), ValueError, "backend must be"),
]


@pytest.mark.parametrize("what,over,exc,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(what, over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        effbert.token_exit_decision(**_good(**over))


def test_bad_padded_arguments():
    x = torch.randn(2, 5, 3)
    ok = dict(
        active=torch.ones(2, 5, dtype=torch.bool),
        exit_layer=torch.zeros(2, 5, dtype=i32),
        threshold=0.5,
        layer=1,
    )
    with pytest.raises(ValueError, match="attention_mask must be"):
        effbert.token_exit_decision(x, attention_mask=torch.ones(2, 4, dtype=torch.bool), **ok)
    with pytest.raises(TypeError, match="attention_mask must be bool"):
        effbert.token_exit_decision(x, attention_mask=torch.ones(2, 5), **ok)
    with pytest.raises(ValueError, match="exit_layer must have 2 dimensions"):
        effbert.token_exit_decision(
            x,
            attention_mask=torch.ones(2, 5, dtype=torch.bool),
            **(ok | dict(exit_layer=torch.zeros(5, dtype=i32))),
        )


# ---- GPU ----


def many_sequences(backend, device, dtype, windows, count, longest):
    """Sequences longer than one tile or block (several programs per sequence, halos across them) against the
    reference, with a slack for float32 ties: too many tokens for `safe_threshold`."""
    torch.manual_seed(1)
    lengths = torch.randint(1, longest, (count,)).tolist()
    cu = offsets(lengths, device)
    total = cu[-1].item()
    x = make_logits(total, 9, device, dtype)
    active = (torch.rand(total) < 0.9).to(device)
    u = reference.token_uncertainty(x.double().cpu())
    for window in windows:
        thr = float(torch.quantile(u, 0.9 if window < 100 else 0.99))
        got, want = check(
            backend,
            device,
            x,
            cu,
            active,
            torch.zeros(total, dtype=i32, device=device),
            threshold=thr,
            window=window,
            layer=2,
            slack=1e-5,
        )
        assert (~want[0] & active.cpu()).any(), (
            f"window {window}: nobody exits, the case tests little"
        )


@pytest.mark.skipif(_ext.load("_C")[0] is None, reason="the C++ CPU extension is not built")
def test_cpu_many_sequences_with_ties_slack():
    many_sequences("cpu", "cpu", torch.float32, (3, 15, 301), count=8, longest=700)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.cuda_ext)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_many_sequences_long_and_wide_windows(backend, dtype):
    """On CUDA, windows up to each kernel's widest, on a side stream."""
    windows = (1, 3, 15, 65) + ((301, 1025) if backend == "cuda" else ())
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        many_sequences(backend, "cuda", dtype, windows, count=64, longest=700)
    stream.synchronize()


def test_torch_compile_fullgraph_packed_and_padded(seeded):
    """Traces as one graph in both layouts and gives what the uncompiled call gives."""
    torch._dynamo.reset()
    cu = offsets([3, 7])
    x = make_logits(10, 4, "cpu")
    active, layers = torch.ones(10, dtype=torch.bool), torch.zeros(10, dtype=i32)

    def packed(x, active, layers, cu):
        return effbert.token_exit_decision(
            x, active, layers, cu_seqlens=cu, max_seqlen=7, threshold=0.5, layer=1
        )

    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 3:] = False

    def padded(x, active, layers, mask):
        return effbert.token_exit_decision(
            x, active, layers, attention_mask=mask, threshold=0.5, layer=1
        )

    xp = make_logits(14, 4, "cpu").view(2, 7, 4)
    for fn, args in (
        (packed, (x, active, layers, cu)),
        (padded, (xp, active.new_ones(2, 7), layers.new_zeros(2, 7), mask)),
    ):
        want = fn(*args)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
        for g, w in zip(got, want):
            assert torch.equal(
                g.isnan() if g.is_floating_point() else g, w.isnan() if w.is_floating_point() else w
            )
            if g.is_floating_point():
                assert torch.equal(g.nan_to_num(), w.nan_to_num())
    torch._dynamo.reset()


@pytest.mark.parametrize("backend,device", backend_cases())
def test_unchecked_call_stays_in_bounds(backend, device):
    """Below the checks (run_into, as a caller who skips them): offsets past the tokens and a short active mask give
    wrong numbers at worst, never an access outside a buffer; tokens past the shortest tensor are not written."""
    require_backend(backend, device)
    x = make_logits(9, 3, device)
    cu = torch.tensor([0, 4, 50, 2], dtype=i32, device=device)  # past T, then decreasing
    active = torch.ones(6, dtype=torch.bool, device=device)
    out = (
        torch.ones(9, dtype=torch.bool, device=device),
        torch.full((9,), -7, dtype=i32, device=device),
        torch.full((9,), float("nan"), device=device),
    )
    args = (backend, x, cu, 50, active, torch.zeros(9, dtype=i32, device=device), None, out)
    kw = dict(
        threshold=0.5,
        window=3,
        token_threshold=None,
        token_rule="and",
        layer=1,
        exclude_exited=False,
    )
    if backend == "eager":  # torch's indexing: an out-of-range offset is an error, never a read
        with pytest.raises(IndexError):
            ops.run_into(*args, **kw)
        return
    ops.run_into(*args, **kw)
    assert (out[1][6:] == -7).all() and out[2][6:].isnan().all()


@pytest.mark.parametrize("backend,device", backend_cases())
def test_padding_only_rows(backend, device):
    """A row of padding only is an empty sequence; a batch of padding only gives its inputs back and NaN u."""
    require_backend(backend, device)
    x = make_logits(12, 3, device).view(3, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool, device=device)
    active = torch.ones(3, 4, dtype=torch.bool, device=device)
    layers = torch.zeros(3, 4, dtype=i32, device=device)
    a, layer, u = effbert.token_exit_decision(
        x, active, layers, attention_mask=mask, threshold=1.5, layer=1, backend=backend
    )
    assert a.cpu().tolist() == [[True, False, True, True], [True] * 4, [True, False, False, True]]
    assert u[1].isnan().all() and not u[0, :3].isnan().any()
    a, layer, u = effbert.token_exit_decision(
        x,
        active,
        layers,
        attention_mask=torch.zeros_like(mask),
        threshold=1.5,
        layer=1,
        backend=backend,
    )
    assert a.all() and (layer == 0).all() and u.isnan().all()


def test_token_rule_defaults_to_the_published_or(seeded):
    """The published code lets a token out when its window test passes or its own u is below t_level_t."""
    cu = offsets(LENGTHS, "cpu")
    total = cu[-1].item()
    x = make_logits(total, 6, "cpu")
    active = torch.ones(total, dtype=torch.bool)
    layers = torch.zeros(total, dtype=i32)
    thr, tok = safe_threshold(x, cu, 5), safe_threshold(x, cu, 1, q=0.6)
    common = dict(
        threshold=thr, window=5, token_threshold=tok, layer=2, cu_seqlens=cu, backend="eager"
    )
    default = effbert.token_exit_decision(x, active, layers, **common)
    either = effbert.token_exit_decision(x, active, layers, token_rule="or", **common)
    both = effbert.token_exit_decision(x, active, layers, token_rule="and", **common)
    assert torch.equal(default[0], either[0])
    assert not torch.equal(default[0], both[0]), "the case must tell the two rules apart"
