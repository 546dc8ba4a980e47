"""``Linear``: ``torch.nn.Linear`` that runs CPU inference on a pre-packed oneDNN weight.

PyTorch's ``F.linear`` (``addmm``) on a CPU reads the weight in its plain row-major layout on every
call; oneDNN's inner-product primitive wants it reordered into its blocked layout first. Through
torch that is ``torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)`` once and
``torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, scalars, algorithm)`` per call, the pair
inductor's CPU freezing pass emits for ``nn.Linear``
(``torch/_inductor/fx_passes/mkldnn_fusion.py``). Measured on BERT-base shapes (one thread,
AVX-512): 220-255 GFLOP/s against addmm's 86-112 from 31 to 512 rows, and ``attr="gelu"`` applies
BERT's GELU in the same call.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._dispatch import ENV_VAR, requested_backend

__all__ = ["Linear", "packed_linear_available", "BATCH_SIZE_HINT"]

# The rows oneDNN packs the weight for. Measured (BERT-base's four weight shapes, M = 1, 31, 128,
# 512 rows, one thread): hints 31, 128, 512 and None give the same rate at every M (within 3%); a
# hint of 1 is 5-20% slower from 31 rows on. 128 is a short batch's token count.
BATCH_SIZE_HINT = 128

_MKLDNN = getattr(torch.ops, "mkldnn", None)
_HAS_OPS = _MKLDNN is not None and all(
    hasattr(_MKLDNN, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
)


def _bf16_supported():
    check = getattr(_MKLDNN, "_is_mkldnn_bf16_supported", None) if _HAS_OPS else None
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


# found out once, at import: a plain dict that torch.compile never has to trace through
_AVAILABLE = {
    torch.float32: _HAS_OPS and torch.backends.mkldnn.is_available(),
}
_AVAILABLE[torch.bfloat16] = _AVAILABLE[torch.float32] and _bf16_supported()
_GELU = ("none", "tanh")


def packed_linear_available(dtype=torch.float32):
    """Whether this torch build runs ``Linear``'s packed path for ``dtype`` (float32 or bfloat16):
    oneDNN is built in and ``torch.ops.mkldnn._linear_pointwise`` exists (bfloat16 also needs a CPU
    oneDNN runs it on). False for any other dtype."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    return _AVAILABLE.get(dtype, False)


