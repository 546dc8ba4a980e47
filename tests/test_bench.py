"""The benchmark runner on this machine: quick run, files written, a self-compare with no regression."""

import json

import pytest

from effbert.bench import runner
from effbert.commands import bench as bench_command


@pytest.mark.slow
def test_quick_run_writes_results_and_self_compare_is_clean(tmp_path, capsys):
    out = tmp_path / "run"
    assert bench_command.main(["--quick", "--no-progress", "--op", "exit_entropy", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["env"]["torch"] and data["ceilings"]["copy_GBps"] > 0
    ok = [c for c in data["cases"] if c["status"] == "ok"]
    skipped = [c for c in data["cases"] if c["status"] == "skipped"]
    assert ok and all(c["ms"] > 0 and c["rel_error"] <= 1e-4 for c in ok)
    assert all(c["reason"] for c in skipped)  # providers that cannot run say why
    assert "| exit_entropy" not in (out / "bench.md").read_text() or "## exit_entropy" in (out / "bench.md").read_text()
    # Comparing a run with itself finds every case and flags none.
    assert bench_command.main(["--quick", "--no-progress", "--op", "exit_entropy", "--out", str(tmp_path / "again"),
                        "--compare", str(out / "bench.json")]) == 0
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
    # an --out or --compare the run could not use is refused before it measures anything, not after
    (tmp_path / "file").write_text("x")
    (tmp_path / "cut.json").write_text('{"cases": [')
    for argv, message in ((["--out", str(tmp_path / "file")], "exists and is not a folder"),
                          (["--compare", str(tmp_path / "cut.json")], "is not the bench.json of an earlier run")):
        with pytest.raises(SystemExit) as exc:
            bench_command.main(["--op", "exit_entropy", "--quick", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "measuring" not in err


def test_a_spent_budget_skips_the_remaining_cases_but_writes_the_files(tmp_path):
    out = tmp_path / "late"
    assert bench_command.main(["--quick", "--no-progress", "--op", "exit_entropy", "--budget", "1e-9", "--out",
                        str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["cases"]
    assert rows and all(r["status"] == "skipped" and r["reason"] for r in rows)
    assert any("--budget" in r["reason"] for r in rows)
    assert "## exit_entropy" in (out / "bench.md").read_text()


@pytest.mark.slow
def test_plots_speedups_and_time_against_sequence_length(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep"
    assert bench_command.main(["--quick", "--no-progress", "--op", "tupe_attention_seqlen", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    ok = [c for c in data["cases"] if c["status"] == "ok"]
    assert len({c["shape"] for c in ok}) >= 3  # the sweep ran at three lengths at least
    for name in ("speedup_tupe_attention_seqlen.png", "time_vs_seqlen_tupe_attention_seqlen.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000, name


TINY_BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                 max_position_embeddings=16)


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
            labels = torch.where(torch.rand(3, 16, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
            losses.append(trainer(ids, torch.ones(3, 16, dtype=torch.bool), labels, spans, slots, lengths))
        runs[provider] = (torch.stack(losses), trainer.model.notes.notes.clone(), trainer.model.notes.counts.clone())
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
    trainer = train_step._Trainer("effbert-absolute", sizes, torch.device("cpu"), torch.float32, dropout=0.0)
    trainer.build()
    trainer.model.set_backend("eager")
    ids = torch.randint(5, 60, (3, 16))
    labels = torch.where(torch.rand(3, 16) < 0.3, ids, torch.full_like(ids, -100))
    with FlopCounterMode(display=False) as counter:
        trainer(ids, torch.ones(3, 16, dtype=torch.bool), labels, *train_step._tnf_batch(3, 16, 4096, seed=1))
    # the training path runs the MLM head at the labelled positions only
    assert counter.get_total_flops() == train_step.step_flops(sizes, 3, 16, head_rows=int((labels != -100).sum()))
    assert train_step.step_flops(sizes, 3, 16) > train_step.step_flops(sizes, 3, 16, head_rows=5)


@pytest.mark.slow
def test_train_step_reports_tokens_per_second(tmp_path, monkeypatch):
    import torch

    from effbert.bench import train_step

    monkeypatch.setattr(train_step, "_sizes", lambda device, quick: (TINY_BERT, [(2, 16)], torch.float32))
    out = tmp_path / "e2e"
    assert bench_command.main(["--quick", "--no-progress", "--op", train_step.OP, "--out", str(out)]) == 0
    rows = {c["provider"]: c for c in json.loads((out / "bench.json").read_text())["cases"]}
    assert set(rows) == {"effbert", "effbert-absolute", "effbert-eager", "hf-sdpa", "effbert-mcbert"}
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
    done = subprocess.run([sys.executable, "-m", "effbert.commands", "bench", "--quick", "--no-progress",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((out / "bench.json").read_text())["cases"]
    assert {r["status"] for r in rows} <= {"ok", "skipped"}, [r for r in rows if r["status"] not in ("ok", "skipped")]
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
    layers, with FLOPs worked out from the layers actually run."""
    import torch

    from effbert.bench import cpu_inference as bench

    cases = bench.cases(torch.device("cpu"), quick=True)
    assert {c.provider for c in cases} == {"hf-sdpa", "effbert", "effbert-early-exit", "hf-sdpa-patched"}
    assert all(c.op == "cpu_inference" and c.baseline == "hf-sdpa" for c in cases)
    # FLOPs by hand: hidden 64, FFN 128, N 32, one sequence of 32 tokens
    assert bench.layer_flops([32], 64, 128, 32, True) == 2 * 32 * (4 * 64 * 64 + 2 * 64 * 128) + 4 * 32 * 32 * 64
    # real tokens only: 42 tokens' matmuls, 32^2 + 10^2 query-key pairs; padded: 2 x 32 tokens, 2 x 32^2 pairs
    assert bench.layer_flops([32, 10], 64, 128, 32, False) == (2 * 42 * (4 * 64 * 64 + 2 * 64 * 128)
                                                               + 4 * (32 * 32 + 10 * 10) * 64)
    assert bench.layer_flops([32, 10], 64, 128, 32, True) == (2 * 64 * (4 * 64 * 64 + 2 * 64 * 128)
                                                              + 4 * 2 * 32 * 32 * 64)
    # one floor per shape (the real tokens' FLOPs); the padded baseline's own work is more
    for shape in {c.shape for c in cases}:
        group = [c for c in cases if c.shape == shape and not c.provider.startswith("effbert-early-exit")]
        assert len({c.flops for c in group}) == 1, shape
        base = next(c for c in group if c.provider == "hf-sdpa")
        assert (base.work_flops > base.flops) == ("B=1," not in shape)  # B=1: one sequence, no padding
    # inference caches TUPE's positional term (it depends on no input)
    assert all(m.position_encoder.cache for m in (bench._models(True)[1], bench._models(True)[2].bert))
    ids, mask, lengths = bench.make_batch(4, 32, 1000, seed=4)
    assert lengths[0] == 32 and (mask.sum(1) == lengths).all() and (ids[mask == 0] == 0).all()
    for case in cases:
        if case.provider == "hf-sdpa":
            continue
        if case.provider == "hf-sdpa-patched":
            assert case.shape.startswith("all-MiniLM-L6-v2,")
        inputs = case.make_inputs()
        out, ref = case.fn(*inputs), case.reference(*inputs)
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
    exact = row_rates(40.0, 2e9, 10 ** 6, ceilings, "float32")
    assert exact["floor_ms"] == pytest.approx(20.0) and exact["pct_of_floor"] == pytest.approx(50.0)
    assert exact["TFLOPs"] == pytest.approx(2e9 / 40.0 / 1e9) and exact["GBps"] == pytest.approx(1e6 / 40.0 / 1e6)
    # a padded provider doing twice the work in the same time: the same % of floor, twice the FLOP rate
    padded = row_rates(40.0, 2e9, 10 ** 6, ceilings, "float32", work_flops=4e9, work_bytes=3 * 10 ** 6)
    assert padded["pct_of_floor"] == pytest.approx(50.0) and padded["TFLOPs"] == pytest.approx(2 * exact["TFLOPs"])
    assert padded["GBps"] == pytest.approx(3 * exact["GBps"]) and padded["work_flops"] == 4e9
    # a provider at the ceiling on the real work is at 100%, however much padding another computes
    assert row_rates(20.0, 2e9, 10 ** 6, ceilings, "float32")["pct_of_floor"] == pytest.approx(100.0)
    # memory-bound (no FLOPs): the bytes set the floor; tiny: the launch does
    assert row_rates(1.0, 0, 10 ** 7, ceilings, "float32")["floor_ms"] == pytest.approx(0.5)
    assert row_rates(1.0, 0, 10, ceilings, "float32")["floor_ms"] == pytest.approx(0.01)
    assert row_rates(1.0, 0, 10, ceilings, "float32")["TFLOPs"] is None


def _case(op, shape, provider="p"):
    import torch

    from effbert.bench.case import Case

    return Case(op=op, shape=shape, dtype="bfloat16", mode="forward", provider=provider, fn=torch.zeros,
                make_inputs=tuple, reference=torch.zeros, bytes=1, flops=0)


def test_headline_takes_one_shape_per_op_family_and_rest_the_others():
    """--headline: every provider of one BERT-base shape per headline op, the most wanted op first; --rest: the
    other cases; together every case once."""
    cases = [_case("exit_entropy", "B=64,C=2"), _case("exit_entropy", "B=4096,C=30522"),
             _case("tupe_attention", "B=32,N=512,H=12,D=64", "a"), _case("tupe_attention", "B=32,N=512,H=12,D=64", "b"),
             _case("tupe_attention", "B=128,N=128,H=12,D=64"), _case("exit_decision", "R=64,C=2"),
             _case("train_step_padding", "B=128,N=128,real=8192,L=12,Dm=768"),
             _case("train_step_padding", "B=32,N=512,real=8192,L=12,Dm=768", "padded"),
             _case("train_step_padding", "B=32,N=512,real=8192,L=12,Dm=768", "unpadded"),
             _case("mc_sample_fused", "M=16384,V=30522,D=256,K=10")]
    head = runner.select(cases, "headline")
    assert [(c.op, c.shape, c.provider) for c in head] == [
        ("train_step_padding", "B=32,N=512,real=8192,L=12,Dm=768", "padded"),
        ("train_step_padding", "B=32,N=512,real=8192,L=12,Dm=768", "unpadded"),
        ("tupe_attention", "B=32,N=512,H=12,D=64", "a"), ("tupe_attention", "B=32,N=512,H=12,D=64", "b"),
        ("exit_entropy", "B=4096,C=30522", "p"),
        ("mc_sample_fused", "M=16384,V=30522,D=256,K=10", "p")]  # no pattern: the op's first shape
    rest = runner.select(cases, "rest")
    assert sorted(map(id, head + rest)) == sorted(map(id, cases))
    assert {c.op for c in rest} == {"exit_entropy", "tupe_attention", "exit_decision", "train_step_padding"}
    assert runner.select(cases, "all") == cases
    with pytest.raises(ValueError, match="which"):
        runner.select(cases, "most")


def test_speedups_compare_throughput_and_a_ratio_target_is_noted():
    rows = [{"op": "o", "shape": "s", "dtype": "d", "mode": "m", "provider": "padded", "baseline": "padded",
             "status": "ok", "ms": 10.0, "tokens_per_s": 100.0},
            {"op": "o", "shape": "s", "dtype": "d", "mode": "m", "provider": "unpadded", "baseline": "padded",
             "status": "ok", "ms": 5.5, "tokens_per_s": 100.0 * 10 / 5.5, "ratio_target": 0.6, "note": "n"},
            {"op": "o", "shape": "s", "dtype": "d", "mode": "m", "provider": "packed", "baseline": "padded",
             "status": "ok", "ms": 20.0, "tokens_per_s": 300.0}]  # twice the time, three times the tokens
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
    """bench.json and bench.md are rewritten after every case: a run stopped from outside (the GPU suite's time
    limit) still leaves the rows it measured, marked incomplete."""
    measured = []

    def run_case(case, device, ceilings, quick):
        if len(measured) == 2:
            raise KeyboardInterrupt  # what a kill looks like to the run: nothing after this line happens
        measured.append(case.key)
        return {"op": case.op, "shape": case.shape, "dtype": case.dtype, "mode": case.mode, "key": case.key,
                "provider": case.provider, "baseline": case.baseline, "status": "skipped", "reason": "stub"}

    monkeypatch.setattr(bench_command, "run_case", run_case)
    monkeypatch.setattr(bench_command, "measure_ceilings", lambda device, quick: {"launch_us": 1.0})
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        bench_command.main(["--quick", "--no-progress", "--op", "exit_entropy", "--out", str(out)])
    data = json.loads((out / "bench.json").read_text())
    assert data["complete"] is False and [r["key"] for r in data["cases"]] == measured
    assert "## exit_entropy" in (out / "bench.md").read_text()
    assert not list(out.glob("*.tmp"))


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

    committed = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("*/*.json"))
    src = json.loads(committed[0].read_text())
    first = src["cases"][0]["op"]  # a run of two ops: the committed cases, and the same rows under a second name
    src["cases"] = [c for c in src["cases"] if c["op"] == first]
    src["cases"] += [dict(c, op="second_op") for c in src["cases"]]
    ops = [first, "second_op"]
    old = dict(src, env=dict(src["env"], date="2026-01-01T00:00:00Z"))
    new = dict(src, env=dict(src["env"], date="2026-02-01T00:00:00Z"),
               cases=[c for c in src["cases"] if c["op"] == ops[0]])
    results = tmp_path / "results"
    for name, run in (("a_old", old), ("b_new", new)):
        (results / name).mkdir(parents=True)
        (results / name / "bench.json").write_text(json.dumps(run))
    text = write_index(results).read_text()
    newer, older = text.split("Source: `results/b_new/bench.json`")
    assert "Source: `results/a_old/bench.json`" in older
    assert f"### {ops[0]}\n" in newer and all(f"### {op}\n" not in newer for op in ops[1:])
    assert f"### {ops[0]}\n" not in older and all(f"### {op}\n" in older for op in ops[1:])
    (results / "b_new" / "bench.json").unlink()  # without the newer run, every op comes from the older one
    again = write_index(results).read_text()
    assert "b_new" not in again and all(f"### {op}\n" in again for op in ops)
