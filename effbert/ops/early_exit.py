"""Early-exit ops: ``exit_entropy`` (the DeeBERT / RomeBERT exit criterion) and the fused per-layer exit decision
of batched early exit (``exit_decision``, driven by ``BatchedExit``)."""

import math

import torch

from .. import _ext
from .. import reference
from .checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._dispatch import Inputs, Support, cached_selection, declare, direct_call_ok, requested_backend

__all__ = [
    "exit_entropy",
    "exit_decision",
    "BatchedExit",
    "check_criterion",
    "CRITERIA",
    "multi_exit_distillation_loss",
]

_KERNEL_DTYPES = FLOAT_DTYPES


_KERNELS = Support(dtypes=_KERNEL_DTYPES)
declare(
    ("exit_entropy", "exit_decision"),
    {"triton": _KERNELS, "cuda": _KERNELS, "cpu": _KERNELS, "eager": Support()},
)


def _logits(logits):
    return Inputs(logits.device, (("logits", logits.dtype),), {"classes": logits.shape[-1]})


def _entropy_eager(x, out):
    out.copy_(reference.exit_entropy(x))


def _entropy_triton(x, out):
    from ..kernels import early_exit as kernels

    kernels.exit_entropy(x, out)


def _entropy_native(x, out, module_name):
    rows, cols = x.shape
    _ext.launch(
        module_name,
        "exit_entropy",
        x.device,
        x.data_ptr(),
        _ext.dtype_code(x.dtype),
        rows,
        cols,
        x.stride(0),
        out.data_ptr(),
    )


# Each writes entropy(x) into an `out` of x.shape[0] elements on x's device (float64 for float64 logits on the
# eager backend, the only one that takes them; float32 otherwise).
_ENTROPY_INTO = {
    "eager": _entropy_eager,
    "triton": _entropy_triton,
    "cpu": lambda x, out: _entropy_native(x, out, "_C"),
    "cuda": lambda x, out: _entropy_native(x, out, "_cuda"),
}


def entropy_into(backend, logits, out):
    """Run one concrete backend into a caller-provided ``out`` of `entropy_dtype` (tests poison it first)."""
    # Kernels take a row stride and unit column stride; broadcast or transposed layouts are copied once.
    rows, cols = logits.shape
    plain = logits.stride(-1) == 1 and (rows <= 1 or logits.stride(0) >= cols)
    x = logits if plain else logits.contiguous()
    _ENTROPY_INTO[backend](x, out)
    return out


def entropy_backend(logits, backend="auto"):
    """The backend that ``exit_entropy(logits, backend=backend)`` would run (raises if none can serve)."""
    return cached_selection(
        "exit_entropy", backend, (logits.device, logits.dtype), lambda: _logits(logits)
    )


