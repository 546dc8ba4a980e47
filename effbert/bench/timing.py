"""Timing with the discipline of DESIGN.md: warm up, rotate inputs larger than the cache, take the median."""

import statistics
import time

import torch


def rotation_count(bytes_per_set, device, cache_bytes=None):
    """How many input sets to rotate through so that one round overflows the last-level cache (2x, at most 64)."""
    if cache_bytes is None:
        if device.type == "cuda":
            cache_bytes = torch.cuda.get_device_properties(device).L2_cache_size
        else:
            cache_bytes = 64 << 20
    if bytes_per_set <= 0:
        return 1
    return int(min(64, max(1, -(-2 * cache_bytes // bytes_per_set))))


def time_fn(fn, device, *, quick=False):
    """Median milliseconds of ``fn()`` and the spread (max/min of the middle half) over repeats."""
    if device.type == "cuda":
        import triton.testing

        warmup, rep = (5, 20) if quick else (25, 200)
        times = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="all")
        times = sorted(times)
    else:
        fn()  # warm-up (first-call costs: allocation, lazy imports)
        budget = 0.05 if quick else 0.5
        times, start = [], time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - start < budget and len(times) < 1000):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
    mid = times[len(times) // 4: max(len(times) // 4 + 1, 3 * len(times) // 4)]
    return statistics.median(times), (mid[-1] / mid[0] if mid[0] > 0 else 1.0), len(times)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceilings(device, *, quick=False):
    """The device's launch floor, copy bandwidth (bytes read + written) and matrix rates, measured now on random
    data."""
    out = {}
    # The cheapest op a Python caller can launch: a floor for cases too small for bytes or FLOPs to matter.
    one = torch.zeros(1, device=device)
    ms, _, _ = time_fn(lambda: one.add_(1.0), device, quick=quick)
    out["launch_us"] = ms * 1e3
    n = (64 << 20) if device.type == "cpu" or quick else (1 << 30)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = time_fn(lambda: dst.copy_(src), device, quick=quick)
    out["copy_GBps"] = 2 * n / ms / 1e6
    del src, dst
    sizes = {"cpu": {torch.float32: 1024, torch.bfloat16: 512}, "cuda": {torch.float32: 4096, torch.bfloat16: 8192}}
    for dtype, size in sizes["cuda" if device.type == "cuda" else "cpu"].items():
        if quick:
            size //= 2
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 ceiling is true fp32
        try:
            ms, _, _ = time_fn(lambda: a @ b, device, quick=quick)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        out[f"{str(dtype).replace('torch.', '')}_matmul_TFLOPs"] = 2 * size**3 / ms / 1e9
    return out
