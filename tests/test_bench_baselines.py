"""The bench's plain-torch and peer baselines are what their users would run, and equal the
references."""

import pytest
import torch

from effbert import reference
from effbert.bench import notes as notes_bench


def _update_case(batch, seq, dim, rows, slots, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    spans = []
    for _ in range(rows):
        b = int(torch.randint(batch, (), generator=g))
        length = int(lengths[b])
        start = int(torch.randint(length, (), generator=g))
        end = min(length, start + int(torch.randint(1, 4, (), generator=g)))
        slot = int(torch.randint(slots, (), generator=g))  # few slots: repeats
        spans.append([b, start, end, slot])
    spans = torch.tensor(spans, dtype=torch.int64).view(-1, 4)
    notes = torch.randn(slots, dim, generator=g, dtype=dtype)
    counts = torch.randint(0, 2, (slots,), generator=g)
    hidden = torch.randn(batch, seq, dim, generator=g, dtype=dtype)
    return notes, counts, hidden, spans, lengths


@pytest.mark.parametrize("rows", [0, 1, 7, 40])
@pytest.mark.parametrize("window", [0, 3, 16])
def test_plain_torch_note_update_equals_the_reference_float64(rows, window):
    notes, counts, hidden, spans, lengths = _update_case(
        3, 20, 8, rows, 5, torch.float64, seed=rows + window
    )
    want_n, want_c = notes.clone(), counts.clone()
    reference.note_update_(want_n, want_c, hidden, spans, window=window, gamma=0.1, lengths=lengths)
    got_n, got_c = notes.clone(), counts.clone()
    out = notes_bench.plain_torch_update_(got_n, got_c, hidden, spans, window, 0.1, lengths)
    assert out is got_n
    torch.testing.assert_close(got_n, want_n, rtol=1e-12, atol=1e-12)
    assert torch.equal(got_c, want_c)


def test_plain_torch_note_update_equals_the_reference_at_bench_shapes_float32():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(64, 129, (32,), generator=g)
    spans = notes_bench.make_spans(32, 128, lengths, seed=1)
    notes = torch.randn(notes_bench.SLOTS, 64)
    counts = torch.randint(0, 2, (notes_bench.SLOTS,))
    hidden = torch.randn(32, 128, 64)
    want_n, want_c = notes.double(), counts.clone()
    reference.note_update_(
        want_n,
        want_c,
        hidden.double(),
        spans,
        window=notes_bench.WINDOW,
        gamma=notes_bench.GAMMA,
        lengths=lengths,
    )
    got_n, got_c = notes.clone(), counts.clone()
    notes_bench.plain_torch_update_(
        got_n, got_c, hidden, spans, notes_bench.WINDOW, notes_bench.GAMMA, lengths
    )
    torch.testing.assert_close(got_n.double(), want_n, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_c, want_c)


def test_window_token_rows_are_the_windows_tokens():
    spans = torch.tensor([[0, 0, 1, 3], [1, 5, 7, 2], [1, 9, 10, 3]])
    lengths = torch.tensor([4, 10])
    rows, owner, width = notes_bench.window_token_rows(spans, lengths, 2, 12)
    want = [(0, list(range(0, 3))), (1, list(range(3, 9))), (2, list(range(7, 10)))]
    assert width.tolist() == [len(t) for _, t in want]
    assert owner.tolist() == [r for r, t in want for _ in t]
    assert rows.tolist() == [int(spans[r, 0]) * 12 + t for r, t in want for t in t]


def test_early_exit_is_calibrated_on_held_out_rows_and_reports_the_exits_run():
    from effbert.bench import cpu_inference as bench
    from effbert.calibration import calibrate_threshold, exit_layers

    heldout = bench._heldout_exit_logits(True)
    assert heldout.shape[:2] == (bench.DEPTH, bench.HELDOUT_ROWS[True])
    cal = bench.calibrate_heldout(6.0, True)
    want = calibrate_threshold(
        heldout, criterion="entropy", target_avg_exit=6.0, num=bench.CALIBRATION_CANDIDATES
    )
    assert cal.threshold == want.threshold and cal.avg_exit_layer <= 6.0 + 1e-9
    # the fine candidate grid lands within one row's worth of the target on the held-out rows
    assert cal.avg_exit_layer >= 6.0 - bench.DEPTH / heldout.shape[1]
    multi = bench._models(True)[2]
    cases = [
        c
        for c in bench.cases(torch.device("cpu"), quick=True)
        if c.provider == "effbert-early-exit"
    ]
    assert cases
    for case in cases:
        ids, mask = case.make_inputs()
        state = case.early_exit_state
        assert state["threshold"] == cal.threshold
        assert state["heldout_avg_exit"] == cal.avg_exit_layer
        with torch.no_grad():
            _, layers = multi.early_exit(ids, mask, criterion="entropy", threshold=cal.threshold)
            full = multi(ids, mask).exit_logits.float()
        assert torch.equal(layers, exit_layers(full, "entropy", threshold=cal.threshold))
        assert state["avg_exit"] == float(layers.double().mean())
        assert f"this batch ran an average exit of {state['avg_exit']:.2f}" in case.note
        held = f"average exit {cal.avg_exit_layer:.2f} of 12 on 16 held-out rows (target 6)"
        assert held in case.note
        lengths = mask.sum(1)
        flops = sum(
            bench.layer_flops([int(n)], 64, 128, ids.shape[1], False) * int(l)
            for n, l in zip(lengths, layers)
        )
        assert case.flops == float(flops)
        out, ref = case.fn(ids, mask), case.reference(ids, mask)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.requires("transformers")
def test_transformers_rows_train_bert_for_masked_lm_with_and_without_the_labelled_head_trick():
    """Both transformers rows train BertForMaskedLM; the labelled-head form gives the loss and every
    gradient of the model run as a user runs it (float64, dropout off), and the rows say what their
    FLOPs count."""
    from transformers import BertForMaskedLM

    from effbert.bench import train_step_padding as padding
    from effbert.bench import train_step_transformers as bench

    cpu = torch.device("cpu")
    sizes = dict(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    lengths = padding.half_padded_lengths(4, 16, seed=3)
    ids, mask, labels = padding.mlm_rows(lengths, 16, sizes["vocab_size"], seed=3)
    grads, losses = {}, {}
    for labelled in (False, True):
        trainer = bench.HFTrainer(labelled, sizes, cpu, torch.float32, dropout=0.0)
        trainer.build()
        assert isinstance(trainer.model, BertForMaskedLM)
        trainer.model.double()
        loss = trainer.loss(ids, mask, labels)
        loss.backward()
        losses[labelled] = loss.detach()
        grads[labelled] = {
            n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
        }
    # the loss by hand: cross-entropy of the full model's logits at the labelled slots
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=mask).logits
    rows = labels != -100
    want = torch.nn.functional.cross_entropy(logits[rows], labels[rows])
    torch.testing.assert_close(losses[False], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses[True], want, rtol=1e-12, atol=1e-12)
    assert grads[True].keys() == grads[False].keys()
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-9, atol=1e-12)
    trainer = bench.HFTrainer(True, sizes, cpu, torch.float32, dropout=0.0)
    steps = torch.stack([trainer(ids, mask, labels) for _ in range(3)])
    assert steps[2] < steps[0]  # it trains

    cases = {c.provider: c for c in bench.cases(cpu, quick=True)}
    assert set(cases) == {"hf-mlm", "hf-mlm-labelled-head", "effbert-padded", "effbert-unpadded"}
    assert {c.baseline for c in cases.values()} == {"hf-mlm"}
    assert {c.op for c in cases.values()} == {bench.OP}
    hf = cases["hf-mlm"]
    b, n, real = hf.params["B"], hf.params["N"], hf.params["real"]
    inputs = hf.make_inputs()
    assert all(c.tokens == real == int(inputs[1].sum()) for c in cases.values())
    head, lens = int((inputs[2] != -100).sum()), inputs[1].sum(1)
    small = padding._sizes(cpu, True)[0]
    assert hf.flops == padding.matrix_flops(small, b * n, b * n * n, b * n)
    trick = padding.matrix_flops(small, b * n, b * n * n, head)
    assert cases["hf-mlm-labelled-head"].flops == cases["effbert-padded"].flops == trick
    unpadded = padding.matrix_flops(small, real, int((lens**2).sum()), head)
    assert cases["effbert-unpadded"].flops == unpadded
    for case in cases.values():
        assert torch.isfinite(case.fn(*inputs))
