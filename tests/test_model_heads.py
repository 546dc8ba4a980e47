"""The model heads' TNF and multi-exit wiring: notes mixed at rare words and updated only for the batch's rare-word
slots, notes saved in the state dict, every exit's logits and RomeBERT's loss, and batched early exit equal to each
sample run alone."""

import copy

import pytest
import torch

from effbert import reference
from effbert.calibration import exit_layers
from effbert.models import TupeBertConfig, TupeBertForMaskedLM, TupeBertForSequenceClassification
from effbert.nn import NoteDictionary
from effbert.data.tnf import RareWordTable

from helpers import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("eager", "triton")
VOCAB = 53
CONT_FROM = 45  # ids >= 45 are continuation pieces


def tiny_config(**overrides):
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        position_mode="tupe-r",
        num_buckets=8,
        max_distance=12,
        num_labels=3,
    )
    values.update(overrides)
    return TupeBertConfig(**values)


def randomize_(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def rare_table():
    # three rare words: a one-piece word, a two-piece word and a three-piece word
    cont = torch.arange(VOCAB) >= CONT_FROM
    pieces = {"alpha": [10], "beta": [11, 46], "gamma": [12, 47, 48]}
    return RareWordTable.build(list(pieces), lambda w: pieces[w], cont)


def rare_batch(lengths=(11, 8, 5)):
    """A batch of plain tokens with rare words planted at known places (word starts only, ids < CONT_FROM)."""
    b, n = len(lengths), max(lengths)
    ids = torch.randint(13, CONT_FROM, (b, n))
    ids[0, 2] = 10  # alpha
    ids[0, 5:7] = torch.tensor([11, 46])  # beta
    ids[1, 1:4] = torch.tensor([12, 47, 48])  # gamma
    ids[2, 3] = 10  # alpha again (second occurrence of slot 0)
    lengths = torch.tensor(lengths)
    mask = (torch.arange(n)[None] < lengths[:, None]).long()
    return ids.to(DEVICE), mask.to(DEVICE), lengths.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_notes_change_only_for_the_batch_rare_words(backend, seeded):
    cfg = tiny_config(backend=backend)
    table = rare_table()
    extra_slots = 4  # slots no word of the batch uses: must stay exactly as they were
    notes = NoteDictionary(len(table) + extra_slots, cfg.hidden_size, window=2, gamma=0.3, lam=0.4)
    model = randomize_(TupeBertForMaskedLM(cfg, note_dictionary=notes)).to(DEVICE)
    with torch.no_grad():  # slot 1 (beta) and an unused slot already hold notes
        model.notes.notes[1] = torch.randn(cfg.hidden_size)
        model.notes.notes[4] = torch.randn(cfg.hidden_size)
        model.notes.counts[1] = 3
        model.notes.counts[4] = 2
    ids, mask, lengths = rare_batch()
    spans, slots = table.find(ids, lengths)
    assert spans[:, 3].tolist() == [0, 1, 2, 0]  # (batch, position) order
    before_notes, before_counts = model.notes.notes.clone(), model.notes.counts.clone()

    out = model(ids, mask, note_slots=slots)
    # the notes entered the embeddings exactly where a rare word with a note sits (beta only: alpha/gamma are new)
    ref_model = copy.deepcopy(model).double().set_backend("eager")
    bert = ref_model.bert
    tt, pad = bert.check_inputs(ids, mask)
    x = bert.embed(ids, tt)
    seen = torch.where(
        (slots >= 0) & (before_counts[slots.clamp_min(0)] > 0), slots, torch.full_like(slots, -1)
    )
    x = reference.note_mix(x, before_notes.double(), seen, notes.lam)
    h, _ = bert.encoder(x, pos_bias=bert.position_bias(ids.shape[1]), attention_mask=pad)
    real = mask.bool()
    assert_close(out.last_hidden_state[real], h[real], what="hidden with notes mixed in")
    plain = model(ids, mask)
    beta = slots == 1
    assert not torch.allclose(out.last_hidden_state[beta], plain.last_hidden_state[beta])

    model.update_notes(out.last_hidden_state, spans, lengths)
    exp_notes, exp_counts = before_notes.clone(), before_counts.clone()
    reference.note_update_(
        exp_notes,
        exp_counts,
        out.last_hidden_state.detach(),
        spans,
        window=2,
        gamma=0.3,
        lengths=lengths,
    )
    touched = torch.zeros(notes.num_slots, dtype=torch.bool)
    touched[spans[:, 3].cpu()] = True
    assert touched.tolist() == [True, True, True] + [False] * extra_slots
    assert torch.equal(
        model.notes.notes[~touched], before_notes[~touched]
    )  # untouched slots bit for bit
    assert torch.equal(model.notes.counts, exp_counts)
    assert model.notes.counts.tolist()[:3] == [2, 4, 1]
    assert_close(model.notes.notes[touched], exp_notes[touched], what="updated notes")
    assert not torch.allclose(model.notes.notes[touched], before_notes[touched])


def test_notes_survive_a_state_dict_round_trip(seeded):
    cfg = tiny_config(backend="eager")
    table = rare_table()
    model = randomize_(
        TupeBertForMaskedLM(cfg, NoteDictionary(len(table), cfg.hidden_size, window=1))
    ).to(DEVICE)
    ids, mask, lengths = rare_batch()
    spans, slots = table.find(ids, lengths)
    model.update_notes(model(ids, mask).last_hidden_state, spans, lengths)
    state = model.state_dict()
    assert "notes.notes" in state and "notes.counts" in state
    fresh = TupeBertForMaskedLM(cfg, NoteDictionary(len(table), cfg.hidden_size, window=1)).to(
        DEVICE
    )
    assert not torch.equal(fresh.notes.notes, model.notes.notes)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.notes.notes, model.notes.notes)
    assert torch.equal(fresh.notes.counts, model.notes.counts)
    assert torch.equal(
        fresh(ids, mask, note_slots=slots).logits, model(ids, mask, note_slots=slots).logits
    )