def entropy_dtype(logits):
    """The dtype ``exit_entropy`` returns: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _exit_entropy_impl(logits, backend):
    out = torch.empty(logits.shape[0], dtype=entropy_dtype(logits), device=logits.device)
    return entropy_into(entropy_backend(logits, backend), logits, out)


def _check_entropy_args(logits, backend):
    check_tensor(
        "logits", logits, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,), shape_hint="[B, C]"
    )
    if logits.shape[1] < 1:
        raise ValueError(
            f"logits must have at least one class (C >= 1), got shape {tuple(logits.shape)}"
        )
    requested_backend(backend)  # reject a bad name here, with the argument's name, before tracing


@torch.library.custom_op("effbert::exit_entropy", mutates_args=())
def _exit_entropy_op(logits: torch.Tensor, backend: str) -> torch.Tensor:
    # callable directly and run on real tensors under torch.compile: checked here, not only in the wrapper
    _check_entropy_args(logits, backend)
    return _exit_entropy_impl(logits, backend)


@_exit_entropy_op.register_fake
def _(logits, backend):
    return logits.new_empty((logits.shape[0],), dtype=entropy_dtype(logits))


def _entropy_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)


def _entropy_backward(ctx, grad):
    # dH/dz_k = -p_k (log p_k + H); classes with p_k = 0 (z_k = -inf) get no gradient.
    logits, entropy = ctx.saved_tensors
    logp = torch.log_softmax(logits.to(entropy_dtype(logits)), dim=-1)
    term = logp.exp() * (logp + entropy.unsqueeze(-1))
    term = torch.where(logp == float("-inf"), torch.zeros_like(term), term)
    return (-grad.unsqueeze(-1) * term).to(logits.dtype), None


_exit_entropy_op.register_autograd(_entropy_backward, setup_context=_entropy_setup_context)


def exit_entropy(logits, *, backend="auto"):
    """Entropy of ``softmax(logits)`` per row, natural log, as ``[B]`` float32 (float64 for float64 logits).

    ``logits``: ``[B, C]`` float tensor (fp32, fp16, bf16; float64 on the eager backend), ``C >= 1``, any ``B``.
    Every backend computes ``log1p(a) + u / (1 + a)`` (``m`` the row maximum, ``a`` the sum of ``exp(z - m)`` over
    every class but one argmax, ``u`` the sum of ``exp(z - m) * (m - z)``): all terms are >= 0, so float32 keeps a
    relative error <= 1e-5 against float64 at any logit scale, also where the entropy is tiny and the textbook
    ``-sum p log p`` cancels. A row holding NaN or +inf, or with no finite logit, gives NaN. Differentiable.
    Raises ``ValueError`` for a tensor that is not ``[B, C]`` float with ``C >= 1``.
    """
    _check_entropy_args(logits, backend)
    if direct_call_ok(logits):
        return _exit_entropy_impl(logits, backend)
    return torch.ops.effbert.exit_entropy(logits, backend)


# ---- batched early exit: the fused per-layer decision ----

CRITERIA = reference.CRITERIA
# Kernel codes (effbert/kernels/early_exit.py and csrc/include/effbert/exit_decision.h hold the same table); a patience
# criterion on a one-column (regression) head uses PABEE's regression rule.
_CODES = {"entropy": 0, "max_prob": 1, "patience": 2}
_PATIENCE_REGRESSION = 3
_NAMES = {0: "entropy", 1: "max_prob", 2: "patience", 3: "patience"}
_NEVER = 2**31 - 1  # the kernels' patience for "patience 0": the int32 counter never reaches it


def check_criterion(criterion, threshold=None, patience=None, classes=None):
    """Validate an exit criterion and its parameters; returns ``(code, threshold, patience)`` for the kernels.

    entropy: ``threshold >= 0`` (exit when entropy < threshold; 0 means full depth, nobody exits early). max_prob:
    ``0 < threshold <= 1`` (exit when the largest probability >= threshold). patience: integer ``patience >= 0``
    (0 means full depth, PABEE's ``patience == 0`` path); with a one-column regression head also ``threshold > 0``
    (a prediction counts as unchanged when |delta| < threshold), otherwise no threshold. DeeBERT's and PABEE's
    scripts sweep from threshold 0 / patience 0 for the full-depth row. The kernels get a threshold of -inf
    (entropy 0) or a patience of 2**31 - 1 (patience 0), which no row reaches.
    """
    if not isinstance(criterion, str) or criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
        threshold = float(threshold)
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
    if criterion != "patience":
        if patience is not None:
            raise ValueError(
                f"patience applies to criterion 'patience' only, got patience={patience!r} with "
                f"criterion {criterion!r}"
            )
        if threshold is None:
            raise ValueError(f"criterion {criterion!r} needs a threshold")
        if criterion == "entropy" and not threshold >= 0:
            raise ValueError(
                f"threshold must be >= 0 for criterion 'entropy' (exit when entropy < threshold; 0: "
                f"full depth), got {threshold}"
            )
        if criterion == "entropy" and threshold == 0:
            return _CODES[criterion], float("-inf"), 0  # full depth: entropy is never below -inf
        if criterion == "max_prob" and not 0 < threshold <= 1:
            raise ValueError(
                f"threshold must be in (0, 1] for criterion 'max_prob' (exit when the largest "
                f"probability >= threshold), got {threshold}"
            )
        return _CODES[criterion], threshold, 0
    if isinstance(patience, bool) or not isinstance(patience, int):
        raise TypeError(f"patience must be an int >= 0 for criterion 'patience', got {patience!r}")
    if patience < 0:
        raise ValueError(f"patience must be >= 0 (0: full depth), got {patience}")
    if patience >= 2**31 - 1:
        raise ValueError(f"patience must be < 2**31 - 1, got {patience}")
    if patience == 0:
        patience = _NEVER  # full depth: a streak never gets that long
    if classes is None:  # the head's width is not known yet: check what can be checked
        if threshold is not None and not threshold > 0:
            raise ValueError(
                f"threshold must be > 0 for criterion 'patience' (regression rule), got {threshold}"
            )
        return _CODES["patience"], threshold or 0.0, patience
    if classes == 1:
        if threshold is None or not threshold > 0:
            raise ValueError(
                "threshold must be > 0 for criterion 'patience' on a one-column (regression) head "
                f"(a prediction is unchanged when |delta| < threshold), got {threshold}"
            )
        return _PATIENCE_REGRESSION, threshold, patience
    if threshold is not None:
        raise ValueError(
            "threshold applies to criterion 'patience' only with a one-column (regression) head; "
            f"got threshold={threshold} with {classes} classes"
        )
    return _CODES["patience"], 0.0, patience


def decision_backend(logits, backend="auto"):
    """The backend that ``exit_decision`` would run for these logits (raises if none can serve)."""
    return cached_selection(
        "exit_decision", backend, (logits.device, logits.dtype), lambda: _logits(logits)
    )


def _decision_eager(
    x,
    ids,
    prev,
    counter,
    out_logits,
    out_layer,
    next_rows,
    next_local,
    count,
    code,
    layer,
    threshold,
    patience,
    last,
):
    batch = out_layer.shape[0]
    ok = (ids >= 0) & (
        ids < batch
    )  # checked by the caller; the kernels skip such ids too (never write there)
    local = torch.nonzero(ok).flatten()
    x, ids = x[local], ids[local].long()
    crit = _NAMES[code]
    stateful = code >= 2
    exits, pred, cnt = reference.exit_decision(
        x,
        layer,
        crit,
        threshold=threshold,
        patience=patience,
        prev=prev[ids].double() if stateful else None,
        counter=counter[ids].long() if stateful else None,
        last=last,
    )
    if stateful:
        prev[ids] = pred.to(prev.dtype)
        counter[ids] = cnt.to(counter.dtype)
    out_logits[ids[exits]] = x[exits].to(out_logits.dtype)
    out_layer[ids[exits]] = layer
    keep = ~exits
    n = int(keep.sum())
    next_rows[:n] = ids[keep].to(next_rows.dtype)
    next_local[:n] = local[keep].to(next_local.dtype)
    count.fill_(n)


def _decision_triton(
    x,
    ids,
    prev,
    counter,
    out_logits,
    out_layer,
    next_rows,
    next_local,
    count,
    code,
    layer,
    threshold,
    patience,
    last,
):
    from ..kernels import early_exit as kernels

    kernels.exit_decision(
        x,
        ids,
        prev,
        counter,
        out_logits,
        out_layer,
        next_rows,
        next_local,
        count,
        criterion=code,
        layer=layer,
        threshold=threshold,
        patience=patience,
        last=last,
    )


def _decision_native(
    module_name,
    x,
    ids,
    prev,
    counter,
    out_logits,
    out_layer,
    next_rows,
    next_local,
    count,
    code,
    layer,
    threshold,
    patience,
    last,
):
    rows, cols = x.shape
    _ext.launch(
        module_name,
        "exit_decision",
        x.device,
        x.data_ptr(),
        _ext.dtype_code(x.dtype),
        rows,
        cols,
        x.stride(0),
        ids.data_ptr(),
        prev.data_ptr(),
        counter.data_ptr(),
        out_logits.data_ptr(),
        out_logits.shape[0],
        out_logits.stride(0),
        out_layer.data_ptr(),
        next_rows.data_ptr(),
        next_local.data_ptr(),
        count.data_ptr(),
        code,
        layer,
        threshold,
        patience,
        bool(last),
    )


_DECISION = {
    "eager": _decision_eager,
    "triton": _decision_triton,
    "cpu": lambda *a: _decision_native("_C", *a),
    "cuda": lambda *a: _decision_native("_cuda", *a),
}


def _check_row_ids(row_ids, batch):
    """Every id must name a batch row: the same error on every backend, before any state changes. On CUDA tensors
    this reads one flag back; `BatchedExit` owns its ids and skips it after the first layer."""
    if row_ids.numel() == 0:
        return
    bad = (row_ids < 0) | (row_ids >= batch)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"row_ids must hold batch ids (rows of out_logits): row_ids[{first}] = "
            f"{int(row_ids[first])} outside [0, {batch})"
        )


def _decision_impl(
    logits,
    row_ids,
    prev,
    counter,
    out_logits,
    out_layer,
    next_rows,
    next_local,
    count,
    code,
    layer,
    threshold,
    patience,
    last,
    backend,
):
    name = decision_backend(logits, backend)
    _check_row_ids(row_ids, out_layer.shape[0])
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    _DECISION[name](
        x,
        row_ids,
        prev,
        counter,
        out_logits,
        out_layer,
        next_rows,
        next_local,
        count,
        code,
        layer,
        threshold,
        patience,
        last,
    )


def _check_decision_code(code, threshold, patience, last, cols):
    """The kernels' form of a criterion (what `check_criterion` returns), for callers of the registered op."""
    if isinstance(code, bool) or not isinstance(code, int) or code not in _NAMES:
        raise ValueError(
            f"code must be a criterion code in {sorted(_NAMES)} (check_criterion's), got {code!r}"
        )
    if code == _PATIENCE_REGRESSION and cols != 1:
        raise ValueError(
            f"code {code} (patience, regression rule) needs a one-column head, got {cols} columns"
        )
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or math.isnan(threshold)
    ):
        raise ValueError(f"threshold must be a float, got {threshold!r}")
    ok = {
        0: threshold == float("-inf")
        or (math.isfinite(threshold) and threshold >= 0),  # -inf: full depth
        1: 0 < threshold <= 1,
        2: math.isfinite(threshold),
        3: math.isfinite(threshold) and threshold > 0,
    }[code]
    if not ok:
        raise ValueError(
            f"threshold {threshold} is out of range for criterion code {code} ({_NAMES[code]}; see "
            "check_criterion)"
        )
    if isinstance(patience, bool) or not isinstance(patience, int) or not 0 <= patience <= _NEVER:
        raise ValueError(f"patience must be an int in [0, 2**31 - 1], got {patience!r}")
    if not isinstance(last, bool):
        raise TypeError(f"last must be a bool, got {type(last).__name__}")


