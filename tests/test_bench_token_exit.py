"""The ``token_exit_inference`` bench rows (effbert.bench.token_exit_inference): the quick cases
build, run and equal the published per-sentence loop; the token-layer and FLOP counts against hand
counts and against the
batched run's own token-layers, with every word exiting at layer 1, none exiting, and a mix, on odd
lengths."""

import pytest
import torch
from test_token_classification import DEPTH, make_batch, make_model, quantile_thresholds

from effbert.bench import token_exit_inference as bench
from effbert.bench.case import check_output
from effbert.bench.runner import collect_cases


def test_quick_cases_build_run_and_equal_the_published_loop():
    cases = bench.cases(torch.device("cpu"), quick=True)
    assert {c.op for c in cases} == {"token_exit_inference"}
    for batch in ("B=1,", "B=4,"):
        group = [c for c in cases if c.shape.startswith(batch)]
        assert {c.provider for c in group} == {
            "effbert-full",
            "effbert-sentee-2x",
            "effbert-tokee-3x",
            "official-loop",
        }
        assert all(c.baseline == "effbert-full" and c.rtol == 0.0 for c in group)
    for case in cases:
        inputs = case.make_inputs()
        fields, problem = check_output(case, inputs)  # labels and exit layers, 0 mismatches
        assert problem is None, (case.key, problem)
        assert fields["rel_error"] == 0.0
        assert case.flops > 0
        if case.provider.startswith("effbert-tokee") or case.provider.startswith("effbert-sentee"):
            ratio = float(case.note.split("FLOP ratio ")[1])
            assert 0 < ratio < 1
            assert "held-out" in case.note and "this batch" in case.note
            state = case.token_exit_state
            target = 3 if "3x" in case.provider else 2
            assert abs(state["heldout"] - target) < 0.5  # the bisection lands near the target
    # the family lists them: effbert bench --op token_exit (and the GPU suite's case list) runs them
    listed = {c.key for c in collect_cases(torch.device("cpu"), True, only="token_exit")}
    assert {c.key for c in cases} <= listed


def test_flops_against_a_hand_count():
    """One sentence: [CLS] w1 w2a w2b [SEP] (word 1 one piece, word 2 two), depth 3, hidden 4, FFN
    6; word 1 exits at layer 1, word 2 at layer 2: the sentence runs 2 layers, [CLS] and [SEP] 2 as
    queries, w1 1, w2's
    pieces 2. A second row of 3 tokens, one word exiting at 3."""
    exit_layer = torch.tensor([[0, 1, 2, 0, 0], [0, 3, 0, 0, 0]])
    label_mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    tokens, sentences = bench.query_layers(exit_layer, label_mask, mask, "tokee")
    assert tokens.tolist() == [[2, 1, 2, 2, 2], [3, 3, 3, 0, 0]]
    assert sentences.tolist() == [2, 3]
    first, _ = bench.query_layers(exit_layer, label_mask, mask, "tokee", copy_wordpieces="first")
    assert first.tolist() == [[2, 1, 2, 2, 2], [3, 3, 3, 0, 0]]
    sentee, _ = bench.query_layers(exit_layer, label_mask, mask, "sentee")
    assert sentee.tolist() == [[2, 2, 2, 2, 2], [3, 3, 3, 0, 0]]
    h, f = 4, 6
    # by hand, layer by layer: queries q, keys n; Q and output projections and the FFN per query, K
    # and V per key, 2 matmuls of h per query-key pair
    want = 0
    for queries_per_layer, n in (([5, 4], 5), ([3, 3, 3], 3)):
        for q in queries_per_layer:
            want += 2 * q * h * h * 2 + 2 * q * h * f * 2 + 2 * n * h * h * 2 + 2 * 2 * q * n * h
    assert bench.inference_flops(tokens, sentences, mask, h, f) == want
    with pytest.raises(ValueError, match="mode"):
        bench.query_layers(exit_layer, label_mask, mask, "fast")
    with pytest.raises(ValueError, match="label_mask"):
        bench.query_layers(exit_layer, label_mask.long(), mask, "tokee")
    with pytest.raises(ValueError, match="hidden"):
        bench.inference_flops(tokens, sentences, mask, 0, f)
    with pytest.raises(ValueError, match="sentences"):
        bench.inference_flops(tokens, sentences[:1], mask, h, f)


@pytest.mark.parametrize("mode", ["tokee", "sentee"])
@pytest.mark.parametrize("case", ["none_exit", "all_at_layer_1", "mixed"])
def test_counted_token_layers_are_the_runs(mode, case):
    """``query_layers`` from the exit layers gives the token-layers the batched run counts (and the
    published
    loop: tests/test_token_classification.py), on odd lengths and rows without words."""
    torch.manual_seed(0)
    model = make_model()
    ids, mask, label_mask = make_batch(model.config)
    thresholds = {
        "none_exit": [0.0] * DEPTH,
        "all_at_layer_1": [1.01] * DEPTH,
        "mixed": quantile_thresholds(
            model, ids, mask, label_mask, 0.35 if mode == "tokee" else 0.8
        ),
    }[case]
    out = model.early_exit_token_labels(
        ids, mask, label_mask=label_mask, mode=mode, thresholds=thresholds, window=3
    )
    tokens, sentences = bench.query_layers(out.exit_layer, label_mask, mask, mode)
    assert int(tokens.sum()) == out.token_layers
    lengths, has_words = mask.sum(1), label_mask.any(1)
    # a row without words leaves after layer 1, as the published loop returns there
    if case == "none_exit":
        want = torch.where(has_words, lengths * DEPTH, lengths)
        assert int(tokens.sum()) == int(want.sum()) and not has_words.all()
    if case == "all_at_layer_1":
        assert int(tokens.sum()) == int(mask.sum()) and set(sentences.tolist()) == {1}


def test_bisection_finds_the_threshold_of_a_reduction():
    """On a known curve, token-layers 1200 * (1 - t) for t in [0, 1): 3x fewer is t = 2/3."""
    t, got = bench.bisect_threshold(lambda t: round(1200 * (1 - t)), 1200, 3, steps=20)
    assert abs(t - 2 / 3) < 1e-3 and abs(got - 3) < 0.01
    with pytest.raises(ValueError, match="full"):
        bench.bisect_threshold(lambda t: 1, 0, 3)
    with pytest.raises(ValueError, match="reduction"):
        bench.bisect_threshold(lambda t: 1, 10, 0)
    with pytest.raises(ValueError, match="lengths"):
        bench.make_batch([], 100, 0)
    ids, mask, label_mask = bench.make_batch([5, 2, 9], 100, seed=3)
    assert ids.shape == (3, 9) and mask.sum(1).tolist() == [5, 2, 9]
    # words lie between [CLS] and [SEP]: never the first or the last real token
    assert not label_mask[:, 0].any() and not label_mask[0, 4] and not label_mask[2, 8]
    assert label_mask[0, 1] and label_mask[2, 1] and not label_mask[1].any()
