"""Benchmark cases of token-level early exit: ``token_exit_decision`` on packed tokens against plain
PyTorch on the padded batch (entropy, ``max_pool1d``, compare), what a user writes without effbert;
and the model-level rows of ``token_exit_inference`` (SENTEE / TOKEE at BERT-base sizes, see
``effbert.bench.token_exit_inference``).

Floor: the op must read each token's logits once, its ``active`` flag (1 byte) and exit layer (4), the offsets
(4 per sequence and one), and write the new flag (1), exit layer (4) and ``u`` (4). No FLOP count matters (a few
per logit): each case reports GB/s against the measured copy bandwidth. The PyTorch baseline reads and computes the
padded batch (its ``work_bytes``); the floor stays the op's.
"""

import torch
import torch.nn.functional as F

import effbert
from effbert.ops import token_exit as ops
from effbert.reference import token_exit as reference

from . import token_exit_inference
from .case import Case, provider_reasons

THRESHOLD, WINDOW, LAYER = 0.3, 3, 2


def _inputs(device, batch, seq, cols, dtype):
    """Sequences of seq/2..seq tokens; each token sure (u near 0) or unsure (u near 1), so that float32 and float64
    agree on every decision at threshold 0.3. The padded copies are the baseline's inputs (effbert's ignore them)."""
    gen = torch.Generator().manual_seed(batch * 131 + seq * 7 + cols)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    total = int(lengths.sum())
    x = torch.randn(total, cols, generator=gen) * 0.5
    sure = torch.rand(total, generator=gen) < 0.85
    x[sure, 0] += 12.0
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    active = torch.rand(total, generator=gen) < 0.9
    exit_layer = torch.where(active, 0, 1).to(torch.int32)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    index = torch.nonzero(mask.flatten()).flatten()
    padded = torch.zeros(batch * seq, cols)
    padded[index] = x
    active_pad = torch.zeros(batch * seq, dtype=torch.bool)
    active_pad[index] = active
    layer_pad = torch.zeros(batch * seq, dtype=torch.int32)
    layer_pad[index] = exit_layer
    keep_pad = torch.zeros(batch, seq, dtype=torch.bool)
    keep_pad[:, 0] = True
    keep_pad[torch.arange(batch), lengths - 1] = True
    to = dict(device=device)
    return (
        x.to(dtype).to(**to),
        cu.to(**to),
        int(lengths.max()),
        active.to(**to),
        exit_layer.to(**to),
        padded.view(batch, seq, cols).to(dtype).to(**to),
        mask.to(**to),
        active_pad.view(batch, seq).to(**to),
        layer_pad.view(batch, seq).to(**to),
        keep_pad.to(**to),
        index.to(**to),
    )


def plain_torch(
    x, cu, max_seqlen, active, exit_layer, padded, mask, active_pad, layer_pad, keep_pad, index
):
    """Without effbert, on the padded batch: normalised entropy, window max over real non-[CLS]/[SEP] tokens with
    max_pool1d, compare; the new flags of the real tokens returned packed, like the op's."""
    logp = torch.log_softmax(padded.float(), dim=-1)
    u = -(logp.exp() * logp).sum(-1) / torch.log(torch.tensor(float(padded.shape[-1])))
    value = torch.where(mask & ~keep_pad, u, float("-inf"))
    u_win = F.max_pool1d(value[:, None], WINDOW, stride=1, padding=WINDOW // 2)[:, 0]
    exits = active_pad & mask & ~keep_pad & (u_win < THRESHOLD)
    new_layer = torch.where(exits, LAYER, layer_pad)  # noqa: F841  (the op's output too)
    return (active_pad & ~exits).flatten()[index].double()


def _run(backend):
    def fn(x, cu, max_seqlen, active, exit_layer, *_):
        out, _, _ = effbert.token_exit_decision(
            x,
            active,
            exit_layer,
            cu_seqlens=cu,
            max_seqlen=max_seqlen,
            threshold=THRESHOLD,
            window=WINDOW,
            layer=LAYER,
            backend=backend,
        )
        return out.double()

    return fn


def _reference(x, cu, max_seqlen, active, exit_layer, *_):
    out, _, _ = reference.token_exit_decision(
        x.double().cpu(),
        cu.cpu(),
        active.cpu(),
        exit_layer.cpu(),
        threshold=THRESHOLD,
        window=WINDOW,
        layer=LAYER,
    )
    return out.double()


def cases(device, quick):
    if device.type == "cuda":
        shapes = (
            [(32, 128, 9), (256, 128, 9), (256, 512, 50)]
            if not quick
            else [(32, 128, 9), (256, 128, 9)]
        )
        dtypes = [torch.bfloat16, torch.float32] if not quick else [torch.bfloat16]
    else:
        shapes = [(32, 128, 9), (256, 128, 9)] if not quick else [(8, 64, 9)]
        dtypes = [torch.float32]
    providers = {
        "effbert-triton": _run("triton"),
        "effbert-cuda": _run("cuda"),
        "effbert-cpu": _run("cpu"),
        "eager-reference": _run("eager"),
        "torch": plain_torch,
    }
    out = []
    for batch, seq, cols in shapes:
        for dtype in dtypes:

            def make_inputs(batch=batch, seq=seq, cols=cols, dtype=dtype):
                return _inputs(device, batch, seq, cols, dtype)

            probe = make_inputs()
            total = probe[0].shape[0]
            nbytes = (
                total * cols * dtype.itemsize
                + total * (1 + 4)
                + 4 * (batch + 1)
                + total * (1 + 4 + 4)
            )
            padded_bytes = batch * seq * (cols * dtype.itemsize + 1 + 1 + 1 + 4 + 4 + 4) + total * 8
            for name, fn in providers.items():
                reasons = []
                if name.startswith("effbert-"):
                    backend = name.split("-", 1)[1]
                    reasons = provider_reasons(
                        lambda b=backend: ops.token_exit_backend(probe[0][:1], WINDOW, b)
                    )
                out.append(
                    Case(
                        op="token_exit_decision",
                        shape=f"B={batch},N<={seq},T={total},C={cols},window={WINDOW}",
                        params={"B": batch, "Nmax": seq, "T": total, "C": cols, "window": WINDOW},
                        dtype=str(dtype).replace("torch.", ""),
                        mode="forward",
                        provider=name,
                        fn=fn,
                        make_inputs=make_inputs,
                        reference=_reference,
                        bytes=nbytes,
                        flops=0,
                        rtol=0.0,
                        skip_reasons=reasons,
                        baseline="torch",
                        tokens=total,
                        work_bytes=padded_bytes if name == "torch" else None,
                    )
                )
    # the model-level rows: SENTEE / TOKEE against full depth and the published loop
    return out + token_exit_inference.cases(device, quick)