def test_note_arguments_are_checked():
    cfg = tiny_config(backend="eager")
    with pytest.raises(ValueError, match="note_dictionary must have dim"):
        TupeBertForMaskedLM(cfg, NoteDictionary(3, cfg.hidden_size + 1))
    with pytest.raises(TypeError, match="note_dictionary"):
        TupeBertForMaskedLM(cfg, note_dictionary=3)
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="note_slots needs"):
        TupeBertForMaskedLM(cfg)(ids, note_slots=torch.full_like(ids, -1))
    with pytest.raises(ValueError, match="update_notes needs"):
        TupeBertForMaskedLM(cfg).update_notes(
            torch.zeros(2, 5, 32), torch.zeros(0, 4, dtype=torch.long)
        )
    model = TupeBertForMaskedLM(cfg, NoteDictionary(3, cfg.hidden_size))
    with pytest.raises(ValueError, match="note_slots must be"):
        model(ids, note_slots=torch.full((2, 4), -1))
    with pytest.raises(ValueError, match="slots"):
        model(ids, note_slots=torch.full_like(ids, 7))


def padded_batch(b=6, n=9):
    ids = torch.randint(0, VOCAB, (b, n))
    lengths = torch.randint(1, n + 1, (b,))
    lengths[0] = n
    mask = (torch.arange(n)[None] < lengths[:, None]).long()
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_exit_forward_gives_every_exit_and_romebert_loss(backend, seeded):
    cfg = tiny_config(multi_exit=True, backend=backend)
    model = randomize_(TupeBertForSequenceClassification(cfg)).to(DEVICE).eval()
    assert (
        model.classifier is None
        and model.bert.pooler is None
        and len(model.exits) == cfg.num_hidden_layers
    )
    ids, mask = padded_batch()
    labels = torch.randint(0, 3, (ids.shape[0],), device=DEVICE)
    out = model(ids, mask, labels=labels, output_hidden_states=True)
    assert out.exit_logits.shape == (cfg.num_hidden_layers, ids.shape[0], 3)
    ref = copy.deepcopy(model).double().set_backend("eager")
    states = ref.bert(ids, mask, output_hidden_states=True).hidden_states
    for i, head in enumerate(
        ref.exits
    ):  # exit i reads layer i's output, as the plain encoder computes it
        assert_close(out.exit_logits[i], head(states[i + 1]), what=f"exit {i + 1} logits")
    assert_close(
        out.loss,
        reference.multi_exit_distillation_loss(out.exit_logits.double(), labels),
        what="loss",
    )
    out.loss.backward()
    assert all(h.classifier.weight.grad is not None for h in model.exits)


