"""Dispatch declared as data (effbert/ops/_dispatch.py): one `not_supported_reasons` reading each
op's declaration, and every declaration held to what its backends really compute: each (backend,
dtype) the data says serves runs and matches the float64 reference by the one comparator, and each
it refuses raises."""

import pytest
import torch

import effbert
from effbert import reference
from effbert.ops import BackendNotSupportedError
from effbert.ops import _dispatch
from effbert.ops._dispatch import (
    OPS,
    Inputs,
    Support,
    declare,
    not_supported_reasons,
    select_backend,
    supported_backends,
)

from helpers import FP32_RTOL, assert_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CPU = torch.device("cpu")


@pytest.fixture
def toy(monkeypatch):
    """A throwaway op declaration (removed again after the test)."""
    monkeypatch.setattr(_dispatch, "OPS", dict(OPS))
    return declare(
        "toy_op",
        {
            "triton": Support(
                dtypes=(torch.float32, torch.float16),
                head_dims=(16, 32),
                takes="Triton kernels take",
                interpreter_dtypes=(torch.float32,),
                limits={
                    "window": (
                        8,
                        "the toy kernel keeps a window in registers: "
                        "window <= {limit}, "
                        "got {value}",
                    )
                },
            ),
            "cpu": Support(
                dtypes=(torch.float32, torch.float64, torch.bfloat16),
                grad_dtypes=(torch.float32,),
                tensor_dtypes={"notes": (torch.float32,)},
                why="as the toy needs",
            ),
            "eager": Support(supports_backward=False),
        },
        {"cpu": ("cpu", "eager")},
        absent="toy has no {backend} kernel",
    )


def test_reasons_come_from_the_declaration(toy, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def why(backend, dtype=torch.float32, sizes=None, grad=False, notes=torch.float32):
        inputs = Inputs(CPU, (("q", dtype), ("notes", notes)), sizes or {"head_dim": 16}, grad)
        reasons = not_supported_reasons("toy_op", backend, inputs)
        machine = _dispatch._general_reasons(backend) + _dispatch.device_reasons(backend, CPU)
        assert reasons[: len(machine)] == machine  # this machine's facts first
        return reasons[len(machine) :]

    assert why("cpu") == [] and why("eager") == []
    assert why("cuda") == ["toy has no cuda kernel"]
    assert why("cpu", torch.float16) == [
        "cpu kernels take fp32/fp64/bf16 q (as the toy needs), got float16"
    ]
    assert why("cpu", torch.float64, grad=True) == [
        "cpu kernels take float32 q with a gradient wanted (as the toy needs), got float64"
    ]
    assert why("cpu", notes=torch.float64) == [
        "cpu kernels take float32 notes (as the toy needs), got float64"
    ]
    assert why("eager", grad=True) == ["eager computes no gradients for toy_op"]
    # the Triton interpreter on CPU tensors: its own dtypes, and a dtype the GPU takes named as
    # computed wrongly
    assert why("triton", torch.float16) == [
        "the Triton interpreter computes fp16 dot products wrongly"
    ]
    assert why("triton", torch.float64) == ["Triton kernels take fp32/fp16 q, got float64"]
    assert why("triton", sizes={"head_dim": 24, "window": 9}) == [
        "Triton kernels take head dims (16, 32), got 24",
        "the toy kernel keeps a window in registers: window <= 8, got 9",
    ]


def test_selection_follows_the_declared_preference(toy):
    half = Inputs(CPU, (("q", torch.float16),), {"head_dim": 16})
    want = "cpu" if not _dispatch._general_reasons("cpu") else "eager"
    single = Inputs(CPU, (("q", torch.float32),), {"head_dim": 16})
    assert select_backend("toy_op", "auto", single) == want
    assert select_backend("toy_op", "auto", half) == "eager"  # the cpu kernel refuses fp16
    with pytest.raises(
        BackendNotSupportedError, match=r"toy_op: backend 'cpu' cannot serve.*got float16"
    ):
        select_backend("toy_op", "cpu", half)
    with pytest.raises(BackendNotSupportedError, match=r"^renamed: backend 'cuda'"):
        select_backend("toy_op", "cuda", half, called="renamed")
    with pytest.raises(ValueError, match="backend must be one of"):
        select_backend("toy_op", "gpu", half)


def test_declare_checks_its_arguments(toy):
    with pytest.raises(ValueError, match="declared already"):
        declare("toy_op", {"eager": Support()}, {"cpu": ("eager",)})
    with pytest.raises(ValueError, match=r"got \['tpu'\]"):
        declare("other_op", {"tpu": Support()}, {"cpu": ()})
    with pytest.raises(ValueError, match=r"got \['cpu'\]"):
        # preferred but not declared
        declare("other_op", {"eager": Support()}, {"cpu": ("cpu", "eager")})


def test_every_op_declares_what_it_prefers():
    assert {
        "exit_entropy",
        "exit_decision",
        "multi_exit_distillation_loss",
        "token_exit_decision",
        "note_mix",
        "note_update_",
        "note_window_means",
        "mc_sample",
        "mc_sample_fused",
        "mc_candidate_loss",
        "tupe_position_bias",
        "tupe_attention",
        "tupe_attention_varlen_subset",
    } <= set(OPS)
    for spec in OPS.values():
        assert "eager" in spec.backends, spec.op  # the reference serves every op
        for order in spec.preference.values():
            assert order[-1] == "eager" and all(b in spec.backends for b in order), spec.op


# --- each declaration against what its backends compute, on this machine's CPU backends
# -------------------------


def _entropy(dtype):
    x = (torch.randn(33, 7, dtype=torch.float64) * 3).to(dtype)
    return (x,), {}, effbert.exit_entropy, lambda x: reference.exit_entropy(x.double())


def _position_bias(dtype):
    n, h, d = 9, 2, 8
    pos_q, pos_k = (torch.randn(n, h, d, dtype=torch.float64).to(dtype) for _ in range(2))

    def ref(pq, pk, **kw):
        return reference.tupe_position_bias(pq.double(), pk.double(), scale=0.3)

    return (pos_q, pos_k), {"scale": 0.3}, effbert.tupe_position_bias, ref


def _attention(dtype):
    b, n, h, d = 2, 5, 2, 16
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64).to(dtype) for _ in range(3))

    def ref(q, k, v, **kw):
        return reference.tupe_attention(q.double(), k.double(), v.double(), scale=0.25)

    return (q, k, v), {"scale": 0.25}, effbert.tupe_attention, ref


