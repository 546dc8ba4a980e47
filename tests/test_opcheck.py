"""Every registered op (``torch.ops.effbert.*``), derived from torch's list of registered ops: ``torch.library.opcheck``
on each backend that runs here (eager, cpu, and triton under the interpreter), and each op's own argument checks
when called directly (bypassing the public wrappers), in eager calls and under ``torch.compile``: ``ValueError`` /
``TypeError`` naming the argument, no crash, no state changed. A newly registered op without a case here fails
``test_every_registered_op_is_covered``."""

import pytest
import torch

import effbert
import effbert.models.packing  # noqa: F401  (registers effbert::packing_*)
from effbert import _ext
from effbert.ops import mc_bert as mc_ops

from helpers import ON_GPU

KDEV = "cuda" if ON_GPU else "cpu"  # where the Triton cases run (the interpreter on a CPU)
ALL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
NO_AUTOGRAD = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
HOST_BACKENDS = ["eager"] + (["cpu"] if _ext.load("_C")[0] is not None else [])
i32 = torch.int32


def registered_ops():
    return sorted(
        n.split("::", 1)[1]
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith("effbert::")
    )


def _dev(backend):
    return KDEV if backend == "triton" else "cpu"


# ---- valid arguments of each op (small: the Triton cases run in the interpreter) ----


def _attention(backend, varlen=False, dropout=0.0):
    d = torch.device(_dev(backend))
    h, dh = 2, 16
    if varlen:
        cu = torch.tensor([0, 3, 7], dtype=i32, device=d)
        q, k, v = (torch.randn(8, h, dh, device=d, requires_grad=True) for _ in range(3))
        pos = torch.randn(h, 5, 5, device=d, requires_grad=True)
        return (q, k, v, pos, None, cu, 4, 0.25, dropout, mc_ops.new_seed(d) if dropout else None)
    q, k, v = (torch.randn(2, 5, h, dh, device=d, requires_grad=True) for _ in range(3))
    pos = torch.randn(h, 5, 5, device=d, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool, device=d)
    return (q, k, v, pos, mask, None, 5, 0.25, dropout, mc_ops.new_seed(d) if dropout else None)


def _attention_backward(backend):
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _attention(backend)]
    out, lse = torch.ops.effbert.tupe_attention(*args)
    return (torch.randn_like(out), *args[:3], out, lse, *args[3:], True)


def _attention_subset(backend):
    d = torch.device(_dev(backend))
    h, dh = 2, 16
    cu_q = torch.tensor(
        [0, 2, 2, 3], dtype=i32, device=d
    )  # the second sequence has no active query
    cu_k = torch.tensor([0, 3, 7, 8], dtype=i32, device=d)
    q = torch.randn(3, h, dh, device=d)
    k, v = (torch.randn(8, h, dh, device=d) for _ in range(2))
    return (
        q,
        k,
        v,
        cu_q,
        cu_k,
        torch.tensor([0, 2, 0], dtype=i32, device=d),
        torch.randn(h, 5, 5, device=d),
        2,
        4,
        0.25,
        True,
        backend,
    )


def _position_bias(backend, grad=True):
    d = torch.device(_dev(backend))
    n, h = 6, 2
    t = [
        torch.randn(n, h, 8, device=d),
        torch.randn(n, h, 8, device=d),
        torch.randn(32, h, device=d),
        torch.randn(h, device=d),
        torch.randn(h, device=d),
    ]
    if grad:
        t = [x.requires_grad_() for x in t]
    buckets = effbert.t5_relative_buckets(n, device=d)
    return (t[0], t[1], t[2], buckets, t[3], t[4], 0.3)


def _position_bias_backward(backend):
    pq, pk, _, buckets, *_ = _position_bias(backend, grad=False)
    return (torch.randn(2, 6, 6, device=pq.device), pq, pk, buckets, 32, True, 0.3)


def _note_mix(backend):
    d = _dev(backend)
    x = torch.randn(2, 5, 8, device=d, requires_grad=True)
    return (x, torch.randn(3, 8, device=d), torch.randint(-1, 3, (2, 5), device=d), 0.5, backend)


