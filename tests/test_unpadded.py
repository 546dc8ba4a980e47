"""The unpadded and packed model (``config.unpad_inputs``, ``position_ids``): on the real tokens it equals the
padded model run on one text per right-padded row, forward and every parameter gradient, in float64; left and
right padding, one-token texts, an all-full batch, a batch of one; a packed row A+B equals A and B run separately;
TNF's note mix and windowed update, the multi-exit heads and batched early exit; no recompile per new packed
length under torch.compile."""

import pytest
import torch

from effbert.models import (
    TupeBertConfig,
    TupeBertForMaskedLM,
    TupeBertForSequenceClassification,
    TupeBertModel,
)
from effbert.models.packing import unpad_input
from effbert.nn import NoteDictionary
from effbert.ops import attention as attn_ops

from helpers import backend_cases

# float64 runs on the eager and CPU backends; the Triton kernels (fp32) get a tiny case of their own below
CPU_CASES = [
    c for c in backend_cases() if not c.marks and c.values[1] == "cpu" and c.values[0] != "triton"
]
RTOL = 1e-10  # float64 throughout: only summation order differs


def config(mode="tupe-r", backend="eager", **overrides):
    values = dict(
        vocab_size=41,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        position_mode=mode,
        num_buckets=8,
        max_distance=12,
        num_labels=3,
        backend=backend,
    )
    values.update(overrides)
    return TupeBertConfig(**values)


def pair(cls, cfg, **kwargs):
    """The same weights as an unpadded and a padded model, float64, every parameter non-trivial."""
    torch.manual_seed(0)
    unpadded = cls(cfg, **kwargs).double()
    with torch.no_grad():
        for p in unpadded.parameters():
            p.add_(0.1 * torch.randn_like(p))
    padded = cls(cfg.replace(unpad_inputs=False), **kwargs).double()
    padded.load_state_dict(unpadded.state_dict())
    return unpadded.eval(), padded.eval()


def texts_of(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]


def right_padded(texts, n=None):
    """One text per row, real tokens first: ``(ids, mask)``."""
    n = n or max(len(t) for t in texts)
    ids = torch.zeros(len(texts), n, dtype=torch.int64)
    mask = torch.zeros(len(texts), n, dtype=torch.int64)
    for b, t in enumerate(texts):
        ids[b, : len(t)], mask[b, : len(t)] = t, 1
    return ids, mask


def left_padded(texts, n=None):
    n = n or max(len(t) for t in texts)
    ids = torch.zeros(len(texts), n, dtype=torch.int64)
    mask = torch.zeros(len(texts), n, dtype=torch.int64)
    for b, t in enumerate(texts):
        ids[b, n - len(t) :], mask[b, n - len(t) :] = t, 1
    return ids, mask


def packed_rows(rows, n):
    """Several texts per row: ``rows`` is a list of lists of texts; ``(ids, mask, position_ids)``."""
    ids = torch.zeros(len(rows), n, dtype=torch.int64)
    mask = torch.zeros(len(rows), n, dtype=torch.int64)
    pos = torch.zeros(len(rows), n, dtype=torch.int64)
    for b, texts in enumerate(rows):
        at = 0
        for t in texts:
            ids[b, at : at + len(t)], mask[b, at : at + len(t)] = t, 1
            pos[b, at : at + len(t)] = torch.arange(len(t))
            at += len(t)
    return ids, mask, pos


def real_rows(x, mask):
    """The real tokens of ``x [B, N, ...]`` in row order."""
    return x[mask.bool()]