@torch.library.custom_op(
    "effbert::exit_decision",
    mutates_args=("prev", "counter", "out_logits", "out_layer", "next_rows", "next_local", "count"),
)
def _exit_decision_op(
    logits: torch.Tensor,
    row_ids: torch.Tensor,
    prev: torch.Tensor,
    counter: torch.Tensor,
    out_logits: torch.Tensor,
    out_layer: torch.Tensor,
    next_rows: torch.Tensor,
    next_local: torch.Tensor,
    count: torch.Tensor,
    code: int,
    layer: int,
    threshold: float,
    patience: int,
    last: bool,
    backend: str,
) -> None:
    # callable directly and run on real tensors under torch.compile: every argument is checked here, the row ids'
    # range too (in _decision_impl), before any state changes
    _check_decision_args(
        logits, row_ids, prev, counter, out_logits, out_layer, next_rows, next_local, count, layer
    )
    _check_decision_code(code, threshold, patience, last, logits.shape[1])
    requested_backend(backend)
    _decision_impl(
        logits,
        row_ids,
        prev,
        counter,
        out_logits,
        out_layer,
        next_rows,
        next_local,
        count,
        code,
        layer,
        float(threshold),
        patience,
        last,
        backend,
    )


@_exit_decision_op.register_fake
def _(
    logits,
    row_ids,
    prev,
    counter,
    out_logits,
    out_layer,
    next_rows,
    next_local,
    count,
    code,
    layer,
    threshold,
    patience,
    last,
    backend,
):
    return None


