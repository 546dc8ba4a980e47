"""``torch.compile(fullgraph=True)`` on the CPU backend, the default on a machine without a GPU: every op with a CPU
backend (and the multi-exit loss, eager on the CPU) and every model but MC-BERT's traces as one graph, compiles
with inductor and gives, forward and backward, what it gives uncompiled; and dispatch compiles without dynamo's
warning about a ``functools.lru_cache`` it would trace through."""

import warnings

import pytest
import torch

import effbert
from effbert import losses
from effbert import ops as effbert_ops
from effbert.ops import attention as attn_ops
from effbert.models import (
    TupeBertConfig,
    TupeBertForMaskedLM,
    TupeBertForSequenceClassification,
    TupeBertModel,
)

from helpers import assert_close


pytestmark = pytest.mark.skipif(
    not effbert.backends()["cpu"].available, reason="the C++ CPU extension is not built"
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def _compare(fn, inputs, *, rtol=None):
    """``fn`` compiled (inductor, fullgraph) against ``fn`` uncompiled: outputs and the gradients of every float
    input."""
    eager_in, compiled_in = _leaves(*inputs), _leaves(*inputs)
    want = fn(*eager_in)
    got = torch.compile(fn, fullgraph=True, backend="inductor")(*compiled_in)
    want, got = (w if isinstance(w, tuple) else (w,) for w in (want, got))
    loss_w = sum(
        (w.double() * torch.linspace(-1, 1, w.numel()).view_as(w)).nansum()
        for w in want
        if w.is_floating_point()
    )
    loss_g = sum(
        (g.double() * torch.linspace(-1, 1, g.numel()).view_as(g)).nansum()
        for g in got
        if g.is_floating_point()
    )
    for i, (g, w) in enumerate(zip(got, want)):
        if w.is_floating_point():
            assert_close(g, w, rtol=rtol, what=f"output {i}")
        else:
            assert torch.equal(g, w), f"output {i}"
    if not any(t.requires_grad for t in eager_in):
        return
    loss_w.backward()
    loss_g.backward()
    for i, (g, w) in enumerate(zip(compiled_in, eager_in)):
        if w.requires_grad:
            assert g.grad is not None, f"no gradient for input {i}"
            assert_close(g.grad, w.grad, rtol=rtol, what=f"gradient of input {i}")


def _attention_case():
    b, n, h, d = 2, 7, 2, 16
    q, k, v = (torch.randn(b, n, h, d) for _ in range(3))
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1, 1]], dtype=torch.bool
    )  # right pad and a hole
    for t in (q, k, v):
        t[~mask] = float("nan")  # nothing at a padded position may reach a real token
    pos = torch.randn(h, n, n)

    def fn(q, k, v, pos):
        return effbert.tupe_attention(q, k, v, pos, attention_mask=mask, scale=0.2, backend="cpu")

    return fn, (q, k, v, pos)


def _attention_no_mask_case():
    q, k, v = (torch.randn(2, 5, 2, 16) for _ in range(3))

    def fn(q, k, v, pos):
        return effbert.tupe_attention(q, k, v, pos, backend="cpu")

    return fn, (q, k, v, torch.randn(2, 5, 5))


def _varlen_case():
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)  # rows 13 and 14 belong to no sequence
    q, k, v = (torch.randn(15, 2, 16) for _ in range(3))
    pos = torch.randn(2, 9, 9)  # longer than max_seqlen: the kernel reads its [:7, :7] corner

    def fn(q, k, v, pos):
        return effbert.tupe_attention_varlen(q, k, v, cu, 7, pos, backend="cpu")

    return fn, (q, k, v, pos)


def _position_bias_case():
    from effbert.ops import t5_relative_buckets

    n, h, dh = 7, 2, 16
    buckets = t5_relative_buckets(n, 8, 16)

    def fn(pq, pk, rel, cls_row, cls_col):
        return effbert.tupe_position_bias(
            pq,
            pk,
            scale=0.25,
            rel_table=rel,
            rel_buckets=buckets,
            cls_row=cls_row,
            cls_col=cls_col,
            backend="cpu",
        )

    return fn, (
        torch.randn(n, h, dh),
        torch.randn(n, h, dh),
        torch.randn(8, h),
        torch.randn(h),
        torch.randn(h),
    )


