"""pytest-benchmark cases for the TNF family (the same cases as `effbert bench`, small on the CPU).

pytest benchmarks/bench_notes.py --benchmark-json=out.json
"""

import pytest

from effbert.bench import notes
from effbert.bench.case import case_id, quick_cases, run_benchmark


@pytest.mark.parametrize("case", quick_cases(notes), ids=case_id)
def test_notes(benchmark, case):
    run_benchmark(benchmark, case)
