"""pytest-benchmark cases for the MC-BERT family (the same cases as `effbert bench`, small on the CPU).

    pytest benchmarks/bench_mc_bert.py --benchmark-json=out.json
"""

import pytest
import torch

from effbert.bench import mc_bert
from effbert.bench.case import check_output

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [c for c in mc_bert.cases(DEVICE, quick=True) if not c.skip_reasons]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.shape}-{c.dtype}-{c.provider}")
def test_mc_bert(benchmark, case):
    inputs = case.make_inputs()
    if case.check:  # the check `effbert bench` runs before timing
        _, problem = check_output(case, inputs)
        assert problem is None, problem
    if DEVICE.type == "cuda":
        benchmark(lambda: (case.fn(*inputs), torch.cuda.synchronize()))
    else:
        benchmark(case.fn, *inputs)
