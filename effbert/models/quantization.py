"""Lower-precision CPU inference for effbert's models: int8 dynamic quantisation of the linear layers.

``quantize_for_cpu(model)`` is PyTorch's own dynamic quantisation (``torch.ao.quantization.quantize_dynamic``,
https://pytorch.org/docs/stable/quantization.html#dynamic-quantization and the tutorial "Dynamic Quantization on
BERT") applied to a copy of an effbert model: every ``nn.Linear`` of the encoder and heads stores int8 weights
(per output channel) and quantises its input per call, which the x86 engine runs with VNNI int8 dot products.
It lives beside the models because it transforms one (and knows which of their modules must stay in float); it
works on ``from_hf_bert`` conversions alike, since they are the same classes.

Left in float: embeddings and LayerNorms (``quantize_dynamic`` only replaces the linears it is given), the TUPE
positional projections U^Q / U^K (``TupePositionBias``: they run once per forward on ``N`` positions, so quantising
them saves nothing, and their product is added unnormalised to every layer's logits) and, by default, the FFN down
projection (``KEEP_FLOAT``: measured, it costs the most accuracy).

bf16 needs no function of its own: ``model.to(torch.bfloat16)`` runs end to end on the CPU path (the CPU attention
backend takes bf16 in inference).
"""

import copy
import warnings

import torch
from torch import nn

from ..nn import Linear
from ..nn.linear import packed_linear_available

__all__ = ["quantize_for_cpu", "QUANTIZED_DTYPES", "KEEP_FLOAT", "FLOAT_DTYPES"]

QUANTIZED_DTYPES = (
    torch.qint8,
)  # what quantize_for_cpu takes (float16 dynamic linears are slower than fp32 here)
# Linear layers left in fp32 by default, by the last part of their name: the FFN's down projection
# (``TupeBertLayer.output``), whose input (after GELU) has outliers that one per-call activation scale flattens. On
# all-MiniLM-L6-v2 and 16 license sentences: every linear in int8 gives a worst sentence-embedding cosine of 0.96
# against fp32 (onednn; 0.92 with fbgemm's reduced range); this one kept fp32, 0.985. Over 320 fortunes quotations
# (benchmarks/low_precision_accuracy.py) the worst is 0.952 all-int8 and 0.971 with it kept (ONNX Runtime's: 0.906).
KEEP_FLOAT = ("output",)
# What the kept linears may run in (``float_dtype``): fp32, or bf16 weights on oneDNN's packed bf16
# GEMM (fp32 in and out). Measured on one core: bf16 for the FFN down projection took BERT-base int8
# from 29.2 to 22.6 ms at B=1 and 130 to 103 ms at B=8, MiniLM from 28 to 24 ms at B=8, at the fp32
# one's worst per-token cosines.
FLOAT_DTYPES = (torch.float32, torch.bfloat16)


class _CastLinear(Linear):
    """An ``effbert.nn.Linear`` whose parameters are stored in a lower precision (bf16) that takes
    and returns the caller's dtype (fp32): the input is rounded to the weight's dtype, the GEMM
    accumulates in fp32 (oneDNN), the output is rounded to bf16 and cast back."""

    def forward(self, input):
        return super().forward(input.to(self.weight.dtype)).to(input.dtype)

    def forward_gelu(self, input, approximate="none"):
        return super().forward_gelu(input.to(self.weight.dtype), approximate).to(input.dtype)


def _kept_names(model, keep_float):
    """Names of the linears ``keep_float`` keeps (not the positional projections)."""
    quantised = set(_linear_names(model, ()))
    return [n for n in quantised if n.rsplit(".", 1)[-1] in keep_float]


def _cast_kept(model, names, dtype):
    """Replace the linears ``names`` of ``model`` by ``_CastLinear`` copies in ``dtype``, in
    place."""
    for name in names:
        m = model.get_submodule(name)
        new = _CastLinear(
            m.in_features,
            m.out_features,
            bias=m.bias is not None,
            device="meta",
            backend=getattr(m, "backend", "auto"),
        )
        new.weight = nn.Parameter(m.weight.detach().to(dtype), requires_grad=False)
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
        new.train(m.training)
        model.set_submodule(name, new)
    return model


def _linear_names(model, keep_float):
    """Names of the ``nn.Linear`` modules (``effbert.nn.Linear`` included) to quantise: all but
    those inside a ``TupePositionBias`` and those whose name ends in a ``keep_float`` part."""
    from ..nn import TupePositionBias

    positional = {name for name, m in model.named_modules() if isinstance(m, TupePositionBias)}
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and name.rsplit(".", 1)[-1] not in keep_float
        and not any(name == k or name.startswith(k + ".") for k in positional)
    ]


def _as_plain_linears(model, names):
    """Make the modules ``names`` of ``model`` plain ``nn.Linear`` sharing their parameters, in
    place: ``quantize_dynamic`` maps modules by exact type (its default mapping holds ``nn.Linear``,
    and ``torch.ao.nn.quantized.dynamic.Linear.from_float`` refuses a subclass), and
    ``effbert.nn.Linear`` is one."""
    for name in names:
        m = model.get_submodule(name)
        if type(m) is nn.Linear:
            continue
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = m.weight
        plain.bias = m.bias
        plain.train(m.training)
        model.set_submodule(name, plain)
    return model


def _default_engine():
    # onednn: VNNI kernels with the full 8-bit activation range (fbgemm, and x86 packing through it, quantise
    # activations to 7 bits, reduce_range, for CPUs without VNNI: worse cosines on MiniLM, no faster here)
    supported = torch.backends.quantized.supported_engines
    return "onednn" if "onednn" in supported else torch.backends.quantized.engine


