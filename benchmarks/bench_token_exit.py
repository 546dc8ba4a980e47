"""pytest-benchmark cases for token-level early exit (the same cases as `effbert bench`, small on the CPU):
token_exit_decision on packed tokens against plain PyTorch on the padded batch, and the model-level
token_exit_inference rows (full depth, SENTEE, TOKEE and the published per-sentence loop; quick
sizes).

    pytest benchmarks/bench_token_exit.py --benchmark-json=out.json
"""

import pytest

from effbert.bench import token_exit
from effbert.bench.case import case_id, quick_cases, run_benchmark


@pytest.mark.parametrize("case", quick_cases(token_exit, op="token_exit_decision"), ids=case_id)
def test_token_exit_decision(benchmark, case):
    run_benchmark(benchmark, case)


@pytest.mark.parametrize("case", quick_cases(token_exit, op="token_exit_inference"), ids=case_id)
def test_token_exit_inference(benchmark, case):
    run_benchmark(benchmark, case)