def _note_mix_backward(backend):
    d = _dev(backend)
    return (torch.randn(2, 5, 8, device=d), torch.randint(-1, 3, (2, 5), device=d), 0.5, backend)


def _note_update(backend):
    d = _dev(backend)
    spans = torch.tensor([[0, 1, 3, 2], [1, 0, 2, 2], [1, 4, 6, 0]], device=d)
    return (
        torch.randn(3, 8, device=d),
        torch.tensor([0, 1, 1], device=d),
        torch.randn(2, 6, 8, device=d),
        spans,
        2,
        0.1,
        None,
        backend,
    )


def _exit_entropy(backend):
    return (torch.randn(5, 11, device=_dev(backend), requires_grad=True), backend)


def _exit_decision(backend):
    d = _dev(backend)
    batch, rows, c = 9, 6, 3
    return (
        torch.randn(rows, c, device=d),
        torch.randperm(batch)[:rows].to(i32).to(d),
        torch.full((batch,), float("nan"), device=d),
        torch.zeros(batch, dtype=i32, device=d),
        torch.zeros(batch, c, device=d),
        torch.zeros(batch, dtype=i32, device=d),
        torch.zeros(rows, dtype=i32, device=d),
        torch.zeros(rows, dtype=i32, device=d),
        torch.zeros(1, dtype=i32, device=d),
        2,
        3,
        0.0,
        1,
        False,
        backend,
    )


def _token_exit(backend, keep=False, token_threshold=None):
    d = _dev(backend)
    cu = torch.tensor([0, 1, 4, 11], dtype=i32, device=d)
    return (
        torch.randn(11, 3, device=d) * 3,
        cu,
        7,
        torch.rand(11, device=d) < 0.8,
        torch.zeros(11, dtype=i32, device=d),
        (torch.rand(11, device=d) < 0.3) if keep else None,
        0.6,
        3,
        token_threshold,
        "or",
        2,
        False,
        backend,
    )


def _multi_exit_loss(backend):
    d = _dev(backend)
    return (
        torch.randn(3, 5, 4, device=d, requires_grad=True),
        torch.randint(0, 4, (5,), device=d),
        0.9,
        3.0,
        backend,
    )


def _mc_sample(backend):
    logits = torch.randn(4, 19, device=KDEV)
    logits[1, 3] = float("inf")
    return (logits, 6, mc_ops.new_seed(logits.device), backend)


def _mc_sample_fused(backend):
    d = KDEV
    return (
        torch.randn(5, 16, device=d),
        torch.randn(21, 16, device=d),
        torch.randn(21, device=d),
        5,
        mc_ops.new_seed(torch.device(d)),
        backend,
    )


def _mc_loss(backend, padding_idx=None, reduction="mean"):
    d = KDEV
    hidden, emb, bias = (
        torch.randn(*s, device=d, requires_grad=True) for s in ((5, 8), (13, 8), (13,))
    )
    cand = torch.randint(0, 13, (5, 4), device=d)
    cand[0, 2] = 0
    return (
        hidden,
        emb,
        bias,
        cand,
        torch.randint(0, 4, (5,), device=d),
        reduction,
        True,
        backend,
        padding_idx,
    )


def _mc_loss_backward(backend, reduction="mean", padding_idx=None):
    hidden, emb, bias, cand, labels, *_ = (
        a.detach() if isinstance(a, torch.Tensor) else a for a in _mc_loss(backend)
    )
    _, dh, dscore = torch.ops.effbert.mc_candidate_loss(
        hidden, emb, bias, cand, labels, reduction, True, backend
    )
    grad = torch.tensor(1.7, device=KDEV) if reduction != "none" else torch.randn(5, device=KDEV)
    return (grad, hidden, cand, dh, dscore, 13, reduction, backend, padding_idx)


def _varlen_check(backend):
    return (torch.tensor([0, 3, 3, 7], dtype=i32), 9, 4)


def _packing_nonzero(backend):
    return (torch.tensor([True, False, True, True, False]),)


def _packing_check_positions(backend):
    position_ids = torch.tensor([[0, 1, 2, 0], [0, 1, 0, 0]])
    indices = torch.tensor([0, 1, 2, 3, 4, 5])
    positions = position_ids.reshape(-1)[indices]
    return (torch.zeros(6, dtype=torch.bool), positions, position_ids, indices)


