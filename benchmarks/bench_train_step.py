"""pytest-benchmark cases for the end-to-end BERT masked-LM training step (the same cases as `effbert bench`, a
tiny model on the CPU): effbert with TUPE-R and TNF on the fused backends, with plain positions, on the eager
backend, and transformers' BertForMaskedLM with SDPA.

    pytest benchmarks/ --benchmark-json=out.json
"""

import pytest

from effbert.bench import train_step
from effbert.bench.case import case_id, quick_cases, run_benchmark


@pytest.mark.parametrize("case", quick_cases(train_step), ids=case_id)
def test_bert_mlm_train_step(benchmark, case):
    run_benchmark(benchmark, case)
