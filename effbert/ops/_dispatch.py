"""Backend selection shared by every op (DESIGN.md, "Backends and dispatch").

Each op declares what its backends take as data (`declare`, a `Support` per backend: dtypes, head
dims, size limits, gradients; and its preference order per device type), as xformers'
``SUPPORTED_*`` attributes do, and asks `select_backend` which backend serves a call. One
`not_supported_reasons` reads those declarations beside the machine facts (a backend that is not
installed or has no device), and tests derive their matrices from the same `OPS`. ``auto`` takes the
first backend in the op's preference order with no reason against it; an explicit request (argument
or ``EFFBERT_BACKEND``) that cannot serve raises `BackendNotSupportedError` listing the reasons,
never a silent fallback.

Dispatch is traced by ``torch.compile`` (``fullgraph=True`` included) on every backend: the installed-or-not facts
(importing triton, loading the extensions) are looked up outside the traced region, by ``_general_reasons_of``,
which dynamo runs eagerly while tracing and keeps as a constant (``torch.compiler.assume_constant_result``); they
live in a plain dict, not a ``functools.lru_cache``, whose wrapper dynamo would trace through (importing inside a
graph, and warning that the cache may be silently ignored). Everything else dispatch reads (the device, dtype and
shapes, ``EFFBERT_BACKEND``) is plain Python that dynamo traces and guards on.
"""

import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .. import _ext

BACKENDS = ("triton", "cuda", "cpu", "eager")
ENV_VAR = "EFFBERT_BACKEND"