def _check_decision_args(
    logits, row_ids, prev, counter, out_logits, out_layer, next_rows, next_local, count, layer
):
    check_tensor(
        "logits", logits, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,), shape_hint="[R, C]"
    )
    rows, cols = logits.shape
    if cols < 1:
        raise ValueError(
            f"logits must have at least one class (C >= 1), got shape {tuple(logits.shape)}"
        )
    check_tensor("out_logits", out_logits, ndim=2, dtypes=(logits.dtype,), shape_hint="[B, C]")
    batch = out_logits.shape[0]
    if out_logits.shape[1] != cols or out_logits.stride(-1) != 1:
        raise ValueError(
            f"out_logits must be [B, {cols}] with unit column stride, got shape "
            f"{tuple(out_logits.shape)} strides {out_logits.stride()}"
        )
    if rows > batch:
        raise ValueError(
            f"logits has {rows} rows but the batch (out_logits) has {batch}: the active rows are a subset"
        )
    for name, t, shape, dtype in (
        ("row_ids", row_ids, (rows,), torch.int32),
        ("prev", prev, (batch,), torch.float32),
        ("counter", counter, (batch,), torch.int32),
        ("out_layer", out_layer, (batch,), torch.int32),
        ("count", count, (1,), torch.int32),
    ):
        check_tensor(name, t, ndim=len(shape), dtypes=(dtype,))
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous {list(shape)} tensor, got shape {tuple(t.shape)}"
            )
    for name, t in (("next_rows", next_rows), ("next_local", next_local)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int32,))
        if t.shape[0] < rows or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous int32 tensor of at least {rows} elements, got shape "
                f"{tuple(t.shape)}"
            )
    check_same_device(
        logits=logits,
        row_ids=row_ids,
        prev=prev,
        counter=counter,
        out_logits=out_logits,
        out_layer=out_layer,
        next_rows=next_rows,
        next_local=next_local,
        count=count,
    )
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise ValueError(f"layer must be an int >= 1 (1-based), got {layer!r}")
    if batch >= 2**31:
        raise ValueError(f"the batch must have fewer than 2**31 rows, got {batch}")


