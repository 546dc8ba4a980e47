"""Multi-exit training losses (RomeBERT distillation with its fused kernel, PABEE) and RomeBERT's gradient
regularization, plus threshold calibration, against direct computations."""

import math

import pytest
import torch
from torch import nn

import effbert
from effbert import calibration, losses, reference
from effbert.nn import ExitHead, MultiExitEncoder
from effbert.ops import early_exit as ops
from helpers import assert_close, backend_cases, require_backend

LOSS_BACKENDS = backend_cases("multi_exit_distillation_loss")


def loss_by_definition(z, y, gamma, t):
    """One sample and one exit at a time, in Python floats; the KL term averaged over B * C as RomeBERT's
    ``nn.KLDivLoss()`` (default reduction 'mean') does."""
    depth, batch, c = z.shape

    def softmax(row, temp=1.0):
        m = max(v / temp for v in row)
        e = [math.exp(v / temp - m) for v in row]
        s = sum(e)
        return [x / s for x in e]

    total = 0.0
    for b in range(batch):
        teacher = softmax(z[-1, b].tolist(), t)
        for i in range(depth):
            p = softmax(z[i, b].tolist())
            ce = -math.log(p[int(y[b])])
            if i == depth - 1:
                total += ce
                continue
            q = softmax(z[i, b].tolist(), t)
            kl = sum(pt * (math.log(pt) - math.log(qi)) for pt, qi in zip(teacher, q) if pt > 0)
            total += (1 - gamma) * ce + gamma * t * t * kl / c
    return total / batch


def test_reference_matches_definition(seeded):
    z = torch.randn(3, 4, 5, dtype=torch.float64) * 2
    y = torch.randint(0, 5, (4,))
    for gamma, t in ((0.9, 3.0), (0.0, 1.0), (1.0, 0.5)):
        got = reference.multi_exit_distillation_loss(z, y, gamma, t).item()
        assert got == pytest.approx(loss_by_definition(z, y, gamma, t), rel=1e-12)


def romebert_kdloss(z, y, gamma, t):
    """RomeBERT's ``KDLoss.forward`` for classification, written as its published code writes it."""
    kld, ce = nn.KLDivLoss(), nn.CrossEntropyLoss()
    soft = z[-1].detach()
    loss = ce(z[-1], y)
    for i in range(z.shape[0] - 1):
        loss = loss + (1 - gamma) * ce(z[i], y)
        loss = (
            loss
            + kld(torch.log_softmax(z[i] / t, dim=1), torch.softmax(soft / t, dim=1))
            * gamma
            * t
            * t
        )
    return loss


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
def test_distillation_term_is_romebert_kldivloss_mean(backend, device, seeded):
    """The KL term is the mean over B * C (KLDivLoss's default), not the batch mean: C times smaller."""
    require_backend(backend, device)
    for c in (2, 3, 7):
        z = torch.randn(3, 5, c, dtype=torch.float64) * 2
        y = torch.randint(0, c, (5,))
        want = romebert_kdloss(z, y, 0.9, 3.0).item()
        got = losses.multi_exit_distillation_loss(
            z.float().to(device), y.to(device), backend=backend
        ).item()
        assert got == pytest.approx(want, rel=1e-5)
        assert reference.multi_exit_distillation_loss(z, y).item() == pytest.approx(want, rel=1e-12)
    # by hand, one student and its teacher, C = 2, gamma 1 (the KL term alone), T 1:
    # p_T = softmax(ln 3, 0) = (3/4, 1/4), q = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2); mean over B*C = KL / 2
    z = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]], dtype=torch.float64)
    y = torch.tensor([0])
    ce_last = -math.log(0.75)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    got = losses.multi_exit_distillation_loss(
        z, y, gamma=1.0, temperature=1.0, backend="eager"
    ).item()
    assert got == pytest.approx(ce_last + kl / 2, rel=1e-12)


