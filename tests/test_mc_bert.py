"""MC-BERT ops: the sampler and the multi-choice candidate loss against float64 references, gradients,
reproducibility, torch.library registration, torch.compile and bad inputs."""

import json
import os

import pytest
import torch

import effbert
from effbert import reference
from effbert.ops import mc_bert as ops

from helpers import ON_GPU, assert_close

DEV = "cuda" if ON_GPU else "cpu"
KERNEL = "triton"


def _loss_inputs(m, v, d, k, dtype=torch.float32, device=DEV):
    hidden = torch.randn(m, d, dtype=dtype, device=device)
    emb = torch.randn(v, d, dtype=dtype, device=device) * 0.5
    bias = torch.randn(v, dtype=torch.float32, device=device)
    cand = torch.randint(0, v, (m, k), device=device)
    labels = torch.randint(0, k, (m,), device=device)
    return hidden, emb, bias, cand, labels


# ---- the sampler ----


@pytest.mark.parametrize("m,v,k", [(1, 1, 1), (3, 37, 10), (7, 97, 5), (2, 129, 4)])
def test_sample_kernel_equals_gumbel_reference(m, v, k, seeded):
    logits = torch.randn(m, v, device=DEV) * 3
    seed = ops.new_seed(logits.device)
    out = torch.full(
        (m, k), -7, dtype=torch.int64, device=DEV
    )  # poison: every slot must be written
    from effbert.kernels import mc_bert as kernels

    kernels.mc_sample(logits, k, seed, out)
    ref = reference.mc_sample_gumbel(logits, k, int(seed))
    assert torch.equal(out.cpu(), ref.cpu())
    assert int(out.min()) >= 0 and int(out.max()) < v


def test_philox_reference_known_answer():
    # Random123's published known-answer test for philox4x32-10, counter and key all zero
    z = torch.zeros(1, dtype=torch.int64)
    words = reference.mc_bert.philox4x32(0, z, z, z, z)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("backend", ["eager", KERNEL])
def test_sample_distribution_matches_softmax(backend, seeded):
    # 4 rows x 4000 draws of a 6-token softmax: every token's frequency within 5 standard errors of its probability
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0, 0.5]] * 4, device=DEV)
    draws = effbert.mc_sample(logits, 1000 if backend == "eager" else 1000, backend=backend)
    p = torch.softmax(logits[0].double(), 0).cpu()
    freq = torch.bincount(draws.reshape(-1).cpu(), minlength=6).double() / draws.numel()
    se = (p * (1 - p) / draws.numel()).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-9).all(), (freq, p)


@pytest.mark.parametrize("backend", ["eager", KERNEL])
def test_sample_reproducible_under_manual_seed(backend):
    logits = torch.randn(5, 41, device=DEV)
    torch.manual_seed(123)
    a = effbert.mc_sample(logits, 10, backend=backend)
    b = effbert.mc_sample(logits, 10, backend=backend)
    torch.manual_seed(123)
    c = effbert.mc_sample(logits, 10, backend=backend)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)  # a second call draws new noise
    gen = torch.Generator(device=DEV).manual_seed(7)
    d = effbert.mc_sample(logits, 10, generator=gen, backend=backend)
    gen.manual_seed(7)
    assert torch.equal(d, effbert.mc_sample(logits, 10, generator=gen, backend=backend))


@pytest.mark.parametrize("backend", ["eager", KERNEL])
def test_sample_nan_and_empty_rows(backend):
    logits = torch.randn(4, 9, device=DEV)
    logits[1, 3] = float("nan")
    logits[2] = float("-inf")
    out = effbert.mc_sample(logits, 3, backend=backend)
    assert (out[1] == -1).all() and (out[2] == -1).all()
    assert ((out[[0, 3]] >= 0) & (out[[0, 3]] < 9)).all()
    # a single finite logit is always drawn
    one = torch.full((2, 9), float("-inf"), device=DEV)
    one[:, 5] = 0.0
    assert (effbert.mc_sample(one, 4, backend=backend) == 5).all()
    empty = effbert.mc_sample(torch.zeros(0, 9, device=DEV), 3, backend=backend)
    assert empty.shape == (0, 3) and empty.dtype == torch.int64


