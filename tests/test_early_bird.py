"""EarlyBERT (effbert.models.early_bird, effbert.training.early_bird) against its authors' code
(VITA-Group/EarlyBERT, finetune/): the pruned model equals the masked unpruned one (float64,
absolute and TUPE positions), the draw equals the published quantile rule, the head coefficient's
gradient equals autograd of the published form (probabilities scaled before ``@ V``), the L1 term's
gradient, and the early-bird stop."""

import math

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from effbert.models import TupeBertConfig, TupeBertForSequenceClassification, TupeBertModel
from effbert.models import early_bird as eb
from effbert.training.early_bird import EarlyBirdCallback, ticket_model

L, H, D, INTER = 3, 4, 8, 24


def small_config(position_mode, **kw):
    return TupeBertConfig(
        vocab_size=40,
        hidden_size=H * D,
        num_hidden_layers=L,
        num_attention_heads=H,
        intermediate_size=INTER,
        max_position_embeddings=32,
        position_mode=position_mode,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        backend="eager",
        **kw,
    )


def randomised(model, seed=0):
    """Every parameter perturbed (biases, relative table and [CLS] scalars included, which start at
    0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (3, 11), generator=gen)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


def ticket():
    """Per-layer head sets that differ (head 3 kept by no layer; layer 2 keeps every head some layer
    uses)."""
    heads = torch.tensor(
        [[True, False, True, False], [False, True, False, False], [True, True, True, False]]
    )
    gen = torch.Generator().manual_seed(3)
    ffn = torch.rand(L, INTER, generator=gen) > 0.4
    # a layer may lose every neuron under the global rule: its FFN adds only the output bias
    ffn[1] = False
    return heads, ffn


# ---------------------------------------------------------------- pruned == masked


@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("position_mode", ["absolute", "tupe-a", "tupe-r"])
def test_pruned_model_equals_masked_model(position_mode, unpad):
    torch.manual_seed(0)
    model = randomised(
        TupeBertModel(small_config(position_mode, unpad_inputs=unpad)).double().eval()
    )
    ids, mask = batch()
    heads, ffn = ticket()
    eb.add_coefficients(model)
    eb.masked_coefficients(model, heads, ffn)
    with torch.no_grad():
        masked = model(ids, attention_mask=mask)
    before = eb.count_parameters(model) - L * (H + INTER)  # without the coefficients
    eb.prune_model(model, heads, ffn)
    with torch.no_grad():
        pruned = model(ids, attention_mask=mask)
    torch.testing.assert_close(
        pruned.last_hidden_state, masked.last_hidden_state, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(pruned.pooler_output, masked.pooler_output, rtol=1e-12, atol=1e-12)
    # physically smaller: each pruned head takes 3*D*(H*D) + 3*D QKV weights and biases and D*(H*D)
    # output columns; each pruned neuron H*D + 1 intermediate and H*D output weights
    per_head = 4 * D * H * D + 3 * D
    removed = int((~heads).sum()) * per_head + int((~ffn).sum()) * (2 * H * D + 1)
    if (
        position_mode != "absolute"
    ):  # head 3 is used by no layer: its U^Q / U^K rows (and columns) go
        removed += 2 * (D * H * D + D)
        removed += (model.position_encoder.cls_row is not None) * 2
        removed += model.config.num_buckets if position_mode == "tupe-r" else 0
    assert eb.count_parameters(model) == before - removed
    for i, layer in enumerate(model.encoder.layers):
        assert layer.attention.num_heads == int(heads[i].sum())
        assert layer.attention.qkv.weight.shape == (3 * int(heads[i].sum()) * D, H * D)
        assert layer.intermediate.out_features == int(ffn[i].sum())
        assert layer.attention.head_coef is None and layer.ffn_coef is None
    if position_mode != "absolute":
        assert model.position_encoder.num_heads == 3
        assert (
            model.encoder.layers[2].attention.pos_heads is None
        )  # keeps the whole union: no gather
        assert model.encoder.layers[0].attention.pos_heads.tolist() == [0, 2]
    assert model.config.early_bird_ticket["heads"] == [[0, 2], [1], [0, 1, 2]]


def test_pruned_classifier_trains_and_matches_masked_gradients():
    """Gradients of the kept weights agree too (the pruned model is what EarlyBERT retrains)."""
    torch.manual_seed(0)
    cfg = small_config("tupe-r", num_labels=3)
    base = randomised(TupeBertForSequenceClassification(cfg).double().train())
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ids, mask = batch()
    labels = torch.tensor([0, 2, 1])
    heads, ffn = ticket()
    eb.add_coefficients(base, head_l1=0.0, ffn_l1=0.0)
    eb.masked_coefficients(base, heads, ffn)
    base(ids, attention_mask=mask, labels=labels).loss.backward()
    pruned = (
        TupeBertForSequenceClassification(small_config("tupe-r", num_labels=3)).double().train()
    )
    pruned.load_state_dict(state)
    eb.prune_model(pruned, heads, ffn)
    pruned(ids, attention_mask=mask, labels=labels).loss.backward()
    keep = heads[0].nonzero().squeeze(1)
    rows = torch.cat(
        [(keep[:, None] * D + torch.arange(D)).flatten() + p * H * D for p in range(3)]
    )
    full, small = base.bert.encoder.layers[0], pruned.bert.encoder.layers[0]
    torch.testing.assert_close(
        small.attention.qkv.weight.grad, full.attention.qkv.weight.grad[rows]
    )
    neurons = ffn[0].nonzero().squeeze(1)
    torch.testing.assert_close(small.output.weight.grad, full.output.weight.grad[:, neurons])
    torch.testing.assert_close(pruned.classifier.weight.grad, base.classifier.weight.grad)


@pytest.mark.parametrize("position_mode", ["absolute", "tupe-r"])
def test_pruned_model_saves_and_loads(position_mode, tmp_path):
    """save_pretrained / from_pretrained of a pruned classifier: the config's ticket rebuilds the
    pruned shapes (and each layer's rows of the positional term), the outputs are the same."""
    torch.manual_seed(0)
    model = randomised(TupeBertForSequenceClassification(small_config(position_mode, num_labels=3)))
    heads, ffn = ticket()
    eb.prune_model(model.eval(), heads, ffn)
    model.save_pretrained(tmp_path)
    loaded = TupeBertForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )
    assert loaded.config.early_bird_ticket == model.config.early_bird_ticket
    assert eb.count_parameters(loaded) == eb.count_parameters(model)
    if position_mode != "absolute":
        assert loaded.bert.encoder.layers[1].attention.pos_heads.tolist() == [1]
    bad = small_config(position_mode, num_labels=3)
    bad.early_bird_ticket = {"heads": [[0], [], [1]], "ffn": [[0]] * L}
    with pytest.raises(ValueError, match="no head"):
        TupeBertForSequenceClassification(bad)