def quantize_for_cpu(
    model, dtype=torch.qint8, *, engine=None, keep_float=KEEP_FLOAT, float_dtype=torch.float32
):
    """A copy of ``model`` whose linear layers run in int8 on the CPU (dynamic quantisation); ``model`` is left
    unchanged.

    Semantics: each ``nn.Linear`` (``effbert.nn.Linear`` included; attention QKV and output, FFN up
    projection, pooler, off-ramps and classifiers, MLM head) is replaced by
    ``torch.ao.nn.quantized.dynamic.Linear``: weights quantised once to int8, symmetric per
    output channel; activations quantised to 8 bits per call from their own min/max; int32 accumulation, fp32
    output. Embeddings, LayerNorms, the TUPE positional projections and the linears named in ``keep_float``
    (default: the FFN down projection) stay fp32, as ``effbert.nn.Linear``: in inference they run on
    pre-packed oneDNN weights. Inputs and outputs keep their shapes and dtypes
    (``input_ids [B, N]`` int64 in, fp32 hidden states / logits out); ``forward`` and ``early_exit`` work as on the
    float model. Expect the outputs to differ from fp32 by the int8 rounding (on all-MiniLM-L6-v2, mean-pooled
    sentence embeddings at a worst cosine of 0.971 to fp32's over 320 sentences with the defaults, mean 0.988; see
    ``KEEP_FLOAT`` and DESIGN.md's measured accuracy).

    Args:
        model: an ``nn.Module`` (an effbert ``TupeBert*`` model, e.g. from ``from_hf_bert``) with fp32 parameters,
            on the CPU, in eval mode.
        dtype: ``torch.qint8`` (the only one taken; see ``QUANTIZED_DTYPES``).
        engine: the quantised engine that packs the weights (``torch.backends.quantized.supported_engines``:
            ``"x86"``, ``"fbgemm"``, ``"onednn"``); None takes ``"onednn"`` where supported (else the current
            ``torch.backends.quantized.engine``). The packed weights keep their engine's kernels; the global
            setting is restored afterwards.
        keep_float: names (the last part of a module's name: ``"output"``, ``"intermediate"``, ``"qkv"``, ...) of
            linear layers to leave in fp32; ``()`` quantises every linear but the positional projections. The
            default names effbert's own layer (``TupeBertLayer.output``); a model built on transformers' layers
            (``multi_exit_bert``: ``...output.dense``) has every linear quantised by it.
        float_dtype: what the ``keep_float`` linears run in: ``torch.float32`` (default) or
            ``torch.bfloat16`` (their weights rounded to bf16 on oneDNN's packed bf16 GEMM, fp32
            in and out; needs ``packed_linear_available(torch.bfloat16)`` of
            ``effbert.nn.linear``). The positional projections stay fp32 either way.

    Returns: the quantised copy, in eval mode. For inference only: not trainable, CPU only, saved with
    ``torch.save`` (its state dict holds packed weights, not a transformers checkpoint).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``dtype`` is not in ``QUANTIZED_DTYPES``; ``keep_float`` is
            not a tuple of str; ``float_dtype`` is not in ``FLOAT_DTYPES``.
        ValueError: ``model`` has a parameter off the CPU (CUDA: dynamic quantisation has CPU kernels only) or not
            fp32, or is in training mode; ``engine`` is not supported here; no linear layer is left
            to quantise; ``float_dtype`` bf16 where this CPU or torch has no packed bf16 linear.

    Source: PyTorch's dynamic quantisation (``torch.ao.quantization.quantize_dynamic`` with
    ``per_channel_dynamic_qconfig``; https://pytorch.org/docs/stable/quantization.html).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if dtype not in QUANTIZED_DTYPES:
        raise TypeError(f"dtype must be one of {QUANTIZED_DTYPES}, got {dtype}")
    for name, p in model.named_parameters():
        if p.device.type != "cpu":
            raise ValueError(
                f"model must be on the CPU (dynamic quantisation has CPU kernels only), but parameter "
                f"{name} is on {p.device}"
            )
        if p.dtype != torch.float32:
            raise ValueError(f"model must be fp32 to quantise, but parameter {name} is {p.dtype}")
    if model.training:
        raise ValueError(
            "model must be in eval mode (model.eval()): a dynamically quantised model is for inference"
        )
    supported = torch.backends.quantized.supported_engines
    if engine is not None and engine not in supported:
        raise ValueError(f"engine must be one of {supported}, got {engine!r}")
    if not isinstance(keep_float, (tuple, list, set, frozenset)) or not all(
        isinstance(k, str) for k in keep_float
    ):
        raise TypeError(f"keep_float must be a tuple of module names (str), got {keep_float!r}")
    if float_dtype not in FLOAT_DTYPES:
        raise TypeError(f"float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype!r}")
    if float_dtype != torch.float32 and not packed_linear_available(float_dtype):
        raise ValueError(
            f"float_dtype {float_dtype} needs oneDNN's packed {float_dtype} linear, which this "
            "torch or CPU lacks"
        )
    names = _linear_names(model, set(keep_float))
    if not names:
        raise ValueError(
            f"model has no nn.Linear layer to quantise (keep_float={tuple(keep_float)})"
        )
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    before = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = _default_engine() if engine is None else engine
        with warnings.catch_warnings():
            # torch.ao.quantization warns that it moves to torchao; it is what this torch ships and maintains
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            quantized = quantize_dynamic(
                _as_plain_linears(copy.deepcopy(model), names),
                {name: per_channel_dynamic_qconfig for name in names},
                dtype=dtype,
            )
    finally:
        torch.backends.quantized.engine = before
    if float_dtype != torch.float32:
        _cast_kept(quantized, _kept_names(model, set(keep_float)), float_dtype)
    return quantized.eval()
