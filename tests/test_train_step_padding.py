"""The padding and packing training-step benchmark (ops train_step_padding, train_step_packing): its batches, its
FLOP counts against torch's own count, its real-length data, and that its providers train the same model."""

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from effbert.bench import train_step, train_step_padding as bench

CPU = torch.device("cpu")
TINY = dict(
    vocab_size=60,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    max_position_embeddings=32,
)


def test_half_of_the_slots_are_padding():
    for batch, seq in ((16, 128), (7, 33), (2, 2)):
        lengths = bench.half_padded_lengths(batch, seq, seed=batch)
        assert lengths.shape == (batch,) and bool(((lengths >= 1) & (lengths <= seq - 1)).all())
        expected = batch * seq / 2 if batch % 2 == 0 else (batch - 1) * seq / 2 + seq // 2
        assert int(lengths.sum()) == expected
    assert len(set(bench.half_padded_lengths(16, 128).tolist())) > 4  # a spread of lengths, not one
    with pytest.raises(ValueError, match="seq"):
        bench.half_padded_lengths(4, 1)
    ids, mask, labels = bench.mlm_rows(torch.tensor([3, 1]), 4, 60, seed=0)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert bool((ids[mask == 0] == bench.PAD_ID).all()) and bool((labels[mask == 0] == -100).all())


def test_flops_by_hand_and_as_the_other_training_step_counts_them():
    # one layer of hidden 4, FFN 8, vocabulary 10: tokens 3, pairs 5, head rows 2
    per_layer = 2 * 3 * (4 * 16 + 2 * 4 * 8) + 4 * 5 * 4
    assert bench.matrix_flops(
        dict(hidden_size=4, intermediate_size=8, vocab_size=10, num_hidden_layers=1), 3, 5, 2
    ) == 3 * (per_layer + 2 * 2 * (16 + 40))
    assert bench.matrix_flops(TINY, 3 * 16, 3 * 16 * 16, 7) == train_step.step_flops(
        TINY, 3, 16, head_rows=7
    )


def test_the_rows_flops_are_torchs_count_of_the_padded_step():
    """The padded provider's FLOPs (every slot) against torch's count of every matrix product of an eager step with
    plain BERT positions (TUPE's positional term is not in the count: one [H, N, N] product per step)."""
    trainer = bench._Trainer(False, TINY, CPU, torch.float32, dropout=0.0, position_mode="absolute")
    trainer.build()
    trainer.model.set_backend("eager")
    lengths = bench.half_padded_lengths(4, 16, seed=3)
    ids, mask, labels = bench.mlm_rows(lengths, 16, TINY["vocab_size"], seed=3)
    with FlopCounterMode(display=False) as counter:
        trainer(ids, mask, labels)
    assert counter.get_total_flops() == bench.matrix_flops(
        TINY, 4 * 16, 4 * 16 * 16, int((labels != -100).sum())
    )


def test_cases_say_what_their_flops_count():
    cases = {(c.op, c.provider): c for c in bench.cases(CPU, quick=True)}
    assert set(cases) == {
        (bench.OP, "padded"),
        (bench.OP, "unpadded"),
        (bench.PACKING_OP, "padded"),
        (bench.PACKING_OP, "unpadded"),
        (bench.PACKING_OP, "packed"),
    }
    padded, unpadded = cases[bench.OP, "padded"], cases[bench.OP, "unpadded"]
    b, n = 4, 64  # the quick CPU shape
    real = b * n // 2
    assert padded.tokens == unpadded.tokens == real and f"real={real}" in padded.shape
    assert "padded slots" in padded.note and "real tokens" in unpadded.note
    assert unpadded.ratio_target == 0.6 and padded.baseline == unpadded.baseline == "padded"
    ids, mask, labels = padded.make_inputs()
    assert int(mask.sum()) == real
    head = int((labels != -100).sum())
    assert padded.flops == bench.matrix_flops(bench._sizes(CPU, True)[0], b * n, b * n * n, head)
    lengths = mask.sum(1)
    assert unpadded.flops == bench.matrix_flops(
        bench._sizes(CPU, True)[0], real, int((lengths**2).sum()), head
    )


def test_packing_case_packs_real_lengths_with_restarting_positions():
    cases = {c.provider: c for c in bench.packing_cases(CPU, quick=True)}
    ids, mask, labels = cases["unpadded"].make_inputs()
    pids, pmask, plabels, position_ids = cases["packed"].make_inputs()
    assert pids.shape == ids.shape == (4, 128)
    assert (
        cases["packed"].tokens == int(pmask.sum()) > 2 * int(mask.sum())
    )  # packing fills the rows
    for r in range(pids.shape[0]):
        pos = position_ids[r, pmask[r].bool()]
        starts = (pos == 0).nonzero().squeeze(1).tolist()
        assert (
            starts[0] == 0 and len(starts) >= 2
        )  # several texts in a row, each starting at position 0
        for a, z in zip(starts, starts[1:] + [len(pos)]):
            assert pos[a:z].tolist() == list(range(z - a))
        assert bool((position_ids[r, ~pmask[r].bool()] == 0).all())
    assert "% of slots filled" in cases["packed"].note and cases["packed"].baseline == "padded"


