"""Benchmark cases of TUPE attention: forward, backward and forward+backward with the positional term's gradient.

Anchors: eager TUPE (the reference), SDPA's memory-efficient backend with a bias that requires grad, SDPA's flash
backend with no bias at all (the ceiling: the positional term should be nearly free), FlexAttention (compiled)
with the bias captured in its score_mod, and when installed, flash-attn (no bias: it takes none with a gradient) and
xformers (a bias expanded to the full [B, H, N, N], the only form it returns a gradient for). Plus packed sequences (varlen) at 50% padding against the padded batch, and on the CPU a padded batch in
inference, where effbert's CPU path skips the padding that plain PyTorch computes, and the same in forward+backward at
50% padding, padded and packed.

Floor: FLOPs. The forward does two B*H*N*N*D products (4*B*H*N^2*D FLOPs), the backward five (2.5x the forward,
the usual count for flash-style kernels); the matrix rate measured at the start of the run turns them into time.
"""

import importlib.util

import torch

import effbert
from effbert import reference
from effbert.ops import attention as attention_ops

from .case import Case, provider_reasons

MODES = ("forward", "backward", "forward+backward")


def _flops(lengths, heads, d, mode):
    fwd = sum(4 * heads * n * n * d for n in lengths)
    return {"forward": fwd, "backward": 2.5 * fwd, "forward+backward": 3.5 * fwd}[mode]


def _bytes(b, n, heads, d, itemsize, mode):
    """q, k, v, out (and dout, dq, dk, dv in the backward) once each, plus the [H, N, N] bias (and its grad)."""
    act = b * n * heads * d * itemsize
    bias = heads * n * n * itemsize
    return {
        "forward": 4 * act + bias,
        "backward": 8 * act + 2 * bias,
        "forward+backward": 12 * act + 3 * bias,
    }[mode]


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import contextlib

    backend = getattr(SDPBackend, backend_name) if backend_name else None  # None: SDPA's own choice

    def attend(q, k, v, bias):
        # SDPA takes [B, H, N, D]; the transposes are views of our [B, N, H, D] tensors
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=None if bias is None else bias.unsqueeze(0),
                scale=q.shape[-1] ** -0.5,
            )
        return out.transpose(1, 2)

    return attend


_flex = {}


def _flex_attention(q, k, v, bias):
    from torch.nn.attention.flex_attention import flex_attention

    fn = _flex.get("fn")
    if fn is None:
        fn = _flex["fn"] = torch.compile(flex_attention, dynamic=False)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    out = fn(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        score_mod=score_mod,
        scale=q.shape[-1] ** -0.5,
    )
    return out.transpose(1, 2)


def _flash_attn_nobias(q, k, v, bias):
    from flash_attn import flash_attn_func  # takes our [B, N, H, D] layout as it is

    return flash_attn_func(q, k, v, softmax_scale=q.shape[-1] ** -0.5)


def _xformers(q, k, v, bias):
    from xformers.ops import memory_efficient_attention

    # xformers returns a bias gradient only for a bias of the full [B, H, N, N] shape: an expanded view of ours
    full = bias.unsqueeze(0).expand(q.shape[0], *bias.shape)
    return memory_efficient_attention(q, k, v, attn_bias=full, scale=q.shape[-1] ** -0.5)


def _optional_reasons(name, device):
    """Why an optional anchor (flash-attn, xformers) cannot run here, or [] when it can."""
    if device.type != "cuda":
        return [f"{name} runs on CUDA devices only"]
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    return [] if found else [f"{name} is not installed"]


OPTIONAL = {
    "flash-attn-nobias": ("flash_attn", _flash_attn_nobias),
    "xformers": ("xformers", _xformers),
}