def exit_decision(
    logits,
    row_ids,
    prev,
    counter,
    out_logits,
    out_layer,
    next_rows,
    next_local,
    count,
    *,
    layer,
    criterion,
    threshold=None,
    patience=None,
    last=False,
    backend="auto",
):
    """One layer's exit decision for the rows still in the batch, in one launch.

    ``logits [R, C]``: this layer's off-ramp logits of the ``R`` active rows, whose batch ids are ``row_ids [R]``
    (int32). Patience state lives per batch row in ``prev [B]`` (float32, NaN where there is none yet) and
    ``counter [B]`` (int32), and is updated in place. Rows that exit get their logits written to ``out_logits[id]``
    and ``layer`` to ``out_layer[id]``. The rows that go on are written in batch order to ``next_rows[:n]`` (their
    batch ids) and ``next_local[:n]`` (their positions in ``logits``), with ``n`` in ``count[0]``. ``last=True``
    exits every row. A row id outside ``[0, B)`` raises ``ValueError`` on every backend before anything is written
    (on CUDA tensors that check reads one flag back; `BatchedExit`, which owns its ids, runs the unchecked launch
    after its first layer). Otherwise no host synchronisation: reading ``count`` is the caller's choice.
    """
    _check_decision_args(
        logits, row_ids, prev, counter, out_logits, out_layer, next_rows, next_local, count, layer
    )
    code, threshold, patience = check_criterion(
        criterion, threshold, patience, classes=logits.shape[1]
    )
    requested_backend(backend)
    args = (
        logits,
        row_ids,
        prev,
        counter,
        out_logits,
        out_layer,
        next_rows,
        next_local,
        count,
        code,
        layer,
        threshold,
        patience,
        bool(last),
        backend,
    )
    if direct_call_ok(*args[:9]):
        return _decision_impl(*args)
    return torch.ops.effbert.exit_decision(*args)