def test_prune_model_refuses_bad_tickets():
    model = TupeBertModel(small_config("absolute"))
    heads, ffn = ticket()
    with pytest.raises(ValueError, match="head_keep must be"):
        eb.prune_model(model, heads[:2], ffn)
    with pytest.raises(ValueError, match="bool"):
        eb.prune_model(model, heads.float(), ffn)
    empty = heads.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"head_keep\[1\] keeps no head"):
        eb.prune_model(model, empty, ffn)
    assert model.encoder.layers[0].attention.num_heads == H  # nothing changed before the error
    eb.prune_model(model, heads, ffn)
    with pytest.raises(ValueError, match="pruned already"):
        eb.prune_model(model, heads, ffn)
    with pytest.raises(TypeError, match="TupeBertModel"):
        eb.add_coefficients(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- the draw


def published_quantile(x, q):
    """np.quantile's default ("linear") along the last dim, written out in torch: sorted values v,
    position q * (n - 1), interpolated between its two neighbours."""
    v = x.sort(-1).values
    pos = q * (v.shape[-1] - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, v.shape[-1] - 1)
    return v[..., lo : lo + 1] + (pos - lo) * (v[..., hi : hi + 1] - v[..., lo : lo + 1])


def published_draw(coefs, ratio, method):
    """run_glue_earlybert_draw_and_train.py: quantile over the last axis ("layerwise") or all
    (else), keep coefs > threshold."""
    if method == "layerwise":
        return coefs > published_quantile(coefs, ratio)
    return coefs > published_quantile(coefs.flatten(), ratio)


@pytest.mark.parametrize("seed", range(4))
def test_draw_equals_published_quantile_rule(seed):
    gen = torch.Generator().manual_seed(seed)
    heads = 1.0 + 0.05 * torch.randn(12, 12, generator=gen, dtype=torch.float64)
    ffn = 1.0 + 0.05 * torch.randn(12, 3072, generator=gen, dtype=torch.float64)
    head_keep, ffn_keep = eb.draw_ticket(heads, ffn)
    assert torch.equal(head_keep, published_draw(heads, 0.333333, "layerwise"))
    assert torch.equal(ffn_keep, published_draw(ffn, 0.4, "global"))
    assert (head_keep.sum(1) == 8).all()  # 12 heads: 4 pruned in every layer
    assert int((~ffn_keep).sum()) == math.ceil(0.4 * 12 * 3072)
    # the other methods, as the published flags allow
    head_keep, ffn_keep = eb.draw_ticket(
        heads, ffn, head_method="global", ffn_method="layerwise", head_ratio=0.5, ffn_ratio=0.25
    )
    assert torch.equal(head_keep, published_draw(heads, 0.5, "global"))
    assert torch.equal(ffn_keep, published_draw(ffn, 0.25, "layerwise"))


def test_draw_with_ties_keeps_strictly_greater():
    """Ties at the threshold are pruned (strict >), as the published rule does: coefficients that
    never moved from 1.0 all go."""
    heads = torch.tensor([[1.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    ffn = torch.tensor([[0.0, 0.2, 0.2, 0.2], [0.2, 0.2, 0.9, 1.0]])
    head_keep, ffn_keep = eb.draw_ticket(heads, ffn)
    assert head_keep.tolist() == [[False, False, False], [False, True, True]]
    assert torch.equal(head_keep, published_draw(heads, 0.333333, "layerwise"))
    assert torch.equal(ffn_keep, published_draw(ffn, 0.4, "global"))
    assert ffn_keep.tolist() == [[False] * 4, [False, False, True, True]]


def test_draw_refuses_bad_inputs():
    heads, ffn = torch.ones(2, 4), torch.ones(2, 8)
    with pytest.raises(ValueError, match="head_ratio"):
        eb.draw_ticket(heads, ffn, head_ratio=1.5)
    with pytest.raises(ValueError, match="ffn_method"):
        eb.draw_ticket(heads, ffn, ffn_method="random")
    with pytest.raises(ValueError, match="head_coefs"):
        eb.draw_ticket(torch.ones(4), ffn)


# ---------------------------------------------------------------- coefficients: gradient and L1


def published_attention_layer(layer, hidden, mask):
    """One layer as the published BertSelfAttention computes it: coefficients on the probabilities
    before ``@ V`` (absolute positions, padded batch), then our layer's output projection, norms and
    FFN."""
    attn = layer.attention
    b, n, _ = hidden.shape
    q, k, v = attn.qkv(hidden).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1) * attn.head_coef.view(1, -1, 1, 1)
    ctx = (probs @ v).transpose(1, 2).reshape(b, n, H * D)
    hidden = layer.attention_norm(hidden + attn.out(ctx))
    inner = layer.act(layer.intermediate(hidden)) * layer.ffn_coef
    return layer.output_norm(hidden + layer.output(inner))


def test_coefficient_gradients_equal_autograd_of_the_published_form():
    torch.manual_seed(0)
    model = randomised(TupeBertModel(small_config("absolute")).double())
    eb.add_coefficients(model, head_l1=0.0, ffn_l1=0.0)
    layer = model.encoder.layers[0]
    with torch.no_grad():
        layer.attention.head_coef.copy_(torch.tensor([0.7, 1.3, -0.4, 1.0]))
        layer.ffn_coef.uniform_(-1, 2)
    hidden = torch.randn(2, 6, H * D, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    weights = torch.randn(2, 6, H * D, dtype=torch.float64) * mask[..., None]
    (layer(hidden, attention_mask=mask) * weights).sum().backward()
    ours = layer.attention.head_coef.grad.clone(), layer.ffn_coef.grad.clone()
    layer.zero_grad()
    (published_attention_layer(layer, hidden, mask) * weights).sum().backward()
    torch.testing.assert_close(ours[0], layer.attention.head_coef.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], layer.ffn_coef.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_l1_gradient_equals_published_loss_term(accumulation):
    """trainer.py _training_step: loss / accumulation + 1e-4 * sum |c| per micro-batch. The hook
    adds that term's gradient on every backward, whatever the trainer divides."""
    torch.manual_seed(0)
    cfg = small_config("tupe-r", num_labels=2)
    model = randomised(TupeBertForSequenceClassification(cfg).double())
    reference = TupeBertForSequenceClassification(cfg).double()
    reference.load_state_dict(model.state_dict())
    eb.add_coefficients(model)  # published 1e-4 and 1e-4, as a gradient hook
    eb.add_coefficients(reference, head_l1=0.0, ffn_l1=0.0)
    with torch.no_grad():
        for m in (
            model,
            reference,
        ):  # signs of both kinds, and a zero (sign 0, as |c|'s gradient in torch)
            m.bert.encoder.layers[0].attention.head_coef.copy_(torch.tensor([0.5, -0.2, 0.0, 1.0]))
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1])
    for _ in range(accumulation):
        (model(ids, attention_mask=mask, labels=labels).loss / accumulation).backward()
        loss = reference(ids, attention_mask=mask, labels=labels).loss / accumulation
        (loss + eb.l1_penalty(reference)).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=name)
    value = eb.l1_penalty(model)
    heads, ffn = eb.coefficients(model)
    torch.testing.assert_close(
        value, 1e-4 * heads.double().abs().sum() + 1e-4 * ffn.double().abs().sum()
    )


def test_coefficients_start_at_one_and_leave_the_model_unchanged():
    torch.manual_seed(0)
    model = randomised(TupeBertModel(small_config("tupe-a")).double().eval())
    ids, mask = batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).last_hidden_state
        params = eb.add_coefficients(model)
        after = model(ids, attention_mask=mask).last_hidden_state
    assert len(params) == 2 * L and all(bool((p == 1).all()) for p in params)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already"):
        eb.add_coefficients(model)
    with pytest.raises(ValueError, match="head_l1"):
        eb.l1_penalty(model, head_l1=-1.0)
    eb.remove_coefficients(model)
    with pytest.raises(ValueError, match="no EarlyBERT coefficients"):
        eb.coefficients(model)


