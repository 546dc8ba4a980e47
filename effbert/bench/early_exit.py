"""Benchmark cases of the early-exit family: ``exit_entropy``, the fused exit decision, batched early-exit inference.

Floors. exit_entropy: the op reads each logit once and writes 4 bytes per row; no FLOP count matters (a few per
element), so each case reports GB/s against the measured copy bandwidth. exit_decision: it must read each active
row's logits and batch id, read and write the patience state where there is one, write the exiting rows' logits and
layer and the continuing rows' two int32 ids, and the count. Early-exit inference: the FLOPs of the layers each
sample actually runs (sum over samples of exit layer x one layer's FLOPs; the off-ramps' are left out), with the
weights of the layers reached read once.
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
                out.append(
                    Case(
                        op="exit_entropy",
                        params={"B": rows, "C": cols},
                        dtype=str(dtype).replace("torch.", ""),
                        mode="forward",
                        provider=name,
                        fn=fn,
                        make_inputs=make_inputs,
                        reference=lambda x: reference.exit_entropy(x.double()),
                        bytes=nbytes,
                        flops=0,
                        rtol=1e-4,
                        skip_reasons=reasons,
                        baseline="torch",
                    )
                )
    return out


# ---- the fused exit decision ----


def decision_cases(device, quick):
    if device.type == "cuda":
        shapes = [(64, 2), (4096, 3), (65536, 3)] if not quick else [(64, 2), (4096, 3)]
        dtypes = [torch.bfloat16, torch.float32] if not quick else [torch.bfloat16]
    else:
        shapes = [(64, 2), (4096, 3)] if not quick else [(64, 2)]
        dtypes = [torch.float32]
    out = []
    for rows, cols in shapes:
        for dtype in dtypes:
            # entropy at layer 3: about half the rows exit. patience at layer 1: every row's state is rewritten and
            # nobody can exit yet; both are fixed points, so every repeat does the same work.
            for criterion, kw, layer in (
                ("entropy", dict(threshold=0.3), 3),
                ("patience", dict(patience=2), 1),
            ):
                out += _decision_cases_for(device, rows, cols, dtype, criterion, kw, layer)
    return out


def _decision_inputs(device, rows, cols, dtype, criterion, kw):
    """Active rows = the whole batch; about half the rows confident (they exit under entropy) and, under patience,
    about half with a prediction on record."""
    gen = torch.Generator().manual_seed(rows * 31 + cols)
    x = torch.randn(rows, cols, generator=gen)
    sure = torch.rand(rows, generator=gen) < 0.5
    x[sure, 0] += 20.0
    x = x.to(dtype).to(device)
    i32 = dict(dtype=torch.int32, device=device)
    ids = torch.arange(rows, **i32)
    prev = torch.where(sure, 0.0, float("nan")).to(device)
    counter = sure.to(torch.int32).to(device)
    bufs = (
        torch.full((rows, cols), float("nan"), dtype=dtype, device=device),
        torch.zeros(rows, **i32),
        torch.zeros(rows, **i32),
        torch.zeros(rows, **i32),
        torch.zeros(1, **i32),
    )
    return (x, ids, prev, counter) + bufs


def _decision_bytes(rows, cols, dtype, criterion, exiting):
    e = dtype.itemsize
    nbytes = rows * (cols * e + 4) + 4  # logits, ids, count
    if criterion == "patience":
        nbytes += rows * 16  # prev and counter, read and written
    return nbytes + exiting * (cols * e + 4) + (rows - exiting) * 8


def _decision_cases_for(device, rows, cols, dtype, criterion, kw, layer):
    def make_inputs():
        return _decision_inputs(device, rows, cols, dtype, criterion, kw)

    def run(backend):
        def fn(x, ids, prev, counter, out_logits, out_layer, next_rows, next_local, count):
            ops.exit_decision(
                x,
                ids,
                prev,
                counter,
                out_logits,
                out_layer,
                next_rows,
                next_local,
                count,
                layer=layer,
                criterion=criterion,
                backend=backend,
                **kw,
            )
            return count

        return fn

    def reference_count(x, ids, prev, counter, *_):
        exits, _, _ = reference.exit_decision(
            x.double().cpu(),
            layer,
            criterion,
            prev=prev.double().cpu(),
            counter=counter.long().cpu(),
            **kw,
        )
        return torch.tensor([float((~exits).sum())], dtype=torch.float64)

    probe = make_inputs()
    exiting = rows - int(reference_count(*probe)[0])
    nbytes = _decision_bytes(rows, cols, dtype, criterion, exiting)

    def plain_torch(x, ids, prev, counter, out_logits, out_layer, next_rows, next_local, count):
        """What a user writes without effbert: criterion, masks, nonzero (a host sync), scatters."""
        if criterion == "entropy":
            logp = torch.log_softmax(x.float(), dim=-1)
            exits = -(logp.exp() * logp).sum(-1) < kw["threshold"]
        else:
            pred = x.float().argmax(-1).float()
            same = (pred == prev[ids.long()]) & (layer > 1)
            cnt = torch.where(same, counter[ids.long()] + 1, 0)
            counter[ids.long()] = cnt.to(counter.dtype)
            prev[ids.long()] = pred
            exits = cnt >= kw["patience"]
        gone = ids.long()[exits]
        out_logits[gone] = x[exits]
        out_layer[gone] = layer
        keep = torch.nonzero(~exits).flatten()
        count.fill_(keep.numel())
        return count

    providers = {
        "effbert-cuda": run("cuda"),
        "effbert-triton": run("triton"),
        "effbert-cpu": run("cpu"),
        "eager-reference": run("eager"),
        "torch": plain_torch,
    }
    out = []
    for name, fn in providers.items():
        reasons = []
        if name.startswith("effbert-"):
            backend = name.split("-", 1)[1]
            reasons = provider_reasons(lambda b=backend: ops.decision_backend(probe[0][:1], b))
        out.append(
            Case(
                op="exit_decision",
                shape=f"R={rows},C={cols},{criterion},layer={layer}",
                params={"R": rows, "C": cols, "criterion": criterion, "layer": layer},
                dtype=str(dtype).replace("torch.", ""),
                mode="forward",
                provider=name,
                fn=fn,
                make_inputs=make_inputs,
                reference=reference_count,
                bytes=nbytes,
                flops=0,
                rtol=0.0,
                skip_reasons=reasons,
                baseline="torch",
            )
        )
    return out


# ---- end-to-end batched early-exit inference of a 12-layer BERT-base-sized encoder ----


class _PlanKeepingLayer(torch.nn.Module):
    """A torch.nn.TransformerEncoderLayer that carries one element (token 0, last channel) through unchanged: the
    synthetic off-ramps read each sample's planned exit layer from it, so the exit pattern is exact whatever the
    batch composition and precision."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, attention_mask=None):
        out = self.layer(
            hidden, src_key_padding_mask=None if attention_mask is None else ~attention_mask
        )
        out[:, 0, -1] = hidden[:, 0, -1]
        return out


