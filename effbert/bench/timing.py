"""Timing with the discipline of DESIGN.md: warm up, rotate inputs larger than the cache, take the median.

On the CPU, the providers of one shape are timed interleaved (``interleave``: round by round, one call of each per
round), so that load from other processes, which comes and goes over seconds, falls on every provider alike and the
ratios of their medians stay honest; timing them one after another in blocks let a loaded machine report 1.89x for
0.95x. Beside the wall time each call's process CPU time is recorded (``time.process_time``: it counts every
thread of the process, the runtimes' worker threads included).
"""

import statistics
import time

import torch

NOISY_SPREAD = (
    1.25  # a timed row whose middle half of rounds spans more than this (max/min) is marked noisy
)
MIN_ROUNDS = (
    5  # interleaved rounds at least, however long a call takes (`effbert bench --rounds` raises it)
)
CPU_CLOCK = "process_time"  # the CPU-time clock of interleaved rows, named in their JSON


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
    return statistics.median(times), spread(times), len(times)


def spread(times):
    """max/min of the middle half of ``times``: how much the typical samples disagree."""
    times = sorted(times)
    mid = times[len(times) // 4 : max(len(times) // 4 + 1, 3 * len(times) // 4)]
    return mid[-1] / mid[0] if mid[0] > 0 else 1.0


def interleave(
    fns,
    *,
    quick=False,
    rounds=None,
    budget_s=None,
    min_block_s=1e-3,
    warmup=True,
    alternate=False,
    device=None,
):
    """Time ``fns`` round by round (A B C A B C ...): each round times every fn once, in order,
    after warm-up calls. Runs ``rounds`` rounds when given, else at least MIN_ROUNDS and then until
    ``budget_s`` (default 0.5 s per fn, 0.05 s with ``quick``) is spent, at most 1000. A fn faster
    than ``min_block_s`` is called in a block of back-to-back calls per round (sized in the warm-up)
    and the round records the block's time per call: the clocks' own cost and resolution would
    otherwise be what is measured. ``warmup=False``: no warm-up calls (the caller warmed up), one
    call a round. ``alternate``: every other round runs the fns in reverse order (A B, B A, A B,
    ...), so that neither is always the one that runs first. ``device`` a CUDA device: each call is
    timed between synchronisations.

    Returns ``(wall, cpu, errors)``: per fn the list of wall milliseconds and of process CPU milliseconds per call,
    one per round, and ``{index: exception}`` for fns that raised (dropped from later rounds, so one broken
    provider does not stop the others being timed)."""
    errors = {}
    wall, cpu = [[] for _ in fns], [[] for _ in fns]
    reps = [1] * len(fns)

    def call(i):
        if i in errors:
            return None
        try:
            synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(reps[i]):
                fns[i]()
            synchronize(device)
            t1, c1 = time.perf_counter(), time.process_time()
        except Exception as exc:  # reported in that provider's row
            errors[i] = exc
            return None
        return (t1 - t0) * 1e3 / reps[i], (c1 - c0) * 1e3 / reps[i]

    # warm-up (first-call costs: allocation, compilation), block size
    for i in range(len(fns) if warmup else 0):
        once = call(i)
        if (
            once is not None and once[0] < 10 * min_block_s * 1e3
        ):  # maybe fast: a second call to size the block
            once = call(i)
        if once is not None and once[0] > 0:
            reps[i] = int(min(10000, max(1, min_block_s * 1e3 / once[0])))
    if budget_s is None:
        budget_s = (0.05 if quick else 0.5) * len(fns)
    done, start = 0, time.perf_counter()
    while (
        done < rounds
        if rounds is not None
        else done < MIN_ROUNDS or (time.perf_counter() - start < budget_s and done < 1000)
    ):
        for i in reversed(range(len(fns))) if alternate and done % 2 else range(len(fns)):
            got = call(i)
            if got is not None:
                wall[i].append(got[0])
                cpu[i].append(got[1])
        done += 1
        if len(errors) == len(fns):
            break
    return wall, cpu, errors


def summarize(wall, cpu):
    """A provider's interleaved figures: median wall and CPU ms, the spread, the noisy flag, and ``noise``, the
    disagreement of the medians of the even and the odd rounds (what ``--compare`` must see past)."""
    ms = statistics.median(wall)
    halves = [statistics.median(wall[k::2]) for k in (0, 1)] if len(wall) > 1 else [ms, ms]
    s = spread(wall)
    return {
        "ms": ms,
        "cpu_ms": statistics.median(cpu),
        "cpu_clock": CPU_CLOCK,
        "rounds": len(wall),
        "spread": s,
        "noisy": s > NOISY_SPREAD,
        "noise": abs(halves[0] - halves[1]) / ms if ms > 0 else 0.0,
    }


def paired_speedup(baseline, candidate, device, rounds):
    """The speed-up of ``candidate()`` over ``baseline()`` robust to a shared machine: ``rounds``
    interleaved pairs with the order alternating (``interleave(..., alternate=True)``, no warm-up:
    warm up first), each pair's ratio of costs, the median ratio. The cost is process CPU time on a
    CPU (a pass that waits while other jobs hold the cores accrues none) and wall time between
    synchronisations on a GPU. Returns ``(speed-up, median baseline seconds)``; an exception of
    either fn propagates."""
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    wall, cpu, errors = interleave(
        [baseline, candidate], rounds=rounds, warmup=False, alternate=True, device=device
    )
    if errors:
        raise next(iter(errors.values()))
    base, cand = wall if device.type == "cuda" else cpu
    ratios = [b / max(c, 1e-6) for b, c in zip(base, cand)]
    return statistics.median(ratios), statistics.median(base) / 1e3


def synchronize(device):
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceilings(device, *, quick=False):
    """The device's launch floor, copy bandwidth (bytes read + written) and matrix rates, measured now on random
    data. On the CPU they are timed interleaved and each takes its best round: load from other processes can only
    make a round slower, and a ceiling measured too low would put rows above 100% of their floor."""
    if device.type == "cpu":
        return _cpu_ceilings(quick)
    out = {}
    # The cheapest op a Python caller can launch: a floor for cases too small for bytes or FLOPs to matter.
    one = torch.zeros(1, device=device)
    ms, _, _ = time_fn(lambda: one.add_(1.0), device, quick=quick)
    out["launch_us"] = ms * 1e3
    n = (64 << 20) if device.type == "cpu" or quick else (1 << 30)
    buffers = [torch.randn(n // 4, device=device)]
    buffers.append(torch.empty_like(buffers[0]))
    ms, _, _ = time_fn(lambda: buffers[1].copy_(buffers[0]), device, quick=quick)
    out["copy_GBps"] = 2 * n / ms / 1e6
    buffers.clear()  # the 2 x 64 MiB (GPU: 2 x 1 GiB) go before the matmuls allocate theirs
    sizes = {
        "cpu": {torch.float32: 1024, torch.bfloat16: 512},
        "cuda": {torch.float32: 4096, torch.bfloat16: 8192},
    }
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


def _has_mkldnn():
    return torch.backends.mkldnn.is_available()


def _cpu_ceilings(quick, rounds=None):
    one = torch.zeros(1)
    n = 64 << 20
    src, dst = torch.randn(n // 4), torch.empty(n // 4)
    size = {torch.float32: 1024, torch.bfloat16: 512}
    mats = {
        dtype: (torch.randn(s // (2 if quick else 1), s // (2 if quick else 1), dtype=dtype),) * 2
        for dtype, s in size.items()
    }
    fns = {"launch_us": lambda: one.add_(1.0), "copy_GBps": lambda: dst.copy_(src)}
    fns.update(
        {
            f"{str(d).replace('torch.', '')}_matmul_TFLOPs": (lambda a=a, b=b: a @ b)
            for d, (a, b) in mats.items()
        }
    )
    # oneDNN's linear on a pre-packed weight runs 2x torch.mm on AVX-512 CPUs; the ceiling is the faster of the two
    # (effbert's CPU inference uses it, so torch.mm's rate would put its rows above 100% of their floor)
    pack = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _has_mkldnn() else None
    if pack is not None:
        for d, (a, b) in mats.items():
            packed = pack(b, a.shape[0])
            fns[f"{str(d).replace('torch.', '')}_matmul_TFLOPs:onednn"] = lambda a=a, w=packed: (
                torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
            )
    wall, _, errors = interleave(list(fns.values()), quick=quick, rounds=rounds)
    names = list(fns)
    for i in sorted(
        errors, reverse=True
    ):  # a oneDNN build that refuses the call leaves torch.mm's rate
        if not names[i].endswith(":onednn"):
            raise errors[i]
    best = {name: min(w) for i, (name, w) in enumerate(zip(names, wall)) if i not in errors}
    out = {"launch_us": best["launch_us"] * 1e3, "copy_GBps": 2 * n / best["copy_GBps"] / 1e6}
    for dtype, (a, _) in mats.items():
        key = f"{str(dtype).replace('torch.', '')}_matmul_TFLOPs"
        ms = min(best[k] for k in (key, f"{key}:onednn") if k in best)
        out[key] = 2 * a.shape[0] ** 3 / ms / 1e9
    out["threads"] = torch.get_num_threads()  # the matrix rates are at this many threads
    return out