def _providers(device):
    out = {
        "effbert-triton": lambda q, k, v, bias: effbert.tupe_attention(
            q, k, v, bias, backend="triton"
        ),
        "eager-reference": lambda q, k, v, bias: reference.tupe_attention(q, k, v, bias),
    }
    if device.type == "cuda":
        out.update(
            {
                "sdpa-mem-efficient": _sdpa("EFFICIENT_ATTENTION"),
                "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
                "flexattention": _flex_attention,
                "sdpa-flash-nobias": lambda q, k, v, bias: _sdpa("FLASH_ATTENTION")(q, k, v, None),
            }
        )
    else:
        out["effbert-cpu"] = lambda q, k, v, bias: effbert.tupe_attention(
            q, k, v, bias, backend="cpu"
        )
        out["sdpa-math"] = _sdpa("MATH")
        out["sdpa"] = _sdpa(
            None
        )  # plain PyTorch: whichever CPU kernel SDPA picks, the bias as its attn_mask
    out.update(
        {name: fn for name, (_, fn) in OPTIONAL.items()}
    )  # listed everywhere; skipped with a reason
    return out


def _mode_fn(attend, mode, bias_grad):
    """fn(q, k, v, bias, dout): runs the mode and returns what the check compares (output, or d bias / d q)."""

    def forward(q, k, v, bias, dout):
        with torch.no_grad():
            return attend(q, k, v, bias)

    def both(q, k, v, bias, dout):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        b = bias.detach().requires_grad_() if bias_grad else bias
        out = attend(*leaves, b)
        out.backward(dout)
        return out

    if mode == "forward":
        return forward
    if mode == "forward+backward":
        return both
    graphs = {}

    def backward(q, k, v, bias, dout):
        # the forward graph is built once per input set, outside the timed region's repeated part
        key = id(q)
        if key not in graphs:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            b = bias.detach().requires_grad_() if bias_grad else bias
            graphs[key] = (attend(*leaves, b), leaves)
        out, leaves = graphs[key]
        return torch.autograd.grad(out, leaves, dout, retain_graph=True)[0]

    return backward


def _reference_fn(mode):
    def ref(q, k, v, bias, dout):
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        out = reference.tupe_attention(*leaves, None if bias is None else bias.float())
        if mode == "backward":
            return torch.autograd.grad(out, leaves, dout.float())[0]
        return out

    return ref


def cases(device, quick):
    if device.type == "cuda":
        shapes = [(32, 512, 12, 64), (128, 128, 12, 64)] if not quick else [(8, 512, 12, 64)]
        dtype = torch.bfloat16
    else:
        shapes = [(2, 64, 2, 16)] + (
            [(8, 128, 12, 64)] if not quick else []
        )  # the second: BERT-base inference
        dtype = torch.float32
    dname = str(dtype).replace("torch.", "")
    out = []
    probe = torch.empty(1, 1, 1, 64 if device.type == "cuda" else 16, device=device, dtype=dtype)
    triton_reasons = provider_reasons(lambda: attention_ops.attention_backend(probe, "triton"))
    for b, n, h, d in shapes:

        def make_inputs(b=b, n=n, h=h, d=d):
            q, k, v, dout = (torch.randn(b, n, h, d, device=device, dtype=dtype) for _ in range(4))
            bias = torch.randn(h, n, n, device=device, dtype=dtype)
            return q, k, v, bias, dout

        for mode in MODES if not quick or device.type == "cuda" else ("forward",):
            for name, attend in _providers(device).items():
                reasons = list(triton_reasons) if name == "effbert-triton" else []
                if name in OPTIONAL:
                    reasons += _optional_reasons(OPTIONAL[name][0], device)
                if name == "eager-reference" and n * n * b * h > (64 << 20) and mode != "forward":
                    reasons.append(
                        "the eager backward holds several [B, H, N, N] tensors; timed in forward only"
                    )
                has_bias = not name.endswith("-nobias")
                out.append(
                    Case(
                        op="tupe_attention",
                        params={"B": b, "N": n, "H": h, "D": d},
                        dtype=dname,
                        mode=mode,
                        provider=name,
                        fn=_mode_fn(attend, mode, has_bias),
                        make_inputs=make_inputs,
                        reference=_reference_fn(mode),
                        bytes=_bytes(b, n, h, d, dtype.itemsize, mode),
                        flops=_flops([n] * b, h, d, mode),
                        rtol=3e-2 if dtype != torch.float32 else 1e-4,
                        skip_reasons=reasons,
                        baseline="sdpa-flash-nobias"
                        if device.type == "cuda"
                        else "eager-reference",
                        # without the bias its output differs by construction; it is the no-bias ceiling
                        check=has_bias,
                    )
                )
    out += _varlen_cases(device, quick, dtype, triton_reasons)
    out += _seqlen_sweep(device, quick, dtype, triton_reasons)
    out += _padded_cpu_cases(device, quick)
    out += _padded_cpu_training_cases(device, quick)
    return out