# name -> [(case id, backend, build(backend) -> args, opcheck's test_utils)]
CASES = {
    "tupe_attention": [
        ("padded", "triton", _attention, ALL),
        ("varlen", "triton", lambda b: _attention(b, varlen=True), ALL),
        ("dropout", "triton", lambda b: _attention(b, dropout=0.2), NO_AUTOGRAD),
    ],
    "tupe_attention_backward": [("padded", "triton", _attention_backward, NO_AUTOGRAD)],
    "tupe_attention_varlen_check": [("offsets", None, _varlen_check, NO_AUTOGRAD)],
    "tupe_attention_varlen_subset": [
        (b, b, _attention_subset, NO_AUTOGRAD) for b in HOST_BACKENDS + ["triton"]
    ],
    "tupe_position_bias": [("rel+cls", "triton", _position_bias, ALL)],
    "tupe_position_bias_backward": [("rel+cls", "triton", _position_bias_backward, NO_AUTOGRAD)],
    "note_mix": [(b, b, _note_mix, ALL) for b in HOST_BACKENDS + ["triton"]],
    "note_mix_backward": [
        (b, b, _note_mix_backward, NO_AUTOGRAD) for b in HOST_BACKENDS + ["triton"]
    ],
    "note_update_": [(b, b, _note_update, NO_AUTOGRAD) for b in HOST_BACKENDS + ["triton"]],
    "exit_entropy": [(b, b, _exit_entropy, ALL) for b in HOST_BACKENDS + ["triton"]],
    "exit_decision": [(b, b, _exit_decision, NO_AUTOGRAD) for b in HOST_BACKENDS + ["triton"]],
    "multi_exit_distillation_loss": [(b, b, _multi_exit_loss, ALL) for b in ("eager", "triton")],
    "token_exit_decision": [(b, b, _token_exit, NO_AUTOGRAD) for b in HOST_BACKENDS + ["triton"]]
    + [
        (
            f"{b}-keep+token_threshold",
            b,
            lambda b: _token_exit(b, keep=True, token_threshold=0.4),
            NO_AUTOGRAD,
        )
        for b in HOST_BACKENDS + ["triton"]
    ],
    "mc_sample": [("triton", "triton", _mc_sample, NO_AUTOGRAD)],
    "mc_sample_fused": [("triton", "triton", _mc_sample_fused, NO_AUTOGRAD)],
    "mc_candidate_loss": [
        ("mean", "triton", _mc_loss, ALL),
        ("none+padding_idx", "triton", lambda b: _mc_loss(b, 0, "none"), ALL),
    ],
    "mc_candidate_loss_backward": [
        ("sum", "triton", lambda b: _mc_loss_backward(b, "sum"), NO_AUTOGRAD),
        ("none+padding_idx", "triton", lambda b: _mc_loss_backward(b, "none", 0), NO_AUTOGRAD),
    ],
    "packing_nonzero": [("flags", None, _packing_nonzero, ("test_schema", "test_faketensor"))],
    "packing_check_positions": [("positions", None, _packing_check_positions, NO_AUTOGRAD)],
}


def test_every_registered_op_is_covered():
    ops = registered_ops()
    assert len(ops) >= 17, ops
    assert not sorted(set(ops) - set(CASES)), "registered ops without an opcheck case here"
    assert not sorted(set(ops) - set(BAD_CALLS)), "registered ops without a direct bad call here"
    assert not sorted(set(CASES) - set(ops)), "cases for ops that are no longer registered"


@pytest.mark.parametrize(
    "name,case_id,backend,build,utils",
    [
        pytest.param(n, c, b, f, u, id=f"{n}-{c}")
        for n, cases in CASES.items()
        for c, b, f, u in cases
    ],
)
def test_opcheck(name, case_id, backend, build, utils, seeded):
    torch.library.opcheck(
        getattr(torch.ops.effbert, name).default, build(backend), test_utils=utils
    )


# ---- each op checks its own arguments when called directly ----


