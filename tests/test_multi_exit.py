"""MultiExitEncoder: batched early exit gives, sample by sample, exactly what the per-sample loop gives."""

import pytest
import torch
from torch import nn

import effbert
from effbert import reference
from effbert.nn import BertLayerAdapter, ExitHead, MultiExitEncoder, TorchLayerAdapter
from helpers import assert_close, backend_cases, require_backend


class MixLayer(nn.Module):
    """A toy layer that mixes tokens through a masked mean, so padding changes the result."""

    def __init__(self, dm):
        super().__init__()
        self.lin = nn.Linear(2 * dm, dm)

    def forward(self, hidden, attention_mask=None):
        if attention_mask is None:
            mean = hidden.mean(1, keepdim=True)
        else:
            keep = attention_mask.to(hidden.dtype)[..., None]
            mean = (hidden * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
        return hidden + torch.tanh(self.lin(torch.cat([hidden, mean.expand_as(hidden)], -1)))


def make_encoder(depth=5, dm=8, classes=3, dtype=torch.float32):
    enc = MultiExitEncoder(
        [MixLayer(dm) for _ in range(depth)], [ExitHead(dm, classes) for _ in range(depth)]
    )
    with torch.no_grad():
        for i, head in enumerate(
            enc.heads
        ):  # later off-ramps are more confident, as trained ones are
            head.classifier.weight.mul_(1.0 + 1.5 * i)
    return enc.to(dtype).eval()


CRITERIA = [
    ("entropy", dict(threshold=0.7)),
    ("max_prob", dict(threshold=0.6)),
    ("patience", dict(patience=2)),
]


def check_against_loop(enc, hidden, mask, criterion, kw, backend, expect_layers=None):
    logits, layer = enc.early_exit(hidden, mask, criterion=criterion, backend=backend, **kw)
    want_logits, want_layer = reference.early_exit_loop(
        enc.layers, enc.heads, hidden, mask, criterion=criterion, **kw
    )
    assert layer.dtype == torch.int64 and layer.tolist() == want_layer.tolist()
    assert logits.dtype == want_logits.dtype
    assert_close(logits, want_logits, rtol=1e-5, what=f"{backend} {criterion} logits")
    if expect_layers is not None:
        assert layer.tolist() == expect_layers
    return layer


@pytest.mark.parametrize(
    "backend,device",
    [c for c in backend_cases() if "cuda" not in c.id]
    + [c for c in backend_cases() if "cuda" in c.id],
)
@pytest.mark.parametrize("criterion,kw", CRITERIA, ids=[c for c, _ in CRITERIA])
def test_random_exit_patterns_equal_the_loop(backend, device, criterion, kw, seeded):
    require_backend(backend, device)
    enc = make_encoder().to(device)
    hidden = torch.randn(23, 7, 8, device=device)
    mask = torch.rand(23, 7, device=device) >= 0.3  # True = real token
    mask[:, 0] = True
    layers = check_against_loop(enc, hidden, mask, criterion, kw, backend)
    assert layers.min() >= 1 and layers.max() <= enc.depth


@pytest.mark.parametrize("backend,device", backend_cases())
def test_edge_patterns(backend, device, seeded):
    require_backend(backend, device)
    enc = make_encoder().to(device)
    hidden = torch.randn(9, 5, 8, device=device)
    # all rows at layer 1 (entropy <= log 3 < 2), none early (no off-ramp is that sure), a batch of one
    check_against_loop(
        enc, hidden, None, "entropy", dict(threshold=2.0), backend, expect_layers=[1] * 9
    )
    check_against_loop(
        enc, hidden, None, "entropy", dict(threshold=1e-12), backend, expect_layers=[5] * 9
    )
    check_against_loop(enc, hidden[:1], None, "max_prob", dict(threshold=0.5), backend)
    check_against_loop(
        enc, hidden, None, "patience", dict(patience=enc.depth), backend, expect_layers=[5] * 9
    )


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("criterion,kw", CRITERIA, ids=[c for c, _ in CRITERIA])
def test_nan_samples_never_exit_early(backend, device, criterion, kw, seeded):
    require_backend(backend, device)
    enc = make_encoder().to(device)
    hidden = torch.randn(11, 5, 8, device=device)
    hidden[[2, 7]] = float("nan")  # NaN stays inside its own sample through every layer
    layers = check_against_loop(
        enc,
        hidden,
        None,
        criterion,
        {**kw, "threshold": 2.0} if criterion == "entropy" else kw,
        backend,
    )
    assert layers[2] == enc.depth and layers[7] == enc.depth
    if criterion == "entropy":
        assert (layers[[0, 1, 3, 4, 5, 6, 8, 9, 10]] == 1).all()


def test_float64_model_on_the_eager_backend(seeded):
    enc = make_encoder(dtype=torch.float64)
    hidden = torch.randn(13, 6, 8, dtype=torch.float64)
    mask = torch.rand(13, 6) >= 0.4
    mask[:, 0] = True
    for criterion, kw in CRITERIA:
        check_against_loop(enc, hidden, mask, criterion, kw, "auto")


def test_regression_head_uses_the_delta_rule(seeded):
    enc = make_encoder(classes=1)
    hidden = torch.randn(17, 5, 8)
    for t in (0.05, 0.5, 5.0):
        layers = check_against_loop(
            enc, hidden, None, "patience", dict(patience=1, threshold=t), "cpu"
        )
    assert (layers == 2).all()  # |delta| < 5 everywhere: one repeat at layer 2


def test_forward_returns_every_exit(seeded):
    enc = make_encoder()
    hidden = torch.randn(4, 5, 8)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out = enc(hidden, mask)
    assert out.shape == (5, 4, 3)
    h = hidden
    for i in range(5):
        h = enc.layers[i](h, mask)
        assert torch.allclose(out[i], enc.heads[i](h))
    out.sum().backward()  # the training path is differentiable end to end
    assert enc.layers[0].lin.weight.grad is not None


def test_compaction_runs_later_layers_on_fewer_rows(seeded):
    enc = make_encoder()
    seen = []
    for layer in enc.layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    hidden = torch.randn(16, 5, 8)
    _, layers = enc.early_exit(hidden, criterion="max_prob", threshold=0.6, backend="cpu")
    expected = [16] + [int((layers > i).sum()) for i in range(1, 5)]
    expected = [n for n in expected if n > 0]
    assert seen == expected


def test_torch_encoder_layer_stack(seeded):
    dm = 16
    layers = [
        TorchLayerAdapter(nn.TransformerEncoderLayer(dm, 2, 32, dropout=0.0, batch_first=True))
        for _ in range(3)
    ]
    enc = MultiExitEncoder(layers, [ExitHead(dm, 2) for _ in range(3)]).eval()
    hidden = torch.randn(6, 5, dm)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[2, 3:] = False
    check_against_loop(enc, hidden, mask, "entropy", dict(threshold=0.65), "cpu")


class FakeBertLayer(nn.Module):
    """The call shape of a Hugging Face BertLayer: additive mask [B, 1, 1, N], a tuple out."""

    def forward(self, hidden, attention_mask=None):
        scores = hidden @ hidden.transpose(1, 2)
        if attention_mask is not None:
            scores = scores + attention_mask[:, 0]
        return (torch.softmax(scores, -1) @ hidden,)


def test_bert_layer_adapter_masks_padding(seeded):
    adapter = BertLayerAdapter(FakeBertLayer())
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    out = adapter(hidden, mask)
    # the padded sample equals the same sample cut to its real tokens
    assert torch.allclose(out[0, :2], FakeBertLayer()(hidden[:1, :2])[0][0], atol=1e-6)
    enc = MultiExitEncoder(
        [BertLayerAdapter(FakeBertLayer()) for _ in range(2)], [ExitHead(3, 2) for _ in range(2)]
    )
    check_against_loop(enc, hidden, mask, "max_prob", dict(threshold=0.7), "cpu")


# ---- bad inputs ----


def test_bad_construction():
    with pytest.raises(ValueError, match=r"equal length .* 3 layers and 2 heads"):
        MultiExitEncoder([MixLayer(4)] * 3, [ExitHead(4, 2)] * 2)
    with pytest.raises(ValueError, match=r"at least one layer"):
        MultiExitEncoder([], [])
    with pytest.raises(TypeError, match=r"heads\[1\] must be a torch.nn.Module"):
        MultiExitEncoder([MixLayer(4)] * 2, [ExitHead(4, 2), "head"])


@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        (dict(criterion="entropy", threshold=-1.0), ValueError, r"threshold must be >= 0"),
        (dict(criterion="max_prob", threshold=2.0), ValueError, r"threshold must be in \(0, 1\]"),
        (dict(criterion="patience", patience=-1), ValueError, r"patience must be >= 0"),
        (dict(criterion="softmax", threshold=0.5), ValueError, r"criterion must be one of"),
    ],
)
def test_bad_early_exit_arguments(kw, exc, pattern):
    enc = make_encoder(depth=2)
    with pytest.raises(exc, match=pattern):
        enc.early_exit(torch.randn(3, 4, 8), **kw)


