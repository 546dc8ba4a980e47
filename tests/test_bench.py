"""The benchmark runner on this machine: quick run, files written, a self-compare with no regression."""

import json

import pytest

from effbert.bench import runner, suite
from effbert.commands import bench as bench_command


@pytest.mark.slow
def test_quick_run_writes_results_and_self_compare_is_clean(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        bench_command.main(["--quick", "--no-progress", "--op", "exit_entropy", "--out", str(out)])
        == 0
    )
    data = json.loads((out / "bench.json").read_text())
    assert data["env"]["torch"] and data["ceilings"]["copy_GBps"] > 0
    ok = [c for c in data["cases"] if c["status"] == "ok"]
    skipped = [c for c in data["cases"] if c["status"] == "skipped"]
    assert ok and all(c["ms"] > 0 and c["rel_error"] <= 1e-4 for c in ok)
    assert all(c["reason"] for c in skipped)  # providers that cannot run say why
    assert (
        "| exit_entropy" not in (out / "bench.md").read_text()
        or "## exit_entropy" in (out / "bench.md").read_text()
    )
    # Comparing a run with itself finds every case and flags none.
    assert (
        bench_command.main(
            [
                "--quick",
                "--no-progress",
                "--op",
                "exit_entropy",
                "--out",
                str(tmp_path / "again"),
                "--compare",
                str(out / "bench.json"),
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "again" / "bench.json").read_text())
    matched = again["compare"]["cases"]
    assert len(matched) == len(ok)
    self_cmp = runner.compare(data["cases"], out / "bench.json")
    assert self_cmp and not any(c["regression"] for c in self_cmp)
    assert all(c["ratio"] == 1.0 for c in self_cmp)


def test_bad_arguments_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_command.main(["--compare", str(tmp_path / "missing.json")])
    assert "--compare" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_command.main(["--op", "no_such_op", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench_command.main(["--budget", "0", "--out", str(tmp_path)])
    assert "--budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_command.main(
            ["--op", "exit_entropy", "--quick", "--providers", "nope", "--out", str(tmp_path)]
        )
    err = capsys.readouterr().err
    assert "--providers names no provider" in err and "'nope'" in err
    # an --out or --compare the run could not use is refused before it measures anything, not after
    (tmp_path / "file").write_text("x")
    (tmp_path / "cut.json").write_text('{"cases": [')
    for argv, message in (
        (["--out", str(tmp_path / "file")], "exists and is not a folder"),
        (["--compare", str(tmp_path / "cut.json")], "is not the bench.json of an earlier run"),
    ):
        with pytest.raises(SystemExit) as exc:
            bench_command.main(["--op", "exit_entropy", "--quick", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "measuring" not in err


def test_a_spent_budget_skips_the_remaining_cases_but_writes_the_files(tmp_path):
    out = tmp_path / "late"
    assert (
        bench_command.main(
            [
                "--quick",
                "--no-progress",
                "--op",
                "exit_entropy",
                "--budget",
                "1e-9",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads((out / "bench.json").read_text())["cases"]
    assert rows and all(r["status"] == "skipped" and r["reason"] for r in rows)
    assert any("--budget" in r["reason"] for r in rows)
    assert "## exit_entropy" in (out / "bench.md").read_text()


@pytest.mark.slow
def test_plots_speedups_and_time_against_sequence_length(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep"
    assert (
        bench_command.main(
            ["--quick", "--no-progress", "--op", "tupe_attention_seqlen", "--out", str(out)]
        )
        == 0
    )
    data = json.loads((out / "bench.json").read_text())
    ok = [c for c in data["cases"] if c["status"] == "ok"]
    assert len({c["shape"] for c in ok}) >= 3  # the sweep ran at three lengths at least
    for name in ("speedup_tupe_attention_seqlen.png", "time_vs_seqlen_tupe_attention_seqlen.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000, name


TINY_BERT = dict(
    vocab_size=60,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=48,
    max_position_embeddings=16,
)


def test_train_step_providers_train_the_same_model():
    """The fused and eager providers of the training-step case run the same computation: with dropout off, three
    AdamW steps give the same losses and the same TNF notes."""
    import torch

    from effbert.bench import train_step

    cpu = torch.device("cpu")
    inputs = [train_step._tnf_batch(3, 16, 4096, seed=s) for s in range(3)]
    runs = {}
    for provider in ("effbert", "effbert-eager"):
        trainer = train_step._Trainer(provider, TINY_BERT, cpu, torch.float32, dropout=0.0)
        gen = torch.Generator().manual_seed(1)
        losses = []
        for spans, slots, lengths in inputs:
            ids = torch.randint(5, 60, (3, 16), generator=gen)
            labels = torch.where(
                torch.rand(3, 16, generator=gen) < 0.3, ids, torch.full_like(ids, -100)
            )
            losses.append(
                trainer(ids, torch.ones(3, 16, dtype=torch.bool), labels, spans, slots, lengths)
            )
        runs[provider] = (
            torch.stack(losses),
            trainer.model.notes.notes.clone(),
            trainer.model.notes.counts.clone(),
        )
    fused, eager = runs["effbert"], runs["effbert-eager"]
    assert torch.allclose(fused[0], eager[0], rtol=1e-4), (fused[0], eager[0])
    assert torch.equal(fused[2], eager[2]) and int((fused[2] > 0).sum()) > 0  # notes were taken
    assert torch.allclose(fused[1], eager[1], rtol=1e-4, atol=1e-5)


def test_train_step_flops_are_the_models_matrix_products():
    """The step's counted FLOPs (its TFLOP/s and percent of floor) against torch's own count of every matrix
    product in an eager step of plain BERT: forward, backward and all."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from effbert.bench import train_step

    sizes = dict(TINY_BERT, num_hidden_layers=2)
    trainer = train_step._Trainer(
        "effbert-absolute", sizes, torch.device("cpu"), torch.float32, dropout=0.0
    )
    trainer.build()
    trainer.model.set_backend("eager")
    ids = torch.randint(5, 60, (3, 16))
    labels = torch.where(torch.rand(3, 16) < 0.3, ids, torch.full_like(ids, -100))
    with FlopCounterMode(display=False) as counter:
        trainer(
            ids,
            torch.ones(3, 16, dtype=torch.bool),
            labels,
            *train_step._tnf_batch(3, 16, 4096, seed=1),
        )
    # the training path runs the MLM head at the labelled positions only
    assert counter.get_total_flops() == train_step.step_flops(
        sizes, 3, 16, head_rows=int((labels != -100).sum())
    )
    assert train_step.step_flops(sizes, 3, 16) > train_step.step_flops(sizes, 3, 16, head_rows=5)


@pytest.mark.slow
def test_train_step_reports_tokens_per_second(tmp_path, monkeypatch):
    import torch

    from effbert.bench import train_step

    monkeypatch.setattr(
        train_step, "_sizes", lambda device, quick: (TINY_BERT, [(2, 16)], torch.float32)
    )
    out = tmp_path / "e2e"
    assert (
        bench_command.main(["--quick", "--no-progress", "--op", train_step.OP, "--out", str(out)])
        == 0
    )
    rows = {c["provider"]: c for c in json.loads((out / "bench.json").read_text())["cases"]}
    assert set(rows) == {
        "effbert",
        "effbert-absolute",
        "effbert-eager",
        "hf-sdpa",
        "effbert-mcbert",
    }
    for row in rows.values():
        if row["status"] == "skipped":  # transformers missing: says so
            assert row["provider"] == "hf-sdpa" and "transformers" in row["reason"]
            continue
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] == pytest.approx(32 / row["ms"] * 1e3)
        assert row["TFLOPs"] > 0
    assert "tokens/s" in (out / "bench.md").read_text()


@pytest.mark.slow
def test_the_whole_quick_suite_runs_on_this_cpu(tmp_path):
    """`effbert bench --quick` as a user runs it on a CPU machine (no interpreter): every case either runs and passes
    its check, or says why it cannot run here; every family writes its table, JSON and plots."""
    import os
    import subprocess
    import sys

    out = tmp_path / "all"
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "effbert.commands",
            "bench",
            "--quick",
            "--no-progress",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((out / "bench.json").read_text())["cases"]
    assert {r["status"] for r in rows} <= {"ok", "skipped"}, [
        r for r in rows if r["status"] not in ("ok", "skipped")
    ]
    assert all(r["reason"] for r in rows if r["status"] == "skipped")
    from effbert.bench.runner import collect_cases

    import torch

    ops = {c.op for c in collect_cases(torch.device("cpu"), True)}
    ran = {r["op"] for r in rows if r["status"] == "ok"}
    # every op has a provider that runs here, but varlen-against-padded, whose both sides are Triton kernels
    assert ran == ops - {"tupe_attention_varlen"}
    markdown = (out / "bench.md").read_text()
    assert all(f"## {op}" in markdown for op in ops)
    assert {p.name for p in out.glob("speedup_*.png")} == {f"speedup_{op}.png" for op in ran}


def test_cpu_inference_cases_compare_the_models_and_report_layers_saved():
    """The cpu_inference family (quick sizes): transformers' BERT as baseline, effbert full depth checked against
    its float64 eager run, batched early exit checked against the full-depth exits and calibrated to 6 of 12
    layers, with FLOPs worked out from the layers actually run. (The peers' checks: tests/test_bench_peers.py.)"""
    import torch

    from effbert.bench import cpu_inference as bench

    cases = bench.cases(torch.device("cpu"), quick=True)
    assert {c.provider for c in cases} == {
        "hf-sdpa",
        "hf-compile",
        "onnxruntime",
        "openvino",
        "effbert",
        "effbert-early-exit",
        "hf-sdpa-patched",
        "onnxruntime-int8",
        "effbert-int8",
        "effbert-bf16",
    }
    # the low-precision rows share their shape's dtype column (timed interleaved with fp32) and check by cosine
    lowp = [c for c in cases if c.provider in ("onnxruntime-int8", "effbert-int8", "effbert-bf16")]
    assert all(c.dtype == "float32" and c.min_cosine and c.atol for c in lowp)
    assert all(c.op == "cpu_inference" and c.baseline == "hf-sdpa" for c in cases)
    # FLOPs by hand: hidden 64, FFN 128, N 32, one sequence of 32 tokens
    assert (
        bench.layer_flops([32], 64, 128, 32, True)
        == 2 * 32 * (4 * 64 * 64 + 2 * 64 * 128) + 4 * 32 * 32 * 64
    )
    # real tokens only: 42 tokens' matmuls, 32^2 + 10^2 query-key pairs; padded: 2 x 32 tokens, 2 x 32^2 pairs
    assert bench.layer_flops([32, 10], 64, 128, 32, False) == (
        2 * 42 * (4 * 64 * 64 + 2 * 64 * 128) + 4 * (32 * 32 + 10 * 10) * 64
    )
    assert bench.layer_flops([32, 10], 64, 128, 32, True) == (
        2 * 64 * (4 * 64 * 64 + 2 * 64 * 128) + 4 * 2 * 32 * 32 * 64
    )
    # one floor per shape (the real tokens' FLOPs); the padded baseline's own work is more
    for shape in {c.shape for c in cases}:
        group = [
            c for c in cases if c.shape == shape and not c.provider.startswith("effbert-early-exit")
        ]
        assert len({c.flops for c in group}) == 1, shape
        base = next(c for c in group if c.provider == "hf-sdpa")
        assert (base.work_flops > base.flops) == (
            "B=1," not in shape
        )  # B=1: one sequence, no padding
    # inference caches TUPE's positional term (it depends on no input)
    assert all(
        m.position_encoder.cache for m in (bench._models(True)[1], bench._models(True)[2].bert)
    )
    ids, mask, lengths = bench.make_batch([7, 3, 5], 1000, seed=4)
    assert ids.shape == (3, 7) and (mask.sum(1) == lengths).all() and (ids[mask == 0] == 0).all()
    for case in cases:
        if case.provider not in (
            "effbert",
            "effbert-early-exit",
            "effbert-int8",
            "effbert-bf16",
        ) or case.shape.startswith("all-MiniLM"):
            continue
        inputs = case.make_inputs()
        out, ref = case.fn(*inputs), case.reference(*inputs)
        if case.provider in (
            "effbert-int8",
            "effbert-bf16",
        ):  # loose bounds; the runner notes the figures
            assert out.dtype == torch.float32 and (out - ref).abs().max() <= case.atol
            assert (
                torch.nn.functional.cosine_similarity(out.double(), ref.double(), dim=-1).min()
                >= 0.99
            )
            continue
        assert (out.double() - ref.double()).norm() <= case.rtol * ref.double().norm()
        if case.provider == "effbert-early-exit":
            assert "average exit" in case.note and 0 < case.flops
            avg = float(case.note.split("average exit ")[1].split(" ")[0])
            assert avg <= 6.0 + 1e-9


def test_row_rates_floor_is_the_ops_and_rates_are_the_providers():
    """The runner's arithmetic: the floor comes from the op's fewest FLOPs and bytes (the same for every provider),
    GB/s and TFLOP/s from the provider's own work; a provider that computes padding is below 100% of the floor by
    the padding it computes, never above it."""
    from effbert.bench.runner import row_rates

    ceilings = {"launch_us": 10.0, "copy_GBps": 20.0, "float32_matmul_TFLOPs": 0.1}
    # 2e9 FLOPs at 0.1 TFLOP/s: a 20 ms floor; bytes (1e6 / 20 GB/s = 0.05 ms) and launch (0.01 ms) are below it
    exact = row_rates(40.0, 2e9, 10**6, ceilings, "float32")
    assert exact["floor_ms"] == pytest.approx(20.0) and exact["pct_of_floor"] == pytest.approx(50.0)
    assert exact["TFLOPs"] == pytest.approx(2e9 / 40.0 / 1e9) and exact["GBps"] == pytest.approx(
        1e6 / 40.0 / 1e6
    )
    # a padded provider doing twice the work in the same time: the same % of floor, twice the FLOP rate
    padded = row_rates(40.0, 2e9, 10**6, ceilings, "float32", work_flops=4e9, work_bytes=3 * 10**6)
    assert padded["pct_of_floor"] == pytest.approx(50.0) and padded["TFLOPs"] == pytest.approx(
        2 * exact["TFLOPs"]
    )
    assert padded["GBps"] == pytest.approx(3 * exact["GBps"]) and padded["work_flops"] == 4e9
    # a provider at the ceiling on the real work is at 100%, however much padding another computes
    assert row_rates(20.0, 2e9, 10**6, ceilings, "float32")["pct_of_floor"] == pytest.approx(100.0)
    # memory-bound (no FLOPs): the bytes set the floor; tiny: the launch does
    assert row_rates(1.0, 0, 10**7, ceilings, "float32")["floor_ms"] == pytest.approx(0.5)
    assert row_rates(1.0, 0, 10, ceilings, "float32")["floor_ms"] == pytest.approx(0.01)
    assert row_rates(1.0, 0, 10, ceilings, "float32")["TFLOPs"] is None


def _case(op, params, provider="p"):
    import torch

    from effbert.bench.case import Case

    return Case(
        op=op,
        params=params,
        dtype="bfloat16",
        mode="forward",
        provider=provider,
        fn=torch.zeros,
        make_inputs=tuple,
        reference=torch.zeros,
        bytes=1,
        flops=0,
    )


def test_budget_step_skips_the_cases_free_to_run_once_the_budget_is_spent(tmp_path):
    """effbert bench's steps called one by one: the budget marks only cases without a reason of
    their own; the result file is written before anything is measured; the summary and the exit
    code read the rows."""
    group = [_case("o", {"B": 1}, "a"), _case("o", {"B": 1}, "b")]
    group[1].skip_reasons = ["no GPU here"]
    assert suite.skip_for_budget(group, None, 1e9) == set() and not group[0].skip_reasons
    assert suite.skip_for_budget(group, 10.0, 9.5) == set() and not group[0].skip_reasons
    assert suite.skip_for_budget(group, 10.0, 10.5) == {group[0].key}
    assert group[0].skip_reasons == ["the run's --budget of 10 s was spent"]
    assert group[1].skip_reasons == ["no GPU here"]
    env = {"device": "cpu", "device_type": "cpu", "torch": "x", "effbert": "y", "date": "z"}
    result = suite.start_result(tmp_path / "o", env, True, "all", group)
    written = json.loads((tmp_path / "o" / "bench.json").read_text())
    assert written == result and written["planned"] == [c.key for c in group]
    assert written["complete"] is False and written["cases"] == []
    rows = [{"status": "wrong", "provider": "torch"}, {"status": "error", "provider": "effbert"}]
    assert suite.exit_code(rows) == 0  # a peer's wrong row or a provider that raised: reported
    assert suite.exit_code(rows + [{"status": "wrong", "provider": "effbert-int8"}]) == 1
    result["cases"] = rows
    lines = suite.summary(result, tmp_path / "o", [])
    assert lines[-1] == "2 cases failed their correctness check or raised; see the table"
    assert "no plots: matplotlib is not installed" in lines[0]


def test_headline_takes_one_shape_per_op_family_and_rest_the_others():
    """--headline: every provider but the compiled ones of one BERT-base shape per headline op, the fused kernels
    first and the training step last; --rest: the other cases; together every case once."""
    base = dict(B=32, N=512, H=12, D=64)
    step = dict(B=32, N=512, real=8192, L=12, Dm=768)
    cases = [
        _case("exit_entropy", dict(B=64, C=2)),
        _case("exit_entropy", dict(B=4096, C=30522)),
        _case("exit_entropy", dict(B=4096, C=30522), "torch.compile"),
        _case("tupe_attention", base, "a"),
        _case("tupe_attention", base, "b"),
        _case("tupe_attention", base, "flexattention"),
        _case("tupe_attention", dict(B=128, N=128, H=12, D=64)),
        _case("exit_decision", dict(R=64, C=2)),
        _case("train_step_padding", dict(B=128, N=128, real=8192, L=12, Dm=768)),
        _case("train_step_padding", step, "padded"),
        _case("train_step_padding", step, "unpadded"),
        _case("mc_sample_fused", dict(M=16384, V=30522, D=256, K=10)),
        _case("early_exit_inference", dict(B=64, N=128, L=12, avg_exit=6)),
    ]
    head = runner.select(cases, "headline")
    assert [(c.op, c.shape, c.provider) for c in head] == [
        ("exit_entropy", "B=4096,C=30522", "p"),
        ("mc_sample_fused", "M=16384,V=30522,D=256,K=10", "p"),  # no pattern: the op's first shape
        ("early_exit_inference", "B=64,N=128,L=12,avg_exit=6", "p"),
        ("tupe_attention", "B=32,N=512,H=12,D=64", "a"),
        ("tupe_attention", "B=32,N=512,H=12,D=64", "b"),
        ("train_step_padding", "B=32,N=512,real=8192,L=12,Dm=768", "padded"),
        ("train_step_padding", "B=32,N=512,real=8192,L=12,Dm=768", "unpadded"),
    ]
    rest = runner.select(cases, "rest")
    assert sorted(map(id, head + rest)) == sorted(map(id, cases))
    assert {c.op for c in rest} == {
        "exit_entropy",
        "tupe_attention",
        "exit_decision",
        "train_step_padding",
    }
    # the compiled providers time PyTorch's compiler from cold: with the rest, never in the headline
    assert {c.provider for c in rest} >= {"torch.compile", "flexattention"}
    assert runner.select(cases, "all") == cases
    with pytest.raises(ValueError, match="which"):
        runner.select(cases, "most")

    # --rest after a headline run that settled only some cases: the ones it left come first, in headline order
    settled = {head[0].key, head[3].key, head[4].key}
    after = runner.select(cases, "rest", settled)
    left = [c for c in head if c.key not in settled]
    assert after[: len(left)] == left and after[len(left) :] == rest
    assert runner.select(cases, "rest", {c.key for c in head}) == rest
    with pytest.raises(ValueError, match="measured is only for which='rest'"):
        runner.select(cases, "headline", settled)
    with pytest.raises(ValueError, match="measured must be a collection of case keys"):
        runner.select(cases, "rest", "exit_entropy|B=4096")


def test_settled_keys_leave_what_the_budget_skipped():
    rows = [
        {"key": "ran", "status": "ok"},
        {"key": "wrong", "status": "wrong"},
        {"key": "broke", "status": "error"},
        {"key": "cannot", "status": "skipped", "reason": "no CUDA device"},
        {
            "key": "late",
            "status": "skipped",
            "reason": "the run's --budget of 5 s was spent",
            "skipped_for": runner.BUDGET_SKIP,
        },
    ]
    assert runner.settled_keys({"cases": rows, "planned": ["ran", "never"]}) == {
        "ran",
        "wrong",
        "broke",
        "cannot",
    }
    for bad in ([], {"cases": None}, {"planned": []}):
        with pytest.raises(ValueError, match="result must be a parsed bench.json"):
            runner.settled_keys(bad)


def _stub_bench(monkeypatch, stop_after=None):
    """effbert bench's timing replaced by a stub row per case (and, with stop_after, a kill after that many)."""
    ran = []

    def run_case(case, device, ceilings, quick):
        if stop_after is not None and len(ran) == stop_after:
            raise KeyboardInterrupt
        ran.append(case.key)
        row = {
            "op": case.op,
            "shape": case.shape,
            "dtype": case.dtype,
            "mode": case.mode,
            "key": case.key,
            "provider": case.provider,
            "baseline": case.baseline,
        }
        if case.skip_reasons:
            return dict(row, status="skipped", reason="; ".join(case.skip_reasons))
        return dict(row, status="ok", ms=1.0, GBps=1.0, TFLOPs=None, pct_of_floor=1.0)

    def run_group(cases, device, ceilings, quick, emit, rounds=None):
        for case in cases:
            emit(run_case(case, device, ceilings, quick))

    monkeypatch.setattr(suite, "run_group", run_group)
    monkeypatch.setattr(suite, "measure_ceilings", lambda device, quick: {"launch_us": 1.0})
    monkeypatch.setattr(suite, "write_plots", lambda out, rows: [])
    monkeypatch.setattr(suite, "write_seqlen_plots", lambda out, rows: [])
    return ran


def test_rest_after_a_headline_run_takes_the_headline_cases_it_left(tmp_path, monkeypatch):
    """The GPU suite's stage 1 runs --headline with a --budget; stage 2's --rest --after its bench.json measures
    the headline cases stage 1 skipped for its budget (not those that cannot run here), then the rest."""
    import torch

    ops = "exit_entropy,notes"
    cases = runner.collect_cases(torch.device("cpu"), True, ops)
    head, rest = runner.select(cases, "headline"), runner.select(cases, "rest")
    ran = _stub_bench(monkeypatch)
    first = tmp_path / "stage1"
    assert (
        bench_command.main(
            [
                "--quick",
                "--no-progress",
                "--op",
                ops,
                "--headline",
                "--budget",
                "1e-9",
                "--out",
                str(first),
            ]
        )
        == 0
    )
    data = json.loads((first / "bench.json").read_text())
    assert (
        data["selection"] == "headline"
        and data["planned"] == [c.key for c in head]
        and data["complete"]
    )
    late = [r["key"] for r in data["cases"] if r.get("skipped_for") == runner.BUDGET_SKIP]
    cannot = [
        r["key"] for r in data["cases"] if r["status"] == "skipped" and "skipped_for" not in r
    ]
    assert late and cannot and sorted(late + cannot) == sorted(c.key for c in head)
    ran.clear()
    second = tmp_path / "stage2"
    assert (
        bench_command.main(
            [
                "--quick",
                "--no-progress",
                "--op",
                ops,
                "--rest",
                "--after",
                str(first / "bench.json"),
                "--out",
                str(second),
            ]
        )
        == 0
    )
    assert ran == late + [c.key for c in rest]
    # without --after, --rest leaves the headline cases to the headline run
    ran.clear()
    assert (
        bench_command.main(
            ["--quick", "--no-progress", "--op", ops, "--rest", "--out", str(tmp_path / "r")]
        )
        == 0
    )
    assert ran == [c.key for c in rest]


def test_after_needs_rest_and_a_bench_json(tmp_path, capsys):
    (tmp_path / "cut.json").write_text('{"cases": [')
    for argv, message in (
        (["--after", str(tmp_path / "cut.json")], "--after goes with --rest"),
        (
            ["--rest", "--after", str(tmp_path / "cut.json")],
            "is not the bench.json of a --headline",
        ),
        (
            ["--rest", "--after", str(tmp_path / "none.json")],
            "is not the bench.json of a --headline",
        ),
    ):
        with pytest.raises(SystemExit) as exc:
            bench_command.main(
                ["--op", "exit_entropy", "--quick", "--out", str(tmp_path / "o"), *argv]
            )
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_commit_comes_from_effbert_commit_else_from_this_trees_own_git(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFBERT_COMMIT", "abc1234def")
    assert runner._git_commit() == "abc1234def" and runner._git_commit(tmp_path) == "abc1234def"
    monkeypatch.delenv("EFFBERT_COMMIT")
    # a copy of the tree without .git, even inside another repository: unknown, not that repository's commit
    inner = tmp_path / "copy"
    inner.mkdir()
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert runner._git_commit(inner) is None
    with pytest.raises(ValueError, match="root must be an existing folder"):
        runner._git_commit(tmp_path / "missing")


def test_speedups_compare_throughput_and_a_ratio_target_is_noted():
    rows = [
        {
            "op": "o",
            "shape": "s",
            "dtype": "d",
            "mode": "m",
            "provider": "padded",
            "baseline": "padded",
            "status": "ok",
            "ms": 10.0,
            "tokens_per_s": 100.0,
        },
        {
            "op": "o",
            "shape": "s",
            "dtype": "d",
            "mode": "m",
            "provider": "unpadded",
            "baseline": "padded",
            "status": "ok",
            "ms": 5.5,
            "tokens_per_s": 100.0 * 10 / 5.5,
            "ratio_target": 0.6,
            "note": "n",
        },
        {
            "op": "o",
            "shape": "s",
            "dtype": "d",
            "mode": "m",
            "provider": "packed",
            "baseline": "padded",
            "status": "ok",
            "ms": 20.0,
            "tokens_per_s": 300.0,
        },
    ]  # twice the time, three times the tokens
    runner.add_speedups(rows)
    runner.add_speedups(rows)  # the runner calls it after every case: notes are not repeated
    assert rows[1]["speedup_vs_baseline"] == pytest.approx(10 / 5.5)
    assert rows[2]["speedup_vs_baseline"] == pytest.approx(3.0)
    assert rows[1]["time_ratio"] == pytest.approx(0.55)
    assert rows[1]["ratio_note"] == "time ratio unpadded/padded 0.55 (meets the target <= 0.6)"
    assert runner._notes(rows[1]) == "n; time ratio unpadded/padded 0.55 (meets the target <= 0.6)"
    rows[1]["ms"] = 7.0
    runner.add_speedups(rows)
    assert "0.70 (misses the target <= 0.6)" in rows[1]["ratio_note"]
    assert "ratio_note" not in rows[0] and "ratio_note" not in rows[2]


def test_a_run_stopped_midway_leaves_the_cases_it_measured(tmp_path, monkeypatch):
    """bench.json and bench.md are written before the first case (with the cases the run plans) and rewritten after
    every case: a run stopped from outside (the GPU suite's time limit) still leaves the rows it measured, marked
    incomplete, and which cases it never reached."""
    measured = _stub_bench(monkeypatch, stop_after=2)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        bench_command.main(["--quick", "--no-progress", "--op", "exit_entropy", "--out", str(out)])
    data = json.loads((out / "bench.json").read_text())
    assert data["complete"] is False and [r["key"] for r in data["cases"]] == measured
    assert len(data["planned"]) > len(measured) and data["planned"][:2] == measured
    assert "## exit_entropy" in (out / "bench.md").read_text()
    assert not list(out.glob("*.tmp"))
    # stopped before its first case: the file is there, with every case planned and none measured
    _stub_bench(monkeypatch, stop_after=0)
    with pytest.raises(KeyboardInterrupt):
        bench_command.main(
            ["--quick", "--no-progress", "--op", "exit_entropy", "--out", str(tmp_path / "early")]
        )
    early = json.loads((tmp_path / "early" / "bench.json").read_text())
    assert (
        early["cases"] == []
        and early["planned"] == data["planned"]
        and early["ceilings"] == {"launch_us": 1.0}
    )


def test_op_selects_several_ops_or_families_joined_by_commas():
    import torch

    from effbert.bench.runner import collect_cases

    cpu = torch.device("cpu")
    everything = collect_cases(cpu, True)
    one = {c.op for c in collect_cases(cpu, True, "exit_entropy")}
    family = {c.op for c in collect_cases(cpu, True, "notes")}
    both = collect_cases(cpu, True, "exit_entropy, notes")
    assert one == {"exit_entropy"} and family and "exit_entropy" not in family
    assert {c.op for c in both} == one | family
    assert len(both) == sum(c.op in one | family for c in everything)
    assert collect_cases(cpu, True, "no_such_op,other") == []


def test_index_takes_each_op_from_the_newest_run_that_measured_it(tmp_path):
    """A newer run of a few ops replaces those ops only; the device's other ops keep their latest figures."""
    from pathlib import Path

    from effbert.bench.runner import write_index

    committed = sorted(
        (Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("*/*.json")
    )
    src = json.loads(committed[0].read_text())
    first = src["cases"][0][
        "op"
    ]  # a run of two ops: the committed cases, and the same rows under a second name
    src["cases"] = [c for c in src["cases"] if c["op"] == first]
    src["cases"] += [dict(c, op="second_op") for c in src["cases"]]
    ops = [first, "second_op"]
    old = dict(src, env=dict(src["env"], date="2026-01-01T00:00:00Z"))
    new = dict(
        src,
        env=dict(src["env"], date="2026-02-01T00:00:00Z"),
        cases=[c for c in src["cases"] if c["op"] == ops[0]],
    )
    results = tmp_path / "results"
    for name, run in (("a_old", old), ("b_new", new)):
        (results / name).mkdir(parents=True)
        (results / name / "bench.json").write_text(json.dumps(run))
    text = write_index(results).read_text()
    newer, older = text.split("Source: `results/b_new/bench.json`")
    assert "Source: `results/a_old/bench.json`" in older
    assert f"### {ops[0]}\n" in newer and all(f"### {op}\n" not in newer for op in ops[1:])
    assert f"### {ops[0]}\n" not in older and all(f"### {op}\n" in older for op in ops[1:])
    (
        results / "b_new" / "bench.json"
    ).unlink()  # without the newer run, every op comes from the older one
    again = write_index(results).read_text()
    assert "b_new" not in again and all(f"### {op}\n" in again for op in ops)


def test_index_keeps_the_providers_a_newer_partial_run_did_not_measure(tmp_path):
    """A newer ``--providers`` run of one op replaces its providers' rows only; the older run's other providers
    stay, in the older run's own section."""
    from pathlib import Path

    from effbert.bench.runner import write_index

    committed = sorted(
        (Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("*/*.json")
    )
    src = json.loads(committed[0].read_text())
    op = src["cases"][0]["op"]
    rows = [c for c in src["cases"] if c["op"] == op]
    providers = sorted({c["provider"] for c in rows})
    assert len(providers) >= 2
    old = dict(src, cases=rows, env=dict(src["env"], date="2026-01-01T00:00:00Z"))
    new = dict(
        src,
        cases=[dict(c, ms=c.get("ms")) for c in rows if c["provider"] == providers[0]],
        env=dict(src["env"], date="2026-02-01T00:00:00Z"),
    )
    results = tmp_path / "results"
    for name, run in (("a_old", old), ("b_new", new)):
        (results / name).mkdir(parents=True)
        (results / name / "bench.json").write_text(json.dumps(run))
    newer, older = write_index(results).read_text().split("Source: `results/b_new/bench.json`")
    table = [line for line in newer.splitlines() if line.startswith("| ") and "---" not in line]
    assert {line.split(" | ")[3] for line in table[1:]} == {providers[0]}
    old_table = [line for line in older.splitlines() if line.startswith("| ") and "---" not in line]
    assert {line.split(" | ")[3] for line in old_table[1:]} == set(providers[1:])


def test_a_low_precision_row_is_checked_by_cosine_and_noted():
    import torch

    from effbert.bench import runner
    from effbert.bench.case import Case

    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]])

    def case(out, **kw):
        return Case(
            op="x",
            shape="s",
            dtype="float32",
            mode="forward",
            provider="p",
            fn=lambda: out,
            make_inputs=lambda: (),
            reference=lambda: ref,
            bytes=0,
            flops=0,
            atol=2.0,
            min_cosine=0.99,
            **kw,
        )

    row, step = runner._prepare(case(ref + 0.01), torch.device("cpu"))
    assert (
        step is not None and row["min_cosine"] > 0.99 and row["max_abs_diff"] == pytest.approx(0.01)
    )
    row.update(ms=1.0)
    ceilings = {"copy_GBps": 1.0, "launch_us": 1.0}
    assert (
        "cosine >= 1.0000 per token (>= 0.99)"
        in runner._finish(case(ref + 0.01), row, ceilings)["note"]
    )
    row, step = runner._prepare(case(torch.tensor([[1.0, 1.0], [0.0, 2.0]])), torch.device("cpu"))
    assert step is None and row["status"] == "wrong" and "cosine 0.7071 < 0.99" in row["reason"]


def test_new_result_folder_is_new_named_and_never_reused(tmp_path, monkeypatch):
    """A real-task script's folder: ``<UTC>_CPU_<commit>_<kind>`` under the checkout's
    benchmarks/results, created once; a second run in the same minute, or an ``out`` that exists,
    is refused rather than written into."""
    import re

    from effbert.bench import runner

    monkeypatch.delenv("EFFBERT_COMMIT", raising=False)
    assert runner.short_commit(tmp_path) == "nogit"  # no .git there
    monkeypatch.setenv("EFFBERT_COMMIT", "0123456789abcdef")
    assert runner.short_commit(tmp_path) == "0123456"
    first = runner.new_result_folder("tokee", root=tmp_path)
    assert first.parent == tmp_path / "benchmarks" / "results" and first.is_dir()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d{4}Z_CPU_0123456_tokee", first.name)
    monkeypatch.setattr(runner, "short_commit", lambda root=None: "0123456")
    stamp = first.name.split("_")[0]

    class Frozen(runner._dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return runner._dt.datetime.strptime(stamp, "%Y-%m-%dT%H%MZ").replace(tzinfo=tz)

    monkeypatch.setattr(runner._dt, "datetime", Frozen)
    with pytest.raises(FileExistsError):
        runner.new_result_folder("tokee", root=tmp_path)
    chosen = runner.new_result_folder("tokee", tmp_path / "mine")
    assert chosen == tmp_path / "mine" and chosen.is_dir()
    with pytest.raises(FileExistsError):
        runner.new_result_folder("tokee", tmp_path / "mine")
    for bad in ("", "a/b", "../x", 3):
        with pytest.raises(ValueError, match="kind"):
            runner.new_result_folder(bad, root=tmp_path)