def _with(build, index, value, backend="triton"):
    def make():
        args = list(build(backend))
        args[index] = value(args) if callable(value) else value
        return tuple(args)

    return make


def _t(*shape, dtype=torch.float32, device=KDEV):
    return torch.zeros(*shape, dtype=dtype, device=device)


# name -> [(what, make() -> args, exception, message pattern)]
BAD_CALLS = {
    "tupe_attention": [
        (
            "k shorter than q",
            _with(_attention, 1, lambda a: a[1][:, :3].detach()),
            ValueError,
            "q, k and v",
        ),
        (
            "pos_bias too small",
            _with(_attention, 3, lambda a: a[3][:, :3, :3].detach()),
            ValueError,
            "pos_bias",
        ),
        (
            "empty seed with dropout",
            _with(lambda b: _attention(b, dropout=0.2), 9, _t(0, dtype=torch.int64)),
            ValueError,
            "seed must be",
        ),
    ],
    "tupe_attention_backward": [
        (
            "lse too short",
            _with(_attention_backward, 5, lambda a: a[5][:, :3]),
            ValueError,
            "lse must be",
        ),
    ],
    "tupe_attention_varlen_check": [
        (
            "int64 offsets",
            _with(_varlen_check, 0, torch.tensor([0, 3, 7])),
            TypeError,
            "cu_seqlens must have dtype",
        ),
        ("negative total", _with(_varlen_check, 1, -1), ValueError, "total must be"),
        (
            "offsets past total",
            _with(_varlen_check, 1, 5),
            ValueError,
            "cu_seqlens must end at most",
        ),
    ],
    "tupe_attention_varlen_subset": [
        (
            "position past its keys",
            _with(_attention_subset, 5, lambda a: a[5] + 1, "eager"),
            ValueError,
            "position_ids_q must be in",
        ),
        (
            "offsets past Tk",
            _with(_attention_subset, 4, torch.tensor([0, 3, 7, 9], dtype=i32), "eager"),
            ValueError,
            "cu_seqlens_k must end at",
        ),
        (
            "pos_bias too small",
            _with(_attention_subset, 6, _t(2, 3, 3)),
            ValueError,
            "pos_bias must be at least",
        ),
        (
            "max_seqlen_q too small",
            _with(_attention_subset, 7, 1),
            ValueError,
            "max_seqlen_q must be >=",
        ),
    ],
    "tupe_position_bias": [
        (
            "pos_k shorter",
            _with(_position_bias, 1, lambda a: a[1][:4].detach()),
            ValueError,
            "pos_k must have",
        ),
        (
            "cls_row too short",
            _with(_position_bias, 4, lambda a: a[4][:1].detach()),
            ValueError,
            r"cls_row must be",
        ),
        (
            "bucket past the table",
            _with(_position_bias, 3, lambda a: a[3] + 40),
            ValueError,
            "rel_buckets must index",
        ),
        (
            "float64",
            _with(_position_bias, 0, lambda a: a[0].detach().double()),
            TypeError,
            "pos_q must have dtype",
        ),
    ],
    "tupe_position_bias_backward": [
        (
            "grad of another N",
            _with(_position_bias_backward, 0, lambda a: a[0][:, :4, :4]),
            ValueError,
            "grad must be",
        ),
        (
            "too many buckets",
            _with(_position_bias_backward, 4, 65),
            ValueError,
            "num_buckets must be",
        ),
    ],
    "note_mix": [
        (
            "slot past the notes",
            _with(_note_mix, 2, lambda a: a[2] + 3, "eager"),
            ValueError,
            "out of range",
        ),
        (
            "notes narrower",
            _with(_note_mix, 1, lambda a: a[1][:, :4], "eager"),
            ValueError,
            "notes must be",
        ),
        ("lam", _with(_note_mix, 3, 1.5, "eager"), ValueError, "lam must be"),
        ("backend", _with(_note_mix, 4, "gpu", "eager"), ValueError, "backend must be"),
    ],
    "note_mix_backward": [
        (
            "slots of another shape",
            _with(_note_mix_backward, 1, lambda a: a[1][:, :2], "eager"),
            ValueError,
            "slots must be",
        ),
        ("lam", _with(_note_mix_backward, 2, -0.5, "eager"), ValueError, "lam must be"),
    ],
    "note_update_": [
        (
            "slot past the notes",
            _with(
                _note_update,
                3,
                lambda a: a[3].clone().index_fill_(1, torch.tensor([3]), 7),
                "eager",
            ),
            ValueError,
            "spans row 0",
        ),
        (
            "counts too short",
            _with(_note_update, 1, lambda a: a[1][:2], "eager"),
            ValueError,
            "counts must be",
        ),
        (
            "hidden narrower",
            _with(_note_update, 2, lambda a: a[2][..., :4], "eager"),
            ValueError,
            "hidden must be",
        ),
    ],
    "exit_entropy": [
        (
            "no class",
            _with(_exit_entropy, 0, _t(3, 0, device="cpu"), "eager"),
            ValueError,
            "at least one class",
        ),
        (
            "int logits",
            _with(_exit_entropy, 0, _t(3, 2, dtype=torch.int64, device="cpu"), "eager"),
            TypeError,
            "logits must have dtype",
        ),
    ],
    "exit_decision": [
        (
            "row id outside the batch",
            _with(_exit_decision, 1, lambda a: a[1].clone().fill_(9), "eager"),
            ValueError,
            "row_ids must hold batch ids",
        ),
        (
            "prev too short",
            _with(_exit_decision, 2, lambda a: a[2][:4], "eager"),
            ValueError,
            "prev must be",
        ),
        ("bad code", _with(_exit_decision, 9, 7, "eager"), ValueError, "code must be"),
        (
            "max_prob threshold",
            lambda: tuple(_exit_decision("eager")[:9]) + (1, 3, 2.0, 0, False, "eager"),
            ValueError,
            "threshold",
        ),
    ],
    "token_exit_decision": [
        (
            "offsets past T",
            _with(_token_exit, 1, torch.tensor([0, 1, 4, 12], dtype=i32), "eager"),
            ValueError,
            "cu_seqlens must end at the token count",
        ),
        (
            "decreasing offsets",
            _with(_token_exit, 1, torch.tensor([0, 4, 1, 11], dtype=i32), "eager"),
            ValueError,
            "cu_seqlens must start at 0 and never decrease",
        ),
        (
            "max_seqlen too small",
            _with(_token_exit, 2, 6, "cpu"),
            ValueError,
            "max_seqlen must be >=",
        ),
        (
            "active too short",
            _with(_token_exit, 3, lambda a: a[3][:5], "eager"),
            ValueError,
            "active must be",
        ),
        ("even window", _with(_token_exit, 7, 2, "eager"), ValueError, "window must be an odd int"),
        ("layer 0", _with(_token_exit, 10, 0, "eager"), ValueError, "layer must be"),
        (
            "inf threshold",
            _with(_token_exit, 6, float("inf"), "eager"),
            ValueError,
            "threshold must be a finite",
        ),
    ],
    "multi_exit_distillation_loss": [
        (
            "label out of range",
            _with(_multi_exit_loss, 1, lambda a: a[1] + 4, "eager"),
            ValueError,
            "labels must be class indices",
        ),
        (
            "labels too short",
            _with(_multi_exit_loss, 1, lambda a: a[1][:3], "eager"),
            ValueError,
            "labels must be",
        ),
        ("gamma", _with(_multi_exit_loss, 2, 1.5, "eager"), ValueError, "gamma must be"),
    ],
    "mc_sample": [
        ("empty seed", _with(_mc_sample, 2, _t(0, dtype=torch.int64)), ValueError, "seed must be"),
        ("float seed", _with(_mc_sample, 2, _t(1)), TypeError, "seed must have dtype"),
        ("no column", _with(_mc_sample, 0, _t(3, 0)), ValueError, "V >= 1"),
        ("eager backend", _with(_mc_sample, 3, "eager"), ValueError, "backend must be 'triton'"),
    ],
    "mc_sample_fused": [
        (
            "weight narrower than hidden",
            _with(_mc_sample_fused, 1, _t(21, 8)),
            ValueError,
            "weight must be",
        ),
        ("bias too short", _with(_mc_sample_fused, 2, _t(20)), ValueError, "bias must be"),
        (
            "seed of two",
            _with(_mc_sample_fused, 4, _t(2, dtype=torch.int64)),
            ValueError,
            "seed must be",
        ),
    ],
    "mc_candidate_loss": [
        (
            "hidden shorter than the candidates",
            _with(_mc_loss, 0, lambda a: a[0][:2].detach()),
            ValueError,
            "candidates must be",
        ),
        (
            "embedding narrower",
            _with(_mc_loss, 1, lambda a: a[1][:, :4].detach()),
            ValueError,
            "embedding must be",
        ),
        (
            "candidate past the vocabulary",
            _with(_mc_loss, 3, lambda a: a[3] + 13),
            ValueError,
            "candidates must hold token ids",
        ),
        ("padding_idx", _with(_mc_loss, 8, 13), ValueError, "padding_idx must be"),
    ],
    "mc_candidate_loss_backward": [
        (
            "hidden shorter than the candidates",
            _with(_mc_loss_backward, 1, lambda a: a[1][:2]),
            ValueError,
            "candidates must be",
        ),
        (
            "dscore of another shape",
            _with(_mc_loss_backward, 4, lambda a: a[4][:, :3]),
            ValueError,
            "dscore must be",
        ),
        (
            "candidate past vocab",
            _with(_mc_loss_backward, 5, 3),
            ValueError,
            "candidates must hold token ids",
        ),
        (
            "grad of another reduction",
            _with(_mc_loss_backward, 0, _t(5)),
            ValueError,
            "grad must be",
        ),
    ],
    "packing_nonzero": [
        ("int flags", lambda: (torch.tensor([1, 0, 1]),), ValueError, "flags must be"),
    ],
    "packing_check_positions": [
        (
            "indices past position_ids",
            _with(_packing_check_positions, 3, lambda a: a[3] + 5, None),
            ValueError,
            "indices must index",
        ),
        (
            "positions of another length",
            _with(_packing_check_positions, 1, lambda a: a[1][:3], None),
            ValueError,
            "must all be",
        ),
    ],
}


