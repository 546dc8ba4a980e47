"""TupeBertForTokenClassification: multi-exit heads and the joint loss, save/load and Auto registration, and batched
SENTEE / TOKEE inference against the published per-sentence loop (Li et al., ACL 2021;
LeeSureman/Sequence-Labeling-Early-Exit, V0/modeling_bert_ee.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

import effbert  # noqa: F401  (registers the Auto classes)
from effbert.models import (
    MultiExitTokenClassifierOutput,
    TupeBertConfig,
    TupeBertForTokenClassification,
    multi_exit_token_loss,
    published_token_thresholds,
)
from effbert.reference.token_exit_loop import uncertainty
from effbert.reference.token_exit_loop import published_token_exit_loop as published_loop

DEPTH = 4


def tiny_config(mode="tupe-r", **overrides):
    values = dict(
        vocab_size=53,
        hidden_size=32,
        num_hidden_layers=DEPTH,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=24,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        position_mode=mode,
        num_buckets=8,
        max_distance=12,
        num_labels=5,
        multi_exit=True,
        backend="eager",
    )
    values.update(overrides)
    return TupeBertConfig(**values)


def make_model(mode="tupe-r", dtype=torch.float64, **overrides):
    model = TupeBertForTokenClassification(tiny_config(mode, **overrides))
    with (
        torch.no_grad()
    ):  # every parameter non-trivial; classifiers confident enough to spread u over [0, 1]
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for head in model.exits or []:
            head.weight.mul_(3.0)
    return model.to(dtype).eval()


def make_batch(cfg, lengths=(9, 4, 13, 1, 7, 2), n=14):
    """Right-padded rows of odd lengths; words of one to three pieces between [CLS] and [SEP] (the labelled token
    is each word's first piece; a row of 1 or 2 tokens has no word)."""
    b = len(lengths)
    ids = torch.randint(1, cfg.vocab_size, (b, n))
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    label_mask = torch.zeros(b, n, dtype=torch.bool)
    for r, length in enumerate(lengths):
        i = 1
        while i < length - 1:
            label_mask[r, i] = True
            i += int(torch.randint(1, 4, ()))
    return ids, mask, label_mask


# ---- the published loop: one sentence at a time, the whole layer on every token, the masked copy rule ----


def quantile_thresholds(model, ids, mask, label_mask, q, window=3):
    """Per layer, about the ``q`` quantile of the words' window uncertainty in a full forward: thresholds that let
    words leave at every layer (the states change once words exit, so the spread is approximate). Each threshold
    is the midpoint of two neighbouring distinct values, never a value itself: until a word exits the states are
    the full forward's, and a threshold equal to a word's ``u`` would let rounding decide."""
    with torch.no_grad():
        z = model(ids, mask).exit_logits
    out = []
    for layer_logits in z:
        u = uncertainty(layer_logits).masked_fill(
            ~label_mask, -1.0
        )  # other tokens never win a window's max
        win = F.max_pool1d(u[:, None], window, 1, window // 2)[:, 0][label_mask]
        win = torch.unique(win)  # sorted; a window's max repeats over its neighbours
        k = min(int(q * (win.numel() - 1)), win.numel() - 2)
        out.append(float((win[k] + win[k + 1]) / 2))
    return out


def check_against_loop(model, ids, mask, label_mask, hf=None, **kw):
    labels, layers, token_layers, logits = model.early_exit_token_labels(
        ids, mask, label_mask=label_mask, **kw
    )
    assert labels.dtype == torch.int64 and layers.dtype == torch.int64
    assert torch.equal(labels[label_mask], logits[label_mask].argmax(-1))
    assert (labels[~label_mask] == -100).all() and (layers[~label_mask] == 0).all()
    total, mismatches, all_layers = 0, 0, []
    for r in range(ids.shape[0]):
        real = mask[r]
        want, want_layers, want_cost, want_logits = published_loop(
            model, ids[r][real], label_mask[r][real], hf=hf, **kw
        )
        got, got_layers = labels[r][label_mask[r]].tolist(), layers[r][label_mask[r]].tolist()
        mismatches += sum(a != b for a, b in zip(got, want)) + sum(
            a != b for a, b in zip(got_layers, want_layers)
        )
        assert got_layers == want_layers, (
            f"row {r}: exit layers {got_layers}, the loop gives {want_layers}"
        )
        # the exit layer's logits, from states built with the copy rule: any state that differs shows here
        torch.testing.assert_close(
            logits[r][label_mask[r]], want_logits.to(logits.dtype), rtol=1e-9, atol=1e-12
        )
        total += want_cost
        all_layers += got_layers
    assert mismatches == 0
    assert token_layers == total
    return all_layers


THRESHOLD_CASES = {
    "none_exit": [0.0] * DEPTH,  # u >= 0: nobody exits before the last layer
    "all_at_layer_1": [1.01] * DEPTH,  # u <= 1: every word exits at layer 1
    "mixed": None,  # the 0.35 quantile of each layer's uncertainties
}


@pytest.mark.parametrize("mode", ["tokee", "sentee"])
@pytest.mark.parametrize("case", list(THRESHOLD_CASES))
@pytest.mark.parametrize("position_mode", ["tupe-r", "absolute"])
def test_batched_inference_equals_the_published_loop(mode, case, position_mode):
    torch.manual_seed(0)
    model = make_model(position_mode)
    ids, mask, label_mask = make_batch(model.config)
    thresholds = THRESHOLD_CASES[case]
    if thresholds is None:
        thresholds = quantile_thresholds(
            model, ids, mask, label_mask, 0.35 if mode == "tokee" else 0.8
        )
    layers = check_against_loop(
        model, ids, mask, label_mask, mode=mode, thresholds=thresholds, window=3
    )
    if case == "none_exit":
        assert set(layers) == {DEPTH}
    elif case == "all_at_layer_1":
        assert set(layers) == {1}
    else:  # a real mix: words leave at three layers or more (sentences, fewer: at two or more)
        assert len(set(layers)) >= (3 if mode == "tokee" else 2), layers
    if mode == "tokee" and case == "mixed":  # and the copy rule changes what later layers decide
        changed = 0
        for r in range(ids.shape[0]):
            real = mask[r]
            args = (model, ids[r][real], label_mask[r][real])
            kw = dict(mode=mode, thresholds=thresholds)
            a, b = published_loop(*args, **kw)[3], published_loop(*args, freeze=False, **kw)[3]
            changed += not torch.allclose(a, b, rtol=1e-6, atol=1e-9)
        assert changed > 0


@pytest.mark.parametrize(
    "window,copy_wordpieces,pool", [(1, "first", "mean"), (5, "all", "mean"), (3, "first", "max")]
)
def test_windows_copy_rules_and_pooling_equal_the_loop(window, copy_wordpieces, pool):
    torch.manual_seed(1)
    model = make_model("tupe-a")
    ids, mask, label_mask = make_batch(model.config, lengths=(11, 5, 14, 3, 8))
    for mode, q in (("tokee", 0.35), ("sentee", 0.8)):
        thresholds = quantile_thresholds(model, ids, mask, label_mask, q, window)
        layers = check_against_loop(
            model,
            ids,
            mask,
            label_mask,
            mode=mode,
            thresholds=thresholds,
            window=window,
            pool=pool,
            copy_wordpieces=copy_wordpieces,
        )
        assert len(set(layers)) >= 2, layers


@pytest.mark.parametrize("mode", ["tokee", "sentee"])
def test_float32_fused_path_gives_the_float64_decisions(mode):
    """The model in float32 on the ``auto`` backends (here the C++ token_exit_decision and exit_entropy and the cpu
    subset attention where the extension is built) takes the float64 eager model's decisions, thresholds lying
    between distinct uncertainties; the exit-layer logits agree to float32 rounding."""
    torch.manual_seed(2)
    model = make_model(dtype=torch.float64)
    ids, mask, label_mask = make_batch(model.config)
    fast = make_model(dtype=torch.float64)
    fast.load_state_dict(model.state_dict())
    fast = fast.float().set_backend("auto")
    for q in (0.2, 0.5):
        kw = dict(
            mode=mode,
            window=3,
            label_mask=label_mask,
            thresholds=quantile_thresholds(
                model, ids, mask, label_mask, q if mode == "tokee" else q + 0.4
            ),
        )
        want, got = (
            model.early_exit_token_labels(ids, mask, **kw),
            fast.early_exit_token_labels(ids, mask, **kw),
        )
        assert torch.equal(got.exit_layer, want.exit_layer) and torch.equal(got.labels, want.labels)
        assert got.token_layers == want.token_layers
        torch.testing.assert_close(got.logits.double(), want.logits, rtol=1e-4, atol=1e-5)


def test_default_label_mask_is_every_token_but_cls_and_sep():
    torch.manual_seed(3)
    model = make_model()
    ids, mask, _ = make_batch(model.config, lengths=(6, 3, 9))
    default = mask.clone()
    for r, length in enumerate((6, 3, 9)):
        default[r, 0] = default[r, length - 1] = False
    kw = dict(mode="tokee", thresholds=published_token_thresholds(0.25, DEPTH))
    a = model.early_exit_token_labels(ids, mask, **kw)
    b = model.early_exit_token_labels(ids, mask, label_mask=default, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2])) and a[2] == b[2]
    check_against_loop(model, ids, mask, default, **kw)