@pytest.mark.parametrize("criterion", ["entropy", "max_prob", "patience"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_early_exit_equals_each_sample_alone(criterion, backend, seeded):
    cfg = tiny_config(multi_exit=True, backend=backend, num_hidden_layers=4)
    model = randomize_(TupeBertForSequenceClassification(cfg)).to(DEVICE).eval()
    ids, mask = padded_batch(b=7)
    with torch.no_grad():
        full = model(ids, mask).exit_logits  # [L, B, C]
    kw = {}
    if criterion == "patience":
        kw["patience"] = 1
    else:  # a threshold in the middle of the scores, so some samples exit early and some do not
        flat = full[:-1].reshape(-1, 3).double()
        scores = (
            reference.exit_entropy(flat) if criterion == "entropy" else flat.softmax(-1).amax(-1)
        )
        # in the widest gap of the middle half, never on a score: a sample run alone computes its score with
        # other float rounding, and a tie at the threshold could go either way
        s = scores.sort().values
        lo, hi = len(s) // 4, 3 * len(s) // 4
        k = lo + int((s[lo + 1 : hi + 1] - s[lo:hi]).argmax())
        kw["threshold"] = float((s[k] + s[k + 1]) / 2)
    calls = []
    hook = model.bert.position_encoder.register_forward_hook(lambda *a: calls.append(1))
    logits, layer = model.early_exit(ids, mask, criterion=criterion, **kw)
    hook.remove()
    assert len(calls) == 1  # the positional term once for the whole early-exit pass
    assert logits.shape == (7, 3) and layer.dtype == torch.int64
    for b in range(ids.shape[0]):
        with torch.no_grad():
            alone = model(ids[b : b + 1], mask[b : b + 1]).exit_logits  # [L, 1, C]
        want = int(exit_layers(alone, criterion, **kw)[0])
        assert int(layer[b]) == want, f"sample {b}"
        assert_close(logits[b], alone[want - 1, 0], what=f"sample {b} logits")
    if criterion != "patience":
        assert 1 <= int(layer.min()) and int(layer.max()) <= cfg.num_hidden_layers


def test_multi_exit_arguments_are_checked():
    plain = TupeBertForSequenceClassification(tiny_config(backend="eager"))
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="multi_exit=True"):
        plain.early_exit(ids, criterion="entropy", threshold=0.5)
    model = TupeBertForSequenceClassification(tiny_config(multi_exit=True, backend="eager")).eval()
    with pytest.raises(ValueError, match="threshold"):
        model.early_exit(ids, criterion="entropy")
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="multi_exit must be a bool"):
        tiny_config(multi_exit=1)


def test_exit_poolers_start_from_one_pooler_or_share_it(seeded):
    """DeeBERT/RomeBERT copy the checkpoint pooler into every off-ramp; PABEE shares one (shared_exit_pooler)."""
    model = TupeBertForSequenceClassification(tiny_config(multi_exit=True, backend="eager"))
    pooler = torch.nn.Linear(32, 32)
    model.init_exit_poolers(pooler.state_dict())
    assert len({id(h.pooler) for h in model.exits}) == 3
    for h in model.exits:
        assert torch.equal(h.pooler.weight, pooler.weight) and torch.equal(
            h.pooler.bias, pooler.bias
        )
    shared = TupeBertForSequenceClassification(
        tiny_config(multi_exit=True, shared_exit_pooler=True, backend="eager")
    )
    assert len({id(h.pooler) for h in shared.exits}) == 1
    # sharing survives a save and a load into a fresh model of the same config
    again = TupeBertForSequenceClassification(shared.config)
    again.load_state_dict(shared.state_dict())
    assert len({id(h.pooler) for h in again.exits}) == 1
    assert torch.equal(again.exits[0].pooler.weight, shared.exits[2].pooler.weight)
    with pytest.raises(TypeError, match="shared_exit_pooler must be a bool"):
        tiny_config(shared_exit_pooler="yes")
    with pytest.raises(ValueError, match="multi_exit=True"):
        TupeBertForSequenceClassification(tiny_config(backend="eager")).init_exit_poolers(
            pooler.state_dict()
        )


def test_full_depth_and_float_masks_in_the_model(seeded):
    model = randomize_(
        TupeBertForSequenceClassification(tiny_config(multi_exit=True, backend="eager"))
    ).eval()
    ids, mask = padded_batch(b=4)
    for kw in (dict(criterion="entropy", threshold=0.0), dict(criterion="patience", patience=0)):
        logits, layer = model.early_exit(ids, mask, **kw)
        with torch.no_grad():
            want = model(ids, mask).exit_logits[-1]
        assert layer.tolist() == [3] * 4
        assert_close(logits, want, what="full-depth logits")
    with pytest.raises(TypeError, match="attention_mask must be bool or 0/1 integers"):
        model(ids, mask.float())
