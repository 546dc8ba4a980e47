"""The CPU benchmark's interleaved timing: round-by-round order, medians, the noisy flag, load, ceilings."""

import statistics

import pytest
import torch

from effbert.bench import runner, timing
from effbert.bench.case import Case


def _fake_case(provider, calls, shape="s", fail=False, skip=()):
    def fn():  # slower than interleave's block (1 ms): one call per round
        calls.append(provider)
        time_sleep(1.5e-3)
        if fail and len(calls) > 6:  # passes its check, breaks while timed
            raise RuntimeError("broke")
        return torch.ones(2)

    return Case(
        op="o",
        shape=shape,
        dtype="float32",
        mode="forward",
        provider=provider,
        fn=fn,
        make_inputs=lambda: (),
        reference=lambda: torch.ones(2),
        bytes=0,
        flops=0.0,
        baseline="A",
        skip_reasons=list(skip),
    )


def test_interleave_times_the_providers_round_by_round():
    calls = []
    fns = [lambda p=p: calls.append(p) or time_sleep(1e-4) for p in "ABC"]
    wall, cpu, errors = timing.interleave(fns, rounds=4, min_block_s=0)
    # one warm-up call each (no block to size: min_block_s=0), then A B C, A B C, ...
    assert calls == list("ABC") + list("ABC") * 4
    assert [len(w) for w in wall] == [4, 4, 4] and [len(c) for c in cpu] == [4, 4, 4] and not errors
    assert all(ms >= 0.1 for w in wall for ms in w)


def time_sleep(seconds):
    import time

    time.sleep(seconds)


def test_interleave_calls_a_fast_fn_in_blocks_and_drops_one_that_raises():
    calls = {"fast": 0}

    def fast():
        calls["fast"] += 1

    def broken():
        raise ValueError("no")

    wall, _, errors = timing.interleave([fast, broken], rounds=3, min_block_s=1e-3)
    assert calls["fast"] > 2 + 3  # each round a block of calls, not one
    assert len(wall[0]) == 3 and wall[1] == [] and isinstance(errors[1], ValueError)


def test_summary_medians_spread_and_the_noisy_flag():
    steady = timing.summarize([10.0, 10.2, 9.9, 10.1, 10.0, 10.05], [9.0] * 6)
    assert (
        steady["ms"] == statistics.median([10.0, 10.2, 9.9, 10.1, 10.0, 10.05])
        and not steady["noisy"]
    )
    assert (
        steady["cpu_ms"] == 9.0 and steady["cpu_clock"] == "process_time" and steady["rounds"] == 6
    )
    loaded = timing.summarize([10.0, 20.0, 10.0, 21.0, 10.5, 19.0, 11.0, 22.0], [9.0] * 8)
    assert loaded["spread"] > timing.NOISY_SPREAD and loaded["noisy"]
    assert loaded["noise"] > 0.5  # the even rounds were fast, the odd ones slow


def test_run_group_interleaves_checks_and_records_load(monkeypatch):
    calls = []
    cases = [
        _fake_case("A", calls),
        _fake_case("B", calls, skip=["not here"]),
        _fake_case("C", calls),
    ]
    emitted = []
    monkeypatch.setattr(timing, "MIN_ROUNDS", 3)
    rows = runner.run_group(
        cases,
        torch.device("cpu"),
        {"launch_us": 1.0, "copy_GBps": 1.0},
        True,
        emitted.append,
        rounds=3,
    )
    assert rows == emitted and [r["provider"] for r in rows] == ["A", "B", "C"]  # the cases' order
    assert rows[1]["status"] == "skipped" and rows[1]["reason"] == "not here"
    for r in (rows[0], rows[2]):
        assert r["status"] == "ok" and r["timing"] == "interleaved" and r["rounds"] == 3
        assert r["loadavg_1min"] >= 0 and "cpu_ms" in r and isinstance(r["noisy"], bool)
    # check, warm-up (two calls each), then one call of each per round
    assert calls == ["A", "C"] + list("AACC") + list("AC") * 3
    assert runner.environment(torch.device("cpu"))["loadavg"] is not None


