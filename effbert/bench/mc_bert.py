"""Benchmark cases of the MC-BERT family: the multi-choice candidate loss and the controller's sampler.

* ``mc_candidate_loss`` (forward + backward, the training path): effbert's fused kernel against the eager gather +
  bmm + cross-entropy a user writes (``torch``: indexing, ``bmm``, ``cross_entropy``) and against the
  full-vocabulary masked-LM head at the same rows (``mlm-head``: ``linear`` to V logits + cross-entropy: what
  the candidate head replaces; a different loss, so it is timed, not checked). K = 10 candidates per row.
  Floor: read the hidden rows and each distinct candidate row once, write the hidden gradient and each touched
  embedding-gradient row once, read the ids (``8 * M * K`` bytes); FLOPs ``6 * M * K * D`` (scores, d hidden,
  d embedding).
* ``mc_sample_fused``: the controller's draws from its features and output matrix, the fused kernel (the ``[M, V]``
  logits never in memory) against the linear layer followed by either sampler. Floor: read the features, the
  matrix and the bias, write the ids; FLOPs ``2 * M * V * D``.
* ``mc_sample``: effbert's Gumbel-max sampler against ``torch.multinomial`` on the materialised softmax (the
  published code's way). Floor: read the ``[M, V]`` logits once, write the ``[M, K]`` int64 ids. The draws are
  random, so the rows are timed, not checked (tests/test_mc_bert.py checks them bit for bit and in distribution).

BERT-base sizes on a GPU (M = 32 x 512 positions, D = 768, V = 30522, bf16); small fp32 sizes on the CPU.
"""

import torch
import torch.nn.functional as F

import effbert
from effbert import reference
from effbert.ops import mc_bert as ops

from .case import Case, provider_reasons

K = 10


def plain_torch_loss(hidden, embedding, bias, candidates, labels):
    """What a user writes: gather the K rows, a batched product, cross-entropy over K."""
    w = embedding[candidates]  # [M, K, D]
    scores = torch.bmm(w, hidden.unsqueeze(-1)).squeeze(-1) + bias[candidates]
    return F.cross_entropy(scores.float(), labels)


def mlm_head_loss(hidden, embedding, bias, candidates, labels):
    """The full-vocabulary head at the same rows: V logits a row (labels are the first candidate's token)."""
    logits = F.linear(hidden, embedding, bias.to(hidden.dtype))
    return F.cross_entropy(logits.float(), candidates[:, 0])


def _train(fn):
    def run(hidden, embedding, bias, candidates, labels):
        leaves = [t.detach().requires_grad_() for t in (hidden, embedding, bias)]
        loss = fn(*leaves, candidates, labels)
        loss.backward()
        return loss.detach()

    return run


def _loss_cases(device, shapes, dtypes):
    providers = {
        "effbert-triton": _train(
            lambda h, e, b, c, y: effbert.mc_candidate_loss(h, e, b, c, y, backend="triton")
        ),
        "eager-reference": _train(
            lambda h, e, b, c, y: effbert.mc_candidate_loss(h, e, b, c, y, backend="eager")
        ),
        "torch": _train(plain_torch_loss),
        "mlm-head": _train(mlm_head_loss),
    }
    out = []
    for m, d, v in shapes:
        g = torch.Generator().manual_seed(m + d)
        cand_cpu = torch.randint(0, v, (m, K), generator=g)
        cand_cpu[:, 0] = 4  # the reject option: one row every position names
        labels_cpu = torch.randint(0, 2, (m,), generator=g)
        distinct = int(torch.unique(cand_cpu).numel())
        for dtype in dtypes:
            size = dtype.itemsize
            nbytes = 2 * m * d * size + 2 * distinct * d * size + 8 * m * K + 8 * m

            def make_inputs(m=m, d=d, v=v, dtype=dtype, cand_cpu=cand_cpu, labels_cpu=labels_cpu):
                return (
                    torch.randn(m, d, device=device, dtype=dtype),
                    (torch.randn(v, d, device=device) * 0.05).to(dtype),
                    torch.randn(v, device=device),
                    cand_cpu.to(device),
                    labels_cpu.to(device),
                )

            for name, fn in providers.items():
                reasons = []
                if name.startswith("effbert-"):
                    probe = torch.empty(1, 1, device=device, dtype=dtype)
                    reasons = provider_reasons(
                        lambda: ops.loss_backend(
                            probe, probe, torch.empty(1, device=device), "triton"
                        )
                    )
                flops = 6.0 * m * K * d if name != "mlm-head" else 6.0 * m * v * d
                out.append(
                    Case(
                        op="mc_candidate_loss",
                        params={"M": m, "K": K, "D": d, "V": v},
                        dtype=str(dtype).replace("torch.", ""),
                        mode="forward+backward",
                        provider=name,
                        fn=fn,
                        make_inputs=make_inputs,
                        reference=lambda h, e, b, c, y: reference.mc_candidate_loss(
                            h.double(), e.double(), b.double(), c, y
                        ),
                        bytes=nbytes,
                        flops=flops,
                        rtol=1e-2 if dtype != torch.float32 else 1e-4,
                        skip_reasons=reasons,
                        baseline="torch",
                        check=name != "mlm-head",
                    )
                )
    return out


