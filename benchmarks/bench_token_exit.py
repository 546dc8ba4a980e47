"""pytest-benchmark cases for token-level early exit (the same cases as `effbert bench`, small on the CPU):
token_exit_decision on packed tokens against plain PyTorch on the padded batch.

    pytest benchmarks/bench_token_exit.py --benchmark-json=out.json
"""

import pytest
import torch

from effbert.bench import token_exit
from effbert.bench.case import check_output

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [c for c in token_exit.cases(DEVICE, quick=True) if not c.skip_reasons]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.shape}-{c.dtype}-{c.provider}")
def test_token_exit_decision(benchmark, case):
    inputs = case.make_inputs()
    if case.check:  # the check `effbert bench` runs before timing
        _, problem = check_output(case, inputs)
        assert problem is None, problem
    if DEVICE.type == "cuda":
        benchmark(lambda: (case.fn(*inputs), torch.cuda.synchronize()))
    else:
        benchmark(case.fn, *inputs)
