"""One benchmark case and the helpers the op modules share."""

from dataclasses import dataclass, field
from typing import Callable, List, Optional

from effbert.ops import BackendNotSupportedError


@dataclass
class Case:
    op: str
    shape: str
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
    baseline: str = ""  # the provider speed-ups are quoted against within this (op, shape, dtype, mode)
    check: bool = True  # compare against the reference before timing
    tokens: int = 0  # tokens one call processes: end-to-end cases also report tokens/s
    note: str = ""  # what the row measured beyond its shape (an early-exit threshold and the layers it saved)
    # what this provider actually computes and moves, when it differs from the op's fewest (a padded batch computes
    # its padded positions): the TFLOP/s and GB/s columns are rates of this work, "% of floor" stays the op's
    work_flops: Optional[float] = None
    work_bytes: Optional[int] = None
    ratio_target: float = 0.0  # when set, the note gives this row's time over its baseline's against this target
    # when set, the check is the largest absolute difference from ``reference`` (a peer runtime against transformers'
    # eager output, in the same precision), given in the row's note; the row fails above it
    atol: Optional[float] = None
    # a lower-precision provider (int8, bf16) against the fp32 output: the smallest cosine similarity of an output
    # row (a token's hidden state) with the reference's, given in the note beside the max abs difference (which
    # ``atol`` then bounds loosely); the row fails below it
    min_cosine: Optional[float] = None

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
