"""Benchmark cases of the early-exit family: ``exit_entropy``.

Floor: the op reads each logit once and writes 4 bytes per row; no FLOP count matters (a few per element), so
each case reports GB/s against the measured copy bandwidth.
"""

import torch

import effbert
from effbert import reference
from effbert.ops import early_exit as ops

from .case import Case, provider_reasons


def plain_torch_entropy(logits):
    """What a user writes without effbert: softmax, then -sum p log p, in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


_compiled = {}


def compiled_torch_entropy(logits):
    fn = _compiled.get("fn")
    if fn is None:
        fn = _compiled["fn"] = torch.compile(plain_torch_entropy, dynamic=False)
    return fn(logits)


def cases(device, quick):
    if device.type == "cuda":
        shapes = [(64, 2), (4096, 3), (4096, 30522)] if not quick else [(64, 2), (512, 30522)]
        dtypes = [torch.bfloat16, torch.float32] if not quick else [torch.bfloat16]
    else:
        shapes = [(64, 2), (256, 30522)] if not quick else [(64, 2), (16, 30522)]
        dtypes = [torch.float32]
    providers = {
        "effbert-cuda": lambda x: effbert.exit_entropy(x, backend="cuda"),
        "effbert-triton": lambda x: effbert.exit_entropy(x, backend="triton"),
        "effbert-cpu": lambda x: effbert.exit_entropy(x, backend="cpu"),
        "eager-reference": lambda x: effbert.exit_entropy(x, backend="eager"),
        "torch": plain_torch_entropy,
        "torch.compile": compiled_torch_entropy,
    }
    out = []
    for rows, cols in shapes:
        for dtype in dtypes:
            nbytes = rows * cols * dtype.itemsize + rows * 4

            def make_inputs(rows=rows, cols=cols, dtype=dtype):
                return (torch.randn(rows, cols, device=device, dtype=dtype) * 3,)

            for name, fn in providers.items():
                reasons = []
                if name.startswith("effbert-"):
                    backend = name.split("-", 1)[1]
                    probe = torch.empty(1, 1, device=device, dtype=dtype)
                    reasons = provider_reasons(lambda b=backend, p=probe: ops.entropy_backend(p, b))
                if name == "torch.compile" and device.type == "cpu" and quick:
                    reasons = ["skipped in --quick on the CPU (compile time dominates)"]
                out.append(Case(
                    op="exit_entropy", shape=f"B={rows},C={cols}", dtype=str(dtype).replace("torch.", ""),
                    mode="forward", provider=name, fn=fn, make_inputs=make_inputs,
                    reference=lambda x: reference.exit_entropy(x.double()), bytes=nbytes, flops=0,
                    rtol=1e-4, skip_reasons=reasons, baseline="torch",
                ))
    return out