def test_forward_gives_every_layer_and_the_published_joint_loss():
    torch.manual_seed(4)
    model = make_model(dtype=torch.float32)
    ids, mask, label_mask = make_batch(model.config)
    labels = torch.where(label_mask, torch.randint(0, 5, ids.shape), torch.full_like(ids, -100))
    out = model(ids, mask, labels=labels)
    assert isinstance(out, MultiExitTokenClassifierOutput)
    assert out.exit_logits.shape == (DEPTH,) + tuple(ids.shape) + (5,)
    assert torch.equal(out.logits, out.exit_logits[-1])
    # the loss written out: sum_i (i+1) * mean CE over labelled tokens / sum_i (i+1)
    keep = labels != -100
    ce = [F.cross_entropy(z[keep].double(), labels[keep]) for z in out.exit_logits]
    want = sum((i + 1) * c for i, c in enumerate(ce)) / sum(range(1, DEPTH + 1))
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    out.loss.backward()
    assert all(h.weight.grad is not None for h in model.exits)
    # each layer's logits are its classifier on that layer's states
    states = model(ids, mask, output_hidden_states=True).hidden_states
    for i, head in enumerate(model.exits):
        torch.testing.assert_close(out.exit_logits[i][mask], head(states[i + 1][mask]))
    # a padded-slot label is no target
    noisy = labels.masked_fill(~mask, 2)
    assert model(ids, mask, labels=noisy).loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_single_classifier_without_multi_exit():
    torch.manual_seed(5)
    model = make_model(dtype=torch.float32, multi_exit=False)
    ids, mask, label_mask = make_batch(model.config)
    labels = torch.where(label_mask, torch.randint(0, 5, ids.shape), torch.full_like(ids, -100))
    out = model(ids, mask, labels=labels)
    keep = labels != -100
    assert out.loss.item() == pytest.approx(
        F.cross_entropy(out.logits[keep], labels[keep]).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="multi_exit=True"):
        model.early_exit_token_labels(ids, mask, thresholds=0.1)