def _state(args):
    return [a.detach().clone() for a in args if isinstance(a, torch.Tensor)]


def _unchanged(args, before):
    for a, b in zip(_state(args), before):
        if a.is_floating_point():
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "name,what,make,exc,pattern",
    [
        pytest.param(n, w, m, e, p, id=f"{n}-{w}")
        for n, calls in BAD_CALLS.items()
        for w, m, e, p in calls
    ],
)
def test_direct_call_checks_its_arguments(name, what, make, exc, pattern):
    """Bypassing the public wrapper: the op's own error, naming the argument; nothing it mutates has changed."""
    args = make()
    before = _state(args)
    with pytest.raises(exc, match=pattern):
        getattr(torch.ops.effbert, name)(*args)
    _unchanged(args, before)


COMPILED = [
    ("mc_sample", "empty seed"),
    ("mc_sample_fused", "weight narrower than hidden"),
    ("mc_candidate_loss_backward", "hidden shorter than the candidates"),
    ("mc_candidate_loss", "candidate past the vocabulary"),
    ("tupe_position_bias", "bucket past the table"),
    ("note_update_", "slot past the notes"),
    ("exit_decision", "row id outside the batch"),
    ("token_exit_decision", "offsets past T"),
    ("tupe_attention_varlen_subset", "position past its keys"),
]


@pytest.mark.parametrize("name,what", COMPILED, ids=[f"{n}-{w}" for n, w in COMPILED])
def test_direct_call_checks_under_torch_compile(name, what):
    """A compiled function calling the op directly still gets the op's ValueError (the op runs on the real tensors
    inside the graph; its fake implementation only gives shapes), with fullgraph=True."""
    ((what_, make, exc, pattern),) = [c for c in BAD_CALLS[name] if c[0] == what]
    args = make()
    before = _state(args)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def fn(*ts):
        full = list(args)
        for i, t in zip(tensors, ts):
            full[i] = t
        return getattr(torch.ops.effbert, name)(*full)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with pytest.raises(exc, match=pattern):
        compiled(*[args[i].detach() for i in tensors])
    _unchanged(args, before)
