"""MC-BERT ops: the sampler and the multi-choice candidate loss against float64 references, gradients,
reproducibility, torch.library registration, torch.compile and bad inputs."""

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
    out = torch.full((m, k), -7, dtype=torch.int64, device=DEV)  # poison: every slot must be written
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


# ---- the candidate loss ----

@pytest.mark.parametrize("m,v,d,k", [(1, 3, 1, 2), (7, 29, 19, 10), (9, 97, 64, 3), (5, 11, 300, 7)])
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
    assert torch.autograd.gradcheck(lambda *t: effbert.mc_candidate_loss(*t, c, y, backend="eager"), args)


def test_loss_gradcheck_kernel():
    # the kernel computes in float32: finite differences in float32 with a matching tolerance
    h, e, b, c, y = _loss_inputs(3, 7, 4, 3)
    args = [t.requires_grad_() for t in (h, e, b)]
    assert torch.autograd.gradcheck(lambda *t: effbert.mc_candidate_loss(*t, c, y, backend=KERNEL), args,
                                    eps=1e-2, atol=2e-3, rtol=1e-2, fast_mode=True)


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


# ---- registration and compilation ----

def test_opcheck(seeded):
    h, e, b, c, y = _loss_inputs(5, 13, 8, 4)
    leaves = [t.requires_grad_() for t in (h, e, b)]
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.effbert.mc_candidate_loss.default,
                              (*leaves, c, y, reduction, True, KERNEL))
    logits = torch.randn(4, 19, device=DEV)
    torch.library.opcheck(torch.ops.effbert.mc_sample.default, (logits, 6, ops.new_seed(logits.device), KERNEL),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


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