class BatchedExit:
    """The state of one batched early-exit pass: outputs, patience state and the active rows' batch ids.

    Per layer, ``step(logits, layer)`` runs the fused decision over the active rows and returns ``None`` when every
    active row goes on (nothing to compact), else the positions (int32, in the current active batch) of the rows
    that go on, possibly empty. It reads the new row count from the device (one 4-byte copy) only on layers where a
    row can exit: never on the last layer (everyone exits) nor, for patience, on the first ``patience`` layers.
    """

    def __init__(
        self, batch, *, depth, criterion, threshold=None, patience=None, device=None, backend="auto"
    ):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        check_criterion(
            criterion, threshold, patience
        )  # early message; the class count is checked per step
        self.batch, self.depth = int(batch), depth
        self.criterion, self.threshold, self.patience = criterion, threshold, patience
        self.full_depth = (criterion == "entropy" and threshold == 0) or (
            criterion == "patience" and patience == 0
        )
        self.backend = backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        i32 = dict(dtype=torch.int32, device=self.device)
        self.prev = torch.full((self.batch,), float("nan"), dtype=torch.float32, device=self.device)
        self.counter = torch.zeros(self.batch, **i32)
        self.exit_layer = torch.zeros(self.batch, **i32)
        self.count = torch.zeros(1, **i32)
        self._ids = torch.arange(
            self.batch, **i32
        )  # the active rows' batch ids are self._ids[:active]
        self._spare = torch.empty(
            self.batch, **i32
        )  # the decision writes the next ids here (never in place)
        self._local = torch.empty(self.batch, **i32)
        self.logits = None
        self.active = self.batch
        self._resolved = None  # (backend, criterion code, threshold, patience) once the first layer has been checked

    @property
    def row_ids(self):
        return self._ids[: self.active]

    def step(self, logits, layer):
        if logits.dim() != 2 or logits.shape[0] != self.active:
            raise ValueError(
                f"logits must be [{self.active}, C] (one row per active sample), got shape "
                f"{tuple(logits.shape)}"
            )
        if self.logits is None:
            self.logits = torch.full(
                (self.batch, logits.shape[1]), float("nan"), dtype=logits.dtype, device=self.device
            )
        last = layer == self.depth
        if (
            self._resolved is None
            or logits.dtype != self.logits.dtype
            or logits.stride(-1) != 1
            or not direct_call_ok(logits)
        ):
            # the first layer (and anything unusual) goes through the checked public op
            exit_decision(
                logits,
                self.row_ids,
                self.prev,
                self.counter,
                self.logits,
                self.exit_layer,
                self._spare,
                self._local,
                self.count,
                layer=layer,
                criterion=self.criterion,
                threshold=self.threshold,
                patience=self.patience,
                last=last,
                backend=self.backend,
            )
            code, threshold, patience = check_criterion(
                self.criterion, self.threshold, self.patience, classes=logits.shape[1]
            )
            self._resolved = (decision_backend(logits, self.backend), code, threshold, patience)
        else:
            # later layers: the buffers are this object's own and were checked on the first layer, so the per-layer
            # cost is the launch alone (argument checks cost as much as the decision on a GPU)
            if logits.shape[1] != self.logits.shape[1] or logits.device != self.device:
                raise ValueError(
                    f"logits must be [{self.active}, {self.logits.shape[1]}] on {self.device}, got "
                    f"{tuple(logits.shape)} on {logits.device}"
                )
            name, code, threshold, patience = self._resolved
            _DECISION[name](
                logits,
                self.row_ids,
                self.prev,
                self.counter,
                self.logits,
                self.exit_layer,
                self._spare,
                self._local,
                self.count,
                code,
                layer,
                threshold,
                patience,
                last,
            )
        if last:
            self.active = 0
            return self._local[:0]
        if self.full_depth:
            return None  # threshold 0 / patience 0: nobody exits before the last layer
        if self.criterion == "patience" and layer <= self.patience:
            return None  # a streak of `patience` repeats needs patience + 1 layers: nobody can exit yet
        n = int(self.count.item())  # the one device-to-host copy of the layer
        if n == self.active:
            return None
        self._ids, self._spare = self._spare, self._ids
        self.active = n
        return self._local[:n]