def test_gradient_equilibrium_scales_exit_i_by_one_over_L_minus_i(seeded):
    z = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 5, dtype=torch.float64)
    out = losses.gradient_equilibrium(z)
    assert torch.equal(out, z)  # the forward is the identity
    (out * w).sum().backward()
    for i in range(4):
        assert torch.allclose(z.grad[i], w[i] / (4 - i), rtol=0, atol=1e-15)
    # as an option of the losses: the gradient of every exit is the plain gradient over (L - i)
    y = torch.randint(0, 5, (3,))
    for fn in (
        lambda x, **k: losses.multi_exit_distillation_loss(x, y, backend="eager", **k),
        lambda x, **k: losses.pabee_loss(x, y, **k),
        lambda x, **k: losses.deebert_loss(x, y, 2, **k),
    ):
        a = z.detach().clone().requires_grad_()
        b = z.detach().clone().requires_grad_()
        fn(a).backward()
        fn(b, gradient_equilibrium=True).backward()
        for i in range(4):
            assert torch.allclose(b.grad[i], a.grad[i] / (4 - i), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"exit_logits must be a float tensor"):
        losses.gradient_equilibrium(torch.zeros(2, 3, dtype=torch.long))


def test_deebert_two_stage_losses(seeded):
    z = torch.randn(4, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    ce = [nn.functional.cross_entropy(z[i], y).item() for i in range(4)]
    assert losses.deebert_loss(z, y, 1).item() == pytest.approx(ce[3], rel=1e-12)
    assert losses.deebert_loss(z, y, 2).item() == pytest.approx(ce[0] + ce[1] + ce[2], rel=1e-12)
    zr, yr = torch.randn(3, 5, 1, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    mse = [((zr[i, :, 0] - yr) ** 2).mean().item() for i in range(3)]
    assert losses.deebert_loss(zr, yr, 1).item() == pytest.approx(mse[2], rel=1e-12)
    assert losses.deebert_loss(zr, yr, 2).item() == pytest.approx(mse[0] + mse[1], rel=1e-12)
    with pytest.raises(ValueError, match=r"stage must be 1 \(backbone\) or 2"):
        losses.deebert_loss(z, y, 3)
    with pytest.raises(ValueError, match=r"stage 2 .* L >= 2"):
        losses.deebert_loss(z[:1], y, 2)
    with pytest.raises(TypeError, match=r"labels must be integer class indices"):
        losses.deebert_loss(z, torch.zeros(6), 1)


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize(
    "shape", [(1, 1, 2), (3, 7, 5), (4, 9, 97)], ids=lambda s: "x".join(map(str, s))
)
def test_fused_loss_and_gradient(backend, device, dtype, shape, seeded):
    require_backend(backend, device)
    depth, batch, c = shape
    z = (torch.randn(shape) * 3).to(dtype).to(device)
    y = torch.randint(0, c, (batch,), device=device)
    gamma, t = 0.7, 2.5
    z1 = z.clone().requires_grad_()
    out = losses.multi_exit_distillation_loss(z1, y, gamma, t, backend=backend)
    w = 1.7
    (out * w).backward()
    z64 = z.double().requires_grad_()
    ref = reference.multi_exit_distillation_loss(z64, y, gamma, t)
    (ref * w).backward()
    assert out.dtype == torch.float32 and z1.grad.dtype == dtype
    # A confident sample's cross-entropy is a cancellation (logsumexp - z_y) near 0, so fp32 (the kernels compute
    # in fp32 whatever the input dtype) is accurate relative to the loss scale, not to the value: the norms are
    # floored at 1 (loss) and 1 / B (gradient, whose entries are O(1 / B)).
    assert abs(out.item() - ref.item()) <= 1e-5 * max(abs(ref.item()), 1.0), f"{backend} loss"
    floor = w / batch
    g_err = float(
        (z1.grad.double().cpu() - z64.grad.cpu()).norm() / max(float(z64.grad.norm()), floor)
    )
    if dtype == torch.float32:
        assert g_err <= 1e-5, f"{backend} gradient: {g_err:.3e}"
    else:
        z16 = (
            z.clone().float().requires_grad_()
        )  # the eager reference in low precision: fp16 gradient
        (reference.multi_exit_distillation_loss(z16, y, gamma, t) * w).backward()
        e_err = float(
            (z16.grad.to(dtype).double().cpu() - z64.grad.cpu()).norm()
            / max(float(z64.grad.norm()), floor)
        )
        assert g_err <= 2 * e_err + 1e-5, f"{backend} fp16 gradient: {g_err:.3e} > 2 x {e_err:.3e}"


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
def test_fused_loss_strided_input(backend, device, seeded):
    require_backend(backend, device)
    base = torch.randn(6, 3, 11, device=device)  # [B, L, C] as a model might produce it
    z = base.transpose(0, 1)
    y = torch.randint(0, 11, (6,), device=device)
    out = losses.multi_exit_distillation_loss(z, y, backend=backend)
    assert_close(out, reference.multi_exit_distillation_loss(z.double(), y), what="strided loss")


def test_fused_loss_opcheck_and_compile(seeded):
    z = torch.randn(3, 5, 4, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    torch.library.opcheck(
        torch.ops.effbert.multi_exit_distillation_loss.default, (z, y, 0.9, 3.0, "triton")
    )

    def f(z, y):
        return losses.multi_exit_distillation_loss(z * 1.0, y, backend="triton")

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(z, y)
    out.backward()
    z2 = z.detach().double().requires_grad_()
    reference.multi_exit_distillation_loss(z2, y).backward()
    assert_close(
        out, reference.multi_exit_distillation_loss(z.detach().double(), y), what="compiled loss"
    )
    assert_close(z.grad, z2.grad, what="compiled gradient")


def test_loss_backend_choice():
    z = torch.randn(2, 3, 4)
    assert ops.loss_backend(z) == "eager"  # on the CPU the fused kernel is not the fast path
    with pytest.raises(
        effbert.BackendNotSupportedError, match=r"'cpu' cannot serve.*Triton kernel and the eager"
    ):
        ops.loss_backend(z, "cpu")
    with pytest.raises(effbert.BackendNotSupportedError, match=r"C <= 8192"):
        ops.loss_backend(torch.randn(1, 1, 9000), "triton")


@pytest.mark.parametrize(
    "z,y,kw,exc,pattern",
    [
        (
            torch.randn(4, 3),
            torch.zeros(4, dtype=torch.long),
            {},
            ValueError,
            r"exit_logits must have 3 dimensions",
        ),
        (
            torch.randn(2, 4, 3),
            torch.zeros(5, dtype=torch.long),
            {},
            ValueError,
            r"labels must be \[B\] = \[4\]",
        ),
        (
            torch.randn(2, 4, 3),
            torch.tensor([0, 1, 3, 0]),
            {},
            ValueError,
            r"labels must be class indices in \[0, 3\)",
        ),
        (
            torch.randn(2, 4, 3),
            torch.zeros(4),
            {},
            TypeError,
            r"labels must hold integer class indices",
        ),
        (
            torch.randn(2, 4, 3),
            torch.zeros(4, dtype=torch.long),
            dict(gamma=1.5),
            ValueError,
            r"gamma must be in",
        ),
        (
            torch.randn(2, 4, 3),
            torch.zeros(4, dtype=torch.long),
            dict(temperature=0.0),
            ValueError,
            r"temperature must be > 0",
        ),
        (
            torch.randn(0, 4, 3),
            torch.zeros(4, dtype=torch.long),
            {},
            ValueError,
            r"at least one exit",
        ),
    ],
)
def test_bad_loss_inputs(z, y, kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        losses.multi_exit_distillation_loss(z, y, **kw)


def test_pabee_loss_weights_later_exits_more(seeded):
    z = torch.randn(4, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    ce = [nn.functional.cross_entropy(z[i], y).item() for i in range(4)]
    want = sum((i + 1) * ce[i] for i in range(4)) / 10
    assert losses.pabee_loss(z, y).item() == pytest.approx(want, rel=1e-12)
    zr, yr = torch.randn(3, 5, 1, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    mse = [((zr[i, :, 0] - yr) ** 2).mean().item() for i in range(3)]
    assert losses.pabee_loss(zr, yr).item() == pytest.approx(
        (mse[0] + 2 * mse[1] + 3 * mse[2]) / 6, rel=1e-12
    )
    with pytest.raises(TypeError, match=r"labels must be integer class indices"):
        losses.pabee_loss(z, torch.zeros(6))


# ---- RomeBERT gradient regularization ----


class TinyLayer(nn.Module):
    def __init__(self, dm):
        super().__init__()
        self.lin = nn.Linear(dm, dm)
        self.norm = nn.LayerNorm(dm)

    def forward(self, hidden, attention_mask=None):
        return self.norm(hidden + torch.tanh(self.lin(hidden)))


def test_gradient_regularization_against_direct_projection(seeded):
    """RomeBERT's --gp block: one concatenated vector of the selected gradients, one coefficient."""
    torch.manual_seed(0)
    dm, depth = 4, 3
    enc = MultiExitEncoder(
        [TinyLayer(dm) for _ in range(depth)], [ExitHead(dm, 3) for _ in range(depth)]
    ).double()
    hidden = torch.randn(5, 2, dm, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    projected = losses.romebert_projected_parameters(enc)
    names = {id(p): n for n, p in enc.named_parameters()}
    assert sorted(names[id(p)] for p in projected) == ["layers.0.lin.weight", "layers.1.lin.weight"]

    def split_losses():
        z = enc(hidden)
        full = losses.multi_exit_distillation_loss(z, y, backend="eager")
        final = nn.functional.cross_entropy(z[-1], y)
        return final, full - final

    params = list(enc.parameters())
    final, other = split_losses()
    gf = torch.autograd.grad(final, params, retain_graph=True, allow_unused=True)
    go = torch.autograd.grad(other, params, allow_unused=True)
    gf = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gf)]
    go = [torch.zeros_like(p) if g is None else g for p, g in zip(params, go)]
    sel = [i for i, p in enumerate(params) if any(p is q for q in projected)]
    for side in ("others", "final"):
        moved, ref = (go, gf) if side == "others" else (gf, go)
        vm = torch.cat([moved[i].flatten() for i in sel])
        vr = torch.cat([ref[i].flatten() for i in sel])
        coef = min(float(vm @ vr) / float(vr @ vr), 0.0)
        want = {}
        for i, p in enumerate(params):
            m = moved[i] - coef * ref[i] if i in sel else moved[i]
            want[id(p)] = m + ref[i]
        enc.zero_grad(set_to_none=True)
        final, other = split_losses()
        did = losses.gradient_regularized_backward(final, other, params, projected, project=side)
        assert isinstance(did, torch.Tensor) and did.dtype == torch.bool and did.dim() == 0
        assert bool(did) == (coef < 0)
        for p in params:
            assert torch.allclose(p.grad, want[id(p)], rtol=1e-12, atol=1e-14), (side, names[id(p)])


def test_gradient_regularization_by_hand():
    """Linear losses, so the gradients are the constants: g_f = (u, v, 2), g_o = (s, t, 3) over tensors (a, b, c),
    with a and b projected."""
    a, b, c = (
        nn.Parameter(torch.zeros(2, dtype=torch.float64)),
        nn.Parameter(torch.zeros(2, dtype=torch.float64)),
        nn.Parameter(torch.zeros(1, dtype=torch.float64)),
    )
    u, v = (
        torch.tensor([1.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 1.0], dtype=torch.float64),
    )

    def run(s, t, project="others"):
        for p in (a, b, c):
            p.grad = None
        final = (u * a).sum() + (v * b).sum() + 2 * c.sum()
        other = (s * a).sum() + (t * b).sum() + 3 * c.sum()
        did = losses.gradient_regularized_backward(final, other, [a, b, c], [a, b], project=project)
        return bool(did), a.grad.tolist(), b.grad.tolist(), c.grad.tolist()

    # a's gradients conflict (-1) but b's agree (+3): the concatenation does not conflict, nothing is projected
    # (projecting tensor by tensor would have changed a's gradient to (1, 0))
    s, t = (
        torch.tensor([-1.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 3.0], dtype=torch.float64),
    )
    assert run(s, t) == (False, [0.0, 0.0], [0.0, 4.0], [5.0])
    # <g_o, g_f> = -2 + 1 = -1, |g_f|^2 = 2: g_o + 0.5 g_f on (a, b); c takes the plain sum
    s, t = (
        torch.tensor([-2.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 1.0], dtype=torch.float64),
    )
    did, ga, gb, gc = run(s, t)
    assert (
        did and ga == pytest.approx([-0.5, 0.0]) and gb == pytest.approx([0.0, 2.5]) and gc == [5.0]
    )
    # the reverse side (RomeBERT's setting outside MNLI/QQP): |g_o|^2 = 5, g_f + 0.2 g_o
    did, ga, gb, gc = run(s, t, "final")
    assert (
        did and ga == pytest.approx([-1.4, 0.0]) and gb == pytest.approx([0.0, 2.2]) and gc == [5.0]
    )


def test_gradient_regularization_bad_inputs():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"other_loss must be a scalar"):
        losses.gradient_regularized_backward((p**2).sum(), p * 2, [p], [])
    with pytest.raises(ValueError, match=r"projected must be a subset"):
        losses.gradient_regularized_backward(
            (p**2).sum(), p.sum(), [p], [nn.Parameter(torch.ones(1))]
        )
    with pytest.raises(ValueError, match=r"project must be one of \('others', 'final'\)"):
        losses.gradient_regularized_backward((p**2).sum(), p.sum(), [p], [p], project="last")


# ---- threshold calibration ----


def held_out(depth=6, batch=200, c=3):
    """Off-ramp logits that grow more confident and more accurate with depth, and their labels."""
    y = torch.randint(0, c, (batch,))
    z = torch.randn(depth, batch, c, dtype=torch.float64)
    for i in range(depth):
        z[i, torch.arange(batch), y] += 0.6 * (i + 1)
    return z, y


def test_exit_layers_replay_the_batched_decisions(seeded):
    dm = 8
    from test_multi_exit import make_encoder

    enc = make_encoder(dtype=torch.float64)
    hidden = torch.randn(19, 4, dm, dtype=torch.float64)
    z = enc(hidden).detach()
    for criterion, kw in (
        ("entropy", dict(threshold=0.7)),
        ("max_prob", dict(threshold=0.6)),
        ("patience", dict(patience=2)),
    ):
        _, want = enc.early_exit(hidden, criterion=criterion, **kw)
        assert calibration.exit_layers(z, criterion, **kw).tolist() == want.tolist()


@pytest.mark.parametrize("criterion", ["entropy", "max_prob", "patience"])
def test_calibrate_to_a_target_average_exit(criterion, seeded):
    z, y = held_out()
    cal = calibration.calibrate_threshold(z, y, criterion=criterion, target_avg_exit=3.5)
    layers = calibration.exit_layers(
        z,
        criterion,
        **(
            {"patience": cal.threshold} if criterion == "patience" else {"threshold": cal.threshold}
        ),
    )
    assert (
        float(layers.double().mean()) == pytest.approx(cal.avg_exit_layer)
        and cal.avg_exit_layer <= 3.5
    )
    curve = cal.curve
    assert set(curve) == {"threshold", "avg_exit_layer", "accuracy", "speedup"}
    assert torch.allclose(curve["speedup"], 6 / curve["avg_exit_layer"])
    # nothing fast enough is more accurate
    ok = curve["avg_exit_layer"] <= 3.5
    assert cal.accuracy == pytest.approx(float(curve["accuracy"][ok].max()))


def test_calibrate_to_an_accuracy_drop(seeded):
    z, y = held_out()
    cal = calibration.calibrate_threshold(z, y, criterion="entropy", max_accuracy_drop=0.02)
    assert cal.accuracy >= cal.full_depth_accuracy - 0.02
    ok = cal.curve["accuracy"] >= cal.full_depth_accuracy - 0.02
    assert cal.avg_exit_layer == pytest.approx(float(cal.curve["avg_exit_layer"][ok].min()))
    assert cal.avg_exit_layer < 6  # the synthetic off-ramps are good enough to leave early


def test_calibration_bad_inputs():
    z, y = held_out(depth=3, batch=10)
    with pytest.raises(ValueError, match=r"exactly one of"):
        calibration.calibrate_threshold(z, y, criterion="entropy")
    with pytest.raises(ValueError, match=r"target_avg_exit must be in \[1, L\]"):
        calibration.calibrate_threshold(z, y, criterion="entropy", target_avg_exit=5)
    with pytest.raises(ValueError, match=r"max_accuracy_drop needs labels"):
        calibration.calibrate_threshold(z, criterion="max_prob", max_accuracy_drop=0.1)
    with pytest.raises(ValueError, match=r"criterion must be one of"):
        calibration.calibrate_threshold(z, y, criterion="margin", target_avg_exit=2)


def test_calibration_accepts_the_full_depth_settings(seeded):
    z, y = held_out(depth=4, batch=20)
    for criterion, c in (("entropy", 0.0), ("patience", 0)):
        curve = calibration.speed_accuracy_curve(z, y, criterion=criterion, candidates=[c])
        assert curve["avg_exit_layer"].tolist() == [4.0] and curve["speedup"].tolist() == [1.0]
        full = float((z[-1].argmax(-1) == y).double().mean())
        assert curve["accuracy"].tolist() == [full]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gradient_regularization_never_synchronises_with_the_host(seeded):
    """The projection decision stays on the device: no .item(), no host-side branch on a device value."""
    enc = MultiExitEncoder(
        [TinyLayer(8) for _ in range(3)], [ExitHead(8, 3) for _ in range(3)]
    ).cuda()
    hidden = torch.randn(5, 4, 8, device="cuda")
    y = torch.randint(0, 3, (5,), device="cuda")
    z = enc(hidden)
    full = losses.multi_exit_distillation_loss(z, y, backend="eager")
    final = nn.functional.cross_entropy(z[-1], y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        did = losses.gradient_regularized_backward(
            final, full - final, list(enc.parameters()), losses.romebert_projected_parameters(enc)
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert did.device.type == "cuda"


def test_fused_loss_kernel_reads_only_inside_the_labels():
    """Below the op's checks (the kernel launcher itself), with fewer labels than samples: a sample past them gets
    a NaN loss instead of a label read from past the tensor."""
    from effbert.kernels import early_exit as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    z = torch.randn(3, 5, 4, device=device)
    labels = torch.tensor([1, 0, 3, 2, 2], device=device)
    rows, grad = torch.full((5,), -7.0, device=device), torch.empty(3, 5, 4, device=device)
    kernels.multi_exit_loss(z, labels[:3], rows, grad, 0.9, 3.0)
    full = torch.full((5,), -7.0, device=device)
    kernels.multi_exit_loss(z, labels, full, torch.empty_like(grad), 0.9, 3.0)
    assert torch.equal(rows[:3], full[:3]) and torch.isnan(rows[3:]).all()