def _padded_cpu_cases(device, quick):
    """CPU inference on a padded batch (lengths drawn from N/8..N, the first N): effbert's CPU path computes the
    real tokens only; plain PyTorch (SDPA with the bias and the key padding added into one ``[B, H, N, N]`` mask)
    and the eager reference compute the padded batch. Compared on the real tokens. The floor is the real tokens'
    FLOPs (and bytes: q, k, v, out of the real tokens, the bias once); each provider's own work gives its rates."""
    if device.type != "cpu":
        return []
    b, n, h, d = (2, 32, 2, 16) if quick else (8, 128, 12, 64)
    gen = torch.Generator().manual_seed(b)
    lengths = torch.randint(max(1, n // 8), n + 1, (b,), generator=gen)
    lengths[0] = n
    mask = torch.arange(n)[None, :] < lengths[:, None]
    real = int(lengths.sum())
    params = {"B": b, "N": n, "H": h, "D": d, "pad": f"{100 * (1 - real / (b * n)):.0f}%"}
    scale = (2 * d) ** -0.5  # TUPE's
    act, bias_bytes = h * d * 4, h * n * n * 4

    def make_inputs():
        q, k, v = (torch.randn(b, n, h, d) for _ in range(3))
        return q, k, v, torch.randn(h, n, n)

    def effbert_cpu(q, k, v, bias):
        return effbert.tupe_attention(
            q, k, v, bias, attention_mask=mask, scale=scale, backend="cpu"
        )[mask]

    def plain(q, k, v, bias):
        keys = torch.zeros(b, 1, 1, n).masked_fill(~mask[:, None, None, :], float("-inf"))
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=bias.unsqueeze(0) + keys,
            scale=scale,
        )
        return out.transpose(1, 2)[mask]

    def eager(q, k, v, bias):
        return reference.tupe_attention(q, k, v, bias, attention_mask=mask, scale=scale)[mask]

    def ref(q, k, v, bias):
        return eager(q.double(), k.double(), v.double(), bias.double())

    flops, padded_flops = (
        _flops(lengths.tolist(), h, d, "forward"),
        _flops([n] * b, h, d, "forward"),
    )
    common = dict(
        op="tupe_attention",
        params=params,
        dtype="float32",
        mode="forward",
        make_inputs=make_inputs,
        reference=ref,
        bytes=4 * real * act + bias_bytes,
        flops=flops,
        rtol=1e-4,
        baseline="eager-reference",
    )

    def run(fn):
        def timed(*inputs):
            with torch.no_grad():
                return fn(*inputs)

        return timed

    return [
        Case(provider="effbert-cpu", fn=run(effbert_cpu), **common),
        Case(
            provider="sdpa",
            fn=run(plain),
            work_flops=padded_flops,
            work_bytes=4 * b * n * act + bias_bytes,
            **common,
        ),
        Case(
            provider="eager-reference",
            fn=run(eager),
            work_flops=padded_flops,
            work_bytes=4 * b * n * act + bias_bytes,
            **common,
        ),
    ]


def _padded_cpu_training_cases(device, quick):
    """CPU forward+backward (gradients of q, k, v and the bias) at 50% padding (``half_padded_lengths``): effbert's
    CPU path on the padded batch and on the same tokens packed (varlen), against plain PyTorch (SDPA with the bias
    and the key padding added into one ``[B, H, N, N]`` mask) on the padded batch. Compared on the real tokens'
    output; the floor is the real tokens' FLOPs."""
    if device.type != "cpu":
        return []
    from .train_step_padding import half_padded_lengths

    b, n, h, d = (2, 32, 2, 16) if quick else (16, 128, 12, 64)
    lengths = half_padded_lengths(b, n)
    mask = torch.arange(n)[None, :] < lengths[:, None]
    cu = torch.zeros(b + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    real = int(lengths.sum())
    scale = (2 * d) ** -0.5
    act, bias_bytes = h * d * 4, h * n * n * 4
    keys = torch.zeros(b, 1, 1, n).masked_fill(~mask[:, None, None, :], float("-inf"))

    def make_padded():
        q, k, v, dout = (torch.randn(b, n, h, d) for _ in range(4))
        return q, k, v, torch.randn(h, n, n), dout

    def make_packed():
        q, k, v, dout = (torch.randn(real, h, d) for _ in range(4))
        return q, k, v, torch.randn(h, n, n), dout

    def train(attend, packed=False):
        def fn(q, k, v, bias, dout):
            leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
            out = attend(*leaves)
            out.backward(dout)
            return out.detach() if packed else out.detach()[mask]

        return fn

    def effbert_cpu(q, k, v, bias):
        return effbert.tupe_attention(
            q, k, v, bias, attention_mask=mask, scale=scale, backend="cpu"
        )

    def effbert_varlen(q, k, v, bias):
        return effbert.tupe_attention_varlen(q, k, v, cu, n, bias, scale=scale, backend="cpu")

    def plain(q, k, v, bias):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=bias.unsqueeze(0) + keys,
            scale=scale,
        )
        return out.transpose(1, 2)

    def ref_padded(q, k, v, bias, dout):
        return reference.tupe_attention(
            q.double(), k.double(), v.double(), bias.double(), attention_mask=mask, scale=scale
        )[mask]

    def ref_packed(q, k, v, bias, dout):
        return reference.tupe_attention_varlen(
            q.double(), k.double(), v.double(), cu, n, bias.double(), scale=scale
        )

    common = dict(
        op="tupe_attention",
        params={"B": b, "N": n, "H": h, "D": d, "pad": "50%"},
        dtype="float32",
        mode="forward+backward",
        bytes=12 * real * act + 3 * bias_bytes,
        flops=_flops(lengths.tolist(), h, d, "forward+backward"),
        rtol=1e-4,
        baseline="sdpa",
    )
    return [
        Case(
            provider="effbert-cpu",
            fn=train(effbert_cpu),
            make_inputs=make_padded,
            reference=ref_padded,
            **common,
        ),
        Case(
            provider="effbert-cpu-varlen",
            fn=train(effbert_varlen, packed=True),
            make_inputs=make_packed,
            reference=ref_packed,
            **common,
        ),
        Case(
            provider="sdpa",
            fn=train(plain),
            make_inputs=make_padded,
            reference=ref_padded,
            work_flops=_flops([n] * b, h, d, "forward+backward"),
            work_bytes=12 * b * n * act + 3 * bias_bytes,
            **common,
        ),
    ]


def _seqlen_sweep(device, quick, dtype, triton_reasons):
    """Forward+backward at a fixed token count and growing N: the runner plots time against sequence length."""
    if device.type == "cuda":
        lengths, tokens, h, d = ((128, 256, 512, 1024) if not quick else (128, 512)), 16384, 12, 64
        names = ("effbert-triton", "sdpa-flash-nobias", "sdpa-mem-efficient", "flexattention")
        mode = "forward+backward"
    else:
        lengths, tokens, h, d = (32, 64, 128), 256, 2, 16
        names = ("effbert-triton", "eager-reference", "sdpa-math")
        mode = "forward"
    providers = _providers(device)
    dname = str(dtype).replace("torch.", "")
    out = []
    for n in lengths:
        b = max(1, tokens // n)

        def make_inputs(b=b, n=n):
            q, k, v, dout = (torch.randn(b, n, h, d, device=device, dtype=dtype) for _ in range(4))
            return q, k, v, torch.randn(h, n, n, device=device, dtype=dtype), dout

        for name in names:
            has_bias = name != "sdpa-flash-nobias"
            out.append(
                Case(
                    op="tupe_attention_seqlen",
                    params={"B": b, "N": n, "H": h, "D": d},
                    dtype=dname,
                    mode=mode,
                    provider=name,
                    fn=_mode_fn(providers[name], mode, has_bias),
                    make_inputs=make_inputs,
                    reference=_reference_fn(mode),
                    bytes=_bytes(b, n, h, d, dtype.itemsize, mode),
                    flops=_flops([n] * b, h, d, mode),
                    rtol=3e-2 if dtype != torch.float32 else 1e-4,
                    skip_reasons=list(triton_reasons) if name == "effbert-triton" else [],
                    baseline=names[1],
                    check=has_bias,
                )
            )
    return out


def _varlen_cases(device, quick, dtype, triton_reasons):
    """Packed sequences at 50% padding against the same batch padded (with its key padding mask)."""
    b, n, h, d = (
        (32, 512, 12, 64)
        if device.type == "cuda" and not quick
        else ((8, 512, 12, 64) if device.type == "cuda" else (2, 64, 2, 16))
    )
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, n + 1, (b,), generator=gen)
    lengths = (lengths.float() * (0.5 * b * n / lengths.sum())).round().clamp(1, n).long()
    cu = torch.zeros(b + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    cu = cu.to(device)
    mask = (torch.arange(n)[None, :] < lengths[:, None]).to(device)
    total = int(lengths.sum())
    flops = _flops(lengths.tolist(), h, d, "forward+backward")
    params = {"B": b, "N": n, "H": h, "D": d, "pad": f"{100 * (1 - total / (b * n)):.0f}%"}
    dname = str(dtype).replace("torch.", "")

    def make_padded():
        q, k, v, dout = (torch.randn(b, n, h, d, device=device, dtype=dtype) for _ in range(4))
        return q, k, v, torch.randn(h, n, n, device=device, dtype=dtype), dout

    def make_packed():
        q, k, v, dout = (torch.randn(total, h, d, device=device, dtype=dtype) for _ in range(4))
        return q, k, v, torch.randn(h, n, n, device=device, dtype=dtype), dout

    def run_padded(q, k, v, bias, dout):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
        out = effbert.tupe_attention(*leaves, attention_mask=mask, backend="triton")
        out.backward(dout)
        return out

    def run_packed(q, k, v, bias, dout):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
        out = effbert.tupe_attention_varlen(*leaves[:3], cu, n, leaves[3], backend="triton")
        out.backward(dout)
        return out

    def ref_padded(q, k, v, bias, dout):
        return reference.tupe_attention(
            q.float(), k.float(), v.float(), bias.float(), attention_mask=mask
        )

    def ref_packed(q, k, v, bias, dout):
        return reference.tupe_attention_varlen(q.float(), k.float(), v.float(), cu, n, bias.float())

    common = dict(
        op="tupe_attention_varlen",
        params=params,
        dtype=dname,
        mode="forward+backward",
        flops=flops,
        rtol=3e-2 if dtype != torch.float32 else 1e-4,
        skip_reasons=list(triton_reasons),
        baseline="effbert-triton-padded",
    )
    act = dtype.itemsize * h * d
    return [
        Case(
            provider="effbert-triton-padded",
            fn=run_padded,
            make_inputs=make_padded,
            reference=ref_padded,
            bytes=12 * b * n * act + 3 * h * n * n * dtype.itemsize,
            **common,
        ),
        Case(
            provider="effbert-triton-varlen",
            fn=run_packed,
            make_inputs=make_packed,
            reference=ref_packed,
            bytes=12 * total * act + 3 * h * n * n * dtype.itemsize,
            **common,
        ),
    ]
