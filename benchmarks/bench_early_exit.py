"""pytest-benchmark cases for the early-exit family (the same cases as `effbert bench`, small on the CPU):
exit_entropy, the fused exit decision, and batched early-exit inference against full depth and the batch-1 loop.

    pytest benchmarks/ --benchmark-json=out.json
"""

import pytest
import torch

from effbert.bench import early_exit
from effbert.bench.case import check_output

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [c for c in early_exit.cases(DEVICE, quick=True) if not c.skip_reasons]


def _run(benchmark, case):
    inputs = case.make_inputs()
    if case.check:  # the check `effbert bench` runs before timing
        _, problem = check_output(case, inputs)
        assert problem is None, problem
    if DEVICE.type == "cuda":
        benchmark(lambda: (case.fn(*inputs), torch.cuda.synchronize()))
    else:
        benchmark(case.fn, *inputs)


@pytest.mark.parametrize("case", [c for c in CASES if c.op == "exit_entropy"],
                         ids=lambda c: f"{c.shape}-{c.dtype}-{c.provider}")
def test_exit_entropy(benchmark, case):
    _run(benchmark, case)


@pytest.mark.parametrize("case", [c for c in CASES if c.op == "exit_decision"],
                         ids=lambda c: f"{c.shape}-{c.dtype}-{c.provider}")
def test_exit_decision(benchmark, case):
    _run(benchmark, case)


@pytest.mark.parametrize("case", [c for c in CASES if c.op == "early_exit_inference"],
                         ids=lambda c: f"{c.shape}-{c.dtype}-{c.provider}")
def test_early_exit_inference(benchmark, case):
    _run(benchmark, case)
