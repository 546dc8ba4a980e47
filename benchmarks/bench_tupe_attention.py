"""pytest-benchmark cases for TUPE attention (the same cases as `effbert bench`, small on the CPU).

    pytest benchmarks/ --benchmark-json=out.json
"""

import pytest
import torch

from effbert.bench import tupe_attention
from effbert.bench.case import check_output

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [c for c in tupe_attention.cases(DEVICE, quick=True) if not c.skip_reasons]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.shape}-{c.mode}-{c.provider}")
def test_tupe_attention(benchmark, case):
    inputs = case.make_inputs()
    if case.check:  # the check `effbert bench` runs before timing
        _, problem = check_output(case, inputs)
        assert problem is None, problem
    if DEVICE.type == "cuda":
        benchmark(lambda: (case.fn(*inputs), torch.cuda.synchronize()))
    else:
        benchmark(case.fn, *inputs)
