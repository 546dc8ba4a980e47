"""pytest-benchmark cases for TUPE attention (the same cases as `effbert bench`, small on the CPU).

pytest benchmarks/ --benchmark-json=out.json
"""

import pytest

from effbert.bench import tupe_attention
from effbert.bench.case import case_id, quick_cases, run_benchmark


@pytest.mark.parametrize("case", quick_cases(tupe_attention), ids=case_id)
def test_tupe_attention(benchmark, case):
    run_benchmark(benchmark, case)
