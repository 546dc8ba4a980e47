"""One benchmark case and the helpers the op modules share."""

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from effbert.ops import BackendNotSupportedError
from effbert.reference.compare import compare


def format_params(params):
    """``{"B": 32, "N": 512}`` -> ``"B=32,N=512"``: a case's shape label, in the order of
    ``params``."""
    return ",".join(f"{name}={value}" for name, value in params.items())


@dataclass(kw_only=True)
class Case:
    """One provider of one op at one size, dtype and mode: what the runner times and checks.

    ``params``: the case's parameters as data (``{"B": 32, "N": 512, "H": 12, "D": 64}``), which
    plots and the headline selection read; ``shape``: its label in tables and keys,
    ``format_params(params)`` unless given (a label with words, such as "real lengths", is given).
    Raises ``ValueError`` when both are empty and ``TypeError`` for params that are not a dict with
    str keys."""

    op: str
    shape: str = ""
    params: dict = field(default_factory=dict)
    dtype: str
    mode: str  # forward / backward / forward+backward
    provider: str
    fn: Callable  # fn(*inputs) -> output (forward) or runs the whole mode
    make_inputs: Callable  # () -> tuple of inputs; called once per rotated input set
    reference: Callable  # reference(*inputs) -> float64 output to check fn against
    bytes: int  # the fewest bytes the op must move (its floor)
    flops: float  # the fewest floating-point operations the op needs (0 when memory-bound by construction)
    rtol: float = 1e-4
    skip_reasons: List[str] = field(default_factory=list)
    baseline: str = (
        ""  # the provider speed-ups are quoted against within this (op, shape, dtype, mode)
    )
    check: bool = True  # compare against the reference before timing
    tokens: int = 0  # tokens one call processes: end-to-end cases also report tokens/s
    note: str = ""  # what the row measured beyond its shape (an early-exit threshold and the layers it saved)
    # what this provider actually computes and moves, when it differs from the op's fewest (a padded batch computes
    # its padded positions): the TFLOP/s and GB/s columns are rates of this work, "% of floor" stays the op's
    work_flops: Optional[float] = None
    work_bytes: Optional[int] = None
    ratio_target: float = (
        0.0  # when set, the note gives this row's time over its baseline's against this target
    )
    # when set, the check is the largest absolute difference from ``reference`` (a peer runtime against transformers'
    # eager output, in the same precision), given in the row's note; the row fails above it
    atol: Optional[float] = None
    # a lower-precision provider (int8, bf16) against the fp32 output: the smallest cosine similarity of an output
    # row (a token's hidden state) with the reference's, given in the note beside the max abs difference (which
    # ``atol`` then bounds loosely); the row fails below it
    min_cosine: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.params, dict) or not all(isinstance(k, str) for k in self.params):
            raise TypeError(f"params must be a dict with str keys, got {self.params!r:.80}")
        if not self.shape:
            if not self.params:
                raise ValueError(
                    f"a Case needs params or a shape label, got neither for op {self.op!r}"
                )
            self.shape = format_params(self.params)

    def matches(self, wanted):
        """Whether ``params`` holds every ``name: value`` of ``wanted`` (a value of None: the name
        is absent)."""
        return all(self.params.get(name) == value for name, value in wanted.items())

    @property
    def key(self):
        return f"{self.op}|{self.shape}|{self.dtype}|{self.mode}|{self.provider}"


def provider_reasons(probe):
    """Reasons a backend cannot serve, from a dispatch probe that raises BackendNotSupportedError."""
    try:
        probe()
    except BackendNotSupportedError as exc:
        return [str(exc).split("cannot serve these inputs: ", 1)[-1]]
    return []


def _min_cosine(out, ref):
    """The smallest cosine similarity between matching rows (last dim) of ``out`` and ``ref``, in
    float64."""
    a, b = (t.detach().double().cpu().reshape(-1, t.shape[-1]) for t in (out, ref))
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()) if a.numel() else 1.0


def check_output(case, inputs):
    """``case.fn(*inputs)`` against ``case.reference(*inputs)``, the check the bench runs before
    timing a case (``effbert bench`` and the ``benchmarks/`` wrappers alike): ``(fields, problem)``,
    the row fields it measured (``rel_error``; or ``max_abs_diff`` and ``min_cosine`` for a peer
    runtime's case with ``atol``) and None, or the reason the output is wrong. The relative error
    follows ``effbert.reference.compare`` (float64 reference, its message names the worst entry).
    Raises ``TypeError`` for a ``case`` that is not a `Case`."""
    if not isinstance(case, Case):
        raise TypeError(f"case must be a Case, got {type(case).__name__}")
    out, ref = case.fn(*inputs), case.reference(*inputs)
    if case.atol is not None:
        diff = float((out.detach().double().cpu() - ref.detach().double().cpu()).abs().max())
        fields = {"max_abs_diff": diff}
        if not diff <= case.atol:
            return fields, f"max abs diff {diff:.2e} > {case.atol:.0e}"
        if case.min_cosine is not None:
            cos = fields["min_cosine"] = _min_cosine(out, ref)
            if not cos >= case.min_cosine:
                return fields, f"cosine {cos:.4f} < {case.min_cosine:g}"
        return fields, None
    result = compare(out, ref, rtol=case.rtol, what=case.key)
    fields = {"rel_error": result.error}
    if not result.ok:
        where = ""
        if result.index:
            where = f"; worst at {list(result.index)}: {result.got!r} vs {result.want!r}"
        return fields, f"relative error {result.error:.2e} > {case.rtol:.0e}{where}"
    return fields, None


# ------------------------------------------------------------ the pytest-benchmark files in benchmarks/


def quick_cases(family, device=None, op=None):
    """The quick cases of a bench ``family`` module (``effbert.bench.notes``, ...) that can run on
    ``device`` (default: CUDA when available, else the CPU), those of ``op`` only when given: what
    ``benchmarks/bench_<family>.py`` parametrizes over."""
    import torch

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [
        c
        for c in family.cases(device, quick=True)
        if not c.skip_reasons and (op is None or c.op == op)
    ]


def case_id(case):
    """A pytest id for ``case``: op, shape, dtype, mode and provider."""
    return "-".join(
        str(v) for v in (case.op, case.shape, case.dtype, case.mode, case.provider) if v
    )


def run_benchmark(benchmark, case):
    """Check ``case`` against its reference (as ``effbert bench`` does before timing), then time it
    with pytest-benchmark's ``benchmark`` fixture (synchronising CUDA after each call)."""
    import torch

    inputs = case.make_inputs()
    if case.check:
        _, problem = check_output(case, inputs)
        assert problem is None, problem
    if torch.cuda.is_available() and any(getattr(t, "is_cuda", False) for t in inputs):
        benchmark(lambda: (case.fn(*inputs), torch.cuda.synchronize()))
    else:
        benchmark(case.fn, *inputs)
