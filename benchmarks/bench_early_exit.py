"""pytest-benchmark cases for the early-exit family (the same cases as `effbert bench`, small on the CPU).

    pytest benchmarks/ --benchmark-json=out.json
"""

import pytest
import torch

from effbert.bench import early_exit

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [c for c in early_exit.cases(DEVICE, quick=True) if not c.skip_reasons]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.shape}-{c.dtype}-{c.provider}")
def test_exit_entropy(benchmark, case):
    inputs = case.make_inputs()
    out = case.fn(*inputs)
    ref = case.reference(*inputs)
    assert torch.allclose(out.double().cpu(), ref.cpu(), rtol=1e-4, atol=1e-4, equal_nan=True)
    if DEVICE.type == "cuda":
        benchmark(lambda: (case.fn(*inputs), torch.cuda.synchronize()))
    else:
        benchmark(case.fn, *inputs)
