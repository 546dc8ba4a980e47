"""The benchmark runner on this machine: quick run, files written, a self-compare with no regression."""

import json

import pytest

from effbert.bench import runner


@pytest.mark.slow
def test_quick_run_writes_results_and_self_compare_is_clean(tmp_path, capsys):
    out = tmp_path / "run"
    assert runner.main(["--quick", "--no-progress", "--op", "exit_entropy", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["env"]["torch"] and data["ceilings"]["copy_GBps"] > 0
    ok = [c for c in data["cases"] if c["status"] == "ok"]
    skipped = [c for c in data["cases"] if c["status"] == "skipped"]
    assert ok and all(c["ms"] > 0 and c["rel_error"] <= 1e-4 for c in ok)
    assert all(c["reason"] for c in skipped)  # providers that cannot run say why
    assert "| exit_entropy" not in (out / "bench.md").read_text() or "## exit_entropy" in (out / "bench.md").read_text()
    # Comparing a run with itself finds every case and flags none.
    assert runner.main(["--quick", "--no-progress", "--op", "exit_entropy", "--out", str(tmp_path / "again"),
                        "--compare", str(out / "bench.json")]) == 0
    again = json.loads((tmp_path / "again" / "bench.json").read_text())
    matched = again["compare"]["cases"]
    assert len(matched) == len(ok)
    self_cmp = runner.compare(data["cases"], out / "bench.json")
    assert self_cmp and not any(c["regression"] for c in self_cmp)
    assert all(c["ratio"] == 1.0 for c in self_cmp)


def test_bad_arguments_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        runner.main(["--compare", str(tmp_path / "missing.json")])
    assert "--compare" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main(["--op", "no_such_op", "--out", str(tmp_path)])


@pytest.mark.slow
def test_plots_speedups_and_time_against_sequence_length(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep"
    assert runner.main(["--quick", "--no-progress", "--op", "tupe_attention_seqlen", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    ok = [c for c in data["cases"] if c["status"] == "ok"]
    assert len({c["shape"] for c in ok}) >= 3  # the sweep ran at three lengths at least
    for name in ("speedup_tupe_attention_seqlen.png", "time_vs_seqlen_tupe_attention_seqlen.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000, name