def _note_mix_case():
    notes = torch.randn(4, 6)
    slots = torch.tensor([[0, -1, 3, 3, -1], [1, 1, -1, 2, 0]])

    def fn(x):
        return effbert.note_mix(x * 2.0, notes, slots, 0.25, backend="cpu")

    return fn, (torch.randn(2, 5, 6),)


def _entropy_case():
    return (lambda x: effbert.exit_entropy(x * 2.0, backend="cpu")), (torch.randn(6, 10),)


def _distillation_case():  # no CPU kernel: "auto" runs the eager reference on CPU tensors
    y = torch.randint(0, 4, (5,))
    return (lambda z: losses.multi_exit_distillation_loss(z * 1.0, y)), (torch.randn(3, 5, 4),)


OP_CASES = {
    "tupe_attention": _attention_case,
    "tupe_attention_no_mask": _attention_no_mask_case,
    "tupe_attention_varlen": _varlen_case,
    "tupe_position_bias": _position_bias_case,
    "note_mix": _note_mix_case,
    "exit_entropy": _entropy_case,
    "multi_exit_distillation_loss": _distillation_case,
}
# MC-BERT's ops have no CPU kernel, and their eager path checks the candidate ids on the host (a graph break under
# fullgraph): effbert/ops/mc_bert.py is outside this test's reach


@pytest.mark.slow
@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_fullgraph_inductor_equals_eager(case, seeded):
    fn, inputs = OP_CASES[case]()
    _compare(fn, inputs)


def test_attention_auto_is_the_cpu_backend_here():
    """What the tests above and below compile is the default: ``auto`` on CPU tensors picks the CPU backend."""
    assert attn_ops.attention_backend(torch.randn(1, 2, 1, 16)) == "cpu"


@pytest.mark.slow
def test_in_place_ops_fullgraph_inductor(seeded):
    """note_update_ and exit_decision (in place, no gradient) on the CPU backend, compiled, equal their eager
    runs."""
    hidden = torch.randn(2, 4, 3)
    spans = torch.tensor([[0, 1, 2, 0], [1, 0, 1, 0], [1, 2, 4, 1]])

    def update(notes, counts, hidden, spans):
        effbert.note_update_(notes, counts, hidden * 1.0, spans, window=1, gamma=0.5, backend="cpu")
        return notes.sum()

    notes, counts = torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)
    notes_c, counts_c = notes.clone(), counts.clone()
    update(notes, counts, hidden, spans)
    torch.compile(update, fullgraph=True, backend="inductor")(notes_c, counts_c, hidden, spans)
    assert torch.equal(counts_c, counts)
    assert_close(notes_c, notes, what="compiled note update")

    batch, c = 7, 3
    x = torch.randn(batch, c)
    states = [
        effbert_ops.early_exit.BatchedExit(
            batch, depth=2, criterion="entropy", threshold=0.8, backend="cpu"
        )
        for _ in range(2)
    ]
    for st in states:
        st.logits = torch.full((batch, c), float("nan"))  # the exited rows' logits land here

    def decide(st, logits):
        effbert_ops.exit_decision(
            logits * 1.0,
            st.row_ids,
            st.prev,
            st.counter,
            st.logits,
            st.exit_layer,
            st._spare,
            st._local,
            st.count,
            layer=1,
            criterion="entropy",
            threshold=0.8,
            backend="cpu",
        )
        return st.count + 0

    want = decide(states[0], x)
    got = torch.compile(
        lambda logits: decide(states[1], logits), fullgraph=True, backend="inductor"
    )(x)
    assert torch.equal(got, want) and torch.equal(states[1].exit_layer, states[0].exit_layer)
    assert torch.equal(states[1].logits.isnan(), states[0].logits.isnan())


# ---- the models ----


def _config(**changes):
    base = dict(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        position_mode="tupe-r",
        num_buckets=8,
        max_distance=16,
        num_labels=3,
        backend="cpu",
    )
    base.update(changes)
    return TupeBertConfig(**base)


