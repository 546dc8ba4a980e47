"""Backend selection shared by every op (DESIGN.md, "Backends and dispatch").

An op asks `select_backend` which backend serves a call. General reasons (a backend that is not installed or has no
device) come from here; op-specific reasons (a dtype or size a kernel does not handle) come from the op. ``auto``
takes the first backend in the op's preference order with no reason against it; an explicit request (argument or
``EFFBERT_BACKEND``) that cannot serve raises `BackendNotSupportedError` listing the reasons, never a silent fallback.

Dispatch is traced by ``torch.compile`` (``fullgraph=True`` included) on every backend: the installed-or-not facts
(importing triton, loading the extensions) are looked up outside the traced region, by ``_general_reasons_of``,
which dynamo runs eagerly while tracing and keeps as a constant (``torch.compiler.assume_constant_result``); they
live in a plain dict, not a ``functools.lru_cache``, whose wrapper dynamo would trace through (importing inside a
graph, and warning that the cache may be silently ignored). Everything else dispatch reads (the device, dtype and
shapes, ``EFFBERT_BACKEND``) is plain Python that dynamo traces and guards on.
"""

import os
from dataclasses import dataclass, field

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
        return f"{self.name}: " + ("available" if self.available else "unavailable (" + "; ".join(self.reasons) + ")")


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


_SELECTION_CACHES = []  # per-op caches of `select_backend` results (see `cached_selection`)


def refresh():
    """Forget cached backend availability (after building an extension in a running process, or in tests)."""
    _GENERAL_REASONS.clear()
    for cache in _SELECTION_CACHES:
        cache.clear()


def cached_selection(op, backend, device, dtype, op_reasons, preference, cache):
    """`select_backend` for an op whose own reasons depend on the device and dtype only, remembered in ``cache``
    (a dict the op owns) per (backend, device, dtype, EFFBERT_BACKEND, interpreter): a small call (an exit decision
    on a CPU) should not spend more on choosing its backend than on running it. Failures are not cached. While
    torch.compile traces, the choice is made afresh (it costs nothing at run time there, and a traced write to
    ``cache`` would only make dynamo guard on the dict's contents and recompile)."""
    if torch.compiler.is_compiling():
        return select_backend(op, backend, device, op_reasons, preference)
    if not any(c is cache for c in _SELECTION_CACHES):
        _SELECTION_CACHES.append(cache)
    key = (backend, device, dtype, os.environ.get(ENV_VAR), triton_interpreting())
    chosen = cache.get(key)
    if chosen is None:
        chosen = cache[key] = select_backend(op, backend, device, op_reasons, preference)
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


def _device_reasons(name, device):
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        return [f"inputs are on {device.type}; Triton kernels run on CUDA tensors (CPU tensors only under "
                "TRITON_INTERPRET=1)"]
    if name == "cuda" and device.type != "cuda":
        return [f"inputs are on {device.type}; the CUDA extension takes CUDA tensors"]
    if name == "cpu" and device.type != "cpu":
        return [f"inputs are on {device.type}; the C++ CPU extension takes CPU tensors"]
    return []


def not_supported_reasons(name, device, op_reasons=()):
    """Why backend ``name`` cannot serve inputs on ``device`` (empty when it can)."""
    return _general_reasons(name) + _device_reasons(name, device) + list(op_reasons)


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


def select_backend(op, backend, device, op_reasons, preference):
    """Pick the backend for one call of ``op``.

    ``op_reasons(name)`` returns the op's own reasons against backend ``name``; ``preference(device)`` lists the
    backends ``auto`` tries, fastest first.
    """
    wanted = requested_backend(backend)
    if wanted != "auto":
        reasons = not_supported_reasons(wanted, device, op_reasons(wanted))
        if reasons:
            raise BackendNotSupportedError(f"{op}: backend {wanted!r} cannot serve these inputs: " + "; ".join(reasons))
        return wanted
    tried = []
    for name in preference(device):
        reasons = not_supported_reasons(name, device, op_reasons(name))
        if not reasons:
            return name
        tried.append(f"{name}: " + "; ".join(reasons))
    raise BackendNotSupportedError(f"{op}: no backend can serve these inputs ({' | '.join(tried)})")


def default_preference(device):
    """Fastest first: fused kernels on the device the tensors live on, then the eager reference."""
    if device.type == "cuda":
        return ("cuda", "triton", "eager")
    if device.type == "cpu":
        return ("cpu", "eager")
    return ("eager",)