class BackendNotSupportedError(RuntimeError):
    """An explicitly requested backend cannot serve the given inputs."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reasons: tuple = field(default_factory=tuple)

    def __str__(self):
        return f"{self.name}: " + (
            "available" if self.available else "unavailable (" + "; ".join(self.reasons) + ")"
        )


def triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_GENERAL_REASONS = {}  # (name, interpreting) -> tuple of reasons: what `_general_reasons_of` has found out


def _general_reasons(name):
    return list(_general_reasons_of(name, triton_interpreting()))


@torch.compiler.assume_constant_result
def _general_reasons_of(name, interpreting):
    """Why backend ``name`` cannot run on this machine at all (a tuple of strings; empty when it can).

    Installed-or-not facts do not change within a process, so they are found out once and kept in
    ``_GENERAL_REASONS``; `refresh()` forgets them (tests that patch them). Under torch.compile this runs eagerly
    at trace time and its result is a constant of the graph (a compiled graph keeps the backend it was traced
    with: call ``torch._dynamo.reset()`` after `refresh()` for a compiled function to see a change)."""
    key = (name, interpreting)
    reasons = _GENERAL_REASONS.get(key)
    if reasons is None:
        reasons = _GENERAL_REASONS[key] = _find_general_reasons(name, interpreting)
    return reasons


def _find_general_reasons(name, interpreting):
    reasons = []
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            reasons.append(f"triton is not installed ({exc})")
        if not torch.cuda.is_available() and not interpreting:
            reasons.append("no CUDA device and TRITON_INTERPRET is not 1")
    elif name == "cuda":
        module, why = _ext.load("_cuda")
        if module is None:
            reasons.append(why)
        if not torch.cuda.is_available():
            reasons.append("torch sees no CUDA device")
    elif name == "cpu":
        module, why = _ext.load("_C")
        if module is None:
            reasons.append(why)
    return tuple(reasons)


# (op, backend, key, EFFBERT_BACKEND, interpreter) -> backend: see `cached_selection`
_SELECTED = {}


def refresh():
    """Forget cached backend availability (after building an extension in a running process, or in tests)."""
    _GENERAL_REASONS.clear()
    _SELECTED.clear()


def cached_selection(op, backend, key, inputs):
    """`select_backend` for an op whose reasons depend on ``key`` only (the device and dtype, and
    which side of each size limit the inputs are on); ``inputs``: a callable that builds the
    `Inputs`, called on a miss only. Remembered per (op, backend, key, EFFBERT_BACKEND,
    interpreter): a small call (an exit decision on a CPU) should not spend more on choosing its
    backend than on running it. Failures are not cached. While torch.compile traces, the choice is
    made afresh (it costs nothing at run time there, and a traced write to the cache would only
    make dynamo guard on the dict's contents and recompile)."""
    if torch.compiler.is_compiling():
        return select_backend(op, backend, inputs())
    full = (op, backend, key, os.environ.get(ENV_VAR), triton_interpreting())
    chosen = _SELECTED.get(full)
    if chosen is None:
        chosen = _SELECTED[full] = select_backend(op, backend, inputs())
    return chosen


def direct_call_ok(*tensors):
    """True when an op may call its implementation directly instead of through the torch.library dispatcher.

    The dispatcher costs tens of microseconds a call, as much as a small exit decision on the GPU. It is needed
    only for autograd, torch.compile, tensor subclasses (fake tensors) and dispatch modes; with none of those the
    direct call computes the same thing.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) is torch.Tensor and not (grad and t.requires_grad) for t in tensors)


def backends():
    """Every backend with whether it can run on this machine and, if not, why."""
    out = {}
    for name in BACKENDS:
        reasons = tuple(_general_reasons(name))
        out[name] = BackendStatus(name, not reasons, reasons)
    return out


def device_reasons(name, device):
    if (
        name == "triton"
        and device.type != "cuda"
        and not (device.type == "cpu" and triton_interpreting())
    ):
        return [
            f"inputs are on {device.type}; Triton kernels run on CUDA tensors (CPU tensors only under "
            "TRITON_INTERPRET=1)"
        ]
    if name == "cuda" and device.type != "cuda":
        return [f"inputs are on {device.type}; the CUDA extension takes CUDA tensors"]
    if name == "cpu" and device.type != "cpu":
        return [f"inputs are on {device.type}; the C++ CPU extension takes CPU tensors"]
    return []


# ---- what each op's backends take, declared as data (xformers' SUPPORTED_DTYPES, ...) ----

_SHORT_DTYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}


def dtype_name(dtype):
    """``torch.float32`` -> ``"float32"`` (as error messages spell a dtype they got)."""
    return str(dtype).replace("torch.", "")


def _dtype_list(dtypes):
    """``(float32, float16, bfloat16)`` -> ``"fp32/fp16/bf16"``; one dtype in full
    (``"float32"``)."""
    if len(dtypes) == 1:
        return dtype_name(dtypes[0])
    return "/".join(_SHORT_DTYPE.get(d, dtype_name(d)) for d in dtypes)


@dataclass(frozen=True)
class Support:
    """What one backend of one op takes: the facts `not_supported_reasons` checks, one record per
    (op, backend).

    dtypes: the dtypes of the op's floating inputs (None: any that the op's own argument checks
        let through).
    grad_dtypes: the dtypes when the call builds a graph (None: as ``dtypes``).
    interpreter_dtypes: the dtypes under the Triton interpreter, on CPU tensors (None: as
        ``dtypes``); a dtype in ``dtypes`` but not here is one the interpreter computes wrongly.
    tensor_dtypes: exceptions for named inputs, e.g. ``{"notes": (torch.float32,)}``.
    head_dims: the head dims (``q.shape[-1]``) the kernels are built for (None: any).
    limits: ``{size: (largest, why)}`` for the sizes an op reports (``heads``, ``window``, ...);
        ``why`` is the reason, with ``{limit}`` and ``{value}`` filled in.
    supports_backward: whether the backend computes gradients (a call that wants them is refused
        otherwise).
    takes: how a reason names the backend, before the dtypes ("{backend} kernels take").
    why: why the dtypes are what they are, given in the dtype reason ("" for none).
    """

    dtypes: tuple = None
    grad_dtypes: tuple = None
    interpreter_dtypes: tuple = None
    tensor_dtypes: dict = field(default_factory=dict)
    head_dims: tuple = None
    limits: dict = field(default_factory=dict)
    supports_backward: bool = True
    takes: str = "{backend} kernels take"
    why: str = ""


@dataclass(frozen=True)
class OpSupport:
    """One op's dispatch as data: its backends (``{name: Support}``; a backend absent there has no
    kernel for the op, and ``absent`` says so), and the order ``auto`` tries them in per device
    type, fastest first."""

    op: str
    backends: dict
    preference: dict
    absent: str = "no {backend} kernel for {op}"

    def preferred(self, device):
        return self.preference.get(device.type, ("eager",))


class Inputs(NamedTuple):
    """What dispatch needs to know of one call: the device, ``tensors`` as ``((label, dtype), ...)``
    (the op's floating inputs), ``sizes`` as ``{name: value}`` (those that some backend limits) and
    whether the call builds a graph."""

    device: torch.device
    tensors: tuple
    sizes: dict = {}
    wants_grad: bool = False


# Fastest first: fused kernels on the device the tensors live on, then the eager reference.
DEFAULT_PREFERENCE = {"cuda": ("cuda", "triton", "eager"), "cpu": ("cpu", "eager")}

OPS = {}  # op name -> OpSupport: every op's declaration (`declare`)


def declare(ops, backends, preference=DEFAULT_PREFERENCE, absent="no {backend} kernel for {op}"):
    """Declare what the backends of ``ops`` (an op name, or several sharing one declaration) take.
    Raises
    ``ValueError`` for a backend name outside BACKENDS or an op declared twice."""
    names = (ops,) if isinstance(ops, str) else tuple(ops)
    unknown = [b for b in backends if b not in BACKENDS] + [
        b for order in preference.values() for b in order if b not in backends
    ]
    if unknown:
        raise ValueError(f"declare: backends must be declared ones of {BACKENDS}, got {unknown}")
    for op in names:
        if op in OPS:
            raise ValueError(f"declare: {op} is declared already")
        OPS[op] = OpSupport(op, dict(backends), dict(preference), absent)
    return OPS[names[0]]


def _op_reasons(spec, name, inputs):
    support = spec.backends.get(name)
    if support is None:
        return [spec.absent.format(backend=name, op=spec.op)]
    out = []
    if support.dtypes is not None or support.tensor_dtypes or support.grad_dtypes is not None:
        interpreted = name == "triton" and inputs.device.type == "cpu"
        for label, dtype in inputs.tensors:
            with_grad = False
            if label in support.tensor_dtypes:
                allowed = support.tensor_dtypes[label]
            elif inputs.wants_grad and support.grad_dtypes is not None:
                allowed, with_grad = support.grad_dtypes, True
            elif interpreted and support.interpreter_dtypes is not None:
                allowed = support.interpreter_dtypes
            else:
                allowed = support.dtypes
            if allowed is None or dtype in allowed:
                continue
            if interpreted and support.dtypes is not None and dtype in support.dtypes:
                short = _SHORT_DTYPE.get(dtype, dtype_name(dtype))
                out.append(f"the Triton interpreter computes {short} dot products wrongly")
            else:
                listed = support.dtypes if allowed is support.interpreter_dtypes else allowed
                out.append(
                    f"{support.takes.format(backend=name)} {_dtype_list(listed)} {label}"
                    f"{' with a gradient wanted' if with_grad else ''}"
                    f"{f' ({support.why})' if support.why else ''}, got {dtype_name(dtype)}"
                )
    sizes = inputs.sizes
    if support.head_dims is not None and sizes.get("head_dim") not in support.head_dims:
        out.append(
            f"{support.takes.format(backend=name)} head dims {support.head_dims}, got "
            f"{sizes.get('head_dim')}"
        )
    if support.limits:
        for size, (largest, why) in support.limits.items():
            value = sizes.get(size, 0)
            if value > largest:
                out.append(why.format(limit=largest, value=value))
    if inputs.wants_grad and not support.supports_backward:
        out.append(f"{name} computes no gradients for {spec.op}")
    return out


def not_supported_reasons(op, backend, inputs):
    """Why ``backend`` cannot serve a call of ``op`` on ``inputs`` (an `Inputs`): a list of strings,
    empty when it can. Machine facts first (installed, a device), then the op's declaration in
    `OPS`. Raises ``KeyError`` for an op never declared."""
    return (
        _general_reasons(backend)
        + device_reasons(backend, inputs.device)
        + _op_reasons(OPS[op], backend, inputs)
    )


def requested_backend(backend):
    """The backend a call asks for: the argument, or EFFBERT_BACKEND when the argument is "auto"."""
    if not isinstance(backend, str) or backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced and forced != "auto":
            if forced not in BACKENDS:
                raise ValueError(f"{ENV_VAR} must be one of {('auto',) + BACKENDS}, got {forced!r}")
            return forced
    return backend


def select_backend(op, backend, inputs, called=None):
    """Pick the backend for one call of ``op`` (declared in `OPS`) on ``inputs`` (an `Inputs`).

    ``backend``: "auto" (EFFBERT_BACKEND, or the first backend of the op's preference for the device
    with no reason against it) or one of BACKENDS, which must then serve. ``called`` names the op in
    errors (a registered op sharing ``op``'s declaration). Raises `BackendNotSupportedError` listing
    the reasons, ``ValueError`` for a backend name outside BACKENDS."""
    called = called or op
    spec = OPS[op]
    wanted = requested_backend(backend)
    if wanted != "auto":
        reasons = (
            _general_reasons(wanted)
            + device_reasons(wanted, inputs.device)
            + _op_reasons(spec, wanted, inputs)
        )
        if reasons:
            raise BackendNotSupportedError(
                f"{called}: backend {wanted!r} cannot serve these inputs: " + "; ".join(reasons)
            )
        return wanted
    tried = []
    for name in spec.preferred(inputs.device):
        reasons = (
            _general_reasons(name)
            + device_reasons(name, inputs.device)
            + _op_reasons(spec, name, inputs)
        )
        if not reasons:
            return name
        tried.append(f"{name}: " + "; ".join(reasons))
    raise BackendNotSupportedError(
        f"{called}: no backend can serve these inputs ({' | '.join(tried)})"
    )


def supported_backends(op, inputs):
    """The backends that can serve ``op`` on ``inputs`` on this machine, in BACKENDS order (tests
    derive their
    matrices from this)."""
    return [name for name in BACKENDS if not not_supported_reasons(op, name, inputs)]