def _loss(dtype):
    z = torch.randn(3, 4, 5, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 5, (4,))

    def ref(z, y, **kw):
        return reference.multi_exit_distillation_loss(z.double(), y)

    return (z, y), {}, effbert.ops.multi_exit_distillation_loss, ref


CALLS = {
    "exit_entropy": (_entropy, lambda args: (("logits", args[0].dtype),), lambda args: {}),
    "tupe_position_bias": (
        _position_bias,
        lambda args: (("pos_q", args[0].dtype),),
        lambda args: {"num_buckets": 0, "heads": args[0].shape[1]},
    ),
    "tupe_attention": (
        _attention,
        lambda args: (("q", args[0].dtype),),
        lambda args: {"head_dim": args[0].shape[-1], "heads": args[0].shape[-2]},
    ),
    "multi_exit_distillation_loss": (
        _loss,
        lambda args: (("logits", args[0].dtype),),
        lambda args: {"classes": args[0].shape[-1]},
    ),
}


@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_declarations_match_what_the_backends_compute(op, dtype, monkeypatch):
    """For every backend of BACKENDS: where the declaration (with this machine's facts) says it
    serves, the op runs on it and matches float64 (2x the eager error in the same precision for
    16-bit); elsewhere it raises."""
    # the interpreter serves CPU tensors (as in the conftest)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    make, tensors, sizes = CALLS[op]
    torch.manual_seed(0)
    args, kwargs, fn, ref_fn = make(dtype)
    inputs = Inputs(CPU, tensors(args), sizes(args))
    ref = ref_fn(*args, **kwargs)
    lowp = None
    if dtype in (torch.float16, torch.bfloat16):
        lowp = fn(*args, backend="eager", **kwargs)
    served = supported_backends(op, inputs)
    assert "eager" in served  # the reference serves every dtype the op takes
    for backend in _dispatch.BACKENDS:
        if backend not in served:
            with pytest.raises(BackendNotSupportedError, match=f"backend '{backend}' cannot serve"):
                fn(*args, backend=backend, **kwargs)
            continue
        out = fn(*args, backend=backend, **kwargs)
        rtol = 1e-12 if dtype == torch.float64 and backend == "eager" else FP32_RTOL
        assert_close(out, ref, rtol=rtol, lowp_eager=lowp, what=f"{op} on {backend}")
