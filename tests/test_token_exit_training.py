"""Self-sampling fine-tuning (stage 2 of Li et al., ACL 2021) against a plain write-out of the
published code (LeeSureman/Sequence-Labeling-Early-Exit at 9717770: ``V0/utils.py`` ``simulate_ee``,
``inverse_pull_word_to_wordpiece``, ``exit_layers_to_should_exit``, ``Sample_Stop_Update_Callback``;
``V0/modeling_bert_ee.py`` ``train_mode='joint_sample_copy'``), in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effbert.models import (
    SelfSamplingDraw,
    draw_self_sampling,
    multi_exit_token_loss,
    self_sampling_token_exit_layers,
    self_sampling_token_loss,
    simulate_word_exits,
)
from test_token_classification import make_batch, make_model

# ---- the published code, written out (numpy/random draws aside) ----


def get_uncertainty(x):
    """``get_entropy`` / ``get_uncertainty`` of V0/utils.py (logits before the softmax)."""
    exp_x = torch.exp(x)
    a = torch.sum(exp_x, dim=1)
    b = torch.sum(x * exp_x, dim=1)
    return (torch.log(a) - b / a) / math.log(x.size(-1))


def published_simulate_ee(old_pred, win_size, threshold, t_level_t, max_threshold_2=1000):
    """``simulate_ee`` (criterion 'entropy', no constraint): 0-based exit layers of a sentence's
    words."""
    threshold = [threshold] * 6 + [threshold * 2] * 6
    threshold = [min(x, max_threshold_2) for x in threshold]
    t_level_t = [0] * 6 + [t_level_t] * 6
    seq_len = len(old_pred[0])
    token_exit_layers = [11] * seq_len
    pred = [None] * seq_len
    for i in range(12):
        logits = old_pred[i]
        if i + 1 == 12:
            return token_exit_layers
        u = get_uncertainty(logits)
        win = nn.functional.max_pool1d(
            u[None, None], kernel_size=win_size, stride=1, padding=win_size // 2
        )[0, 0]
        for j, uncertainty in enumerate(win):
            if pred[j] is None and (uncertainty < threshold[i] or u[j] < t_level_t[i]):
                pred[j] = logits[j]
                token_exit_layers[j] = i
        if all(p is not None for p in pred):
            return token_exit_layers


def inverse_pull_word_to_wordpiece(
    token_exit_layers, word_to_wordpiece_num, num_hidden_layers, copy_wordpiece
):
    out = [num_hidden_layers - 1]
    for i, layer in enumerate(token_exit_layers):
        if copy_wordpiece == "all":
            out.extend([layer] * word_to_wordpiece_num[i])
        else:
            out.append(layer)
            out.extend([num_hidden_layers - 1] * (word_to_wordpiece_num[i] - 1))
    out.append(num_hidden_layers - 1)
    return out


def exit_layers_to_should_exit(exit_layers, num_layers):
    exit_layers = torch.tensor(exit_layers)
    return torch.stack([exit_layers >= i for i in range(num_layers)])


def published_loss(preds, target, should_exit_word, flooding_bias=None, flooding_const=0.0):
    """The stage-2 loss of ``BertModel_EE`` wrapper's forward, ``true_label=1``,
    ``joint_weighted=1``, reduction 'none': ``preds`` list of L ``[B, W, C]``, ``target [B, W]``
    (-100 padded), ``should_exit_word [B, L, W]`` bool, ``flooding_bias [B, L, W]`` padded with
    -1."""
    batch_size, max_seq_len = target.shape
    loss, total_weight = 0, 0
    for i, pred in enumerate(preds):
        pred = pred.flatten(0, 1)
        target_now_layer = target.masked_fill(mask=~(should_exit_word[:, i]), value=-100).flatten(
            0, 1
        )
        now = F.cross_entropy(pred, target_now_layer, ignore_index=-100, reduction="none")
        if flooding_bias is not None:
            now = now.view(batch_size, max_seq_len)
            now = torch.abs(now - flooding_bias[:, i] - flooding_const)
        now = torch.sum(now) / torch.sum((target != -100).float())
        loss += now * (i + 1)
        total_weight += i + 1
    return loss / total_weight


# ---- the tests ----


def random_logits(depth, n, classes, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    # later layers more confident, so exits spread over the layers
    temp = torch.linspace(0.3, 3.0, depth, dtype=torch.float64)[:, None, None]
    return scale * temp * torch.randn(depth, n, classes, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 5, 17])
@pytest.mark.parametrize("window", [1, 3, 5, 15])
@pytest.mark.parametrize(
    "threshold,t_level_t", [(0.05, -1.0), (0.2, -1.0), (0.3, 0.1), (0.5, 0.3), (0.01, 0.01)]
)
def test_simulate_word_exits_equals_published(n, window, threshold, t_level_t):
    for seed in range(4):
        logits = random_logits(12, n, 5, seed=seed)
        got = simulate_word_exits(logits, window, threshold, t_level_t, max_threshold=0.5)
        want = published_simulate_ee(
            list(logits), window, threshold, t_level_t, max_threshold_2=0.5
        )
        assert got.tolist() == [w + 1 for w in want]


def test_simulate_word_exits_spread_and_edges():
    logits = random_logits(12, 40, 5)
    got = simulate_word_exits(logits, 3, 0.2)
    assert len(set(got.tolist())) > 3  # the test data exits at several layers
    assert simulate_word_exits(logits, 3, -1.0).eq(12).all()  # nothing below a negative threshold
    assert simulate_word_exits(logits, 3, 2.0).eq(1).all()  # everything below 2 (u <= 1)
    assert simulate_word_exits(logits[:, :0], 3, 0.2).shape == (0,)
    for bad, match in [
        (dict(window=2), "window"),
        (dict(threshold=math.nan), "threshold"),
        (dict(token_threshold="x"), "token_threshold"),
    ]:
        args = dict(window=3, threshold=0.2, token_threshold=-1.0)
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            simulate_word_exits(logits, **args)
    with pytest.raises(ValueError, match="word_logits"):
        simulate_word_exits(logits[0], 3, 0.2)


def test_draw_self_sampling_sandwich():
    g = torch.Generator().manual_seed(3)
    windows, thresholds, toks = (5, 7, 9), (0.05, 0.1, 0.25), (-1.0, 0.1)
    seen_coin = set()
    for _ in range(40):
        d = draw_self_sampling(
            8,
            windows=windows,
            thresholds=thresholds,
            token_thresholds=toks,
            sandwich_small=2,
            sandwich_full=4,
            generator=g,
        )
        assert d.full == [False] * 4 + [True] * 4
        assert all(w in windows for w in d.windows) and all(t in thresholds for t in d.thresholds)
        for i in range(2):  # the most aggressive setting on one axis, the largest token threshold
            assert d.windows[i] == 5 or d.thresholds[i] == 0.25
            assert d.token_thresholds[i] == 0.1
            seen_coin.add((d.windows[i] == 5, d.thresholds[i] == 0.25))
    assert (True, False) in seen_coin or (True, True) in seen_coin
    assert (False, True) in seen_coin
    same = [draw_self_sampling(6, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert same[0] == same[1]
    small = draw_self_sampling(2, sandwich_small=2, sandwich_full=3)
    assert small.full == [True, True]  # full depth wins where the sandwich's two ends overlap
    assert draw_self_sampling(0) == SelfSamplingDraw([], [], [], [])
    for bad, match in [
        (dict(windows=(4,)), "windows"),
        (dict(thresholds=()), "thresholds"),
        (dict(token_thresholds=(0.3, 0.1)), "ascending"),
        (dict(sandwich_full=-1), "sandwich_full"),
        (dict(generator=1), "generator"),
    ]:
        with pytest.raises(ValueError, match=match):
            draw_self_sampling(4, **bad)


def word_layout(label_mask, attention_mask):
    """Per row: the labelled positions and each word's piece count as the published data gives them
    (``word_piece_num``): from the labelled token to the next one or the row's last real token
    ([SEP]).
    """
    rows = []
    for r in range(label_mask.shape[0]):
        first = label_mask[r].nonzero().flatten().tolist()
        length = int(attention_mask[r].sum())
        ends = first[1:] + [length - 1]
        rows.append((first, [e - s for s, e in zip(first, ends)], length))
    return rows


@pytest.mark.parametrize("copy_wordpieces", ["all", "first"])
def test_token_exit_layers_equal_published(copy_wordpieces):
    torch.manual_seed(0)
    model = make_model(num_hidden_layers=12)
    ids, mask, label_mask = make_batch(model.config, lengths=(9, 4, 13, 1, 7, 2, 14))
    depth, b = 12, ids.shape[0]
    stage1 = random_logits(depth, b * ids.shape[1], 5, seed=5).view(depth, b, ids.shape[1], 5)
    draw = draw_self_sampling(
        b, sandwich_small=2, sandwich_full=2, generator=torch.Generator().manual_seed(2)
    )
    got = self_sampling_token_exit_layers(
        stage1, label_mask, mask, draw, copy_wordpieces=copy_wordpieces, max_threshold=0.5
    )
    for r, (first, pieces, length) in enumerate(word_layout(label_mask, mask)):
        if length < 2:  # no [CLS] ... [SEP] frame: every real token runs every layer
            assert got[r, :length].eq(depth).all()
            continue
        if draw.full[r]:
            exits = [depth - 1] * len(first)
        else:
            old = [stage1[i, r, first] for i in range(depth)]
            exits = (
                published_simulate_ee(
                    old,
                    draw.windows[r],
                    draw.thresholds[r],
                    draw.token_thresholds[r],
                    max_threshold_2=0.5,
                )
                if first
                else []
            )
        wp = inverse_pull_word_to_wordpiece(exits, pieces, depth, copy_wordpieces)
        assert len(wp) == length
        assert got[r, :length].tolist() == [w + 1 for w in wp]
        assert got[r, length:].eq(0).all()
        should = exit_layers_to_should_exit(wp, depth)  # [L, n]: layer i runs the token
        assert torch.equal(should, torch.stack([got[r, :length] > i for i in range(depth)]))
    with pytest.raises(ValueError, match="draw"):
        self_sampling_token_exit_layers(stage1, label_mask, mask, draw_self_sampling(b - 1))
    with pytest.raises(ValueError, match="label_mask"):
        self_sampling_token_exit_layers(stage1, label_mask | ~mask, mask, draw)


def padded_words(values, label_mask, fill):
    """``values [..., B, N]`` at the labelled tokens laid out as the published word-level ``[..., B,
    W]``."""
    counts = label_mask.sum(1)
    width = int(counts.max())
    out = torch.full(values.shape[:-2] + (label_mask.shape[0], width), fill, dtype=values.dtype)
    for r in range(label_mask.shape[0]):
        out[..., r, : int(counts[r])] = values[..., r, label_mask[r]]
    return out, counts


@pytest.mark.parametrize("flooding", [None, 0.0, 0.05])
def test_self_sampling_loss_equals_published(flooding):
    torch.manual_seed(1)
    depth, b, n, c = 6, 5, 11, 4
    label_mask = torch.rand(b, n) < 0.6
    label_mask[0, :] = True
    labels = torch.where(label_mask, torch.randint(0, c, (b, n)), -100)
    logits = torch.randn(depth, b, n, c, dtype=torch.float64, requires_grad=True)
    exit_layer = torch.randint(1, depth + 1, (b, n))
    bias = torch.rand(depth, b, n, dtype=torch.float64) if flooding is not None else None
    got = self_sampling_token_loss(
        logits.flatten(1, 2),
        labels.flatten(),
        exit_layer.flatten(),
        None if bias is None else bias.flatten(1, 2) + flooding,
    )
    # the published word-level layout
    preds = [padded_words(z.permute(2, 0, 1), label_mask, 0.0)[0].permute(1, 2, 0) for z in logits]
    target, counts = padded_words(labels, label_mask, -100)
    should = torch.stack(
        [padded_words(exit_layer > i, label_mask, False)[0] for i in range(depth)], 1
    )
    fb = None if bias is None else padded_words(bias, label_mask, -1.0)[0].transpose(0, 1)
    want = published_loss(preds, target, should, fb, flooding or 0.0)
    if (
        flooding is not None
    ):  # the published sum's gradient-free |0 + 1 - constant| at each padded word slot
        pad = int((target == -100).sum())
        want = want - sum((i + 1) * pad * abs(1 - flooding) for i in range(depth)) / float(
            counts.sum()
        ) / (depth * (depth + 1) / 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    assert g_got[0][(exit_layer < 1)].abs().sum() == 0  # nothing reaches a layer a token skipped
    assert g_got[depth - 1][(exit_layer < depth) & label_mask].abs().sum() == 0


def test_full_depth_is_the_joint_loss():
    torch.manual_seed(2)
    logits = torch.randn(4, 30, 5, dtype=torch.float64)
    labels = torch.where(torch.rand(30) < 0.7, torch.randint(0, 5, (30,)), -100)
    full = torch.full((30,), 4)
    torch.testing.assert_close(
        self_sampling_token_loss(logits, labels, full),
        multi_exit_token_loss(logits, labels),
        rtol=1e-12,
        atol=1e-12,
    )


def published_copy_forward(model, ids, exit_layer):
    """``BertModel_EE.forward`` in training, ``joint_sample_copy`` with ``keep_norm_same=0``, one
    sentence (its real tokens): every layer on every token, ``h = s * LN(layer(h)) + (1 - s) * h``
    with ``s`` the token's should-run mask; the layer's classifier on each token's state."""
    bert = model.bert
    n = ids.shape[0]
    h = bert.embed(ids[None], torch.zeros_like(ids)[None])
    pos_bias = bert.position_bias(n)
    full = torch.ones(1, n, dtype=torch.bool)
    should = exit_layers_to_should_exit((exit_layer - 1).tolist(), len(model.exits)).double()[
        ..., None
    ]
    res = []
    for i, (layer, head) in enumerate(zip(bert.encoder.layers, model.exits)):
        h = should[i][None] * layer(h, pos_bias, full) + (1 - should[i][None]) * h
        res.append(head(h[0]))
    return torch.stack(res)  # [L, n, C]