class Linear(nn.Linear):
    """``torch.nn.Linear`` whose CPU inference runs on a pre-packed oneDNN weight.

    Same parameters, state dict, initialisation, input and output as ``nn.Linear`` (``input [...,
    in_features]`` -> ``[..., out_features]``, the weight's dtype); ``isinstance(m, nn.Linear)``
    holds. ``forward`` takes the packed path (``torch.ops.mkldnn._linear_pointwise`` on
    ``torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_SIZE_HINT)``) only when all of these
    hold, and is exactly ``F.linear`` otherwise:

    - ``packed`` is True (the class attribute: ``effbert.nn.Linear.packed = False`` turns it off
      everywhere; set on one module for that module) and ``backend`` is not ``"eager"`` (after
      ``EFFBERT_BACKEND`` for ``"auto"``; ``TupeBertPreTrainedModel.set_backend`` and
      ``config.backend`` set it);
    - input, weight and bias are CPU tensors of one dtype, float32 or bfloat16
      (``packed_linear_available``), the input non-empty with ``in_features`` columns;
    - no gradient is recorded: ``torch.no_grad()``, ``torch.inference_mode()``, or nothing requires
      grad;
    - not inside ``torch.compile`` tracing (inductor's freezing packs weights on its own).

    The packed weight is a cache on the module, not a parameter or buffer: it never reaches
    ``state_dict``, ``save_pretrained``, ``deepcopy`` or pickling. It is rebuilt when the weight
    changes: another tensor, another storage, dtype or device, or an in-place edit torch's version
    counter sees (an optimizer step, ``load_state_dict``, ``copy_`` under ``no_grad``). An edit
    through ``weight.data`` bypasses the counter: call ``clear_cache()`` after one. A weight made
    under ``torch.inference_mode()`` has no counter: it is never cached, oneDNN runs it unpacked
    (about twice addmm's rate still; build or load the model outside inference mode for the
    packed rate). fp32 results
    equal ``F.linear``'s up to summation order (both within ~1e-6 relative of float64 at K =
    768..3072); bf16 accumulates in fp32 and rounds once, as ``F.linear`` in bf16.

    Args (beyond ``nn.Linear``'s ``in_features, out_features, bias, device, dtype``):
        backend: ``"auto"`` or one of ``effbert``'s backends; only ``"eager"`` (the reference)
            matters here: it keeps ``F.linear``.

    Raises: what ``nn.Linear`` raises (bad sizes); ``ValueError`` for an unknown ``backend`` at
    construction.

    Source: oneDNN's inner product with a pre-reordered weight, as inductor's CPU weight prepacking
    calls it (pytorch/pytorch, ``torch/_inductor/fx_passes/mkldnn_fusion.py``,
    ``_linear_pointwise``).
    """

    packed = True

    def __init__(
        self, in_features, out_features, bias=True, device=None, dtype=None, *, backend="auto"
    ):
        requested_backend(backend)  # raises ValueError naming backend
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = backend
        self._packed = None

    @classmethod
    def from_linear(cls, linear, *, backend="auto"):
        """A ``Linear`` sharing ``linear``'s parameters (no copy). ``linear`` must be an
        ``nn.Linear``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        requested_backend(backend)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)
        new.backend = backend
        new._packed = None
        new.train(linear.training)
        return new

    def clear_cache(self):
        """Forget the packed weight (needed only after an edit through ``weight.data``)."""
        self._packed = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = None  # an mkldnn tensor: neither picklable nor worth copying
        return state

    def _use_packed(self, x):
        # cheapest tests first: this runs on every call of every linear of the model
        if not self.packed or torch.compiler.is_compiling() or type(x) is not torch.Tensor:
            return False
        weight, bias = self.weight, self.bias
        dtype = x.dtype
        if not (
            x.is_cpu
            and weight.is_cpu
            and weight.dtype is dtype
            and _AVAILABLE.get(dtype, False)
            and x.layout is torch.strided
            and x.dim() >= 1
            and x.shape[-1] == self.in_features
            and x.numel() > 0
            and (bias is None or (bias.dtype is dtype and bias.is_cpu))
        ):
            return False
        if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return False
        backend = self.backend
        if backend == "auto":
            backend = os.environ.get(ENV_VAR, "").strip() or "auto"
        return backend != "eager"

    def packed_weight(self, start=0, stop=None):
        """The oneDNN-packed weight (an ``mkldnn``-layout tensor), built on first use and kept until
        the weight changes (see the class); ``start, stop``: only output rows ``start:stop``
        (``forward_rows``), each block packed and kept on its own. Raises ``RuntimeError`` when
        ``packed_linear_available`` is False for the weight's dtype or the weight is off the CPU."""
        weight = self.weight
        if weight.device.type != "cpu" or not _AVAILABLE.get(weight.dtype, False):
            raise RuntimeError(
                f"no packed oneDNN linear for a {weight.dtype} weight on {weight.device}"
            )
        rows = (start, self.out_features if stop is None else stop)
        if weight.is_inference():
            # made under torch.inference_mode(): no version counter tells an in-place edit, so no
            # cache; oneDNN takes the plain weight as it is (still about twice addmm's rate)
            self._packed = None
            return weight.detach()[rows[0] : rows[1]]
        key = (weight.data_ptr(), weight._version, weight.dtype)
        blocks = self._packed if self._packed is not None else {}
        cached = blocks.get(rows)
        if cached is None or cached[0] is not weight or cached[1] != key:
            with torch.no_grad():
                block = weight.detach()[rows[0] : rows[1]]
                packed = _MKLDNN._reorder_linear_weight(block, BATCH_SIZE_HINT)
            # the weight is kept beside its key: its storage cannot be freed and reused by a new one
            cached = blocks[rows] = (weight, key, packed)
        self._packed = blocks
        return cached[2]

    def forward_rows(self, input, start, stop):
        """``F.linear(input, weight[start:stop], bias[start:stop])``: output features ``start`` to
        ``stop - 1`` only (e.g. the Q block of a fused QKV projection for a subset of tokens), on
        the packed path with that block packed once. ``input [..., in_features]`` ->
        ``[..., stop - start]``. Raises ``ValueError`` unless ``0 <= start < stop <=
        out_features``."""
        if not (
            isinstance(start, int)
            and isinstance(stop, int)
            and 0 <= start < stop <= self.out_features
        ):
            raise ValueError(
                f"start, stop must be ints with 0 <= start < stop <= {self.out_features}, "
                f"got {start!r}, {stop!r}"
            )
        bias = None if self.bias is None else self.bias[start:stop]
        if self._use_packed(input):
            return _MKLDNN._linear_pointwise(
                input, self.packed_weight(start, stop), bias, "none", [], ""
            )
        return F.linear(input, self.weight[start:stop], bias)

    def forward(self, input):
        """``input [..., in_features]`` -> ``[..., out_features]``, as ``nn.Linear``."""
        if self._use_packed(input):
            return _MKLDNN._linear_pointwise(input, self.packed_weight(), self.bias, "none", [], "")
        return F.linear(input, self.weight, self.bias)

    def forward_gelu(self, input, approximate="none"):
        """``F.gelu(self(input), approximate=approximate)``, in one oneDNN call on the packed path
        (GELU fused into the GEMM's epilogue). ``approximate``: ``"none"`` (exact erf, BERT's) or
        ``"tanh"``."""
        if approximate not in _GELU:
            raise ValueError(f"approximate must be one of {_GELU}, got {approximate!r}")
        if self._use_packed(input):
            return _MKLDNN._linear_pointwise(
                input, self.packed_weight(), self.bias, "gelu", [], approximate
            )
        return F.gelu(F.linear(input, self.weight, self.bias), approximate=approximate)
