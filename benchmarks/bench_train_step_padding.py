"""pytest-benchmark cases for what padding costs a training step (the same cases as `effbert bench --op
train_step_padding`): padded against unpadded at half padding, and one text per row against packed rows on real
sentence lengths.

    pytest benchmarks/bench_train_step_padding.py --benchmark-json=out.json
"""

import pytest
import torch

from effbert.bench import train_step_padding

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [c for c in train_step_padding.cases(DEVICE, quick=True) if not c.skip_reasons]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.shape}-{c.provider}")
def test_train_step_padding(benchmark, case):
    inputs = case.make_inputs()
    loss = case.fn(*inputs)
    assert torch.isfinite(loss) and float(loss) > 0  # a real masked-LM loss, not a skipped step
    if DEVICE.type == "cuda":
        benchmark(lambda: (case.fn(*inputs), torch.cuda.synchronize()))
    else:
        benchmark(case.fn, *inputs)
