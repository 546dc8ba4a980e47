"""pytest-benchmark cases for what padding costs a training step (the same cases as `effbert bench --op
train_step_padding`): padded against unpadded at half padding, and one text per row against packed rows on real
sentence lengths.

    pytest benchmarks/bench_train_step_padding.py --benchmark-json=out.json
"""

import pytest

from effbert.bench import train_step_padding
from effbert.bench.case import case_id, quick_cases, run_benchmark


@pytest.mark.parametrize("case", quick_cases(train_step_padding), ids=case_id)
def test_train_step_padding(benchmark, case):
    run_benchmark(benchmark, case)