def test_classifier_dropout_sets_the_exit_dropout():
    """config.classifier_dropout (the published code's 0.3) drives the classifiers' dropout; None falls back to
    hidden_dropout_prob, as transformers' BERT does."""
    assert make_model(classifier_dropout=0.3).dropout.p == 0.3
    assert make_model(hidden_dropout_prob=0.2).dropout.p == 0.2
    torch.manual_seed(7)
    model = make_model(
        dtype=torch.float32,
        classifier_dropout=0.5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ).train()
    ids, mask, _ = make_batch(model.config)
    first, second = model(ids, mask).exit_logits, model(ids, mask).exit_logits
    assert not torch.equal(first, second), "the classifiers' dropout is active in training"


def test_save_load_and_auto_class(tmp_path):
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(6)
    model = make_model(dtype=torch.float32, id2label={i: f"L{i}" for i in range(5)})
    model.save_pretrained(tmp_path)
    loaded = AutoModelForTokenClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is TupeBertForTokenClassification
    assert loaded.config.id2label[3] == "L3" and loaded.config.num_labels == 5
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    ids, mask, _ = make_batch(model.config)
    assert torch.equal(model(ids, mask).exit_logits, loaded(ids, mask).exit_logits)


def test_published_threshold_schedule_and_argument_checks():
    assert published_token_thresholds(0.1) == [0.1] * 6 + [0.2] * 6
    assert published_token_thresholds(0.3, 3) == [0.3, 0.6, 0.6]
    with pytest.raises(ValueError, match="threshold"):
        published_token_thresholds(float("nan"))
    model = make_model(dtype=torch.float32)
    ids, mask, label_mask = make_batch(model.config)
    call = model.early_exit_token_labels
    with pytest.raises(ValueError, match="mode"):
        call(ids, mask, mode="word", thresholds=0.1)
    with pytest.raises(ValueError, match="thresholds"):
        call(ids, mask, thresholds=[0.1] * (DEPTH - 1))
    with pytest.raises(ValueError, match="window"):
        call(ids, mask, thresholds=0.1, window=2)
    with pytest.raises(ValueError, match="pool"):
        call(ids, mask, thresholds=0.1, mode="sentee", pool="min")
    with pytest.raises(ValueError, match="copy_wordpieces"):
        call(ids, mask, thresholds=0.1, copy_wordpieces="last")
    with pytest.raises(ValueError, match="label_mask"):
        call(ids, mask, thresholds=0.1, label_mask=label_mask.long())
    with pytest.raises(ValueError, match="label_mask"):
        call(ids, mask, thresholds=0.1, label_mask=label_mask | ~mask)
    with pytest.raises(ValueError, match="labels"):
        model(ids, mask, labels=torch.full_like(ids, 7))
    loss = multi_exit_token_loss(torch.zeros(2, 3, 4), torch.tensor([0, -100, 3]))
    assert loss.item() == pytest.approx(math.log(4))