# ---------------------------------------------------------------- the early-bird stop


def test_mask_distance():
    a = (torch.tensor([[True, False]]), torch.tensor([[True, True, False, False]]))
    b = (torch.tensor([[True, True]]), torch.tensor([[False, True, False, False]]))
    assert eb.mask_distance(a, a) == 0.0
    assert eb.mask_distance(a, b) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="shape"):
        eb.mask_distance(a, (a[0], torch.ones(1, 3, dtype=torch.bool)))


def _state(step):
    state = TrainerState()
    state.global_step = step
    return state


def test_early_bird_callback_stops_when_distances_stay_below_threshold(tmp_path):
    """Tickets drawn from scripted coefficients: the stop comes at the first draw after `patience`
    successive distances below the threshold, not before, and a jump resets the window."""
    torch.manual_seed(0)
    model = TupeBertModel(small_config("absolute"))
    eb.add_coefficients(model)
    cb = EarlyBirdCallback(draw_every=2, threshold=0.1, patience=3)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    control = TrainerControl()
    cb.on_train_begin(args, _state(0), control, model=model)
    assert set(cb.initial_state) == set(model.state_dict())
    gen = torch.Generator().manual_seed(0)
    base_h, base_f = torch.rand(L, H, generator=gen), torch.rand(L, INTER, generator=gen)
    # a schedule of coefficient states: random (large distances), then a stable ticket with one
    # flip, ...
    schedule = (
        [torch.rand(L, INTER, generator=gen) for _ in range(3)]
        + [base_f] * 2
        + [torch.rand(L, INTER, generator=gen)]
        + [base_f] * 4
    )
    stopped = None
    for i, f in enumerate(schedule):
        step = 2 * (i + 1)
        with torch.no_grad():
            for j, layer in enumerate(model.encoder.layers):
                layer.attention.head_coef.copy_(base_h[j])
                layer.ffn_coef.copy_(f[j])
        cb.on_step_end(args, _state(step - 1), control, model=model)  # not a drawing step
        cb.on_step_end(args, _state(step), control, model=model)
        if control.should_training_stop:
            stopped = step
            break
    # draws at 2..20; distances from the 2nd draw; zeros after draw 7 (step 14): steps 16, 18, 20
    assert stopped == 20 and cb.stopped_at == 20
    assert [s for s, _ in cb.distances] == list(range(4, 22, 2))
    assert all(d == 0.0 for _, d in cb.distances[-3:]) and cb.distances[-4][1] > 0.1
    assert torch.equal(cb.ticket[1], eb.draw_ticket(base_h, base_f)[1])