def mlm_step(model, ids, mask, labels, position_ids=None, return_logits=True):
    """Loss from the MLM head and a fixed projection of every real token's hidden state; returns the output and
    every parameter gradient."""
    model.zero_grad(set_to_none=True)
    out = model(
        ids,
        mask,
        labels=labels,
        output_hidden_states=True,
        position_ids=position_ids,
        return_logits=return_logits,
    )
    g = torch.Generator().manual_seed(7)
    hid = real_rows(out.last_hidden_state, mask)
    proj = torch.randn(hid.shape, generator=g, dtype=torch.float64).to(hid.device, hid.dtype)
    (out.loss + (hid * proj).sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def labels_for(ids, mask, seed=3):
    g = torch.Generator().manual_seed(seed)
    pick = (torch.rand(ids.shape, generator=g) < 0.4) & mask.bool()
    pick.view(-1)[mask.view(-1).bool().nonzero()[0]] = True  # at least one target
    return torch.where(pick, ids, torch.full_like(ids, -100))


def assert_same(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    # an absolute floor for gradients that are 0 up to rounding (the [CLS] row's scalar shifts a whole softmax row)
    err = (a - b).norm()
    assert err <= RTOL * b.norm() + 1e-12, f"{what}: error {err:.3e}, reference norm {b.norm():.3e}"


def assert_grads(ga, gb):
    assert ga.keys() == gb.keys()
    for name in gb:
        assert_same(ga[name], gb[name], f"d {name}")


LAYOUTS = {
    "right": [5, 3, 1, 7],
    "left": [5, 3, 1, 7],
    "one_token": [1, 1, 1],
    "all_full": [6, 6],
    "batch_of_one": [4],
}


@pytest.mark.parametrize("backend,device", CPU_CASES)
@pytest.mark.parametrize("mode", ["absolute", "tupe-a", "tupe-r"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unpadded_equals_padded(backend, device, mode, layout):
    """Every real token's hidden state, the MLM loss and every parameter gradient equal the padded model's on the
    same texts, one per right-padded row (float64)."""
    unpadded, padded = pair(TupeBertForMaskedLM, config(mode, backend))
    texts = texts_of(LAYOUTS[layout], 41)
    ref_ids, ref_mask = right_padded(texts, n=8)
    ids, mask = (left_padded if layout == "left" else right_padded)(texts, n=8)
    ref_out, ref_grads = mlm_step(padded, ref_ids, ref_mask, labels_for(ref_ids, ref_mask))
    # the same targets at the same tokens, wherever the padding sits
    labels = torch.full_like(ids, -100)
    labels[mask.bool()] = labels_for(ref_ids, ref_mask)[ref_mask.bool()]
    out, grads = mlm_step(unpadded, ids, mask, labels)
    assert_same(out.loss, ref_out.loss, "loss")
    assert_same(
        real_rows(out.last_hidden_state, mask),
        real_rows(ref_out.last_hidden_state, ref_mask),
        "hidden",
    )
    for i, (s, r) in enumerate(zip(out.hidden_states, ref_out.hidden_states)):
        assert_same(real_rows(s, mask), real_rows(r, ref_mask), f"hidden_states[{i}]")
    assert_same(real_rows(out.logits, mask), real_rows(ref_out.logits, ref_mask), "logits")
    assert bool((out.last_hidden_state[~mask.bool()] == 0).all()), (
        "padded slots must come back as 0"
    )
    assert_grads(grads, ref_grads)
    # the padded path takes a left-padded batch too (it lays the texts out as right-padded rows)
    out_p, grads_p = mlm_step(padded, ids, mask, labels)
    assert_same(
        real_rows(out_p.last_hidden_state, mask),
        real_rows(ref_out.last_hidden_state, ref_mask),
        "padded",
    )
    assert_grads(grads_p, ref_grads)


@pytest.mark.parametrize("backend,device", CPU_CASES)
@pytest.mark.parametrize("unpad", [True, False])
def test_packed_row_equals_texts_run_separately(backend, device, unpad):
    """Row 0 holds texts A+B (position_ids restart at B's first token), row 1 holds C alone: every token, the
    loss and every gradient equal A, B and C run as rows of their own; attention never crosses A|B and B's first
    token is TUPE's position 0."""
    cfg = config("tupe-r", backend, unpad_inputs=unpad)
    model, _ = pair(TupeBertForMaskedLM, cfg)
    a, b, c = texts_of([3, 4, 5], 41, seed=5)
    ids, mask, pos = packed_rows([[a, b], [c]], n=9)
    sep_ids, sep_mask = right_padded([a, b, c], n=9)
    sep_labels = labels_for(sep_ids, sep_mask)
    labels = torch.full_like(ids, -100)
    labels[mask.bool()] = sep_labels[sep_mask.bool()]  # row order = text order
    out, grads = mlm_step(model, ids, mask, labels, position_ids=pos)
    ref, ref_grads = mlm_step(model, sep_ids, sep_mask, sep_labels)
    assert_same(
        real_rows(out.last_hidden_state, mask), real_rows(ref.last_hidden_state, sep_mask), "hidden"
    )
    assert_same(out.loss, ref.loss, "loss")
    assert_grads(grads, ref_grads)
    # without position_ids the same row is one text of 7 tokens: different values at B's tokens
    alone = model(ids, mask).last_hidden_state
    assert not torch.allclose(alone[0, 3:7], out.last_hidden_state[0, 3:7])


@pytest.mark.parametrize("backend,device", CPU_CASES)
def test_packed_classifier_and_base_model(backend, device):
    """``TupeBertModel`` and the classifier: packed and left-padded rows equal one text per row; the pooler reads
    each row's first real token; gradients of every parameter equal."""
    unpadded, padded = pair(TupeBertForSequenceClassification, config("tupe-a", backend))
    texts = texts_of([4, 2, 6], 41, seed=9)
    ids, mask = left_padded(texts, n=7)
    ref_ids, ref_mask = right_padded(texts, n=7)
    labels = torch.tensor([0, 2, 1])
    outs = []
    for model, (i, m) in ((unpadded, (ids, mask)), (padded, (ref_ids, ref_mask))):
        model.zero_grad(set_to_none=True)
        out = model(i, m, labels=labels)
        out.loss.backward()
        outs.append(
            (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    assert_same(outs[0][0].logits, outs[1][0].logits, "logits")
    assert_grads(outs[0][1], outs[1][1])
    base_u, base_p = unpadded.bert, padded.bert
    o_u, o_p = base_u(ids, mask), base_p(ref_ids, ref_mask)
    assert_same(o_u.pooler_output, o_p.pooler_output, "pooler_output")


@pytest.mark.parametrize("backend,device", CPU_CASES)
def test_mlm_head_on_labelled_rows_equals_full_logits(backend, device):
    """``return_logits=False`` (the head at the labelled tokens only) gives the loss and gradients of the full
    logits; the full logits at the labelled tokens equal the padded model's."""
    model, padded = pair(TupeBertForMaskedLM, config("tupe-r", backend))
    ids, mask, pos = packed_rows([texts_of([3, 2], 41), texts_of([5], 41, seed=2)], n=6)
    labels = labels_for(ids, mask)
    full, g_full = mlm_step(model, ids, mask, labels, position_ids=pos)
    picked, g_picked = mlm_step(model, ids, mask, labels, position_ids=pos, return_logits=False)
    assert picked.logits is None
    assert_same(picked.loss, full.loss, "loss")
    assert_grads(g_picked, g_full)
    # by hand: mean cross-entropy of the full logits at the labelled tokens (the head's loss is taken in float32)
    rows = labels != -100
    expect = torch.nn.functional.cross_entropy(full.logits[rows].float(), labels[rows])
    assert_same(full.loss, expect, "loss by hand")
    # a label at a padded slot is no target (the slot has no hidden state)
    at_pad = labels.clone()
    at_pad[1, 5] = 3
    assert_same(
        model(ids, mask, labels=at_pad, position_ids=pos).loss, full.loss, "label at padding"
    )


def test_tnf_mix_and_update_on_packed_rows():
    """TNF on packed rows: the note mix and the windowed note update equal those of the texts run as rows of their
    own (the window stops at the text boundary, not at the row's end)."""
    cfg = config("tupe-r", "eager")
    ids, mask, pos = packed_rows([texts_of([4, 5], 41, seed=4), texts_of([3], 41, seed=6)], n=10)
    texts = [ids[0, :4], ids[0, 4:9], ids[1, :3]]
    sep_ids, sep_mask = right_padded(texts, n=10)
    models = []
    for _ in range(2):
        notes = NoteDictionary(5, cfg.hidden_size, window=3, gamma=0.5, lam=0.5)
        model, _ = pair(TupeBertForMaskedLM, cfg, note_dictionary=notes)
        with torch.no_grad():  # notes seen before, so the mix changes the inputs
            model.notes.notes.copy_(
                torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
            )
            model.notes.counts.fill_(1)
        models.append(model)
    slots = torch.full_like(ids, -1)
    slots[0, 1], slots[0, 5], slots[1, 2] = 0, 3, 0
    sep_slots = torch.full_like(sep_ids, -1)
    sep_slots[0, 1], sep_slots[1, 1], sep_slots[2, 2] = 0, 3, 0
    labels = labels_for(ids, mask)
    sep_labels = torch.full_like(sep_ids, -100)
    sep_labels[sep_mask.bool()] = labels[mask.bool()]
    out = models[0](
        ids, mask, labels=labels, note_slots=slots, position_ids=pos, return_logits=False
    )
    ref = models[1](sep_ids, sep_mask, labels=sep_labels, note_slots=sep_slots, return_logits=False)
    assert_same(
        real_rows(out.last_hidden_state, mask), real_rows(ref.last_hidden_state, sep_mask), "hidden"
    )
    # spans (row, start, end, slot): row 0's second text starts at slot 4
    spans = torch.tensor([[0, 1, 2, 0], [0, 5, 7, 3], [1, 2, 3, 0]])
    sep_spans = torch.tensor([[0, 1, 2, 0], [1, 1, 3, 3], [2, 2, 3, 0]])
    lengths = mask.sum(1)
    models[0].update_notes(out.last_hidden_state, spans, lengths, position_ids=pos)
    models[1].update_notes(ref.last_hidden_state, sep_spans, sep_mask.sum(1))
    assert torch.equal(models[0].notes.counts, models[1].notes.counts)
    assert_same(models[0].notes.notes.double(), models[1].notes.notes.double(), "notes")
    # by hand for slot 3: first text ends at 4, so the window [5-3, 7+3) clips to [4, 9)
    h = out.last_hidden_state[0, 4:9].mean(0)
    start = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(2))[3].double()
    assert_same(models[0].notes.notes[3], 0.5 * start + 0.5 * h, "slot 3 by hand")
    with pytest.raises(ValueError, match="crosses a text boundary"):
        models[0].update_notes(
            out.last_hidden_state, torch.tensor([[0, 3, 5, 1]]), lengths, position_ids=pos
        )


@pytest.mark.parametrize("backend,device", CPU_CASES)
def test_multi_exit_and_early_exit_unpadded(backend, device):
    """Every exit's logits and the batched early exit of the unpadded model equal the padded model's on the same
    texts (left padding and a packed row included), and every sample equals itself run alone."""
    # "auto" on the CPU runs attention on the CPU backend (the fused distillation loss has no CPU backend)
    cfg = config(
        "tupe-r", "auto" if backend == "cpu" else backend, multi_exit=True, num_hidden_layers=3
    )
    unpadded, padded = pair(TupeBertForSequenceClassification, cfg)
    texts = texts_of([5, 2, 7, 1], 41, seed=11)
    ids, mask = left_padded(texts, n=8)
    ref_ids, ref_mask = right_padded(texts, n=8)
    labels = torch.tensor([0, 1, 2, 1])
    got = unpadded(ids, mask, labels=labels)
    ref = padded(ref_ids, ref_mask, labels=labels)
    assert_same(got.exit_logits, ref.exit_logits, "exit_logits")
    assert_same(got.loss, ref.loss, "loss")
    for criterion, kw in (("entropy", dict(threshold=1.05)), ("patience", dict(patience=1))):
        logits, layer = unpadded.early_exit(ids, mask, criterion=criterion, **kw)
        ref_logits, ref_layer = padded.early_exit(ref_ids, ref_mask, criterion=criterion, **kw)
        assert torch.equal(layer, ref_layer)
        assert_same(logits, ref_logits, f"early exit ({criterion})")
        for b, t in enumerate(texts):  # each sample alone
            one, one_layer = unpadded.early_exit(t[None], criterion=criterion, **kw)
            assert int(one_layer) == int(layer[b])
            assert_same(one[0], logits[b], f"sample {b} alone")
    assert len(set(layer.tolist())) > 1 or True  # exits may coincide; equality above is the check
    with pytest.raises(ValueError, match=r"attention_mask\[1\] has no real token"):
        unpadded.early_exit(
            ids,
            torch.tensor([[1] * 8, [0] * 8, [1] * 8, [1] * 8]),
            criterion="entropy",
            threshold=0.5,
        )


def test_packing_of_a_batch():
    """``unpad_input`` by hand: left padding, a hole, packed texts; bad position_ids name the argument."""
    mask = torch.tensor([[0, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    p = unpad_input(mask, None, shape=(3, 4), device="cpu")
    assert p.indices.tolist() == [1, 2, 3, 4, 6, 8, 9, 10, 11]
    assert p.cu_seqlens.tolist() == [0, 3, 5, 9] and p.cu_seqlens.dtype == torch.int32
    assert p.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert p.max_seqlen == 4 and p.row_first.tolist() == [0, 3, 5] and not p.right_padded
    pos = torch.tensor([[0, 0, 1, 2], [0, 0, 1, 0], [0, 1, 0, 1]])
    p = unpad_input(mask, pos, shape=(3, 4), device="cpu")
    assert p.cu_seqlens.tolist() == [0, 3, 5, 7, 9] and p.max_seqlen == 3
    assert p.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 0, 1]
    right = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert unpad_input(right, None, shape=(2, 3), device="cpu").right_padded
    with pytest.raises(
        ValueError,
        match=r"position_ids must be 0 at the first real token.*position_ids\[2, 2\] = 5",
    ):
        unpad_input(
            mask,
            torch.tensor([[0, 0, 1, 2], [0, 0, 1, 0], [0, 1, 5, 1]]),
            shape=(3, 4),
            device="cpu",
        )
    with pytest.raises(ValueError, match=r"position_ids\[0, 1\] = 1"):
        unpad_input(
            mask,
            torch.tensor([[0, 1, 2, 3], [0, 0, 1, 0], [0, 1, 2, 3]]),
            shape=(3, 4),
            device="cpu",
        )


def _shapes(out):
    return {
        k: (tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(tuple(t.shape) for t in v))
        for k, v in out.items()
        if v is not None
    }


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded-layers"])
@pytest.mark.parametrize("backend,device", CPU_CASES)
def test_zero_rows_give_empty_outputs(backend, device, unpad):
    """A batch of 0 rows (and one with only padding) runs like any other, as transformers' models run it: empty
    outputs of the right shapes, never a complaint about cu_seqlens (which the caller never passed)."""
    from effbert.models.mc_bert import TupeBertForMultiChoicePretraining

    # "auto": the distillation loss and MC-BERT's ops have no CPU kernel (attention runs on the CPU backend)
    cfg = config("tupe-r", "auto" if backend == "cpu" else backend, unpad_inputs=unpad)
    h, n, c, v = cfg.hidden_size, 5, cfg.num_labels, cfg.vocab_size
    ids = torch.zeros(0, n, dtype=torch.int64)
    none = torch.zeros(0, dtype=torch.int64)
    for extra in (
        {},
        dict(attention_mask=ids),
        dict(position_ids=ids),
        dict(attention_mask=ids, position_ids=ids),
    ):
        out = TupeBertModel(cfg)(ids, output_hidden_states=True, **extra)
        assert _shapes(out) == {
            "last_hidden_state": (0, n, h),
            "pooler_output": (0, h),
            "hidden_states": ((0, n, h),) * (cfg.num_hidden_layers + 1),
        }, extra
    mlm = TupeBertForMaskedLM(cfg)
    assert _shapes(mlm(ids)) == {"logits": (0, n, v), "last_hidden_state": (0, n, h)}
    out = mlm(ids, labels=ids, return_logits=False)
    assert (
        out.logits is None and float(out.loss.detach()) == 0.0
    )  # no target: loss 0, as for any batch without one
    out.loss.backward()
    assert _shapes(TupeBertForSequenceClassification(cfg)(ids)) == {"logits": (0, c)}
    multi = TupeBertForSequenceClassification(cfg.replace(multi_exit=True))
    assert _shapes(multi(ids, labels=none)) == {
        "loss": (),
        "logits": (0, c),
        "exit_logits": (2, 0, c),
    }
    logits, layers = multi.eval().early_exit(ids, criterion="entropy", threshold=0.5)
    assert logits.shape == (0, c) and layers.shape == (0,)
    mc = TupeBertForMultiChoicePretraining(cfg, mask_token_id=3, num_candidates=3)
    assert _shapes(mc(ids, labels=ids))["last_hidden_state"] == (0, n, h)
    # rows that are all padding, packed or not: zeros at every slot
    rows = torch.ones(2, n, dtype=torch.int64)
    for extra in (
        dict(attention_mask=torch.zeros_like(rows)),
        dict(attention_mask=torch.zeros_like(rows), position_ids=torch.zeros_like(rows)),
    ):
        out = TupeBertModel(cfg)(rows, **extra)
        assert out.last_hidden_state.shape == (2, n, h) and not out.last_hidden_state.any(), extra


def test_model_refuses_bad_position_ids():
    model, _ = pair(TupeBertModel, config())
    ids = torch.randint(1, 41, (2, 5))
    with pytest.raises(ValueError, match=r"position_ids must be \[B, N\] = \[2, 5\]"):
        model(ids, position_ids=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="position_ids must be int64 or int32"):
        model(ids, position_ids=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"position_ids\[1, 3\] = 7"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 7, 0]]))


def test_offsets_checked_once_per_forward(monkeypatch):
    """The model builds and checks its packing once per forward: no layer reads cu_seqlens back to check it."""
    calls = []
    real = attn_ops._check_cu_seqlens_values
    monkeypatch.setattr(
        attn_ops, "_check_cu_seqlens_values", lambda *a: (calls.append(1), real(*a))[1]
    )
    model, _ = pair(TupeBertModel, config(num_hidden_layers=3))
    ids, mask = right_padded(texts_of([3, 5], 41), n=6)
    model(ids, mask)
    assert calls == []
    q = torch.randn(5, 2, 16, dtype=torch.float64)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    attn_ops.tupe_attention_varlen(q, q, q, cu, 3, backend="eager")
    assert len(calls) == 1
    # unchecked bad offsets on the eager backend: an indexing error, never a read past q
    with pytest.raises(IndexError):
        attn_ops.tupe_attention_varlen(
            q,
            q,
            q,
            torch.tensor([0, 2, 9], dtype=torch.int32),
            7,
            backend="eager",
            check_offsets=False,
        )
    with pytest.raises(TypeError, match="check_offsets must be a bool"):
        attn_ops.tupe_attention_varlen(q, q, q, cu, 3, backend="eager", check_offsets=1)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_model_does_not_recompile_per_total(fullgraph):
    """torch.compile: three batches with three different numbers of real tokens run on the first compilation.
    fullgraph=True: one graph, the packed length an unbacked size; otherwise the packing runs eagerly at one
    graph break and marks the packed length dynamic. max_seqlen is the row length N while compiling."""
    import torch._dynamo

    torch._dynamo.reset()
    model, _ = pair(TupeBertModel, config("tupe-r", "eager"))
    compiled = torch.compile(model, backend="eager", fullgraph=fullgraph)
    batches = [
        right_padded(texts_of(lengths, 41, seed=i), n=8)
        for i, lengths in enumerate(([5, 3], [8, 2], [1, 6]))
    ]
    with torch.no_grad():
        first = compiled(*batches[0]).last_hidden_state
        assert_same(first, model(*batches[0]).last_hidden_state, "compiled")
        with torch._dynamo.config.patch(error_on_recompile=True):
            for ids, mask in batches[1:]:
                out = compiled(ids, mask).last_hidden_state
                assert_same(out, model(ids, mask).last_hidden_state, "compiled")
    torch._dynamo.reset()


@pytest.mark.parametrize("backend,device", [c for c in backend_cases() if c.values[0] == "triton"])
def test_unpadded_triton_tiny(backend, device):
    """The Triton kernels (the interpreter without a GPU) on a tiny packed batch in float32: the unpadded model
    with a packed row and a left-padded row equals the float64 padded eager model on the texts one per row,
    forward and every parameter gradient."""
    unpadded, padded = pair(TupeBertForMaskedLM, config("tupe-r", "eager", num_hidden_layers=1))
    fast = TupeBertForMaskedLM(unpadded.config.replace(backend=backend)).to(device)
    fast.load_state_dict({k: v.float() for k, v in unpadded.state_dict().items()})
    fast.eval()
    a, b, c = texts_of([2, 3, 3], 41, seed=13)
    ids = torch.tensor([[*a.tolist(), *b.tolist()], [0, 0, *c.tolist()]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    pos = torch.tensor([[0, 1, 0, 1, 2], [0, 0, 0, 1, 2]])
    ref_ids, ref_mask = right_padded([a, b, c], n=5)
    ref_labels = labels_for(ref_ids, ref_mask)
    labels = torch.full_like(ids, -100)
    labels[mask.bool()] = ref_labels[ref_mask.bool()]
    out, grads = mlm_step(fast, *(t.to(device) for t in (ids, mask, labels, pos)))
    ref, ref_grads = mlm_step(padded, ref_ids, ref_mask, ref_labels)
    tol = 1e-5 if device == "cpu" else 1e-4
    got = real_rows(out.last_hidden_state.cpu().double(), mask)
    want = real_rows(ref.last_hidden_state, ref_mask)
    assert (got - want).norm() <= tol * want.norm()
    for name, g in ref_grads.items():
        assert (grads[name].cpu().double() - g).norm() <= 4 * tol * g.norm() + 1e-6, f"d {name}"
