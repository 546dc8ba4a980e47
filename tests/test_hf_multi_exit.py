"""``multi_exit_bert``: an HF BERT's own layers with an off-ramp after each, against transformers itself (float64
references, padded batches), with and without ``patch_bert_attention``; batched early exit against the per-sample
loop; gradients into HF's weights; bad inputs. Skipped when transformers is missing."""

import copy
import importlib.util

import pytest
import torch

from effbert import reference
from effbert.integrations import hf

from helpers import FP32_RTOL, assert_close


def installed(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


pytestmark = pytest.mark.skipif(
    not installed("transformers"), reason="transformers is not installed (pip install transformers)"
)
GRAD_RTOL = FP32_RTOL * 4
VOCAB = 53
# how the HF model runs its attention: transformers' eager / sdpa paths, or effbert's fused one patched in
VARIANTS = ["eager", "sdpa", "patched"]


def hf_config(impl="eager", **overrides):
    from transformers import BertConfig

    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=41,
        max_position_embeddings=24,
        type_vocab_size=2,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    cfg = BertConfig(**values)
    cfg._attn_implementation = "eager" if impl == "patched" else impl
    return cfg


def make(variant, head="BertForSequenceClassification", **overrides):
    """(hf_model, its float64 copy, wrapper) with the wrapper on the fp32 model; the float64 copy is unpatched."""
    import transformers

    hf_model = getattr(transformers, head)(hf_config(variant, **overrides)).eval()
    ref = copy.deepcopy(hf_model).double()
    if variant == "patched":
        hf.patch_bert_attention(hf_model, backend="eager")
    return hf_model, ref, hf.multi_exit_bert(hf_model)


def padded_batch(b=5, n=9):
    ids = torch.randint(1, VOCAB, (b, n))
    types = torch.randint(0, 2, (b, n))
    lengths = torch.randint(2, n + 1, (b,))
    lengths[0] = n
    mask = (torch.arange(n)[None] < lengths[:, None]).long()
    return ids, types, mask


def sharpen(model, scale=6.0):
    """Later off-ramps more confident (as trained ones are), so thresholds split the batch across layers."""
    with torch.no_grad():
        for i, head in enumerate(model.encoder.heads):
            head.classifier.weight.mul_(1.0 + scale * i / model.depth)


@pytest.mark.parametrize("variant", VARIANTS)
def test_last_exit_is_the_hf_classifier(variant, seeded):
    hf_model, ref, model = make(variant)
    assert model.depth == 3 and model.num_labels == 3 and not model.training
    # weights shared, not copied: the wrapper holds the HF modules themselves
    assert model.embeddings is hf_model.bert.embeddings
    assert all(a.layer is b for a, b in zip(model.encoder.layers, hf_model.bert.encoder.layer))
    assert model.encoder.heads[-1].classifier is hf_model.classifier
    assert model.encoder.heads[-1].pooler is hf_model.bert.pooler.dense
    ids, types, mask = padded_batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        out = model(ids, mask, types)
    assert out.loss is None and out.exit_logits.shape == (3, 5, 3)
    assert_close(out.exit_logits[-1], want, what=f"{variant} last exit")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_exit_reads_that_layers_hidden_state(variant, seeded):
    _, ref, model = make(variant)
    heads64 = copy.deepcopy(model.encoder.heads).double()
    ids, types, mask = padded_batch()
    for m in (None, mask):  # with padding, and without a mask at all
        with torch.no_grad():
            states = ref.bert(
                input_ids=ids, attention_mask=m, token_type_ids=types, output_hidden_states=True
            ).hidden_states
            out = model(ids, m, types).exit_logits
        for i, head in enumerate(heads64):
            with torch.no_grad():
                assert_close(out[i], head(states[i + 1]), what=f"{variant} exit {i + 1}")


def test_bert_model_without_a_classifier(seeded):
    from transformers import BertModel

    bare = BertModel(hf_config(), add_pooling_layer=False).eval()
    model = hf.multi_exit_bert(bare, 4, dropout=0.0)
    assert model.num_labels == 4 and all(h.pooler is not None for h in model.encoder.heads)
    pooled = BertModel(hf_config()).eval()
    model = hf.multi_exit_bert(
        pooled
    )  # config.num_labels (3); the last off-ramp starts from the HF pooler
    assert model.num_labels == 3 and model.encoder.heads[-1].pooler is pooled.pooler.dense
    ids, types, mask = padded_batch()
    ref = copy.deepcopy(pooled).double()
    heads64 = copy.deepcopy(model.encoder.heads).double()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
        got = model(ids, mask, types).exit_logits[-1]
        assert_close(got, heads64[-1].classifier(want.pooler_output), what="BertModel last exit")


def gap_threshold(scores):
    """A threshold that splits the first off-ramp's scores (``scores [L, B]``) near their median, so some samples
    leave at layer 1 and some go on, placed at the largest distance from every score of every layer, so a sample
    run alone (different rounding) cannot land on the other side of it."""
    first = torch.sort(scores[0].double()).values
    every = scores.flatten().double()
    every = every[torch.isfinite(every)]
    b = first.numel()
    mids = (first[b // 4 : (3 * b) // 4] + first[b // 4 + 1 : (3 * b) // 4 + 1]) / 2
    margin = (mids[:, None] - every[None]).abs().min(1).values
    return float(mids[int(torch.argmax(margin))])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("criterion", ["entropy", "max_prob", "patience"])
def test_early_exit_equals_the_per_sample_loop(variant, criterion, seeded):
    _, _, model = make(variant, num_hidden_layers=4)
    sharpen(model)
    ids, types, mask = padded_batch(b=13)
    with torch.no_grad():
        exits = model(ids, mask, types).exit_logits
    flat = exits.reshape(-1, exits.shape[-1]).double()
    if criterion == "patience":
        kw = dict(patience=1)
    elif criterion == "entropy":
        kw = dict(threshold=gap_threshold(reference.exit_entropy(flat).reshape(exits.shape[:2])))
    else:
        kw = dict(threshold=gap_threshold(reference.exit_max_prob(flat).reshape(exits.shape[:2])))
    logits, layer = model.early_exit(ids, mask, types, criterion=criterion, **kw)
    with torch.no_grad():
        hidden, real = model._inputs(ids, mask, types)
    want_logits, want_layer = reference.early_exit_loop(
        model.encoder.layers, model.encoder.heads, hidden, real, criterion=criterion, **kw
    )
    assert layer.dtype == torch.int64 and layer.tolist() == want_layer.tolist()
    assert_close(logits, want_logits, what=f"{variant} {criterion} early-exit logits")
    # and the choice is the one the full forward's off-ramps make
    from effbert.calibration import exit_layers

    assert layer.tolist() == exit_layers(exits, criterion, **kw).tolist()
    if criterion != "patience":
        assert len(set(layer.tolist())) > 1, "the threshold should split the batch across layers"


@pytest.mark.parametrize("variant", ["eager", "patched"])
def test_gradients_reach_the_hf_weights(variant, seeded):
    from transformers import BertForSequenceClassification

    hf_model = BertForSequenceClassification(hf_config(variant)).train()  # dropout 0: train = eval
    model = hf.multi_exit_bert(hf_model)
    hf64, model64 = copy.deepcopy(
        (hf_model, model)
    )  # one deepcopy keeps the sharing between the two
    hf64.double(), model64.double()
    if variant == "patched":
        hf.patch_bert_attention(hf_model, backend="eager")
    ids, types, mask = padded_batch()
    cotangent = torch.randn(3, 5, 3)
    (model(ids, mask, types).exit_logits * cotangent).sum().backward()
    states = hf64.bert(
        input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True
    ).hidden_states
    exits = torch.stack([head(states[i + 1]) for i, head in enumerate(model64.encoder.heads)])
    (exits * cotangent.double()).sum().backward()
    ref = dict(hf64.named_parameters())
    checked = 0
    for name, p in hf_model.named_parameters():
        if name.endswith("self.key.bias"):
            continue  # shifts a whole logit row, which softmax ignores: 0 up to rounding on both sides
        assert p.grad is not None, f"no gradient reached {name}"
        assert_close(p.grad, ref[name].grad, rtol=GRAD_RTOL, what=f"d {name}")
        checked += 1
    assert checked > 20
    # and the training loss is RomeBERT's over these logits
    labels = torch.randint(0, 3, (5,))
    out = model(ids, mask, types, labels=labels)
    from effbert.losses import multi_exit_distillation_loss

    want = multi_exit_distillation_loss(
        out.exit_logits.double(), labels, gamma=0.9, temperature=3.0, backend="eager"
    )
    assert_close(out.loss, want, what="RomeBERT loss")
    model.loss_type = "pabee"
    from effbert import reference as ref_ops

    assert_close(
        model(ids, mask, types, labels=labels).loss,
        ref_ops.pabee_loss(out.exit_logits.double(), labels),
        what="PABEE loss",
    )


def test_bad_inputs_name_the_argument(seeded):
    from transformers import BertForSequenceClassification, BertModel

    _, _, model = make("eager")
    ids, types, mask = padded_batch()
    cases = [
        (dict(input_ids=ids.float()), TypeError, "input_ids"),
        (dict(input_ids=ids[0]), ValueError, r"input_ids must be \[B, N\]"),
        (dict(input_ids=ids + VOCAB), ValueError, "input_ids must hold values"),
        (
            dict(input_ids=torch.ones(2, 25, dtype=torch.long)),
            ValueError,
            "max_position_embeddings",
        ),
        (dict(input_ids=ids, attention_mask=mask[:, :4]), ValueError, "attention_mask"),
        (dict(input_ids=ids, token_type_ids=types + 2), ValueError, "token_type_ids"),
        (dict(input_ids=ids, labels=torch.zeros(4, dtype=torch.long)), ValueError, "labels"),
        (dict(input_ids=ids, labels=torch.full((5,), 3)), ValueError, "labels must hold values"),
        (dict(input_ids=ids, labels=torch.zeros(5)), TypeError, "labels"),
    ]
    for kw, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            model(**kw)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        model.early_exit(ids, mask, criterion="entropy", threshold=-1.0)
    with pytest.raises(ValueError, match="criterion must be one of"):
        model.early_exit(ids, mask, criterion="softmax", threshold=0.5)
    with pytest.raises(TypeError, match="hf_model"):
        hf.multi_exit_bert(torch.nn.Linear(2, 2))
    clf = BertForSequenceClassification(hf_config())
    with pytest.raises(ValueError, match="num_labels"):
        hf.multi_exit_bert(clf, 5)
    with pytest.raises(ValueError, match="num_labels"):
        hf.multi_exit_bert(clf, 0)
    with pytest.raises(ValueError, match="dropout"):
        hf.multi_exit_bert(clf, dropout=1.5)
    with pytest.raises(ValueError, match="loss"):
        hf.multi_exit_bert(clf, loss="ce")
    with pytest.raises(ValueError, match="temperature"):
        hf.multi_exit_bert(clf, temperature=0.0)
    with pytest.raises(ValueError, match="decoder"):
        hf.multi_exit_bert(BertModel(hf_config(is_decoder=True)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("patched", [False, True])
def test_on_the_gpu_with_the_fused_kernels(patched, seeded):
    from transformers import BertForSequenceClassification

    hf_model = BertForSequenceClassification(hf_config("sdpa", num_hidden_layers=4)).cuda().eval()
    model = hf.multi_exit_bert(hf_model)
    sharpen(model)  # the last off-ramp is HF's classifier: copy the reference after this
    ref = copy.deepcopy(hf_model).double()
    if patched:
        hf.patch_bert_attention(
            hf_model
        )  # auto: the fused kernels, in the layers the wrapper shares
    ids, types, mask = (t.cuda() for t in padded_batch(b=13))
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        exits = model(ids, mask, types).exit_logits
    assert_close(exits[-1], want, what="last exit on the GPU")
    flat = exits.reshape(-1, exits.shape[-1]).double()
    kw = dict(threshold=gap_threshold(reference.exit_entropy(flat).reshape(exits.shape[:2])))
    logits, layer = model.early_exit(ids, mask, types, criterion="entropy", **kw)
    with torch.no_grad():
        hidden, real = model._inputs(ids, mask, types)
    want_logits, want_layer = reference.early_exit_loop(
        model.encoder.layers, model.encoder.heads, hidden, real, criterion="entropy", **kw
    )
    assert layer.tolist() == want_layer.tolist()
    assert_close(logits, want_logits, what="early-exit logits on the GPU")


# ---- training as published: off-ramp poolers, regression heads, DeeBERT's stages, full depth ----


def test_every_off_ramp_starts_from_the_checkpoint_pooler(seeded):
    """DeeBERT and RomeBERT copy the pretrained pooler into every off-ramp (init_highway_pooler); PABEE shares one."""
    from transformers import BertForSequenceClassification

    hf_model = BertForSequenceClassification(hf_config()).eval()
    pooler = hf_model.bert.pooler.dense
    model = hf.multi_exit_bert(hf_model)
    heads = list(model.encoder.heads)
    assert heads[-1].pooler is pooler
    for head in heads[:-1]:
        assert head.pooler is not pooler  # a copy each: the off-ramps then learn their own
        assert torch.equal(head.pooler.weight, pooler.weight) and torch.equal(
            head.pooler.bias, pooler.bias
        )
    shared = hf.multi_exit_bert(
        BertForSequenceClassification(hf_config()).eval(), exit_pooler="shared"
    )
    first = shared.encoder.heads[-1].pooler
    assert all(h.pooler is first for h in shared.encoder.heads)
    with pytest.raises(ValueError, match="exit_pooler must be one of"):
        hf.multi_exit_bert(hf_model, exit_pooler="random")


def test_regression_head_trains_on_float_labels_with_mse(seeded):
    from transformers import BertForSequenceClassification

    hf_model = BertForSequenceClassification(hf_config(num_labels=1)).train()
    ids, types, mask = padded_batch()
    y = torch.randn(5)
    for loss in ("romebert", "pabee"):
        model = hf.multi_exit_bert(hf_model, loss=loss)
        out = model(ids, mask, types, labels=y)
        z = out.exit_logits.double()
        mse = [float(((z[i, :, 0] - y.double()) ** 2).mean()) for i in range(3)]
        want = (
            mse[0] + 2 * mse[1] + 3 * mse[2]
        ) / 6  # PABEE's weighted MSE, as HF's MSE for num_labels == 1
        assert out.loss.item() == pytest.approx(want, rel=1e-5) and out.loss.item() > 0
        out.loss.backward()
        assert hf_model.classifier.weight.grad is not None
    with pytest.raises(TypeError, match="labels must be float targets for a one-output"):
        model(ids, mask, types, labels=torch.zeros(5, dtype=torch.long))
    model.eval()
    logits, layer = model.early_exit(
        ids, mask, types, criterion="patience", patience=1, threshold=0.05
    )
    assert logits.shape == (5, 1) and layer.min() >= 1


def test_deebert_stages_train_what_deebert_trains(seeded):
    from transformers import BertForSequenceClassification

    hf_model = BertForSequenceClassification(hf_config()).train()
    model = hf.multi_exit_bert(hf_model, loss="deebert")
    ids, types, mask = padded_batch()
    y = torch.randint(0, 3, (5,))
    out = model(ids, mask, types, labels=y)  # stage 1: the final classifier's cross-entropy
    assert out.loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(out.exit_logits[-1], y).item(), rel=1e-6
    )
    model.set_stage(2)
    out = model(ids, mask, types, labels=y)
    want = sum(torch.nn.functional.cross_entropy(out.exit_logits[i], y).item() for i in range(2))
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    out.loss.backward()
    for name, p in hf_model.named_parameters():  # backbone and final classifier frozen
        assert not p.requires_grad and p.grad is None, name
    for head in list(model.encoder.heads)[:-1]:
        assert all(p.requires_grad and p.grad is not None for p in head.parameters())
    model.set_stage(1)
    assert all(p.requires_grad for p in hf_model.parameters())
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        model.set_stage(0)


def test_full_depth_settings_and_float_masks(seeded):
    _, _, model = make("eager")
    ids, types, mask = padded_batch()
    for kw in (dict(criterion="entropy", threshold=0.0), dict(criterion="patience", patience=0)):
        _, layer = model.early_exit(ids, mask, types, **kw)
        assert layer.tolist() == [3] * 5
    with pytest.raises(TypeError, match="attention_mask must be bool or 0/1 integers"):
        model(ids, mask.float(), types)