def test_bad_shapes():
    enc = make_encoder(depth=2)
    with pytest.raises(ValueError, match=r"hidden must have 3 dimensions \[B, N, Dm\]"):
        enc.early_exit(torch.randn(3, 8), criterion="entropy", threshold=0.5)
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, N\]"):
        enc.early_exit(
            torch.randn(3, 4, 8),
            torch.ones(3, 5, dtype=torch.bool),
            criterion="entropy",
            threshold=0.5,
        )
    with pytest.raises(TypeError, match=r"attention_mask must be bool or 0/1 integers"):
        enc(torch.randn(3, 4, 8), torch.ones(3, 4))
    bad = MultiExitEncoder([MixLayer(8)], [nn.Linear(8, 2)])  # forgets to pool: [B, N, C] logits
    with pytest.raises(ValueError, match=r"heads\[0\] must return logits \[B, C\]"):
        bad.early_exit(torch.randn(3, 4, 8), criterion="entropy", threshold=0.5)


def test_exports():
    assert effbert.nn.MultiExitEncoder is MultiExitEncoder


# ---- the benchmark's synthetic setup does what its table claims ----


def test_bench_exit_plan_and_cases_check_out():
    from effbert.bench import early_exit as bench

    for batch in (1, 16, 64, 256):
        for avg in (4, 6, 8, 9):
            plan = bench._exit_plan(batch, avg, 12)
            assert float(plan.mean()) == avg and plan.min() >= 1 and plan.max() <= 12
    cases = [c for c in bench.cases(torch.device("cpu"), quick=True) if not c.skip_reasons]
    assert {c.op for c in cases} == {"exit_entropy", "exit_decision", "early_exit_inference"}
    for c in cases:
        if c.op == "exit_entropy":
            continue
        inputs = c.make_inputs()
        if c.check:
            out, ref = c.fn(*inputs), c.reference(*inputs)
            assert torch.allclose(out.double(), ref.double(), rtol=max(c.rtol, 1e-6), atol=1e-6), (
                c.key
            )
    # the synthetic off-ramps make every sample leave at its planned layer
    e2e = next(c for c in cases if c.provider == "effbert-batched")
    (hidden,) = e2e.make_inputs()
    enc = bench._encoder(torch.device("cpu"), torch.float32, 64, 2, 128, 12)
    _, layers = enc.early_exit(hidden, criterion="max_prob", threshold=0.9)
    assert layers.tolist() == hidden[:, 0, -1].long().tolist()


