"""pytest-benchmark cases for the TNF family (the same cases as `effbert bench`, small on the CPU).

    pytest benchmarks/bench_notes.py --benchmark-json=out.json
"""

import pytest
import torch

from effbert.bench import notes
from effbert.bench.case import check_output

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [c for c in notes.cases(DEVICE, quick=True) if not c.skip_reasons]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.shape}-{c.dtype}-{c.provider}")
def test_notes(benchmark, case):
    inputs = case.make_inputs()
    if case.check:  # the check `effbert bench` runs before timing
        _, problem = check_output(case, inputs)
        assert problem is None, problem
    if DEVICE.type == "cuda":
        benchmark(lambda: (case.fn(*inputs), torch.cuda.synchronize()))
    else:
        benchmark(case.fn, *inputs)