def _sample_cases(device, shapes, dtypes):
    providers = {
        "effbert-triton": lambda x: effbert.mc_sample(x, K, backend="triton"),
        "torch": lambda x: torch.multinomial(torch.softmax(x.float(), -1), K, replacement=True),
    }
    out = []
    for m, v in shapes:
        for dtype in dtypes:
            nbytes = m * v * dtype.itemsize + m * K * 8

            def make_inputs(m=m, v=v, dtype=dtype):
                return (torch.randn(m, v, device=device, dtype=dtype) * 3,)

            for name, fn in providers.items():
                reasons = []
                if name.startswith("effbert-"):
                    probe = torch.empty(1, 1, device=device, dtype=dtype)
                    reasons = provider_reasons(lambda: ops.sample_backend(probe, "triton"))
                out.append(
                    Case(
                        op="mc_sample",
                        params={"M": m, "V": v, "K": K},
                        dtype=str(dtype).replace("torch.", ""),
                        mode="forward",
                        provider=name,
                        fn=fn,
                        make_inputs=make_inputs,
                        reference=lambda x: None,
                        bytes=nbytes,
                        flops=0,
                        skip_reasons=reasons,
                        baseline="torch",
                        check=False,
                    )
                )
    return out


def _fused_sample_cases(device, shapes, dtypes):
    """The controller's draws from its features ``[M, Dc]`` and output matrix ``[V, Dc]``: the fused kernel (no
    logits in memory) against the linear layer then either sampler."""
    providers = {
        "effbert-triton-fused": lambda h, w, b: effbert.mc_sample_fused(
            h, w, b, K, backend="triton"
        ),
        "effbert-triton": lambda h, w, b: effbert.mc_sample(
            F.linear(h, w, b.to(h.dtype)), K, backend="triton"
        ),
        "torch": lambda h, w, b: torch.multinomial(
            torch.softmax(F.linear(h, w, b.to(h.dtype)).float(), -1), K, replacement=True
        ),
    }
    out = []
    for m, v, d in shapes:
        for dtype in dtypes:
            nbytes = (m + v) * d * dtype.itemsize + 4 * v + m * K * 8

            def make_inputs(m=m, v=v, d=d, dtype=dtype):
                return (
                    torch.randn(m, d, device=device, dtype=dtype),
                    (torch.randn(v, d, device=device) * 0.1).to(dtype),
                    torch.randn(v, device=device),
                )

            for name, fn in providers.items():
                reasons = []
                if name.startswith("effbert-"):
                    probe = torch.empty(1, 1, device=device, dtype=dtype)
                    reasons = provider_reasons(lambda: ops.sample_backend(probe, "triton"))
                out.append(
                    Case(
                        op="mc_sample_fused",
                        params={"M": m, "V": v, "D": d, "K": K},
                        dtype=str(dtype).replace("torch.", ""),
                        mode="forward",
                        provider=name,
                        fn=fn,
                        make_inputs=make_inputs,
                        reference=lambda *x: None,
                        bytes=nbytes,
                        flops=2.0 * m * v * d,
                        skip_reasons=reasons,
                        baseline="torch",
                        check=False,
                    )
                )
    return out


def cases(device, quick):
    if device.type == "cuda":
        loss_shapes = [(32 * 512, 768, 30522)]
        sample_shapes = [(32 * 512, 30522)] if not quick else [(8 * 512, 30522)]
        dtypes = [torch.bfloat16, torch.float32] if not quick else [torch.bfloat16]
    else:
        loss_shapes = [(2048, 256, 8000)] if not quick else [(256, 64, 1000)]
        sample_shapes = [(512, 8000)] if not quick else [(64, 1000)]
        dtypes = [torch.float32]
    fused_shapes = [(m, v, 256) for m, v in sample_shapes]  # BERT-base's controller: hidden 768 / 3
    return (
        _loss_cases(device, loss_shapes, dtypes)
        + _sample_cases(device, sample_shapes, dtypes)
        + _fused_sample_cases(
            device, fused_shapes, [d for d in dtypes if d != torch.float32] or dtypes
        )
    )