def test_a_provider_that_breaks_while_timed_is_an_error_row_and_the_others_are_timed():
    calls = []
    rows = runner.run_group(
        [_fake_case("A", calls), _fake_case("B", calls, fail=True)],
        torch.device("cpu"),
        {"launch_us": 1.0, "copy_GBps": 1.0},
        True,
        rounds=3,
    )
    by = {r["provider"]: r for r in rows}
    assert (
        by["A"]["status"] == "ok" and by["B"]["status"] == "error" and "broke" in by["B"]["reason"]
    )


def test_a_peer_above_its_tolerance_fails_its_row():
    case = _fake_case("A", [])
    case.reference, case.atol = (lambda: torch.ones(2) + 0.01), 1e-3
    row = runner.run_group(
        [case], torch.device("cpu"), {"launch_us": 1.0, "copy_GBps": 1.0}, True, rounds=1
    )[0]
    assert row["status"] == "wrong" and "max abs diff 1.00e-02 > 1e-03" in row["reason"]


def test_cpu_ceilings_take_the_best_round(monkeypatch):
    """Load only makes a round slower: each ceiling comes from its fastest round."""

    def fake(fns, **kwargs):
        wall = [[5.0, 1.0, 3.0] for _ in fns]  # ms per call; the best round is 1 ms
        return wall, wall, {}

    monkeypatch.setattr(timing, "interleave", fake)
    out = timing.measure_ceilings(torch.device("cpu"))
    assert out["launch_us"] == pytest.approx(1e3)
    assert out["copy_GBps"] == pytest.approx(2 * (64 << 20) / 1.0 / 1e6)
    assert out["float32_matmul_TFLOPs"] == pytest.approx(2 * 1024**3 / 1.0 / 1e9)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
def test_cpu_matmul_ceiling_is_the_faster_of_torch_mm_and_onednn(monkeypatch):
    """oneDNN's packed linear runs ahead of torch.mm on AVX-512 CPUs: the ceiling is the faster; a oneDNN call that
    fails leaves torch.mm's rate, and a failing torch.mm is still an error."""
    seen = {}

    def fake(fns, **kwargs):
        seen["n"] = len(fns)
        # launch, copy, fp32 mm, bf16 mm, fp32 oneDNN, bf16 oneDNN
        wall = [[1.0], [1.0], [4.0], [8.0], [2.0], [16.0]]
        return wall, wall, {}

    monkeypatch.setattr(timing, "interleave", fake)
    out = timing.measure_ceilings(torch.device("cpu"))
    assert seen["n"] == 6
    assert out["float32_matmul_TFLOPs"] == pytest.approx(2 * 1024**3 / 2.0 / 1e9)
    assert out["bfloat16_matmul_TFLOPs"] == pytest.approx(2 * 512**3 / 8.0 / 1e9)

    def broken_onednn(fns, **kwargs):
        wall = [[1.0], [1.0], [4.0], [8.0], [], []]
        return wall, wall, {4: RuntimeError("no"), 5: RuntimeError("no")}

    monkeypatch.setattr(timing, "interleave", broken_onednn)
    out = timing.measure_ceilings(torch.device("cpu"))
    assert out["float32_matmul_TFLOPs"] == pytest.approx(2 * 1024**3 / 4.0 / 1e9)

    def broken_mm(fns, **kwargs):
        wall = [[1.0], [1.0], [], [8.0], [2.0], [16.0]]
        return wall, wall, {2: RuntimeError("mm failed")}

    monkeypatch.setattr(timing, "interleave", broken_mm)
    with pytest.raises(RuntimeError, match="mm failed"):
        timing.measure_ceilings(torch.device("cpu"))