@pytest.mark.parametrize("mode", ["tokee", "sentee"])
def test_hf_bert_encoder_equals_the_published_loop_on_its_own_layers(mode):
    """A transformers ``BertModel`` converted by ``token_classifier_from_hf_bert``: the batched inference equals the
    published loop run on the HF model's own embeddings and ``BertLayer``s (the encoder the published code uses)."""
    transformers = pytest.importorskip("transformers")
    from effbert.integrations.hf import token_classifier_from_hf_bert

    torch.manual_seed(7)
    hf_config = transformers.BertConfig(
        vocab_size=53,
        hidden_size=32,
        num_hidden_layers=DEPTH,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=24,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    hf = transformers.BertModel(hf_config, add_pooling_layer=False).double().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = token_classifier_from_hf_bert(hf, num_labels=5, backend="eager")
    assert (
        model.config.position_mode == "absolute"
        and model.config.multi_exit
        and model.dtype == torch.float64
    )
    with torch.no_grad():
        for head in model.exits:
            head.weight.normal_(0.0, 0.3)
    ids, mask, label_mask = make_batch(model.config)
    q = 0.35 if mode == "tokee" else 0.8
    for thresholds in (
        [0.0] * DEPTH,
        [1.01] * DEPTH,
        quantile_thresholds(model, ids, mask, label_mask, q),
    ):
        check_against_loop(
            model, ids, mask, label_mask, hf=hf, mode=mode, thresholds=thresholds, window=3
        )


def test_hf_token_classifier_weights_carry_over():
    transformers = pytest.importorskip("transformers")
    from effbert.integrations.hf import token_classifier_from_hf_bert

    torch.manual_seed(8)
    hf_config = transformers.BertConfig(
        vocab_size=53,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=24,
        num_labels=3,
        attn_implementation="eager",
    )
    hf = transformers.BertForTokenClassification(hf_config).double().eval()
    ids = torch.randint(1, 53, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    single = token_classifier_from_hf_bert(hf, multi_exit=False, backend="eager")
    want = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(single(ids, mask).logits[mask.bool()], want[mask.bool()])
    multi = token_classifier_from_hf_bert(hf, backend="eager")
    assert multi.config.num_labels == 3 and multi.config.id2label == {
        0: "LABEL_0",
        1: "LABEL_1",
        2: "LABEL_2",
    }
    assert torch.equal(multi.exits[-1].weight, hf.classifier.weight)
    torch.testing.assert_close(multi(ids, mask).logits[mask.bool()], want[mask.bool()])
    with pytest.raises(ValueError, match="num_labels"):
        token_classifier_from_hf_bert(hf, num_labels=5)


@pytest.mark.parametrize("mode", ["tokee", "sentee"])
def test_rows_without_words_or_tokens_and_an_empty_batch(mode):
    torch.manual_seed(9)
    model = make_model()
    ids = torch.randint(1, 53, (3, 6))
    mask = torch.tensor(
        [[1] * 6, [0] * 6, [1] * 2 + [0] * 4]
    ).bool()  # a row of padding, a row of [CLS] [SEP]
    label_mask = mask.clone()
    label_mask[0, [0, 5]] = False
    label_mask[2] = False
    check_against_loop(
        model, ids[[0, 2]], mask[[0, 2]], label_mask[[0, 2]], mode=mode, thresholds=[0.5] * DEPTH
    )
    labels, layers, cost, logits = model.early_exit_token_labels(
        ids, mask, mode=mode, thresholds=0.5
    )
    assert (labels[1:] == -100).all() and (layers[1:] == 0).all() and (logits[1:] == 0).all()
    # only rows without words: one layer runs (the published loop returns after it), nothing is labelled
    labels, layers, cost, logits = model.early_exit_token_labels(
        ids[2:], mask[2:], mode=mode, thresholds=0.5
    )
    assert cost == 2 and (labels == -100).all()
    labels, layers, cost, logits = model.early_exit_token_labels(
        ids[:0], mask[:0], mode=mode, thresholds=0.5
    )
    assert labels.shape == (0, 6) and logits.shape == (0, 6, 5) and cost == 0


@pytest.mark.parametrize("qkv", ["effbert", "plain"])
@pytest.mark.parametrize("position_mode", ["tupe-r", "absolute"])
@torch.no_grad()
def test_layer_forward_subset_equals_the_full_layer_on_the_running_rows(position_mode, qkv):
    """``TupeBertLayer.forward_subset``: the running rows of the full layer run on the same states, exited rows
    being keys and values only; with effbert's ``Linear`` QKV projection (row blocks through
    ``forward_rows``) and with a plain ``nn.Linear`` in its place (row slices of its weight)."""
    torch.manual_seed(10)
    model = make_model(position_mode)
    layer, bert = model.bert.encoder.layers[1], model.bert
    if qkv == "plain":
        fused = layer.attention.qkv
        plain = torch.nn.Linear(fused.in_features, fused.out_features, dtype=torch.float64)
        plain.weight, plain.bias = fused.weight, fused.bias
        layer.attention.qkv = plain
    lengths = torch.tensor([5, 1, 8])
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    hidden = torch.randn(int(lengths.sum()), 32, dtype=torch.float64)
    pos_bias = bert.position_bias(8)
    full = layer(hidden, pos_bias, None, cu, 8)
    running = torch.rand(hidden.shape[0]) < 0.5
    running[5] = False  # a sentence with no query at all
    sent = torch.repeat_interleave(torch.arange(3), lengths)
    positions = torch.arange(hidden.shape[0]) - cu[:-1].long()[sent]
    q = running.nonzero().flatten()
    cu_q = torch.nn.functional.pad(torch.bincount(sent[q], minlength=3).cumsum(0).int(), (1, 0))
    out = layer.forward_subset(hidden[q], hidden, cu_q, cu, positions[q], pos_bias)
    torch.testing.assert_close(out, full[q], rtol=1e-12, atol=1e-12)


def test_token_thresholds_as_published_t_level_t():
    """``--t_level_t``: a word also exits on its own ``u``; the published single-value form disables it in the first
    half of the layers (-1) and applies it in the second."""
    torch.manual_seed(11)
    model = make_model()
    ids, mask, label_mask = make_batch(model.config)
    thresholds = quantile_thresholds(model, ids, mask, label_mask, 0.2)
    token_thresholds = [-1.0] * (DEPTH // 2) + [0.6] * (DEPTH - DEPTH // 2)
    base = model.early_exit_token_labels(ids, mask, label_mask=label_mask, thresholds=thresholds)
    layers = check_against_loop(
        model,
        ids,
        mask,
        label_mask,
        mode="tokee",
        thresholds=thresholds,
        token_thresholds=token_thresholds,
    )
    assert sum(layers) < int(base.exit_layer.sum())  # the token rule lets words leave earlier
    with pytest.raises(ValueError, match="token_thresholds"):
        model.early_exit_token_labels(ids, mask, thresholds=0.1, token_thresholds=[0.1])
