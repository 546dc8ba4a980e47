"""``effbert demo --quick`` runs to the end through the command line: the loss is recorded, early exit ran at every
threshold with sane numbers, the plot is written where it says, and output that is not a terminal gets lines, not
progress bars."""

import importlib.util
import math
import os

import pytest
import torch

from effbert import commands as cli
from effbert.training import demo


def test_demo_quick_runs_to_the_end(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "MLM loss" in text and "batched early exit" in text and "done in" in text
    # stderr is not a terminal here: periodic lines, no progress bar's carriage returns
    assert "\r" not in captured.out + captured.err and "  step " in text
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: the plot is not written")
    png = tmp_path / "effbert-demo.png"
    assert str(png) in text
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 1000


def test_demo_results(tmp_path):
    res = demo.run(str(tmp_path), quick=True, seed=1, quiet=True)
    sizes = demo.sizes_for(__import__("torch").device("cpu"), True)
    assert len(res["losses"]) == sizes.pretrain_steps and all(
        math.isfinite(x) for x in res["losses"]
    )
    assert 0.0 <= res["full_accuracy"] <= 1.0
    assert len(res["points"]) == 5
    for threshold, avg_exit, speedup, acc in res["points"]:
        assert 1.0 <= avg_exit <= sizes.layers and speedup > 0 and 0.0 <= acc <= 1.0
    # a larger entropy threshold lets samples leave no later
    exits = [p[1] for p in res["points"]]
    assert all(a >= b for a, b in zip(exits, exits[1:]))


def test_toy_corpus_tokenisation_is_consistent():
    sizes = demo.sizes_for(__import__("torch").device("cpu"), True)
    corpus = demo.ToyCorpus(sizes, seed=3)
    cont = corpus.continuation()
    for i in range(sizes.content_words):
        p = corpus.pieces(("c", i))
        assert not cont[p[0]] and all(cont[q] for q in p[1:]) and max(p) < corpus.vocab_size
    pieces = {tuple(corpus.pieces(("c", i))) for i in range(sizes.content_words)}
    assert len(pieces) == sizes.content_words  # one piece sequence per word
    ids, lengths = corpus.encode(corpus.build(20)[0])
    assert (ids[:, 0] == demo.CLS).all() and (ids[range(20), lengths - 1] == demo.SEP).all()


def test_demo_bad_device_or_out_fails_first_in_one_line(tmp_path, capsys):
    import torch

    cases = [(["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: no CUDA device is available"))
    (tmp_path / "file").write_text("x")
    cases.append((["--out", str(tmp_path / "file")], "exists and is not a folder"))
    for argv, message in cases:
        assert cli.main(["demo", "--quick", *argv]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert (
            len(lines) == 1 and lines[0].startswith("effbert demo: error:") and message in lines[0]
        ), lines
        assert "MLM" not in captured.out  # nothing ran


def _fake_demo_eval(monkeypatch, early_costs, early_layer=3, depth=6, n=40, classes=4):
    """demo.evaluate on fixed exit logits, each pass charged a set cost on a fake clock: a full-depth pass 1.0 s,
    the early-exit passes ``early_costs`` in turn."""
    import types

    from effbert import calibration
    from effbert.bench import timing

    gen = torch.Generator().manual_seed(0)
    exits = torch.randn(depth, n, classes, generator=gen)
    now, costs, order = [0.0], iter(early_costs), []

    def model(ids, mask):
        return types.SimpleNamespace(exit_logits=exits[:, : ids.shape[0]])

    def run(model, ids, lengths, batch, device, criterion, threshold):
        order.append("full" if threshold == 0.0 else "early")
        now[0] += 1.0 if threshold == 0.0 else next(costs)
        return exits[-1, : ids.shape[0]], torch.full(
            (ids.shape[0],), depth if threshold == 0.0 else early_layer
        )

    monkeypatch.setattr(calibration, "run_early_exit", run)
    monkeypatch.setattr(
        timing,
        "time",
        types.SimpleNamespace(perf_counter=lambda: now[0], process_time=lambda: now[0]),
    )
    monkeypatch.setattr(demo, "TIMING_ROUNDS", 3)
    lines = []
    _, points, _ = demo.evaluate(
        model,
        torch.ones(n, 8, dtype=torch.long),
        torch.full((n,), 8),
        torch.randint(0, classes, (n,), generator=gen),
        types.SimpleNamespace(layers=depth),
        torch.device("cpu"),
        lines.append,
    )
    return points, lines, order


def test_demo_speedup_is_the_median_of_interleaved_pairs(monkeypatch):
    """Each threshold's speed-up is the median of TIMING_ROUNDS full-depth / early-exit pairs, the order alternating,
    so one pass slowed by another job on a shared CPU does not decide the printed figure."""
    points, lines, order = _fake_demo_eval(monkeypatch, [0.5, 10.0, 0.5] * 5)
    assert len(points) == 5 and all(p[2] == 2.0 for p in points), points
    assert order[2:8] == ["full", "early", "early", "full", "full", "early"], (
        order
    )  # after the two untimed passes
    assert any("median of 3 interleaved pairs" in line for line in lines)
    assert not any(line.lstrip().startswith("*") for line in lines), (
        "2.0x at 3 of 6 layers is within the bound"
    )


def test_demo_flags_a_speedup_above_the_layers_bound(monkeypatch):
    """3 of 6 layers can give at most 2x: a measured 4x is marked as noise, with the footnote that says why."""
    points, lines, _ = _fake_demo_eval(monkeypatch, [0.25] * 15)
    assert all(p[2] == 4.0 for p in points)
    rows = [line for line in lines if "4.00x" in line]
    assert len(rows) == 5 and all(row.rstrip().endswith("*") for row in rows), rows
    assert any("above the bound the layers set" in line for line in lines)


def test_demo_warns_of_off_ramps_at_chance(monkeypatch):
    """Random exit logits on 4 classes: the off-ramps do no better than the majority class, and the demo says so."""
    _, lines, _ = _fake_demo_eval(monkeypatch, [0.5] * 15)
    assert any("at chance" in line for line in lines), lines


def test_thresholds_print_with_the_digits_that_tell_them_apart():
    """Thresholds that agree to 5 significant digits (the entropies of off-ramps near chance) print
    with as many digits as it takes to differ; patiences print as integers."""
    from effbert.calibration import threshold_texts

    close = [1.0986122886681098, 1.0986123, 1.09861235, 0.5]
    texts = threshold_texts(close, "entropy")
    assert texts == ["1.09861229", "1.0986123", "1.09861235", "0.5"]
    assert [float(t) for t in texts] == pytest.approx(close, rel=1e-7)
    assert threshold_texts([3, 2, 1], "patience") == ["3", "2", "1"]
    assert threshold_texts([0.25, 0.5], "max_prob") == ["0.25", "0.5"]


def test_demo_prints_distinct_thresholds(tmp_path, capsys):
    """The quick demo's table has one row a threshold, each printed as a different number."""
    res = demo.run(str(tmp_path), quick=True, seed=0, quiet=True)
    text = capsys.readouterr().out
    table = text[text.index("batched early exit") :].splitlines()[2:]
    printed = [line.split()[0] for line in table[1 : 1 + len(res["points"])]]
    assert table[0].split()[0] == "full" and len(printed) == len(res["points"])
    assert len(set(printed)) == len({p[0] for p in res["points"]}), printed