# ---- RomeBERT's multi-exit distillation loss: loss and gradient in one pass ----

_LOSS_MAX_C = 8192

declare(
    "multi_exit_distillation_loss",
    {
        "triton": Support(
            dtypes=_KERNEL_DTYPES,
            limits={
                "classes": (
                    _LOSS_MAX_C,
                    "the Triton kernel keeps a row in registers: C <= {limit}, got {value}",
                )
            },
        ),
        "eager": Support(),
    },
    {"cuda": ("triton", "eager")},
    absent="{backend}: the fused multi-exit loss has a Triton kernel and the eager reference only",
)


def loss_backend(exit_logits, backend="auto"):
    """The backend ``multi_exit_distillation_loss`` would run (raises if none can serve)."""
    key = (exit_logits.device, exit_logits.dtype, exit_logits.shape[-1] > _LOSS_MAX_C)
    return cached_selection(
        "multi_exit_distillation_loss", backend, key, lambda: _logits(exit_logits)
    )


def _loss_eager(z, labels, gamma, temperature):
    """Rows of the loss and d(sum of rows)/d(logits), closed form (the same formulas as the kernel)."""
    x = z if z.dtype == torch.float64 else z.float()
    depth = x.shape[0]
    t = float(temperature)
    logp = torch.log_softmax(x, dim=-1)
    onehot = torch.nn.functional.one_hot(labels, x.shape[-1]).to(x.dtype)
    ce = -(logp * onehot).sum(-1)  # [L, B]
    log_q = torch.log_softmax(x / t, dim=-1)
    log_pt = log_q[-1]
    pt = log_pt.exp()
    kl = torch.where(pt > 0, pt * (log_pt - log_q), torch.zeros_like(log_q)).sum(-1)
    w_ce = torch.full((depth, 1), 1 - gamma, dtype=x.dtype, device=x.device)
    w_ce[-1] = 1.0
    # KLDivLoss's default reduction (RomeBERT's KDLoss): the mean over B * C; the op divides by B, this by C
    w_kd = torch.full((depth, 1), gamma / x.shape[-1], dtype=x.dtype, device=x.device)
    w_kd[-1] = 0.0
    rows = (w_ce * ce + w_kd * t * t * kl).sum(0)
    grad = w_ce[..., None] * (logp.exp() - onehot) + w_kd[..., None] * t * (log_q.exp() - pt)
    return rows, grad


def _loss_impl(exit_logits, labels, gamma, temperature, backend):
    name = loss_backend(exit_logits, backend)
    if name == "eager":
        rows, grad = _loss_eager(exit_logits, labels, gamma, temperature)
        return rows.sum() / max(labels.shape[0], 1), grad
    from ..kernels import early_exit as kernels

    z = exit_logits if exit_logits.stride(-1) == 1 else exit_logits.contiguous()
    depth, batch, cols = z.shape
    rows = torch.empty(batch, dtype=torch.float32, device=z.device)
    grad = torch.empty(depth, batch, cols, dtype=torch.float32, device=z.device)
    kernels.multi_exit_loss(z, labels, rows, grad, gamma, temperature)
    return rows.sum() / max(batch, 1), grad