class _SyntheticOffRamp(torch.nn.Module):
    """A real off-ramp's work (pooler and classifier) whose confidence comes from the plan: logits (10, 0) from the
    planned layer on (max probability 0.99995), (0, 0) before (0.5); the real logits enter scaled by 1e-3."""

    def __init__(self, hidden_size, index):
        super().__init__()
        self.pooler = torch.nn.Linear(hidden_size, hidden_size)
        self.classifier = torch.nn.Linear(hidden_size, 2)
        self.layer_number = index + 1

    def forward(self, hidden):
        real = self.classifier(torch.tanh(self.pooler(hidden[:, 0]))).float()
        sure = (hidden[:, 0, -1].float() <= self.layer_number).float()
        synthetic = torch.stack([10.0 * sure, torch.zeros_like(sure)], dim=-1)
        return synthetic + 1e-3 * real.clamp(-1, 1)


def _layer_flops(seq, dm, dff):
    return 2 * seq * 4 * dm * dm + 2 * 2 * seq * seq * dm + 2 * 2 * seq * dm * dff


def _exit_plan(batch, avg, depth):
    """Planned exit layers with mean exactly ``avg``: a spread of +-3 layers around it, balanced."""
    pattern = [0, 1, -1, 2, -2, 3, -3]
    plan = [min(depth, max(1, avg + pattern[b % len(pattern)])) for b in range(batch)]
    plan[-1] += avg * batch - sum(plan)
    if not 1 <= plan[-1] <= depth:
        raise ValueError(f"cannot plan an average exit layer of {avg} over {batch} samples")
    return torch.tensor(plan, dtype=torch.float32)


