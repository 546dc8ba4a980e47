"""CompoundGrow's operators (effbert.models.growth) against grow_bert's rules, in float64."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from effbert.models import TupeBertConfig, TupeBertForMaskedLM
from effbert.models import growth

MODES = ("absolute", "tupe-a", "tupe-r")


def tiny(mode="tupe-r", **overrides):
    values = dict(
        vocab_size=41,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=24,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        position_mode=mode,
        num_buckets=8,
        max_distance=12,
        backend="eager",
    )
    values.update(overrides)
    torch.manual_seed(0)
    model = TupeBertForMaskedLM(TupeBertConfig(**values)).double().eval()
    # every parameter non-trivial (the zero-initialised TUPE scalars and biases too)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(b=3, n=13, vocab=41, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, n), generator=g)
    lengths = torch.tensor([n, n - 4, n - 7][:b])
    mask = torch.arange(n)[None] < lengths[:, None]
    labels = torch.where(
        (torch.rand(b, n, generator=g) < 0.3) & mask & (torch.arange(n) > 0),
        torch.randint(5, vocab, (b, n), generator=g),
        torch.full((b, n), -100),
    )
    labels[:, 2] = torch.where(mask[:, 2], 7, -100)  # at least one target in every row
    return ids, mask.long(), labels


@pytest.mark.parametrize("mode", MODES)
def test_ffn_tiling_preserves_the_function(mode):
    model = tiny(mode)
    ids, mask, labels = batch()
    before = model(ids, mask, labels=labels)
    small = copy.deepcopy(model)
    mapping = growth.grow_ffn(model, 36)
    after = model(ids, mask, labels=labels)
    assert model.config.intermediate_size == 36
    layer, ref = model.bert.encoder.layers[1], small.bert.encoder.layers[1]
    assert torch.equal(layer.intermediate.weight, ref.intermediate.weight.repeat(3, 1))
    assert torch.equal(layer.output.weight, ref.output.weight.repeat(1, 3) * (1 / 3))
    assert torch.equal(layer.output.bias, ref.output.bias)
    assert mapping["bert.encoder.layers.1.intermediate.bias"].grad_scale == pytest.approx(1 / 3)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after.loss, before.loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ("absolute", "tupe-r"))
def test_depth_stacking_copies_layer_i_mod_small(mode, tmp_path):
    model = tiny(mode, num_hidden_layers=3)
    small = copy.deepcopy(model)
    mapping = growth.grow_model(model, num_layers=7, intermediate_size=24)
    assert model.config.num_hidden_layers == 7 and len(model.bert.encoder.layers) == 7
    big = dict(model.named_parameters())
    old = dict(small.named_parameters())
    for i in range(7):
        src = small.bert.encoder.layers[i % 3]
        dst = model.bert.encoder.layers[i]
        assert torch.equal(dst.attention.qkv.weight, src.attention.qkv.weight)
        assert torch.equal(dst.attention_norm.weight, src.attention_norm.weight)
        assert torch.equal(dst.intermediate.weight, src.intermediate.weight.repeat(2, 1))
        assert torch.equal(dst.output.weight, src.output.weight.repeat(1, 2) * (1 / 2))
        rule = mapping[f"bert.encoder.layers.{i}.output.weight"]
        assert rule.source == f"bert.encoder.layers.{i % 3}.output.weight"
    for name, p in old.items():  # embeddings, TUPE's positional parameters and the head are kept
        if not name.startswith("bert.encoder."):
            assert torch.equal(big[name], p), name
    for name, rule in mapping.items():  # every rule rebuilds its parameter from the small model
        assert torch.equal(rule.apply(old[rule.source]), big[name]), name
    assert len(set(map(id, model.parameters()))) == len(
        list(model.parameters())
    )  # no shared copies
    model.save_pretrained(tmp_path)
    loaded = TupeBertForMaskedLM.from_pretrained(tmp_path).double().eval()
    ids, mask, labels = batch()
    torch.testing.assert_close(
        loaded(ids, mask).logits, model(ids, mask).logits, rtol=1e-12, atol=1e-15
    )


def test_operators_check_their_arguments():
    model = tiny()
    with pytest.raises(ValueError, match="num_layers"):
        growth.grow_depth(model, 1)
    with pytest.raises(ValueError, match="intermediate_size must be a multiple"):
        growth.grow_model(model, num_layers=4, intermediate_size=18)
    assert len(model.bert.encoder.layers) == 2  # refused before any change
    with pytest.raises(TypeError, match="model"):
        growth.grow_ffn(torch.nn.Linear(2, 2), 4)
    with pytest.raises(ValueError, match="pool_size"):
        growth.set_input_pooling(model, 0)


# ------------------------------------------------------------------------------- the pooled stage


def _layer_ref(layer, hq, hkv, pb):
    """One post-LN layer, query by query, head by head (float64)."""
    att = layer.attention
    wq, wk, wv = att.qkv.weight.chunk(3)
    bq, bk, bv = att.qkv.bias.chunk(3)
    heads, d = att.num_heads, att.head_dim
    q, k, v = hq @ wq.T + bq, hkv @ wk.T + bk, hkv @ wv.T + bv
    scale = 1 / math.sqrt((2 if pb is not None else 1) * d)
    ctx = torch.zeros_like(hq)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        for i in range(hq.shape[0]):
            logits = torch.stack(
                [
                    q[i, sl] @ k[j, sl] * scale + (pb[h, i, j] if pb is not None else 0)
                    for j in range(hkv.shape[0])
                ]
            )
            ctx[i, sl] = torch.softmax(logits, 0) @ v[:, sl]
    x = layer.attention_norm(hq + att.out(ctx))
    return layer.output_norm(x + layer.output(layer.act(layer.intermediate(x))))


def _pooled_reference(model, ids, mask, labels, k):
    """grow_bert's pooled forward written out per row: [CLS], the mean of each group's real tokens,
    then the targets as queries; every real token then the targets as layer 0's keys; the positional
    term of a set of tokens to another is the mean of its members' terms."""
    bert = model.bert
    b, n = ids.shape
    emb = bert.embed(ids, torch.zeros_like(ids))
    pos = bert.position_bias(n)
    total, count = 0.0, 0
    for r in range(b):
        real = [i for i in range(n) if mask[r, i]]
        targets = [i for i in range(n) if mask[r, i] and labels[r, i] != -100]
        groups = [
            [i for i in range(1 + g * k, min(1 + (g + 1) * k, n)) if mask[r, i]]
            for g in range(-(-(n - 1) // k))
        ]
        qsets = [[0]] + [grp for grp in groups if grp] + [[t] for t in targets]
        ksets = [[i] for i in real] + [[t] for t in targets]

        def vec(sets):
            return torch.stack([emb[r, s].mean(0) for s in sets])

        def pb(qs, ks):
            if pos is None:
                return None
            return torch.stack(
                [torch.stack([pos[:, a][:, :, b_].mean((1, 2)) for b_ in ks], -1) for a in qs], 1
            )

        hidden = _layer_ref(bert.encoder.layers[0], vec(qsets), vec(ksets), pb(qsets, ksets))
        bias = pb(qsets, qsets)
        for layer in bert.encoder.layers[1:]:
            hidden = _layer_ref(layer, hidden, hidden, bias)
        logits = model.mlm_head(
            hidden[len(hidden) - len(targets) :], bert.embeddings.word_embeddings.weight
        )
        total = total + F.cross_entropy(logits, labels[r, targets], reduction="sum")
        count += len(targets)
    return total / count


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", (1, 3))
def test_pooled_forward_matches_grow_bert_per_row(mode, k):
    model = tiny(mode)
    ids, mask, labels = batch()
    ref = _pooled_reference(model, ids, mask, labels, k)
    out = growth.pooled_mlm_forward(model, ids, mask, labels=labels, pool_size=k)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    growth.set_input_pooling(
        model, k
    )  # the model's forward is the pooled one (k > 1) or its own (k = 1)
    assert growth.input_pooling(model) == k
    if k > 1:
        torch.testing.assert_close(
            model(ids, mask, labels=labels).loss, ref, rtol=1e-10, atol=1e-12
        )
    else:
        assert "forward" not in vars(model)


@pytest.mark.parametrize("mode", ("absolute", "tupe-r"))
def test_pooled_layers_without_targets_are_the_model(mode):
    """pool_size 1 without targets: the pooled path's layers and positional term are the model's
    own."""
    model = tiny(mode)
    ids, mask, _ = batch()
    emb = model.bert.embed(ids, torch.zeros_like(ids))
    no_targets = torch.full_like(ids, -100)
    q, kk, qmask, kmask, order, tmask = growth.pooling_matrices(mask.bool(), no_targets, 1)
    assert order.shape[1] == 0 and torch.equal(kmask, mask.bool())
    pos = model.bert.position_bias(ids.shape[1])
    bias = growth.pooled_position_bias(pos, q.double(), kk.double())
    real = mask.bool()
    if pos is not None:  # at the real queries (a padded one is an empty group, masked)
        want = pos.expand_as(bias).transpose(1, 2)[real]
        torch.testing.assert_close(bias.transpose(1, 2)[real], want, rtol=0, atol=0)
    hidden = emb
    for layer in model.bert.encoder.layers:
        hidden = growth._attend(layer, hidden, hidden, bias, kmask)
    ref = model.bert(ids, mask).last_hidden_state
    torch.testing.assert_close(hidden[real], ref[real], rtol=1e-10, atol=1e-12)


def test_growing_the_length_drops_the_pooling(tmp_path):
    model = tiny()
    ids, mask, labels = batch()
    plain = model(ids, mask, labels=labels).loss
    state = {k: v.clone() for k, v in model.state_dict().items()}
    growth.set_input_pooling(model, 2)
    pooled = model(ids, mask, labels=labels).loss
    assert not torch.allclose(pooled, plain.double())
    assert model.state_dict().keys() == state.keys()  # pooling has no parameters
    model.save_pretrained(tmp_path)  # saving while pooled writes the plain model
    growth.set_input_pooling(model, 1)
    torch.testing.assert_close(model(ids, mask, labels=labels).loss, plain, rtol=0, atol=0)
    loaded = TupeBertForMaskedLM.from_pretrained(tmp_path).double().eval()
    torch.testing.assert_close(loaded(ids, mask, labels=labels).loss, plain, rtol=0, atol=0)


def test_pooled_forward_needs_labels_and_one_text_per_row():
    model = growth.set_input_pooling(tiny(), 2)
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="labels are required"):
        model(ids, mask)
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, mask, labels=labels, position_ids=torch.zeros_like(ids))