def test_sample_bad_inputs():
    with pytest.raises(ValueError, match="num_samples"):
        effbert.mc_sample(torch.zeros(2, 5), 0)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        effbert.mc_sample(torch.zeros(5), 2)
    with pytest.raises(TypeError, match="logits must have dtype"):
        effbert.mc_sample(torch.zeros(2, 5, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="V >= 1"):
        effbert.mc_sample(torch.zeros(2, 0), 2)
    with pytest.raises(TypeError, match="generator"):
        effbert.mc_sample(torch.zeros(2, 5), 2, generator=3)


@pytest.mark.parametrize(
    "m,v,d,dtype",
    [(1, 1, 1, torch.float32), (19, 45, 23, torch.float32), (33, 70, 40, torch.float16)],
)
def test_fused_sample_equals_sampling_the_logits(m, v, d, dtype, seeded):
    hidden = torch.randn(m, d, device=DEV).to(dtype)
    weight = torch.randn(v, d, device=DEV).to(dtype)
    bias = torch.randn(v, device=DEV)
    if m > 5:
        hidden[5, 0] = float("nan")
    torch.manual_seed(11)
    got = effbert.mc_sample_fused(hidden, weight, bias, 10, backend=KERNEL)
    torch.manual_seed(11)
    seed = ops.new_seed(hidden.device)  # the key the op drew
    logits = torch.nn.functional.linear(hidden.double(), weight.double(), bias.double())
    want = reference.mc_sample_gumbel(logits, 10, int(seed))
    # fp32 logits against float64 ones: a draw may flip only on a near-tie of two noisy scores
    assert (got.cpu() != want.cpu()).float().mean() <= 0.01
    if m > 5:
        assert (got[5] == -1).all()
    # the unfused kernel on the same logits gives the same ids, same key
    torch.manual_seed(11)
    unfused = effbert.mc_sample(logits.float(), 10, backend=KERNEL)
    assert (got.cpu() != unfused.cpu()).float().mean() <= 0.01


def test_fused_sample_eager_and_bad_inputs():
    h, w, b = torch.randn(4, 6), torch.randn(9, 6), torch.randn(9)
    out = effbert.mc_sample_fused(h, w, b, 3, backend="eager")
    assert out.shape == (4, 3) and int(out.min()) >= 0 and int(out.max()) < 9
    with pytest.raises(ValueError, match="weight must be"):
        effbert.mc_sample_fused(h, w[:, :5], b, 3)
    with pytest.raises(ValueError, match="bias must be"):
        effbert.mc_sample_fused(h, w, b[:4], 3)
    with pytest.raises(ValueError, match="num_samples"):
        effbert.mc_sample_fused(h, w, b, 0)
    with pytest.raises(TypeError, match="hidden must have dtype"):
        effbert.mc_sample_fused(h.long(), w, b, 3)


# ---- the candidate loss ----


@pytest.mark.parametrize(
    "m,v,d,k", [(1, 3, 1, 2), (7, 29, 19, 10), (9, 97, 64, 3), (5, 11, 300, 7)]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_grads_vs_float64(m, v, d, k, reduction, seeded):
    h, e, b, c, y = _loss_inputs(m, v, d, k)
    c[0, 1] = c[0, 0]  # a repeated candidate within a row: both slots add to the same gradient row
    leaves = [t.clone().requires_grad_() for t in (h, e, b)]
    out = effbert.mc_candidate_loss(*leaves, c, y, reduction=reduction, backend=KERNEL)
    ref_leaves = [t.double().requires_grad_() for t in (h, e, b)]
    ref = reference.mc_candidate_loss(*ref_leaves, c, y, reduction=reduction)
    assert out.dtype == torch.float32
    assert_close(out, ref, what="loss")
    w = torch.randn_like(ref) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    (out * w.to(out)).sum().backward()
    (ref * w.to(ref.device)).sum().backward()
    for name, got, want in zip(("hidden", "embedding", "bias"), leaves, ref_leaves):
        assert got.grad.dtype == got.dtype
        assert_close(got.grad, want.grad, what=f"d {name}")


def test_loss_fp16_within_twice_eager_error(seeded):
    h, e, b, c, y = _loss_inputs(11, 31, 40, 6, dtype=torch.float16)
    got = effbert.mc_candidate_loss(h, e, b, c, y, reduction="none", backend=KERNEL)
    ref = reference.mc_candidate_loss(h.double(), e.double(), b.double(), c, y, reduction="none")
    # the eager run in the same low precision: its fp16 products
    lowp = (torch.einsum("md,mkd->mk", h, e[c]) + b[c].half()).float().log_softmax(-1)
    lowp = -lowp.gather(1, y[:, None]).squeeze(1)
    assert_close(got, ref, lowp_eager=lowp, what="fp16 loss")


def test_loss_gradcheck_eager_float64():
    h, e, b, c, y = _loss_inputs(4, 9, 5, 3, dtype=torch.float64, device="cpu")
    b = b.double()
    args = [t.requires_grad_() for t in (h, e, b)]
    assert torch.autograd.gradcheck(
        lambda *t: effbert.mc_candidate_loss(*t, c, y, backend="eager"), args
    )


def test_loss_gradcheck_kernel():
    # the kernel computes in float32: finite differences in float32 with a matching tolerance
    h, e, b, c, y = _loss_inputs(3, 7, 4, 3)
    args = [t.requires_grad_() for t in (h, e, b)]
    assert torch.autograd.gradcheck(
        lambda *t: effbert.mc_candidate_loss(*t, c, y, backend=KERNEL),
        args,
        eps=1e-2,
        atol=2e-3,
        rtol=1e-2,
        fast_mode=True,
    )


def test_scatter_is_bitwise_reproducible(seeded):
    h, e, b, c, y = _loss_inputs(40, 5, 33, 10)  # 400 entries on 5 tokens: long segments
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (h, e, b)]
        effbert.mc_candidate_loss(*leaves, c, y, backend=KERNEL).backward()
        grads.append([t.grad.clone() for t in leaves])
    for a, b_ in zip(*grads):
        assert torch.equal(a, b_)
    # rows no candidate names get exactly zero
    c2 = c.clone() % 3
    leaves = [t.clone().requires_grad_() for t in (h, e, b)]
    effbert.mc_candidate_loss(*leaves, c2, y, backend=KERNEL).backward()
    assert (leaves[1].grad[3:] == 0).all() and (leaves[2].grad[3:] == 0).all()


@pytest.mark.parametrize("backend", ["eager", KERNEL])
def test_loss_empty_batch(backend):
    h, e, b, c, y = _loss_inputs(0, 7, 4, 3)
    e.requires_grad_()
    loss = effbert.mc_candidate_loss(h, e, b, c, y, backend=backend)
    assert float(loss) == 0.0
    loss.backward()
    assert (e.grad == 0).all()
    assert effbert.mc_candidate_loss(h, e, b, c, y, reduction="none", backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", ["eager", KERNEL])
def test_loss_nan_hidden_gives_nan_row(backend):
    h, e, b, c, y = _loss_inputs(3, 7, 4, 3)
    h[1, 2] = float("nan")
    rows = effbert.mc_candidate_loss(h, e, b, c, y, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


@pytest.mark.parametrize("backend", ["eager", KERNEL])
def test_loss_bad_inputs(backend):
    h, e, b, c, y = _loss_inputs(3, 7, 4, 3)
    e0 = e.clone()
    with pytest.raises(ValueError, match=r"candidates must hold token ids in \[0, 7\)"):
        effbert.mc_candidate_loss(h, e, b, c.clone().fill_(7), y, backend=backend)
    with pytest.raises(ValueError, match="candidates must hold token ids"):
        effbert.mc_candidate_loss(h, e, b, c.clone().fill_(-1), y, backend=backend)
    with pytest.raises(ValueError, match=r"labels must hold candidate slots in \[0, 3\)"):
        effbert.mc_candidate_loss(h, e, b, c, y.clone().fill_(3), backend=backend)
    with pytest.raises(ValueError, match="K >= 2"):
        effbert.mc_candidate_loss(h, e, b, c[:, :1], y.clamp(max=0), backend=backend)
    with pytest.raises(ValueError, match="embedding must be"):
        effbert.mc_candidate_loss(h, e[:, :3], b, c, y, backend=backend)
    with pytest.raises(ValueError, match="bias must be"):
        effbert.mc_candidate_loss(h, e, b[:5], c, y, backend=backend)
    with pytest.raises(TypeError, match="candidates must have dtype"):
        effbert.mc_candidate_loss(h, e, b, c.int(), y, backend=backend)
    with pytest.raises(ValueError, match="labels must be"):
        effbert.mc_candidate_loss(h, e, b, c, y[:2], backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        effbert.mc_candidate_loss(h, e, b, c, y, reduction="avg", backend=backend)
    assert torch.equal(e, e0)


def test_no_cpp_backend_is_said_clearly():
    h, e, b, c, y = _loss_inputs(2, 5, 4, 3, device="cpu")
    with pytest.raises(effbert.BackendNotSupportedError, match="no cpu extension"):
        effbert.mc_candidate_loss(h, e, b, c, y, backend="cpu")


# ---- +inf logits: uniform among the +inf entries, on every backend ----


def _inf_logits(rows=4, v=9):
    logits = torch.randn(rows, v, device=DEV) * 3
    logits[:, 2] = float("inf")
    logits[:, 6] = float("inf")
    logits[1, 4] = 1e30  # a huge finite logit still loses to +inf
    return logits


@pytest.mark.parametrize("backend", ["eager", KERNEL])
def test_sample_inf_logits_draw_uniformly_among_them(backend, seeded):
    """Gumbel-max on the limit of the softmax as the +inf logits grow together: each +inf entry scores its noise
    alone, ahead of every finite one, so the draws are uniform over the +inf entries (eager raised torch's
    'invalid multinomial distribution'; the kernel drew the first +inf entry every time)."""
    logits = _inf_logits()
    draws = effbert.mc_sample(logits, 500, backend=backend)
    assert ((draws == 2) | (draws == 6)).all()
    share = float((draws == 2).double().mean())
    assert abs(share - 0.5) <= 5 * (0.25 / draws.numel()) ** 0.5, share
    # +inf with NaN: no distribution, -1 as for NaN alone; a single +inf entry is always drawn
    bad = logits.clone()
    bad[0, 0] = float("nan")
    bad[3, 6] = 0.0
    out = effbert.mc_sample(bad, 50, backend=backend)
    assert (out[0] == -1).all() and (out[3] == 2).all()


@pytest.mark.parametrize("backend", ["eager", KERNEL])
def test_fused_sample_inf_logits_draw_uniformly_among_them(backend, seeded):
    hidden, weight = torch.randn(3, 16, device=DEV), torch.randn(9, 16, device=DEV)
    bias = torch.randn(9, device=DEV)
    bias[[1, 7]] = float("inf")
    draws = effbert.mc_sample_fused(hidden, weight, bias, 400, backend=backend)
    assert ((draws == 1) | (draws == 7)).all()
    share = float((draws == 1).double().mean())
    assert abs(share - 0.5) <= 5 * (0.25 / draws.numel()) ** 0.5, share


def test_sample_kernel_inf_rows_equal_gumbel_reference(seeded):
    from effbert.kernels import mc_bert as kernels

    logits = _inf_logits(rows=5, v=300)  # several blocks: a +inf entry in a later block still wins
    logits[2, 250] = float("inf")
    logits[4] = torch.randn(300)
    seed = ops.new_seed(logits.device)
    out = torch.full((5, 9), -7, dtype=torch.int64, device=DEV)
    kernels.mc_sample(logits, 9, seed, out)
    assert torch.equal(out.cpu(), reference.mc_sample_gumbel(logits, 9, int(seed)).cpu())
    assert set(out[2].tolist()) <= {2, 6, 250}


# ---- the registered ops check their own arguments; the kernels read inside their tensors ----


def _run_isolated(code):
    """Run ``code`` in a fresh interpreter (a crash there is a failed test, not a dead test run)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_registered_mc_sample_with_an_empty_seed_raises_instead_of_crashing():
    done = _run_isolated(
        "import torch, effbert\n"
        f"dev = {DEV!r}\n"
        "try:\n"
        "    torch.ops.effbert.mc_sample(torch.randn(3, 5, device=dev), 2,\n"
        "                                torch.empty(0, dtype=torch.int64, device=dev), 'triton')\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "ValueError: seed must be [1] int64" in done.stdout


def test_registered_fused_sample_checks_the_weight_width():
    h, w, b = (
        torch.randn(4, 64, device=DEV),
        torch.randn(9, 16, device=DEV),
        torch.randn(9, device=DEV),
    )
    with pytest.raises(ValueError, match="weight must be"):
        torch.ops.effbert.mc_sample_fused(h, w, b, 3, ops.new_seed(h.device), KERNEL)
    with pytest.raises(ValueError, match="bias must be"):
        torch.ops.effbert.mc_sample_fused(h[:, :16], w, b[:5], 3, ops.new_seed(h.device), KERNEL)


def test_fused_sample_kernel_reads_only_inside_weight_and_bias(seeded):
    """Called below the op's checks, with a weight narrower than hidden (a view whose row tails hold NaN) and a
    short bias: the kernel masks each load by its own tensor's extent, as if both were zero-padded."""
    from effbert.kernels import mc_bert as kernels

    hidden = torch.randn(5, 32, device=DEV)
    store = torch.full((9, 32), float("nan"), device=DEV)
    store[:, :16] = torch.randn(9, 16, device=DEV)
    weight = store[:, :16]  # stride 32: reading past a row's 16 columns meets NaN
    bias_store = torch.full((9,), float("nan"), device=DEV)
    bias_store[:7] = torch.randn(7, device=DEV)
    seed = ops.new_seed(hidden.device)
    got = kernels.mc_sample_fused(
        hidden,
        weight,
        bias_store[:7],
        6,
        seed,
        torch.full((5, 6), -7, dtype=torch.int64, device=DEV),
    )
    padded = torch.cat([weight, torch.zeros(9, 16, device=DEV)], 1)
    want = kernels.mc_sample_fused(
        hidden,
        padded,
        torch.cat([bias_store[:7], torch.zeros(2, device=DEV)]),
        6,
        seed,
        torch.full((5, 6), -7, dtype=torch.int64, device=DEV),
    )
    assert (got >= 0).all() and torch.equal(got, want)


def test_registered_loss_ops_check_hidden_against_the_candidates():
    h, e, b, c, y = _loss_inputs(50, 7, 8, 3)
    with pytest.raises(ValueError, match=r"candidates must be \[M, K\] with M = 2"):
        torch.ops.effbert.mc_candidate_loss(h[:2], e, b, c, y, "mean", True, KERNEL)
    with pytest.raises(ValueError, match=r"candidates must be \[M, K\] with M = 2"):
        torch.ops.effbert.mc_candidate_loss_backward(
            torch.tensor(1.0, device=DEV),
            h[:2],
            c,
            torch.zeros(50, 8, device=DEV),
            torch.ones(50, 3, device=DEV),
            7,
            "mean",
            KERNEL,
        )


def test_candidate_kernels_read_only_inside_their_tensors(seeded):
    """Below the ops' checks: the forward with an embedding narrower than hidden (row tails NaN) and fewer
    candidate and label rows than hidden rows; the scatter with fewer hidden rows than candidates (rows past them
    NaN). Each load is masked by its own tensor: the narrow embedding reads as zero-padded, rows past the
    candidates or labels give a NaN loss, entries past hidden add nothing."""
    from effbert.kernels import mc_bert as kernels

    h, e, b, c, y = _loss_inputs(6, 11, 24, 3)
    store = torch.full((11, 24), float("nan"), device=DEV)
    store[:, :16] = e[:, :16]
    narrow = store[:, :16]
    loss = torch.full((6,), -7.0, device=DEV)
    kernels.mc_candidate_forward(h, narrow, b, c[:4], y[:5], loss, None, None)
    ref = reference.mc_candidate_loss(
        h[:4],
        torch.cat([e[:, :16], torch.zeros(11, 8, device=DEV)], 1),
        b,
        c[:4],
        y[:4],
        reduction="none",
    )
    assert_close(loss[:4], ref)
    assert torch.isnan(loss[4:]).all()

    h_store = torch.full((6, 24), float("nan"), device=DEV)
    h_store[:2] = h[:2]
    dscore = torch.randn(6, 3, device=DEV)
    grads = []
    for hid in (h_store[:2], torch.cat([h[:2], torch.zeros(4, 24, device=DEV)])):
        d_emb, d_bias = torch.zeros(11, 24, device=DEV), torch.zeros(11, device=DEV)
        kernels.mc_candidate_scatter(
            hid, dscore, ops.scatter_plan(c, 24, kernels.SCATTER_CHUNK), d_emb, d_bias
        )
        grads.append(d_emb)
    assert torch.isfinite(grads[0]).all() and torch.equal(grads[0], grads[1])


# ---- padding_idx: [PAD] drawn as a candidate gets no embedding gradient (MC-BERT's published lookup) ----


@pytest.mark.parametrize("backend", ["eager", KERNEL])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_padding_idx_gives_the_pad_row_no_gradient(backend, reduction, seeded):
    pad = 3
    h, e, b, c, y = _loss_inputs(9, 13, 8, 4)
    c[::2, 1] = pad
    c[1, :] = pad  # a row of [PAD] only
    leaves = [t.clone().requires_grad_() for t in (h, e, b)]
    out = effbert.mc_candidate_loss(
        *leaves, c, y, reduction=reduction, padding_idx=pad, backend=backend
    )
    ref_leaves = [t.double().requires_grad_() for t in (h, e, b)]
    ref = reference.mc_candidate_loss(
        *ref_leaves, c, y, reduction=reduction
    )  # every row gets its gradient
    assert_close(out, ref, what="loss (the pad row's score still counts)")
    w = torch.randn(out.shape, device=DEV)
    (out * w).sum().backward()
    (ref * w.double()).sum().backward()
    d_h, d_e, d_b = (t.grad for t in leaves)
    assert (d_e[pad] == 0).all() and (ref_leaves[1].grad[pad] != 0).any()
    keep = torch.arange(13, device=DEV) != pad
    assert_close(d_e[keep], ref_leaves[1].grad[keep], what="d embedding off the pad row")
    assert_close(d_h, ref_leaves[0].grad, what="d hidden")
    assert_close(d_b, ref_leaves[2].grad, what="d bias (the pad entry keeps its gradient)")
    assert d_b[pad] != 0
    # the reference with padding_idx is nn.Embedding's: the same zero row
    ref_pad = [t.double().requires_grad_() for t in (h, e, b)]
    (
        reference.mc_candidate_loss(*ref_pad, c, y, reduction=reduction, padding_idx=pad)
        * w.double()
    ).sum().backward()
    assert (ref_pad[1].grad[pad] == 0).all()
    assert_close(d_e, ref_pad[1].grad, what="d embedding against the padding_idx reference")


def test_loss_padding_idx_bad_values():
    h, e, b, c, y = _loss_inputs(3, 7, 4, 3)
    for bad in (7, -1, 1.0, True):
        with pytest.raises(ValueError, match=r"padding_idx must be None or a token id in \[0, 7\)"):
            effbert.mc_candidate_loss(h, e, b, c, y, padding_idx=bad, backend="eager")


def test_model_passes_its_pad_token_id(monkeypatch):
    from effbert.models import mc_bert as model_module

    seen = []
    real = model_module.mc_candidate_loss

    def spy(*args, **kw):
        seen.append(kw.get("padding_idx"))
        return real(*args, **kw)

    monkeypatch.setattr(model_module, "mc_candidate_loss", spy)
    model = _tiny_model()
    ids, att, labels = _masked_batch()
    model(ids, att, labels=labels)
    assert seen == [model.config.pad_token_id] == [0]


# ---- registration and compilation ----


def test_opcheck(seeded):
    h, e, b, c, y = _loss_inputs(5, 13, 8, 4)
    leaves = [t.requires_grad_() for t in (h, e, b)]
    for reduction in ("mean", "none"):
        torch.library.opcheck(
            torch.ops.effbert.mc_candidate_loss.default, (*leaves, c, y, reduction, True, KERNEL)
        )
    logits = torch.randn(4, 19, device=DEV)
    torch.library.opcheck(
        torch.ops.effbert.mc_sample.default,
        (logits, 6, ops.new_seed(logits.device), KERNEL),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    hidden, weight, bias = (
        torch.randn(5, 16, device=DEV),
        torch.randn(21, 16, device=DEV),
        torch.randn(21, device=DEV),
    )
    torch.library.opcheck(
        torch.ops.effbert.mc_sample_fused.default,
        (hidden, weight, bias, 5, ops.new_seed(hidden.device), KERNEL),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_torch_compile_fullgraph(seeded):
    h, e, b, c, y = _loss_inputs(6, 17, 8, 5)

    def step(h, e, b, logits):
        ids = effbert.mc_sample(logits, 5, backend=KERNEL)
        loss = effbert.mc_candidate_loss(h, e, b, c, y, backend=KERNEL)
        return loss, ids

    leaves = [t.clone().requires_grad_() for t in (h, e, b)]
    logits = torch.randn(6, 17, device=DEV)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    loss, ids = compiled(*leaves, logits)
    loss.backward()
    torch.manual_seed(5)
    ref_ids = effbert.mc_sample(logits, 5, backend=KERNEL)
    assert torch.equal(ids, ref_ids)
    ref_leaves = [t.double().requires_grad_() for t in (h, e, b)]
    ref = reference.mc_candidate_loss(*ref_leaves, c, y)
    ref.backward()
    assert_close(loss, ref)
    for got, want in zip(leaves, ref_leaves):
        assert_close(got.grad, want.grad)


# ---- the model ----


def _tiny_model(backend="eager", hidden=36, **kw):
    from effbert.models import TupeBertConfig, TupeBertForMultiChoicePretraining

    cfg = TupeBertConfig(
        vocab_size=40,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=6,
        intermediate_size=48,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        backend=backend,
    )
    return TupeBertForMultiChoicePretraining(cfg, mask_token_id=4, **kw)


def _masked_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (3, 11), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, [2, 5]] = ids[:, [2, 5]]
    ids[:, 2] = 4  # [MASK]
    ids[0, 5] = 7  # a random replacement (BERT's 10%): its original is still the target
    att = torch.ones_like(ids)
    att[2, 8:] = 0
    return ids, att, labels


def test_multi_choice_inputs_by_hand():
    from effbert.models.mc_bert import multi_choice_inputs

    input_ids = torch.tensor([4, 9, 4, 7])
    original = torch.tensor(
        [5, 9, 6, 8]
    )  # positions 0, 2 masked; 3 randomly replaced (7 != 8); 1 untouched
    masked = torch.tensor([True, False, True, False])
    draws = torch.tensor([[11, 12, 13], [21, 22, 23], [6, 32, 33], [41, 42, 43]])
    new_ids, cand, labels = multi_choice_inputs(
        input_ids, original, masked, draws, reject_token_id=4
    )
    assert new_ids.tolist() == [
        11,
        9,
        6,
        7,
    ]  # the first draw fills [MASK]; drawing the original (6) is no change
    assert labels.tolist() == [1, 0, 0, 1]
    assert cand.tolist() == [[4, 5, 13], [4, 22, 23], [4, 32, 33], [4, 8, 43]]


def test_controller_shape_and_shared_embeddings():
    model = _tiny_model()
    cc = model.controller_config
    assert (cc.hidden_size, cc.num_attention_heads, cc.intermediate_size, cc.num_hidden_layers) == (
        12,
        2,
        16,
        2,
    )
    keys = model.state_dict().keys()
    # the controller owns no [V, hidden/3] table: it projects the main model's embeddings
    assert not [
        k for k in keys if k.startswith("controller.") and k.endswith("word_embeddings.weight")
    ]
    assert "controller.bert.embeddings.word_embeddings.proj.weight" in keys
    # with lambda = 0 only the controller's MLM trains, and it still moves the shared embeddings and bias
    model.loss_lambda = 0.0
    ids, att, labels = _masked_batch()
    out = model(ids, att, labels=labels)
    out.loss.backward()
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.mlm_head.bias.grad.abs().sum() > 0
    assert (
        model.mlm_head.dense.weight.grad is None
        or model.mlm_head.dense.weight.grad.abs().sum() == 0
    )


def test_model_loss_and_metrics(seeded):
    model = _tiny_model()
    ids, att, labels = _masked_batch()
    torch.manual_seed(3)
    out = model(ids, att, labels=labels)
    assert torch.allclose(out.loss, out.mlm_loss + 50.0 * out.mc_loss)
    assert 0 <= float(out.mc_accuracy) <= 1 and float(out.replaced_fraction) > 0
    # the controller's MLM loss by hand: cross-entropy of proj(E)-logits at the [MASK] positions
    feats = model.controller(ids, att, None)
    logits = torch.nn.functional.linear(feats, model.controller_weight(), model.mlm_head.bias)
    masked = ids == 4
    want = torch.nn.functional.cross_entropy(logits[masked].double(), labels[masked])
    assert abs(float(out.mlm_loss) - float(want)) < 1e-5
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    # the same draws (seed) give the same losses: the objective is a function of torch's RNG state
    torch.manual_seed(3)
    again = model(ids, att, labels=labels)
    assert torch.equal(again.loss, out.loss)


def test_model_choice_metrics_by_hand(monkeypatch):
    """The cloze part at the replaced tokens: the original (slot 1) against the other non-reject candidates, and
    the chance level of a uniform pick among the distinct ones, worked out from the candidates and the scores."""
    import effbert.models.mc_bert as mc

    model = _tiny_model().eval()
    ids, att, labels = _masked_batch()
    g = torch.Generator().manual_seed(5)
    real = int(att.sum())
    draws = torch.randint(5, 40, (real, 10), generator=g)
    draws[:, 3] = draws[:, 2]  # a repeated draw: one option, not two
    monkeypatch.setattr(mc, "mc_sample_fused", lambda *args, **kw: draws.clone())
    out = model(ids, att, labels=labels)
    flat_real = att.reshape(-1).bool()
    original = torch.where(labels != -100, labels, ids).reshape(-1)[flat_real]
    masked = (ids == 4).reshape(-1)[flat_real]
    new, cand, lab = mc.multi_choice_inputs(ids.reshape(-1)[flat_real], original, masked, draws, 4)
    feats = model._candidate_features(out.last_hidden_state.reshape(-1, 36)[flat_real]).double()
    words, bias = (
        model.bert.embeddings.word_embeddings.weight.double(),
        model.mlm_head.bias.double(),
    )
    hits, chances = [], []
    for row in (lab == 1).nonzero().squeeze(1).tolist():
        s = [float(feats[row] @ words[c] + bias[c]) for c in cand[row].tolist()]
        hits.append(all(s[1] >= s[k] for k in range(2, 10)))
        chances.append(1.0 / len(set(cand[row, 1:].tolist())))
    assert len(hits) >= 4  # the [MASK] positions, the random replacement
    assert abs(float(out.mc_choice_accuracy) - sum(hits) / len(hits)) < 1e-6
    assert abs(float(out.mc_choice_chance) - sum(chances) / len(chances)) < 1e-6
    assert float(out.mc_choice_chance) > 1 / 9  # the repeated draw leaves at most 8 options


def test_model_kernel_backend_matches_eager_losses():
    model = _tiny_model(hidden=96)  # head dims 16 in both models: the fused attention's sizes
    ids, att, labels = _masked_batch(1)
    torch.manual_seed(0)
    eager = model(ids, att, labels=labels)
    model.set_backend(KERNEL)
    assert model.controller.bert.encoder.layers[0].attention.backend == KERNEL
    torch.manual_seed(0)
    kern = model(ids, att, labels=labels)
    assert (
        abs(float(kern.mlm_loss) - float(eager.mlm_loss)) < 1e-4
    )  # before any draw: the same computation
    assert torch.isfinite(kern.loss)


def test_finetuning_state_drops_the_controller():
    from effbert.models import TupeBertForMaskedLM

    model = _tiny_model()
    state = model.finetuning_state_dict()
    assert state and not [k for k in state if k.startswith("controller.")]
    mlm = TupeBertForMaskedLM(model.config)
    mlm.load_state_dict(state)  # strict: exactly the masked-LM model's keys


def test_model_bad_arguments():
    with pytest.raises(ValueError, match="num_candidates"):
        _tiny_model(num_candidates=1)
    with pytest.raises(ValueError, match="reject_token_id"):
        _tiny_model(reject_token_id=40)
    with pytest.raises(ValueError, match="loss_lambda"):
        _tiny_model(loss_lambda=-1.0)
    model = _tiny_model()
    ids, att, labels = _masked_batch()
    with pytest.raises(ValueError, match="labels are needed"):
        model(ids, att)
    with pytest.raises(ValueError, match="labels must hold"):
        model(ids, att, labels=labels.clamp(min=0) + 40)


# ---- the command ----


def _real_text(path):
    """Lines of this machine's licence texts: real prose, not generated."""
    import glob
    import re

    files = sorted(glob.glob("/usr/share/common-licenses/*"))
    text = " ".join(
        open(f, encoding="utf-8", errors="ignore").read() for f in files[:6] if os.path.isfile(f)
    )
    if len(text) < 5000:
        text = (
            (os.__doc__ or "") + " " + " ".join(m.__doc__ or "" for m in (re, glob, pytest, torch))
        )
    lines = [
        s.strip()
        for s in re.split(r"(?<=[.;:])\s+", re.sub(r"\s+", " ", text))
        if len(s.split()) >= 4
    ]
    path.write_text("\n".join(lines[:400]) + "\n")
    return str(path)


ARGS = [
    "--layers",
    "2",
    "--hidden",
    "36",
    "--heads",
    "3",
    "--max-seq-length",
    "24",
    "--batch-size",
    "8",
    "--learning-rate",
    "2e-3",
    "--backend",
    "eager",
    "--quiet",
    "--objective",
    "mcbert",
    "--device",
    "cpu",
]


@pytest.mark.requires("datasets", "accelerate")
def test_pretrain_mcbert_resume_and_finetune(tmp_path, capsys):
    """``effbert pretrain --objective mcbert`` under Trainer: both losses and the multi-choice accuracy are logged,
    resuming gives bitwise the run that did not stop (controller included), the objective cannot change on resume,
    the final folder holds the main model only (a masked-LM model), and fine-tuning starts from it."""
    import shutil

    from safetensors.torch import load_file

    from effbert import commands as cli
    from effbert.commands import pretrain
    from effbert.data.tokenization import train_wordpiece

    data = _real_text(tmp_path / "corpus.txt")
    train_wordpiece([data], vocab_size=300).save_pretrained(
        tmp_path / "tok"
    )  # one vocabulary for every run
    common = [
        "--data",
        data,
        "--vocab",
        str(tmp_path / "tok"),
        "--cache-dir",
        str(tmp_path / "cache"),
        *ARGS,
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--logging-steps",
        "2",
    ]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert (
        pretrain.main([*common, "--out", str(whole), "--dump-state", str(tmp_path / "whole.pt")])
        == 0
    )
    text = capsys.readouterr().out
    assert "objective MC-BERT (K = 10, lambda = 50" in text and "multi-choice" in text
    log = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    assert {
        "mlm_loss",
        "mc_loss",
        "mc_accuracy",
        "mc_replaced_accuracy",
        "replaced_fraction",
        "mc_choice_accuracy",
        "mc_choice_chance",
    } <= log[-1].keys()
    assert "cloze " in text and "chance " in text
    report = json.loads((whole / "report.json").read_text())
    assert report["mc_choice_accuracy"] == log[-1]["mc_choice_accuracy"]
    assert report["mc_choice_chance"] == log[-1]["mc_choice_chance"]
    for r in log:  # the logged loss is the objective's: controller MLM + 50 x multi-choice
        assert r["loss"] == pytest.approx(r["mlm_loss"] + 50 * r["mc_loss"], rel=1e-4)
        assert 0 <= r["mc_accuracy"] <= 1
        # a uniform pick among at most K - 1 distinct non-reject candidates: chance in [1/9, 1] when any was replaced
        assert r["replaced_fraction"] == 0 or 1 / 9 <= r["mc_choice_chance"] <= 1
    # resuming after step 2 gives bitwise the run that did not stop (controller included)
    assert pretrain.main([*common, "--out", str(parts)]) == 0
    shutil.rmtree(parts / "checkpoints" / "checkpoint-4")
    os.remove(parts / "model.safetensors")
    assert (
        pretrain.main(
            [*common, "--out", str(parts), "--resume", "--dump-state", str(tmp_path / "parts.pt")]
        )
        == 0
    )
    a, b = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "parts.pt")
    assert a.keys() == b.keys() and any(k.startswith("controller.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the objective is part of the run: a resume cannot switch it
    capsys.readouterr()
    assert pretrain.main([*common, "--out", str(parts), "--resume", "--objective", "mlm"]) == 2
    assert "--objective 'mcbert' -> 'mlm'" in capsys.readouterr().err
    # checkpoints keep the controller (for --resume); the final model drops it and loads as a masked-LM model
    in_checkpoint = load_file(whole / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert any(k.startswith("controller.") for k in in_checkpoint)
    saved = load_file(whole / "model.safetensors")
    assert saved and not [k for k in saved if k.startswith("controller.")]
    mlm, tok, _ = effbert.models.load_pretrained(whole, backend="eager")
    assert type(mlm).__name__ == "TupeBertForMaskedLM"
    assert all(torch.equal(mlm.state_dict()[k], a[k]) for k in mlm.state_dict())
    rows = [
        ("gnu" if i % 2 else "other") + "\t" + line
        for i, line in enumerate(open(data, encoding="utf-8").read().splitlines()[:40])
    ]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    assert (
        cli.main(
            [
                "finetune",
                "--init",
                str(whole),
                "--train",
                str(tmp_path / "train.tsv"),
                "--eval",
                str(tmp_path / "train.tsv"),
                "--out",
                str(tmp_path / "ft"),
                "--max-steps",
                "2",
                "--per-device-train-batch-size",
                "8",
                "--backend",
                "eager",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )


@pytest.mark.requires("datasets", "accelerate")
def test_pretrain_mcbert_masking(tmp_path, monkeypatch, capsys):
    """``--objective mcbert`` masks every target with [MASK] by default (the published task), ``--mask-replace-prob
    0.8 --random-replace-prob 0.1`` gives BERT's 80/10/10, ``--objective mlm`` keeps 80/10/10; the run file records
    the shares, a resume cannot change them, a sum above 1 is refused."""
    from effbert.commands import pretrain
    from effbert.data import collator as collator_module
    from effbert.data.tokenization import load_tokenizer, train_wordpiece

    data = _real_text(tmp_path / "corpus.txt")
    train_wordpiece([data], vocab_size=300).save_pretrained(tmp_path / "tok")
    mask_id = load_tokenizer(tmp_path / "tok").mask_token_id
    common = [
        "--data",
        data,
        "--vocab",
        str(tmp_path / "tok"),
        "--cache-dir",
        str(tmp_path / "cache"),
        *ARGS,
        "--max-steps",
        "3",
        "--save-steps",
        "0",
        "--batch-size",
        "32",
        "--max-seq-length",
        "48",
    ]
    batches = []
    call = collator_module.DataCollatorForTupeMLM.__call__

    def spy(self, features):
        batch = call(self, features)
        original = torch.zeros_like(batch["input_ids"])
        for i, f in enumerate(features):
            original[i, : len(f["input_ids"])] = torch.as_tensor(f["input_ids"])
        batches.append((batch, original))
        return batch

    monkeypatch.setattr(collator_module.DataCollatorForTupeMLM, "__call__", spy)

    def shares(out, *extra, objective="mcbert"):
        batches.clear()
        args = [*common, "--out", str(tmp_path / out), *extra]
        args[args.index("--objective") + 1] = objective
        assert pretrain.main(args) == 0
        run = json.loads((tmp_path / out / "pretrain.json").read_text())["settings"]
        target = torch.cat([(b["labels"] != -100).reshape(-1) for b, _ in batches])
        ids = torch.cat([b["input_ids"].reshape(-1) for b, _ in batches])[target]
        orig = torch.cat([o.reshape(-1) for _, o in batches])[target]
        return (
            run["mask_replace_prob"],
            run["random_replace_prob"],
            int(target.sum()),
            float((ids == mask_id).float().mean()),
            float((ids == orig).float().mean()),
        )

    mask_p, random_p, n, masked, kept = shares("mc", "--save-steps", "3")
    assert (mask_p, random_p) == (1.0, 0.0) and n > 200 and masked == 1.0
    mask_p, random_p, n, masked, kept = shares(
        "mc811", "--mask-replace-prob", "0.8", "--random-replace-prob", "0.1"
    )
    assert (
        (mask_p, random_p) == (0.8, 0.1) and n > 200 and 0.65 < masked < 0.93 and 0.03 < kept < 0.2
    )
    mask_p, random_p, n, masked, kept = shares("mlm", objective="mlm")
    assert (mask_p, random_p) == (0.8, 0.1) and 0.65 < masked < 0.93 and 0.03 < kept < 0.2
    capsys.readouterr()
    args = [
        *common,
        "--out",
        str(tmp_path / "mc"),
        "--resume",
        "--max-steps",
        "4",
        "--mask-replace-prob",
        "0.8",
    ]
    assert pretrain.main(args) == 2
    assert "--mask-replace-prob 1.0 -> 0.8" in capsys.readouterr().err
    # a run file written before the shares were recorded resumes with what that version did: 80/10/10
    run_file = tmp_path / "mc" / "pretrain.json"
    run = json.loads(run_file.read_text())
    del run["settings"]["mask_replace_prob"], run["settings"]["random_replace_prob"]
    run_file.write_text(json.dumps(run))
    os.remove(tmp_path / "mc" / "model.safetensors")
    batches.clear()
    assert (
        pretrain.main([*common, "--out", str(tmp_path / "mc"), "--resume", "--max-steps", "4"]) == 0
    )
    target = torch.cat([(b["labels"] != -100).reshape(-1) for b, _ in batches])
    ids = torch.cat([b["input_ids"].reshape(-1) for b, _ in batches])[target]
    assert target.sum() > 100 and 0.65 < float((ids == mask_id).float().mean()) < 0.93
    assert (
        pretrain.main(
            [
                *common,
                "--out",
                str(tmp_path / "bad"),
                "--mask-replace-prob",
                "0.5",
                "--random-replace-prob",
                "0.6",
            ]
        )
        == 2
    )
    assert "must be <= 1" in capsys.readouterr().err
    assert (
        pretrain.main([*common, "--out", str(tmp_path / "bad"), "--random-replace-prob", "2"]) == 2
    )
    assert "--random-replace-prob must be in [0, 1], got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_check_rows_and_compile_specs():
    from effbert.bench import checks
    from effbert.tools import compile_report

    rows = checks.check_mc_bert()
    seen = {(op, backend) for op, backend, *_ in rows}
    assert {
        ("mc_candidate_loss", "eager"),
        ("mc_candidate_loss", KERNEL),
        ("mc_sample (bits)", KERNEL),
        ("mc_sample (freq.)", "eager"),
        ("mc_sample (freq.)", KERNEL),
    } <= seen
    bad = [r for r in rows if not r[5] <= r[6]]
    assert not bad, bad
    names = [spec["name"] for _, spec in compile_report.kernel_specs(only="mc_")]
    assert {n.split("[")[0] for n in names} == {
        "mc_sample",
        "mc_sample_fused",
        "mc_candidate_fwd",
        "mc_candidate_scatter",
        "mc_candidate_fold",
    }


def test_scatter_long_segments_in_pieces(seeded, monkeypatch):
    """A token named by more than CHUNK entries (the reject option names one per row) is summed in pieces and the
    pieces folded in order: the same gradients as float64, bitwise the same on a second run."""
    from effbert.kernels import mc_bert as kernels

    monkeypatch.setattr(kernels, "SCATTER_CHUNK", 4)
    h, e, b, c, y = _loss_inputs(23, 11, 9, 3)
    c[:, 0] = 2  # 23 entries on token 2: 6 pieces; the rest short and long segments at random
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (h, e, b)]
        effbert.mc_candidate_loss(*leaves, c, y, reduction="sum", backend=KERNEL).backward()
        grads.append([t.grad.clone() for t in leaves])
    ref_leaves = [t.double().requires_grad_() for t in (h, e, b)]
    reference.mc_candidate_loss(*ref_leaves, c, y, reduction="sum").backward()
    for got, again, want in zip(grads[0], grads[1], ref_leaves):
        assert torch.equal(got, again)
        assert_close(got, want.grad)


def test_train_step_flops_of_the_mcbert_step():
    """The MC-BERT train-step case's FLOPs against torch's count of every matrix product in an eager step."""
    from torch.utils.flop_counter import FlopCounterMode

    from effbert.bench import train_step
    from effbert.models import TupeBertConfig, TupeBertForMultiChoicePretraining

    sizes = dict(
        vocab_size=60,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    cfg = TupeBertConfig(
        **sizes,
        position_mode="absolute",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        backend="eager",
    )
    model = TupeBertForMultiChoicePretraining(cfg, mask_token_id=4)
    ids = torch.randint(5, 60, (3, 16))
    labels = torch.where(torch.rand(3, 16) < 0.3, ids, torch.full_like(ids, -100))
    ids = torch.where(labels != -100, torch.full_like(ids, 4), ids)
    with FlopCounterMode(display=False) as counter:
        model(ids, torch.ones(3, 16, dtype=torch.bool), labels=labels).loss.backward()
    masked = int((ids == 4).sum())
    assert counter.get_total_flops() == train_step.mc_step_flops(sizes, 3, 16, masked)


def test_save_pretrained_round_trips_the_controller(tmp_path):
    from effbert.models import TupeBertForMultiChoicePretraining

    model = _tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    loaded = TupeBertForMultiChoicePretraining.from_pretrained(tmp_path, mask_token_id=4)
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(got) and any(k.startswith("controller.") for k in got)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
