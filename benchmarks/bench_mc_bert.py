"""pytest-benchmark cases for the MC-BERT family (the same cases as `effbert bench`, small on the CPU).

pytest benchmarks/bench_mc_bert.py --benchmark-json=out.json
"""

import pytest

from effbert.bench import mc_bert
from effbert.bench.case import case_id, quick_cases, run_benchmark


@pytest.mark.parametrize("case", quick_cases(mc_bert), ids=case_id)
def test_mc_bert(benchmark, case):
    run_benchmark(benchmark, case)
