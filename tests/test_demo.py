"""``effbert demo --quick`` runs to the end through the command line: the loss is recorded, early exit ran at every
threshold with sane numbers, the plot is written where it says, and output that is not a terminal gets lines, not
progress bars."""

import importlib.util
import math
import os

import pytest

from effbert import commands as cli
from effbert.commands import demo


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
    assert len(res["losses"]) == sizes.pretrain_steps and all(math.isfinite(x) for x in res["losses"])
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
        assert len(lines) == 1 and lines[0].startswith("effbert demo: error:") and message in lines[0], lines
        assert "MLM" not in captured.out  # nothing ran


def test_demo_speedup_is_the_median_of_back_to_back_pairs(monkeypatch):
    """Each threshold's speed-up is the median of TIMING_ROUNDS full-depth / early-exit pairs timed back to back, so
    one pass slowed by another job on a shared CPU does not decide the printed figure."""
    import types

    import torch

    depth, n, classes = 6, 40, 4
    gen = torch.Generator().manual_seed(0)
    exits = torch.randn(depth, n, classes, generator=gen)

    def model(ids, mask):
        return types.SimpleNamespace(exit_logits=exits[:, :ids.shape[0]])

    slow = iter([0.5, 10.0, 0.5] * 10)  # the second early-exit pass of every threshold hits a load spike

    def timed(model, ids, lengths, batch, device, criterion, threshold):
        layers = torch.full((ids.shape[0],), depth if threshold == 0.0 else 3)
        return exits[-1, :ids.shape[0]], layers, 1.0 if threshold == 0.0 else next(slow)

    monkeypatch.setattr(demo, "_timed_early_exit", timed)
    monkeypatch.setattr(demo, "TIMING_ROUNDS", 3)
    sizes = types.SimpleNamespace(layers=depth)
    lines = []
    _, points, _ = demo.evaluate(model, torch.ones(n, 8, dtype=torch.long), torch.full((n,), 8),
                                 torch.randint(0, classes, (n,), generator=gen), sizes, torch.device("cpu"),
                                 lines.append)
    assert len(points) == 5 and all(p[2] == 2.0 for p in points), points
    assert any("median of 3 pairs" in line for line in lines)