# --------------------------------------------------------------------------------- Adam's state


def _grads(model, ids, mask, labels):
    model.zero_grad()
    model(ids, mask, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_ffn_gradients_follow_the_operator():
    """The grown model's gradients are the small model's transformed by grad_scale: the premise of
    growing Adam's moments."""
    model = tiny()
    ids, mask, labels = batch()
    small = _grads(model, ids, mask, labels)
    mapping = growth.grow_ffn(model, 36)
    big = _grads(model, ids, mask, labels)
    for name, rule in mapping.items():
        torch.testing.assert_close(
            big[name], rule.apply(small[rule.source], "exp_avg"), rtol=1e-9, atol=1e-13
        )


def test_grown_adam_state_equals_a_real_adamw_step_on_the_grown_model():
    model = tiny()
    ids, mask, labels = batch()
    grown = copy.deepcopy(model)
    mapping = growth.grow_ffn(grown, 24)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    old_names = dict(model.named_parameters())
    _grads(model, ids, mask, labels)
    opt.step()
    state = growth.grow_adam_state(opt.state, old_names, dict(grown.named_parameters()), mapping)
    opt_big = torch.optim.AdamW(grown.parameters(), lr=1e-3)
    _grads(grown, ids, mask, labels)  # the grown model's own gradient at the same function
    opt_big.step()
    for name, p in grown.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(
                state[p][key], opt_big.state[p][key], rtol=1e-9, atol=1e-15, msg=f"{name} {key}"
            )


def test_counts():
    model = tiny()
    before = growth.count_parameters(model)
    growth.grow_model(model, num_layers=4, intermediate_size=24)
    h = 16
    per_layer_small = 4 * h * h + 4 * h + 2 * (h * 12) + 12 + h + 4 * h
    per_layer_big = 4 * h * h + 4 * h + 2 * (h * 24) + 24 + h + 4 * h
    assert growth.count_parameters(model) - before == 4 * per_layer_big - 2 * per_layer_small
    cfg = model.config
    full = growth.mlm_flops_per_token(cfg, 128)
    pooled = growth.mlm_flops_per_token(cfg, 128, pool_size=4)
    assert pooled < full / 2
