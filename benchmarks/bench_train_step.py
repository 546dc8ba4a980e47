"""pytest-benchmark cases for the end-to-end BERT masked-LM training step (the same cases as `effbert bench`, a
tiny model on the CPU): effbert with TUPE-R and TNF on the fused backends, with plain positions, on the eager
backend, and transformers' BertForMaskedLM with SDPA.

    pytest benchmarks/ --benchmark-json=out.json
"""

import pytest
import torch

from effbert.bench import train_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [c for c in train_step.cases(DEVICE, quick=True) if not c.skip_reasons]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.shape}-{c.dtype}-{c.provider}")
def test_bert_mlm_train_step(benchmark, case):
    inputs = case.make_inputs()
    loss = case.fn(*inputs)
    assert torch.isfinite(loss) and float(loss) > 0  # a real masked-LM loss, not a skipped step
    if DEVICE.type == "cuda":
        benchmark(lambda: (case.fn(*inputs), torch.cuda.synchronize()))
    else:
        benchmark(case.fn, *inputs)
