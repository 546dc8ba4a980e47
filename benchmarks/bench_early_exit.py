"""pytest-benchmark cases for the early-exit family (the same cases as `effbert bench`, small on the CPU):
exit_entropy, the fused exit decision, and batched early-exit inference against full depth and the batch-1 loop.

    pytest benchmarks/ --benchmark-json=out.json
"""

import pytest

from effbert.bench import early_exit
from effbert.bench.case import case_id, quick_cases, run_benchmark


@pytest.mark.parametrize("case", quick_cases(early_exit, op="exit_entropy"), ids=case_id)
def test_exit_entropy(benchmark, case):
    run_benchmark(benchmark, case)


@pytest.mark.parametrize("case", quick_cases(early_exit, op="exit_decision"), ids=case_id)
def test_exit_decision(benchmark, case):
    run_benchmark(benchmark, case)


@pytest.mark.parametrize("case", quick_cases(early_exit, op="early_exit_inference"), ids=case_id)
def test_early_exit_inference(benchmark, case):
    run_benchmark(benchmark, case)