def test_head_changing_width_midway_is_an_error():
    enc = MultiExitEncoder(
        [MixLayer(8) for _ in range(3)], [ExitHead(8, 3), ExitHead(8, 4), ExitHead(8, 3)]
    )
    with pytest.raises(ValueError, match=r"logits must be \[\d+, 3\]"):
        enc.early_exit(torch.randn(5, 4, 8), criterion="entropy", threshold=1e-9, backend="cpu")


# ---- full depth (threshold 0 / patience 0) and the mask convention ----


@pytest.mark.parametrize(
    "backend,device",
    [c for c in backend_cases() if "cuda" not in c.id]
    + [c for c in backend_cases() if "cuda" in c.id],
)
@pytest.mark.parametrize(
    "criterion,kw",
    [
        ("entropy", dict(threshold=0.0)),
        ("entropy", dict(threshold=0)),
        ("patience", dict(patience=0)),
    ],
    ids=["entropy-0.0", "entropy-0", "patience-0"],
)
def test_zero_threshold_and_zero_patience_mean_full_depth(backend, device, criterion, kw, seeded):
    """DeeBERT's and PABEE's scripts start their sweeps at threshold 0 / patience 0: the full-depth row."""
    require_backend(backend, device)
    enc = make_encoder(depth=4).to(device)
    hidden = torch.randn(9, 5, 8, device=device)
    with (
        torch.no_grad()
    ):  # the first off-ramp is certain: entropy 0.0 exactly (exp underflows), equal argmaxes
        enc.heads[0].classifier.bias.copy_(torch.tensor([1e4, 0.0, 0.0]))
        enc.heads[0].classifier.weight.zero_()
    layers = check_against_loop(enc, hidden, None, criterion, kw, backend)
    assert layers.tolist() == [4] * 9
    from effbert import calibration

    z = enc(hidden).detach()
    assert calibration.exit_layers(z, criterion, **kw).tolist() == [4] * 9


def test_attention_mask_is_true_at_real_tokens(seeded):
    enc = make_encoder(depth=3)
    hidden = torch.randn(2, 5, 8)
    real = torch.tensor([[True, True, True, False, False], [True] * 5])
    out = enc(hidden, real)
    # sample 0 equals itself cut to its three real tokens; 0/1 integers mean the same
    alone = enc(hidden[:1, :3])
    assert torch.allclose(out[:, 0], alone[:, 0], atol=1e-6)
    assert torch.equal(enc(hidden, real.long()), out)
    with pytest.raises(TypeError, match=r"attention_mask must be bool or 0/1 integers"):
        enc(hidden, real.float())
    with pytest.raises(ValueError, match=r"attention_mask must hold 0/1 values"):
        enc(hidden, real.long() * 2)
    # a padding mask (True = padding) passed by mistake: its first token reads as padding
    with pytest.raises(
        ValueError, match=r"attention_mask\[1, 0\] is False: True/1 marks real tokens"
    ):
        enc.early_exit(
            hidden,
            torch.tensor([[True] * 5, [False, False, True, True, True]]),
            criterion="entropy",
            threshold=0.5,
        )
    with pytest.raises(ValueError, match=r"attention_mask\[0, 0\] is False"):
        enc(hidden, ~real)


def test_torch_layer_adapter_takes_attention_mask(seeded):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    adapter = TorchLayerAdapter(layer)
    hidden = torch.randn(2, 4, 8)
    real = torch.tensor([[True, True, False, False], [True] * 4])
    out = adapter(hidden, real)
    assert torch.allclose(out[0, :2], layer(hidden[:1, :2])[0], atol=1e-5)