@pytest.mark.parametrize("flooding", [False, True])
def test_model_stage2_forward_equals_published(flooding):
    torch.manual_seed(4)
    model = make_model()
    ids, mask, label_mask = make_batch(model.config)
    b, n = ids.shape
    depth = len(model.exits)
    labels = torch.where(label_mask, torch.randint(0, 5, (b, n)), -100)
    exit_layer = torch.where(mask, torch.randint(1, depth + 1, (b, n)), 0)
    bias = torch.rand(depth, b, n, dtype=torch.float64) if flooding else None
    out = model(
        ids, attention_mask=mask, labels=labels, token_exit_layer=exit_layer, flooding_bias=bias
    )
    packed_logits, packed_labels, packed_exit, packed_bias = [], [], [], []
    for r in range(b):
        length = int(mask[r].sum())
        z = published_copy_forward(model, ids[r, :length], exit_layer[r, :length])
        torch.testing.assert_close(out.exit_logits[:, r, :length], z, rtol=1e-10, atol=1e-10)
        packed_logits.append(z)
        packed_labels.append(labels[r, :length])
        packed_exit.append(exit_layer[r, :length])
        if flooding:
            packed_bias.append(bias[:, r, :length])
    want = self_sampling_token_loss(
        torch.cat(packed_logits, 1),
        torch.cat(packed_labels),
        torch.cat(packed_exit),
        torch.cat(packed_bias, 1) if flooding else None,
    )
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-10)
    # every token at full depth: the plain forward and the joint loss
    full = torch.where(mask, depth, 0)
    plain = model(ids, attention_mask=mask, labels=labels)
    same = model(ids, attention_mask=mask, labels=labels, token_exit_layer=full)
    torch.testing.assert_close(same.exit_logits, plain.exit_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(same.loss, plain.loss, rtol=1e-12, atol=1e-12)


def test_model_stage2_checks():
    model = make_model()
    ids, mask, label_mask = make_batch(model.config)
    labels = torch.where(label_mask, 1, -100)
    good = torch.where(mask, 2, 0)
    for kwargs, match in [
        (dict(token_exit_layer=good[:, :-1]), "token_exit_layer"),
        (dict(token_exit_layer=good + 9), r"\[0, 4\]"),
        (dict(token_exit_layer=good.double()), "token_exit_layer"),
        (dict(flooding_bias=torch.zeros(4, *ids.shape)), "needs token_exit_layer"),
        (dict(token_exit_layer=good, flooding_bias=torch.zeros(3, *ids.shape)), "flooding_bias"),
    ]:
        with pytest.raises(ValueError, match=match):
            model(ids, attention_mask=mask, labels=labels, **kwargs)
    single = make_model(multi_exit=False)
    with pytest.raises(ValueError, match="multi_exit"):
        single(ids, attention_mask=mask, labels=labels, token_exit_layer=good)


def test_training_helpers_feed_the_model():
    from effbert.training.token_exit import self_sampling_inputs, stage1_outputs

    torch.manual_seed(6)
    model = make_model()
    ids, mask, label_mask = make_batch(model.config)
    labels = torch.where(label_mask, torch.randint(0, 5, ids.shape), -100)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    model.train()
    logits, loss = stage1_outputs(model, batch)
    assert model.training  # mode restored
    model.eval()
    want = model(ids, attention_mask=mask).exit_logits
    torch.testing.assert_close(logits, want.float())
    for i in range(len(model.exits)):
        ce = F.cross_entropy(want[i][label_mask], labels[label_mask], reduction="none").float()
        torch.testing.assert_close(loss[i][label_mask], ce)
        assert loss[i][~label_mask].eq(0).all()
    extra = self_sampling_inputs(
        batch,
        logits,
        loss,
        flooding_bias=0.1,
        sandwich_full=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert (
        extra["token_exit_layer"][-1][mask[-1]].eq(len(model.exits)).all()
    )  # the sandwich's full row
    torch.testing.assert_close(extra["flooding_bias"], loss + 0.1)
    out = model(
        **batch, **{k: v.double() if v.is_floating_point() else v for k, v in extra.items()}
    )
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="exit_logits"):
        self_sampling_inputs(batch, logits[:, :2], loss)
    with pytest.raises(ValueError, match="token_loss"):
        self_sampling_inputs(batch, logits, loss[:2])