def _batch(cfg, packed=False):
    ids = torch.randint(0, cfg.vocab_size, (3, 8))
    mask = torch.tensor(
        [[1] * 8, [1] * 5 + [0] * 3, [0, 0] + [1] * 6]
    )  # full, right and left padding
    types = torch.randint(0, 2, (3, 8))
    args = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if packed:  # row 0 holds three texts
        args["position_ids"] = torch.tensor(
            [[0, 1, 2, 0, 1, 0, 1, 2], list(range(8)), [0, 0] + list(range(6))]
        )
    return args


MODEL_CASES = {
    # name: (model class, config changes, packed rows, extra forward arguments)
    "TupeBertModel": (TupeBertModel, {}, False, {}),
    "TupeBertModel-padded-layers": (
        TupeBertModel,
        dict(unpad_inputs=False, position_mode="tupe-a"),
        True,
        {},
    ),
    "TupeBertForMaskedLM": (
        TupeBertForMaskedLM,
        dict(position_mode="absolute"),
        True,
        dict(mlm=True),
    ),
    "TupeBertForMaskedLM-train-head": (
        TupeBertForMaskedLM,
        {},
        False,
        dict(mlm=True, return_logits=False),
    ),
    "TupeBertForSequenceClassification": (
        TupeBertForSequenceClassification,
        {},
        False,
        dict(cls=True),
    ),
    # the fused distillation loss has no CPU kernel: "auto" (attention on the CPU backend, the loss eager)
    "TupeBertForSequenceClassification-multi-exit": (
        TupeBertForSequenceClassification,
        dict(multi_exit=True, backend="auto"),
        False,
        dict(cls=True),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_fullgraph_inductor_equals_eager(case, seeded):
    cls, changes, packed, extra = MODEL_CASES[case]
    cfg = _config(**changes)
    model = cls(cfg)
    args = _batch(cfg, packed)
    extra = dict(extra)
    if extra.pop("mlm", False):
        args["labels"] = torch.where(
            torch.rand(args["input_ids"].shape) < 0.5, args["input_ids"], -100
        )
    if extra.pop("cls", False):
        args["labels"] = torch.tensor([0, 2, 1])
    args.update(extra)

    def run(m):
        model.zero_grad(set_to_none=True)
        out = m(**args)
        fields = {
            k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
        }
        total = sum(
            (v.double() * torch.linspace(-1, 1, v.numel()).view_as(v)).sum()
            for k, v in fields.items()
            if k != "loss"
        )
        (total + (fields["loss"] if "loss" in fields else 0)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return fields, grads

    want, want_grads = run(model)
    got, got_grads = run(torch.compile(model, fullgraph=True, backend="inductor"))
    assert set(got) == set(want)
    for k in want:
        assert_close(got[k], want[k], what=k)
    assert set(got_grads) == set(want_grads)
    for n, g in got_grads.items():
        if n.endswith(("cls_row", "cls_col")) and want_grads[n].abs().max() < 1e-6:
            assert g.abs().max() < 1e-5, (
                n
            )  # a constant added to a whole softmax row: its gradient is 0
            continue
        assert_close(g, want_grads[n], rtol=1e-4, what=f"d {n}")


def test_dispatch_compiles_without_lru_cache_warning(monkeypatch):
    """Dispatch keeps what it caches in a plain dict read outside the traced region: dynamo neither traces an
    import nor warns that it ignores an ``lru_cache`` ("silent incorrectness")."""
    from effbert.ops import _dispatch

    monkeypatch.setattr(
        torch._dynamo.utils, "warn_once_cache", set()
    )  # dynamo warns once a process otherwise
    _dispatch.refresh()  # nothing found out yet: the first lookup happens while tracing
    model = TupeBertModel(_config())
    args = _batch(model.config)
    q = torch.randn(1, 3, 2, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # not fullgraph (the tests above check that): here a graph break must not hide the warning
        torch.compile(model, backend="eager")(**args)
        torch.compile(lambda q: effbert.tupe_attention(q, q, q), backend="eager")(q)
        torch.compile(lambda x: effbert.exit_entropy(x), backend="eager")(torch.randn(2, 3))
    bad = [
        str(w.message)
        for w in caught
        if "lru_cache" in str(w.message) or "incorrectness" in str(w.message)
    ]
    assert not bad, bad