@torch.library.custom_op("effbert::multi_exit_distillation_loss", mutates_args=())
def _loss_op(
    exit_logits: torch.Tensor, labels: torch.Tensor, gamma: float, temperature: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    # callable directly and run on real tensors under torch.compile: checked here, not only in the wrapper
    check_exit_logits(exit_logits, labels)
    if labels.dtype != torch.int64:
        raise TypeError(
            f"labels must be int64 class indices here (the wrapper converts), got "
            f"{str(labels.dtype).replace('torch.', '')}"
        )
    check_labels_in_range(labels, exit_logits.shape[-1])
    gamma, temperature = _check_loss_params(gamma, temperature)
    requested_backend(backend)
    return _loss_impl(exit_logits, labels, gamma, temperature, backend)


@_loss_op.register_fake
def _(exit_logits, labels, gamma, temperature, backend):
    dtype = torch.float64 if exit_logits.dtype == torch.float64 else torch.float32
    return exit_logits.new_empty((), dtype=dtype), exit_logits.new_empty(
        exit_logits.shape, dtype=dtype
    )


def _loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.batch = inputs[0].shape[1]
    ctx.dtype = inputs[0].dtype


def _loss_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    scale = grad_loss / max(ctx.batch, 1)
    return (grad * scale).to(ctx.dtype), None, None, None, None


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def check_exit_logits(exit_logits, labels):
    check_tensor(
        "exit_logits",
        exit_logits,
        ndim=3,
        dtypes=FLOAT_DTYPES + (torch.float64,),
        shape_hint="[L, B, C]",
    )
    depth, batch, cols = exit_logits.shape
    if depth < 1 or cols < 1:
        raise ValueError(
            f"exit_logits must have at least one exit and one class, got shape {tuple(exit_logits.shape)}"
        )
    check_tensor("labels", labels, ndim=1, shape_hint="[B]")
    if labels.shape[0] != batch:
        raise ValueError(
            f"labels must be [B] = [{batch}] (one per sample of exit_logits [L, B, C]), got "
            f"{list(labels.shape)}"
        )
    check_same_device(exit_logits=exit_logits, labels=labels)


def check_labels_in_range(labels, cols):
    """Integer class indices (TypeError otherwise) in ``[0, cols)`` (ValueError; checked for CPU tensors)."""
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(
            f"labels must hold integer class indices, got {str(labels.dtype).replace('torch.', '')}"
        )
    # A host-side range check needs the values: done for CPU tensors (free) and not while tracing.
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= cols:
            raise ValueError(
                f"labels must be class indices in [0, {cols}), got values in [{lo}, {hi}]"
            )


def _check_loss_params(gamma, temperature):
    for name, v in (("gamma", gamma), ("temperature", temperature)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(gamma), float(temperature)


def multi_exit_distillation_loss(
    exit_logits, labels, gamma=0.9, temperature=3.0, *, backend="auto"
):
    """RomeBERT's joint self-distillation loss over every exit (DESIGN.md, "Early exit"), differentiable.

    ``exit_logits [L, B, C]``: every exit's logits (``MultiExitEncoder.forward``); ``labels [B]``: class indices.
    The last exit is the detached teacher, trained by cross-entropy alone; exit i < L gets
    ``(1 - gamma) CE_i + gamma T^2 KL(softmax(z_L / T) || softmax(z_i / T))``, summed over exits. CE is a batch
    mean; KL is averaged over all ``B * C`` elements (``torch.nn.KLDivLoss()``'s default 'mean'), as RomeBERT's
    published ``KDLoss`` computes it (romebert/RomeBERT, ``transformers/new_modeling_highway_bert.py``), so its
    published gamma 0.9 and T 3 are the defaults. On CUDA a single Triton launch computes every term and the
    gradient (kept for backward).
    """
    check_exit_logits(exit_logits, labels)
    check_labels_in_range(labels, exit_logits.shape[-1])
    gamma, temperature = _check_loss_params(gamma, temperature)
    requested_backend(backend)
    labels = labels.long()
    if direct_call_ok(exit_logits):
        return _loss_impl(exit_logits, labels, float(gamma), float(temperature), backend)[0]
    return torch.ops.effbert.multi_exit_distillation_loss(
        exit_logits, labels, float(gamma), float(temperature), backend
    )[0]