_ENCODERS = {}


def _encoder(device, dtype, dm, heads, dff, depth):
    key = (str(device), dtype, dm, heads, dff, depth)
    if key not in _ENCODERS:
        from ..nn import MultiExitEncoder

        torch.manual_seed(0)
        layers = [
            _PlanKeepingLayer(
                torch.nn.TransformerEncoderLayer(
                    dm, heads, dff, dropout=0.0, activation="gelu", batch_first=True
                )
            )
            for _ in range(depth)
        ]
        _ENCODERS[key] = (
            MultiExitEncoder(layers, [_SyntheticOffRamp(dm, i) for i in range(depth)])
            .to(device=device, dtype=dtype)
            .eval()
        )
    return _ENCODERS[key]


def e2e_cases(device, quick):
    depth = 12
    if device.type == "cuda":
        dm, heads, dff, seq, dtype = 768, 12, 3072, 128, torch.bfloat16
        batches = [1, 16, 64, 256] if not quick else [1, 64]
        avgs = [4, 6, 8, 9] if not quick else [6]
    else:  # the same structure, small enough for a CPU
        dm, heads, dff, seq, dtype = 64, 2, 128, 16, torch.float32
        batches = [1, 16] if not quick else [8]
        avgs = [6] if quick else [4, 6]
    threshold = 0.9
    out = []
    for batch in batches:
        for avg in avgs:
            plan = _exit_plan(batch, avg, depth)

            def make_inputs(batch=batch, plan=plan):
                gen = torch.Generator().manual_seed(batch)
                hidden = torch.randn(batch, seq, dm, generator=gen)
                hidden[:, 0, -1] = plan
                return (hidden.to(dtype).to(device),)

            def batched(hidden, backend="auto"):
                enc = _encoder(device, dtype, dm, heads, dff, depth)
                return enc.early_exit(
                    hidden, criterion="max_prob", threshold=threshold, backend=backend
                )[0]

            def batched_triton(hidden):
                return batched(hidden, "triton")

            def full_depth(hidden):
                enc = _encoder(device, dtype, dm, heads, dff, depth)
                with torch.no_grad():
                    for layer in enc.layers:
                        hidden = layer(hidden, None)
                    return enc.heads[-1](hidden)

            def loop(hidden):
                enc = _encoder(device, dtype, dm, heads, dff, depth)
                with torch.no_grad():
                    return reference.early_exit_loop(
                        enc.layers, enc.heads, hidden, criterion="max_prob", threshold=threshold
                    )[0]

            flops = float(plan.sum()) * _layer_flops(seq, dm, dff)
            weights = 4 * dm * dm + 2 * dm * dff
            nbytes = int(plan.max()) * weights * dtype.itemsize + batch * seq * dm * dtype.itemsize
            params = {"B": batch, "N": seq, "L": depth, "avg_exit": avg}
            for name, fn, check in (
                ("effbert-batched", batched, True),
                ("effbert-batched-triton", batched_triton, True),
                ("full-depth", full_depth, False),
                ("batch-1-loop", loop, False),
            ):
                reasons = []
                if (
                    name == "effbert-batched-triton"
                ):  # the decision on Triton instead of the auto pick (CUDA C++)
                    probe = torch.empty(1, 2, device=device, dtype=torch.float32)
                    reasons = provider_reasons(lambda p=probe: ops.decision_backend(p, "triton"))
                if name == "batch-1-loop" and device.type == "cuda" and batch == 256 and avg != 6:
                    reasons = [
                        "the batch-1 loop at B=256 runs at avg_exit=6 only (it takes seconds per call)"
                    ]
                out.append(
                    Case(
                        op="early_exit_inference",
                        params=params,
                        dtype=str(dtype).replace("torch.", ""),
                        mode="forward",
                        provider=name,
                        fn=fn,
                        make_inputs=make_inputs,
                        reference=loop,
                        bytes=nbytes,
                        flops=flops,
                        rtol=1e-2,
                        skip_reasons=reasons,
                        baseline="full-depth",
                        check=check,
                    )
                )
    return out


_entropy_cases = cases


def cases(device, quick):  # noqa: F811  (the family's entry point: every op of the family)
    return _entropy_cases(device, quick) + decision_cases(device, quick) + e2e_cases(device, quick)