def test_the_lengths_are_real_sentences():
    lengths = bench.load_sentence_lengths()
    assert (
        len(lengths) > 1000 and 20 <= sorted(lengths)[len(lengths) // 2] <= 60
    )  # BERT's sentences: 20-60 pieces
    assert len(set(lengths)) > 50


@pytest.mark.skipif(
    not Path("/usr/share/common-licenses/GPL-3").exists(), reason="needs the license texts"
)
def test_the_committed_lengths_are_what_the_tokenizer_gives_on_the_license_texts(tmp_path):
    fresh = bench.write_sentence_lengths(tmp_path / "lengths.txt")
    committed = bench.load_sentence_lengths()
    assert fresh == bench.load_sentence_lengths(tmp_path / "lengths.txt")
    # the same sentences; the WordPiece trainer breaks ties between equally frequent merges in no fixed order, so a
    # rare word may split into one piece more or less from one training to the next
    assert len(fresh) == len(committed)
    same = sum(a == b for a, b in zip(fresh, committed))
    assert same >= 0.98 * len(fresh) and all(abs(a - b) <= 3 for a, b in zip(fresh, committed))


def test_padded_rows_count_every_slot_and_unpadded_rows_the_real_tokens():
    """torch's count of the linear layers and heads of one step on each provider (the fused attention op is not
    in torch's count: its pairs are the formula's, B*N^2 padded, sum of l^2 unpadded): the padded model runs them
    on every slot, the unpadded one on the real tokens only."""
    lengths = bench.half_padded_lengths(4, 16, seed=5)
    ids, mask, labels = bench.mlm_rows(lengths, 16, TINY["vocab_size"], seed=5)
    head = int((labels != -100).sum())
    for unpad, tokens in ((False, 4 * 16), (True, int(lengths.sum()))):
        trainer = bench._Trainer(
            unpad, TINY, CPU, torch.float32, dropout=0.0, position_mode="absolute"
        )
        with FlopCounterMode(display=False) as counter:
            trainer(ids, mask, labels)
        assert counter.get_total_flops() == bench.matrix_flops(TINY, tokens, 0, head), unpad


def test_the_providers_train_the_same_model_on_the_same_data():
    """With dropout off, padded and unpadded take the same three AdamW steps (the same weights to start, the same
    batch), and a packed row gives the loss its texts give one per row."""
    lengths = bench.half_padded_lengths(4, 16, seed=1)
    batch = bench.mlm_rows(lengths, 16, TINY["vocab_size"], seed=1)
    losses = {}
    for unpad in (False, True):
        trainer = bench._Trainer(unpad, TINY, CPU, torch.float32, dropout=0.0)
        losses[unpad] = torch.stack([trainer(*batch) for _ in range(3)])
    assert torch.allclose(losses[False], losses[True], rtol=1e-5), losses
    assert losses[True][2] < losses[True][0]  # it trains

    # texts of 5, 3, 7 and 4 tokens: one per row, then packed two per row with restarting positions
    texts = [
        torch.randint(5, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(n))
        for n in (5, 3, 7, 4)
    ]
    marks = [torch.arange(len(t)) % 2 == 0 for t in texts]
    single = torch.zeros(4, 16, dtype=torch.int64)
    single_labels = torch.full((4, 16), -100)
    for r, (t, m) in enumerate(zip(texts, marks)):
        single[r, : len(t)] = t
        single_labels[r, : len(t)] = torch.where(m, t, -100)
    single_mask = (single != 0).long()
    packed = torch.zeros(2, 16, dtype=torch.int64)
    packed_labels = torch.full((2, 16), -100)
    position_ids = torch.zeros(2, 16, dtype=torch.int64)
    for r, pair in enumerate(((0, 1), (2, 3))):
        start = 0
        for i in pair:
            n = len(texts[i])
            packed[r, start : start + n] = texts[i]
            packed_labels[r, start : start + n] = single_labels[i, :n]
            position_ids[r, start : start + n] = torch.arange(n)
            start += n
    packed_mask = (packed != 0).long()
    one_per_row = bench._Trainer(True, TINY, CPU, torch.float32, dropout=0.0)(
        single, single_mask, single_labels
    )
    two_per_row = bench._Trainer(True, TINY, CPU, torch.float32, dropout=0.0)(
        packed, packed_mask, packed_labels, position_ids
    )
    assert torch.allclose(one_per_row, two_per_row, rtol=1e-5), (one_per_row, two_per_row)