def test_early_bird_callback_without_convergence_keeps_last_ticket(tmp_path):
    model = TupeBertModel(small_config("absolute"))
    eb.add_coefficients(model)
    cb = EarlyBirdCallback(draw_every=1, threshold=0.0, patience=2)  # distance < 0 never holds
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerControl()
    cb.on_train_begin(args, _state(0), control, model=model)
    for step in (1, 2, 3):
        cb.on_step_end(args, _state(step), control, model=model)
    cb.on_train_end(args, _state(3), control, model=model)
    assert not control.should_training_stop and cb.stopped_at is None and cb.ticket is not None
    with pytest.raises(ValueError, match="draw_every"):
        EarlyBirdCallback(draw_every=0)
    with pytest.raises(ValueError, match="unknown draw_ticket"):
        EarlyBirdCallback(head_rate=0.3)
    bare = TupeBertModel(small_config("absolute"))
    with pytest.raises(ValueError, match="no EarlyBERT coefficients"):
        EarlyBirdCallback().on_train_begin(args, _state(0), control, model=bare)


def test_ticket_model_retrains_from_the_pre_search_weights(tmp_path):
    torch.manual_seed(0)
    model = randomised(TupeBertModel(small_config("tupe-r")).double())
    eb.add_coefficients(model)
    cb = EarlyBirdCallback()
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerControl()
    cb.on_train_begin(args, _state(0), control, model=model)
    reference = {k: v.clone() for k, v in cb.initial_state.items()}
    with torch.no_grad():  # the search moves the weights
        for p in model.parameters():
            p.add_(1.0)
    heads, ffn = ticket()
    ticket_model(model, cb.initial_state, (heads, ffn))
    keep = heads[1].nonzero().squeeze(1)
    rows = torch.cat(
        [(keep[:, None] * D + torch.arange(D)).flatten() + p * H * D for p in range(3)]
    )
    torch.testing.assert_close(
        model.encoder.layers[1].attention.qkv.weight,
        reference["encoder.layers.1.attention.qkv.weight"][rows],
    )
    torch.testing.assert_close(
        model.embeddings.word_embeddings.weight, reference["embeddings.word_embeddings.weight"]
    )


def test_head_pruned_attention_sizes():
    """A head-pruned TupeSelfAttention: fewer heads than hidden_size / head_dim, the input still
    hidden_size wide."""
    from effbert.nn import TupeSelfAttention

    attn = TupeSelfAttention(32, 2, head_dim=8, backend="eager")
    assert attn.qkv.weight.shape == (48, 32) and attn.out.weight.shape == (32, 16)
    assert attn(torch.randn(2, 5, 32)).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="head_dim"):
        TupeSelfAttention(32, 4, head_dim=0)
    with pytest.raises(ValueError, match=r"hidden must be \[B, N, 32\]"):
        attn(torch.randn(2, 5, 16))
