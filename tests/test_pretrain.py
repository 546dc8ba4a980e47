"""``effbert pretrain`` over ``transformers.Trainer``: trains on real text and writes a ``save_pretrained`` folder
that ``AutoModel`` loads; stopping and resuming gives bitwise the run that did not stop; ``load_pretrained`` gives the
model back; no carriage return reaches a log file; user errors exit with 2 and one line, before any file is
written; two gloo ranks under torchrun keep identical parameters and notes. ``effbert.training.PretrainingTrainer``:
the loss over an accumulated step equals the loss of the whole batch, and docs/pretrain.md's Trainer example runs."""

import collections
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from effbert import commands as cli
from effbert.commands import pretrain
from effbert.models import load_pretrained
from effbert.training import pretrain as train_pretrain
from effbert.training.run_folder import checkpoints

pytestmark = pytest.mark.requires("datasets", "accelerate")  # corpora and Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = [
    "--layers",
    "2",
    "--hidden",
    "32",
    "--heads",
    "2",
    "--max-seq-length",
    "24",
    "--batch-size",
    "8",
    "--learning-rate",
    "2e-3",
    "--backend",
    "eager",
    "--device",
    "cpu",
    "--quiet",
]
TNF = ["--tnf-min-count", "3", "--tnf-max-count", "100"]


def _real_text(path, lines=400):
    """Sentences of this machine's licence texts: real prose, not generated (Python's docs as a fallback)."""
    import glob

    files = sorted(glob.glob("/usr/share/common-licenses/*"))
    text = " ".join(
        open(f, encoding="utf-8", errors="ignore").read() for f in files if os.path.isfile(f)
    )
    if len(text) < 50000:
        text += " ".join(
            m.__doc__ or "" for m in (os, re, json, collections, subprocess, pytest, torch)
        )
    sentences = [
        s.strip()
        for s in re.split(r"(?<=[.;:])\s+", re.sub(r"\s+", " ", text))
        if len(s.split()) >= 4
    ]
    path.write_text("\n".join(sentences[:lines]) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The corpus, a WordPiece tokenizer trained on it once (so runs compare on the same ids), a datasets cache."""
    from effbert.data.tokenization import train_wordpiece

    root = tmp_path_factory.mktemp("data")
    corpus = _real_text(root / "corpus.txt")
    tok = train_wordpiece([corpus], vocab_size=300)
    tok.save_pretrained(root / "tok")
    return {
        "corpus": corpus,
        "tok": str(root / "tok" / "tokenizer.json"),
        "cache": str(root / "cache"),
    }


def _args(files, out, *extra, tnf=True):
    return [
        "--data",
        files["corpus"],
        "--vocab",
        files["tok"],
        "--cache-dir",
        files["cache"],
        "--out",
        str(out),
        *MODEL,
        *(TNF if tnf else []),
        *extra,
    ]


def _run(args):
    assert pretrain.main(args) == 0


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _error(capsys, args, match):
    code = pretrain.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and match in err, err
    return err


def test_trains_on_real_text_and_writes_a_save_pretrained_folder(tmp_path, files, capsys):
    from transformers import AutoModel, AutoModelForMaskedLM

    from effbert.models import TupeBertForMaskedLM, TupeBertModel

    out = tmp_path / "run"
    _run(
        _args(
            files,
            out,
            "--max-steps",
            "30",
            "--logging-steps",
            "10",
            "--save-steps",
            "10",
            "--dump-state",
            str(tmp_path / "s.pt"),
        )
    )
    text = capsys.readouterr().out
    assert (
        re.search(r"TNF notes for \d+ rare words \(the words seen 3 to 100 times", text)
        and "step      30" in text
    )
    assert re.search(
        r"packed \d+ rows \(fill \d+\.\d%, \d+\.\d% unpacked\)", text
    )  # packing is the default
    names = set(os.listdir(out))
    assert {
        "checkpoints",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "log.jsonl",
        "pretrain.json",
        "rare_words.txt",
        "report.json",
    } <= names
    assert sorted(os.listdir(out / "checkpoints")) == [
        "checkpoint-20",
        "checkpoint-30",
    ]  # the last two are kept
    assert {
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "tokenizer.json",
    } <= set(os.listdir(out / "checkpoints" / "checkpoint-30"))
    log = _log(out)
    assert [r["step"] for r in log] == [10, 20, 30]
    assert log[-1]["loss"] < log[0]["loss"] - 0.1  # it learns (means over 10 steps each)
    assert 0 < log[-1]["notes_taken"] <= len((out / "rare_words.txt").read_text().split())
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 30 and report["last_loss"] == log[-1]["loss"]
    assert 0 < report["unpacked_fill_rate"] <= report["fill_rate"] <= 1
    assert json.loads((out / "pretrain.json").read_text())["settings"]["pack"] is True
    # the folder is a transformers checkpoint: the Auto classes load it (after import effbert), notes included
    state = torch.load(tmp_path / "s.pt")
    mlm = AutoModelForMaskedLM.from_pretrained(out)
    assert isinstance(mlm, TupeBertForMaskedLM)
    _same(mlm.state_dict(), state)
    base = AutoModel.from_pretrained(out)
    assert isinstance(base, TupeBertModel)
    assert all(
        torch.equal(v, state["bert." + k])
        for k, v in base.state_dict().items()
        if "pooler" not in k
    )


def test_resume_equals_not_stopping(tmp_path, files):
    """4 steps in one go == 2 steps, a stop, --resume, 2 more: parameters and notes bitwise, the log continued."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _run(
        _args(
            files,
            whole,
            "--max-steps",
            "4",
            "--save-steps",
            "2",
            "--logging-steps",
            "1",
            "--dump-state",
            str(tmp_path / "whole.pt"),
        )
    )
    _run(_args(files, parts, "--max-steps", "4", "--save-steps", "2", "--logging-steps", "1"))
    # the run stopped after step 2 (and logged step 3 before dying): what it wrote after that is gone
    import shutil

    shutil.rmtree(parts / "checkpoints" / "checkpoint-4")
    os.remove(parts / "model.safetensors")
    _run(
        _args(
            files,
            parts,
            "--max-steps",
            "4",
            "--save-steps",
            "2",
            "--logging-steps",
            "1",
            "--resume",
            "--dump-state",
            str(tmp_path / "parts.pt"),
        )
    )
    a, b = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "parts.pt")
    _same(a, b)
    assert int((a["notes.counts"] > 0).sum()) > 0 and float(a["notes.notes"].abs().sum()) > 0
    assert [r["step"] for r in _log(parts)] == [1, 2, 3, 4]
    assert [r["loss"] for r in _log(parts)] == [r["loss"] for r in _log(whole)]


def test_load_pretrained(tmp_path, files):
    from effbert.models import TupeBertConfig, TupeBertForSequenceClassification

    out = tmp_path / "run"
    _run(_args(files, out, "--max-steps", "3", "--dump-state", str(tmp_path / "s.pt")))
    model, tok, table = load_pretrained(out, backend="eager")
    _same(model.state_dict(), torch.load(tmp_path / "s.pt"))
    assert not model.training and model.config.vocab_size == len(tok) <= 300
    assert table.words == (out / "rare_words.txt").read_text().split()
    assert model.notes.num_slots == len(table) and model.notes.window == 16
    word = table.words[0]
    enc = tok([f"the {word} is here.", "a licence"], padding=True, return_tensors="pt")
    spans, slots = table.find(enc["input_ids"], enc["attention_mask"].sum(1))
    assert spans[:, 3].tolist() == [table.slot_of[word]]
    with torch.no_grad():
        logits = model(enc["input_ids"], enc["attention_mask"], note_slots=slots).logits
    assert logits.shape == (2, enc["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()
    # what effbert finetune does: the encoder weights into a classification model
    clf = TupeBertForSequenceClassification(
        TupeBertConfig.from_dict({**model.config.to_dict(), "multi_exit": True, "num_labels": 3})
    )
    clf.bert.load_state_dict(model.bert.state_dict())
    # an unfinished run loads from its latest checkpoint
    os.remove(out / "model.safetensors")
    again, _, _ = load_pretrained(out)
    _same(again.state_dict(), model.state_dict())
    with pytest.raises(FileNotFoundError, match="path"):
        load_pretrained(tmp_path / "nothing")


def test_a_log_file_gets_lines_not_carriage_returns(tmp_path, files):
    """stdout and stderr to files (not a terminal): no progress bar, one line per logged step."""
    out = tmp_path / "run"
    args = [
        a
        for a in _args(files, out, "--max-steps", "4", "--logging-steps", "2", "--save-steps", "2")
        if a != "--quiet"
    ]
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.run(
            [sys.executable, "-m", "effbert.commands", "pretrain", *args],
            stdout=so,
            stderr=se,
            timeout=600,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
    text = (tmp_path / "stdout").read_text() + (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    assert len(re.findall(r"^  step +\d+  loss", text, re.M)) == 2


def test_bad_corpus_and_tokenizer_files_exit_2_and_write_nothing(tmp_path, files, capsys):
    out = tmp_path / "run"
    base = ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), *MODEL, "--max-steps", "2"]
    cases = {
        "missing.txt": None,
        "empty.txt": b"",
        "blank.txt": b"\n   \n\n",
        "latin1.txt": "caf\xe9 cr\xe8me\n".encode("latin-1"),
        "binary.bin": b"\x00\x01\x02ELF\x00" * 50,
        "long.txt": b"word " * 300_000,
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        err = _error(
            capsys, ["--data", str(tmp_path / name), "--vocab-size", "100", *base], "--data:"
        )
        assert name in err
        err = _error(
            capsys, ["--data", str(tmp_path / name), "--vocab", files["tok"], *base], "--data:"
        )
        assert name in err
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    _error(
        capsys,
        ["--data", files["corpus"], "--vocab", str(tmp_path / "tokenizer.json"), *base],
        "--vocab:",
    )
    (tmp_path / "nospecials.txt").write_text("a\nb\nc\n")
    _error(
        capsys,
        ["--data", files["corpus"], "--vocab", str(tmp_path / "nospecials.txt"), *base],
        "--vocab:",
    )
    assert not out.exists()


def test_user_errors(tmp_path, files, capsys):
    out = tmp_path / "run"
    base = _args(files, out, "--max-steps", "2")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"vocab_size": 99, "hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
        )
    )
    cfg = [
        "--data",
        files["corpus"],
        "--vocab",
        files["tok"],
        "--cache-dir",
        files["cache"],
        "--out",
        str(out),
        "--config",
        str(tmp_path / "config.json"),
        "--max-steps",
        "1",
        "--backend",
        "eager",
    ]
    _error(capsys, cfg, "vocab/config mismatch")
    _error(capsys, [*cfg, "--layers", "2"], "give --config or the model size flags")
    (tmp_path / "bad.json").write_text("{nope")
    _error(capsys, [*cfg[:-6], "--config", str(tmp_path / "bad.json")], "is not JSON")
    _error(capsys, [*base, "--heads", "3"], "multiple of num_attention_heads")
    _error(capsys, [*base, "--tnf-min-count", "50", "--tnf-max-count", "10"], "--tnf-min-count")
    _error(
        capsys,
        [*base, "--batch-size", "6", "--gradient-accumulation-steps", "4"],
        "--batch-size (6) must be a multiple",
    )
    _error(capsys, [*base, "--vocab-size", "300"], "give --vocab or --vocab-size, not both")
    _error(capsys, [*base, "--fp16"], "--fp16 needs --device cuda")
    _error(capsys, [*base, "--resume"], "nothing to resume")
    _error(capsys, [*base, "--backend", "fastest"], "--backend must be auto or one of")
    _error(capsys, [*base, "--max-steps", "0"], "--max-steps must be >= 1")
    assert not out.exists()
    _run(base)
    capsys.readouterr()
    _error(capsys, base, "already holds a run")
    _error(
        capsys,
        [*base, "--resume", "--layers", "3"],
        "--resume with different flags than the run in --out: --layers 2 -> 3",
    )
    _error(capsys, [*base, "--resume", "--no-tnf"], "--tnf True -> False")
    _error(capsys, [*base, "--resume", "--learning-rate", "1e-3"], "--learning-rate 0.002 -> 0.001")
    _error(
        capsys, [*base, "--resume", "--max-steps", "1"], "--max-steps 1 is below the step the run"
    )
    assert pretrain.main([*base, "--bogus"]) == 2  # argparse's own message


def test_command_line_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "effbert.commands",
            "pretrain",
            "--data",
            str(tmp_path / "none.txt"),
            "--out",
            str(tmp_path / "o"),
            "--vocab-size",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("effbert pretrain: error: --data:")
        and "none.txt" in lines[0]
    )
    assert not (tmp_path / "o").exists()


def _gloo_available():
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is not available")
def test_torchrun_two_cpu_ranks(tmp_path, files):
    """3 steps on 2 gloo ranks under Trainer's DDP: identical parameters and notes on both ranks, notes taken on
    both ranks' batches (every rank applies every rank's spans), one log, one set of files."""
    out = tmp_path / "ddp"
    args = _args(
        files,
        out,
        "--max-steps",
        "3",
        "--dropout",
        "0",
        "--logging-steps",
        "1",
        "--save-steps",
        "3",
        "--dump-state",
        str(tmp_path / "ddp.pt"),
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "effbert.commands",
            "pretrain",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("pretraining a 2-layer") == 1  # only rank 0 prints
    assert "on 2 x cpu" in proc.stdout
    r0, r1 = torch.load(tmp_path / "ddp.pt.rank0"), torch.load(tmp_path / "ddp.pt.rank1")
    _same(r0, r1)
    taken = r0["notes.counts"] > 0
    assert 0 < int(taken.sum()) and float(r0["notes.notes"][taken].abs().min()) > 0
    assert [r["step"] for r in _log(out)] == [1, 2, 3]
    saved = load_pretrained(out)[0].state_dict()
    _same(saved, r0)
    # the notes count every rank's spans: more updates than one rank's batches alone would give
    one = tmp_path / "one"
    _run(
        _args(
            files,
            one,
            "--max-steps",
            "3",
            "--dropout",
            "0",
            "--batch-size",
            "4",
            "--dump-state",
            str(tmp_path / "one.pt"),
        )
    )
    assert int(r0["notes.counts"].sum()) > int(
        torch.load(tmp_path / "one.pt")["notes.counts"].sum()
    )


def test_config_file_no_tnf_no_word_in_band_and_resume(tmp_path, files, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 40,
                "max_position_embeddings": 20,
                "position_mode": "tupe-a",
            }
        )
    )
    out = tmp_path / "run"
    base = [
        "--data",
        files["corpus"],
        "--vocab",
        files["tok"],
        "--cache-dir",
        files["cache"],
        "--out",
        str(out),
        "--backend",
        "eager",
        "--quiet",
        "--batch-size",
        "4",
        "--save-steps",
        "2",
        "--config",
        str(cfg),
    ]
    _run([*base, "--no-tnf", "--no-pack", "--max-steps", "2"])
    assert [r["step"] for r in _log(out)] == [
        2
    ]  # the last step is logged even off the --logging-steps grid
    settings = json.loads((out / "pretrain.json").read_text())["settings"]
    assert (
        settings["tnf"] is False
        and settings["pack"] is False
        and not (out / "rare_words.txt").exists()
    )
    assert "fill_rate" not in json.loads((out / "report.json").read_text())
    _run(
        [*base, "--resume", "--max-steps", "3", "--bf16"]
    )  # Trainer's bf16 autocast, on the CPU too
    assert all(r["loss"] == r["loss"] for r in _log(out)) and _log(out)[-1]["step"] == 3
    model, tok, table = load_pretrained(out)
    assert table is None and model.notes is None and model.config.position_mode == "tupe-a"
    assert model.config.intermediate_size == 40 and model.config.max_position_embeddings == 20
    assert [os.path.basename(p) for p in checkpoints(out / "checkpoints")] == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    # a band no word falls in: the run says so and trains without notes
    capsys.readouterr()
    _run(
        _args(
            files,
            tmp_path / "band",
            "--max-steps",
            "1",
            "--tnf-min-count",
            "5000",
            "--tnf-max-count",
            "9000",
        )
    )
    assert "training without TNF notes" in capsys.readouterr().out
    assert load_pretrained(tmp_path / "band")[0].notes is None


@pytest.mark.parametrize(
    "save_every,message,kept",
    [
        ("1", "non-finite weights after step 5", ["checkpoint-3", "checkpoint-4"]),
        ("0", "the loss is nan at step 6", []),
    ],
)
def test_nan_stops_the_run_and_keeps_the_good_checkpoints(
    tmp_path, files, capsys, monkeypatch, save_every, message, kept
):
    from safetensors.torch import load_file

    real_step = torch.optim.AdamW.step
    calls = []

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5:  # the weights go bad in step 5, so the loss of step 6 is NaN
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    _error(capsys, _args(files, out, "--max-steps", "8", "--save-steps", save_every), message)
    assert sorted(os.listdir(out / "checkpoints") if kept else []) == kept
    assert not (out / "model.safetensors").exists()
    for name in kept:
        state = load_file(out / "checkpoints" / name / "model.safetensors")
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_damaged_run_folders_and_foreign_checkpoints_exit_2(tmp_path, files, capsys):
    """A checkpoint of another model type, a truncated or foreign weights file and a damaged run folder are
    one-line errors naming the file."""
    import shutil

    from safetensors.torch import load_file, save_file

    good = tmp_path / "good"
    _run(_args(files, good, "--max-steps", "2", "--save-steps", "1"))
    capsys.readouterr()

    def damaged(name, edit):
        out = tmp_path / name
        shutil.copytree(good, out)
        os.remove(out / "model.safetensors")
        edit(out)
        return _args(files, out, "--max-steps", "3", "--resume")

    ck = os.path.join("checkpoints", "checkpoint-2")

    def other_type(o):
        values = json.loads((o / ck / "config.json").read_text())
        (o / ck / "config.json").write_text(json.dumps({**values, "model_type": "bert"}))

    _error(capsys, damaged("bert", other_type), "is a model of type 'bert', not 'tupe-bert'")
    truncated = damaged(
        "truncated",
        lambda o: (o / ck / "model.safetensors").write_bytes(
            (o / ck / "model.safetensors").read_bytes()[:500]
        ),
    )
    _error(capsys, truncated, "cannot read")
    foreign = damaged(
        "foreign", lambda o: save_file({"x": torch.ones(2)}, o / ck / "model.safetensors")
    )
    _error(capsys, foreign, "does not fit the run")

    def nan_weights(o):
        state = load_file(o / ck / "model.safetensors")
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name].fill_(float("nan"))
        save_file(state, o / ck / "model.safetensors")

    _error(capsys, damaged("nan", nan_weights), "holds non-finite weights")
    _error(
        capsys, damaged("run-file", lambda o: (o / "pretrain.json").write_text("{cut")), "damaged"
    )
    _error(
        capsys,
        damaged("no-settings", lambda o: (o / "pretrain.json").write_text("[]")),
        "not the run file",
    )
    _error(capsys, damaged("no-vocab", lambda o: os.remove(o / "tokenizer.json")), "tokenizer")
    _error(capsys, damaged("no-rare", lambda o: os.remove(o / "rare_words.txt")), "rare_words.txt")
    # Trainer writes trainer_state.json last: a checkpoint without it is a save cut short, skipped (and named)
    _run(damaged("no-state", lambda o: os.remove(o / ck / "trainer_state.json")))
    text = capsys.readouterr().out
    assert (
        "skipping incomplete checkpoint-2 (no trainer_state.json)" in text
        and "resuming from step 1" in text
    )
    with pytest.raises(ValueError, match="not 'tupe-bert'"):
        load_pretrained(tmp_path / "bert")


def test_bad_devices_sizes_and_folders_fail_first(tmp_path, files, capsys):
    out = tmp_path / "run"
    base = _args(files, out, "--max-steps", "2")
    _error(capsys, [*base, "--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'")
    if not torch.cuda.is_available():
        _error(capsys, [*base, "--device", "cuda"], "--device cuda: no CUDA device is available")
        _error(capsys, [*base, "--backend", "cuda"], "--backend cuda cannot run here")
    _error(capsys, [*base, "--max-seq-length", "100000"], "--max-seq-length must be <= 8192")
    assert not out.exists()  # nothing half-made blocks the retry
    (tmp_path / "file").write_text("x")
    _error(capsys, _args(files, tmp_path / "file" / "run", "--max-steps", "2"), "is a file")
    # a folder holding another command's output is never overwritten
    other = tmp_path / "finetuned"
    other.mkdir()
    for name in ("config.json", "model.safetensors", "finetune.json"):
        (other / name).write_text("theirs")
    _error(capsys, _args(files, other, "--max-steps", "2"), "no pretrain.json")
    assert all(
        (other / n).read_text() == "theirs"
        for n in ("config.json", "model.safetensors", "finetune.json")
    )


def test_a_model_too_big_for_memory_leaves_no_folder(tmp_path, files, capsys, monkeypatch):
    """The model is built before any file is written: an allocation failure is one line and the retry is free."""
    import effbert.models

    def too_big(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 80000000000 bytes"
        )

    monkeypatch.setattr(effbert.models, "TupeBertForMaskedLM", too_big)
    out = tmp_path / "run"
    _error(capsys, _args(files, out, "--max-steps", "2"), "does not fit in memory on cpu")
    assert not out.exists()


def test_the_rare_word_band_defaults_to_the_papers_100_to_500(tmp_path, files, capsys):
    """TNF (Wu et al., ICLR 2021) takes notes for words seen 100 to 500 times; the command says how many fell in."""
    from effbert.data.corpus import count_words, load_corpus
    from effbert.data.tokenization import load_tokenizer

    assert (
        train_pretrain.MODEL_DEFAULTS["tnf_min_count"] == 100
        and train_pretrain.MODEL_DEFAULTS["tnf_max_count"] == 500
    )
    out = tmp_path / "run"
    assert cli.main(["pretrain", *_args(files, out, "--max-steps", "1", tnf=False)]) == 0
    tok = load_tokenizer(files["tok"])
    counts = count_words(load_corpus([files["corpus"]], tok, 24, cache_dir=files["cache"]), tok)
    want = {
        w
        for w, c in counts.items()
        if 100 <= c <= 500
        and any(ch.isalnum() for ch in w)
        and tok.unk_token_id not in tok.encode(w, add_special_tokens=False)
    }
    got = (out / "rare_words.txt").read_text().split()
    assert want and set(got) == want
    assert (
        f"TNF notes for {len(got)} rare words (the words seen 100 to 500 times in the corpus)"
        in capsys.readouterr().out
    )


# ------------------------------------------------------------------------------------ effbert.training itself


def _tiny_mlm(notes=False, seed=0):
    from effbert.models import TupeBertConfig, TupeBertForMaskedLM
    from effbert.nn import NoteDictionary

    torch.manual_seed(seed)
    cfg = TupeBertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        backend="eager",
    )
    return TupeBertForMaskedLM(cfg, note_dictionary=NoteDictionary(3, 16) if notes else None)


def _fixed_rows(n=8, seed=1):
    """Rows whose masking is a function of the row alone, so any batching sees the same targets."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(5, 40, (length,), generator=g)
        target = torch.rand(length, generator=g) < (
            0.1 + 0.5 * torch.rand(1, generator=g)
        )  # uneven target counts
        target[1] = True
        rows.append({"ids": ids, "labels": torch.where(target, ids, -100)})
    return rows


def _collate(rows):
    n = max(len(r["ids"]) for r in rows)
    batch = {
        k: torch.full((len(rows), n), fill, dtype=torch.int64)
        for k, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100))
    }
    for i, r in enumerate(rows):
        k = len(r["ids"])
        batch["input_ids"][i, :k] = torch.where(r["labels"] >= 0, 4, r["ids"])
        batch["attention_mask"][i, :k] = 1
        batch["labels"][i, :k] = r["labels"]
    return batch


def _train_once(tmp_path, batch, accum, make=_tiny_mlm):
    from transformers import TrainingArguments

    from effbert.training import PretrainingTrainer

    model = make()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"o{batch}x{accum}"),
        max_steps=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        remove_unused_columns=False,
    )
    rows = _fixed_rows()
    trainer = PretrainingTrainer(model=model, args=args, train_dataset=rows, data_collator=_collate)
    trainer.get_train_dataloader = lambda: torch.utils.data.DataLoader(
        rows, batch_size=batch, collate_fn=_collate
    )
    trainer.train()
    return model, trainer.state.log_history[0]["loss"]


def test_accumulated_step_equals_the_whole_batch(tmp_path):
    """The masked-LM loss of a step is the mean over all its targets: 4 micro-batches of 2 rows (uneven target
    counts) give the loss and the update of one batch of 8, within fp32 rounding (plain SGD at lr 1, so the update
    is the gradient itself; Adam would blow up rounding noise, such as the [CLS] scalars' gradient, to full steps)."""
    whole, loss_whole = _train_once(tmp_path, 8, 1)
    accum, loss_accum = _train_once(tmp_path, 2, 4)
    model = _tiny_mlm()
    batch = _collate(_fixed_rows())
    with torch.no_grad():
        assert loss_whole == pytest.approx(float(model(**batch).loss), rel=1e-6)
    assert loss_accum == pytest.approx(loss_whole, rel=1e-5)
    for (name, a), b in zip(whole.named_parameters(), accum.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
    assert not torch.equal(whole.mlm_head.dense.weight, model.mlm_head.dense.weight)  # it did step


def test_weight_decay_spares_biases_norms_and_cls_scalars():
    from transformers import TrainingArguments

    from effbert.training import PretrainingTrainer

    model = _tiny_mlm()
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    names = set(PretrainingTrainer(model=model, args=args).get_decay_parameter_names(model))
    assert "bert.embeddings.word_embeddings.weight" in names and "mlm_head.dense.weight" in names
    assert not [n for n in names if n.endswith("bias") or "norm" in n or "cls_" in n]


def test_non_finite_loss_raises_at_its_step(tmp_path):
    from transformers import TrainingArguments

    from effbert.training import NonFiniteError, PretrainingTrainer

    model = _tiny_mlm()
    with torch.no_grad():
        model.mlm_head.bias.fill_(float("inf"))
    args = TrainingArguments(
        output_dir=str(tmp_path / "o"),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
    )
    trainer = PretrainingTrainer(
        model=model, args=args, train_dataset=_fixed_rows(), data_collator=_collate
    )
    with pytest.raises(NonFiniteError, match="at step 1") as info:
        trainer.train()
    assert info.value.step == 1
    with pytest.raises(TypeError, match="stop_on_nonfinite"):
        PretrainingTrainer(model=model, args=args, stop_on_nonfinite="yes")


def test_docs_trainer_example_runs(tmp_path, monkeypatch):
    """docs/pretrain.md's "Pretraining with Trainer" example, as written, on a tiny model and a real text file."""
    doc = open(os.path.join(REPO, "docs", "pretrain.md"), encoding="utf-8").read()
    section = doc.split("## Pretraining with transformers.Trainer", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    corpus = _real_text(tmp_path / "corpus.txt", lines=200)
    monkeypatch.chdir(tmp_path)
    # the example's sizes are BERT-base's: a tiny model and two steps here, nothing else changed
    small = {
        "vocab_size=8000": "vocab_size=300",
        "max_steps=1000": "max_steps=2",
        "hidden_size=768, num_hidden_layers=12, num_attention_heads=12": "hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64",
        "min_count=100, max_count=500": "min_count=3, max_count=100",
    }
    for old, new in small.items():
        assert old in code, old
        code = code.replace(old, new)
    scope = {}
    exec(compile(code.replace("corpus.txt", corpus), "docs/pretrain.md", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 2
    model = scope["model"]
    assert int((model.notes.counts > 0).sum()) > 0  # the notes were taken during the steps
    from transformers import AutoModelForMaskedLM

    again = AutoModelForMaskedLM.from_pretrained(tmp_path / "my-tupe-bert")
    _same(again.state_dict(), model.state_dict())


def test_evaluate_before_training_gives_the_models_loss(tmp_path):
    from transformers import TrainingArguments

    from effbert.training import PretrainingTrainer

    model = _tiny_mlm()
    rows = _fixed_rows()
    args = TrainingArguments(
        output_dir=str(tmp_path / "o"),
        per_device_eval_batch_size=8,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,
    )
    trainer = PretrainingTrainer(model=model, args=args, eval_dataset=rows, data_collator=_collate)
    metrics = trainer.evaluate()
    with torch.no_grad():
        assert metrics["eval_loss"] == pytest.approx(float(model(**_collate(rows)).loss), rel=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["--fp16", "--bf16"])
def test_pretrain_on_cuda_mixed_precision(tmp_path, files, precision):
    """Trainer's mixed precision on a GPU with effbert's fused kernels (backend auto): finite losses, fp32 weights
    and notes saved, and the folder loads."""
    out = tmp_path / "run"
    args = [
        a
        for a in _args(files, out, "--max-steps", "6", "--logging-steps", "2", precision)
        if a not in ("eager", "cpu")
    ]
    args = [a for a in args if a not in ("--backend", "--device")]
    _run([*args, "--device", "cuda"])
    log = _log(out)
    assert [r["step"] for r in log] == [2, 4, 6] and all(r["loss"] == r["loss"] for r in log)
    model, _, _ = load_pretrained(out, device="cuda")
    assert (
        all(p.dtype == torch.float32 for p in model.parameters())
        and model.notes.notes.dtype == torch.float32
    )


# ------------------------------------------------------------ MC-BERT's step weighting, optimizer flags, --recipe


def _tiny_mcbert(seed=0):
    from effbert.models import TupeBertConfig, TupeBertForMultiChoicePretraining

    torch.manual_seed(seed)
    cfg = TupeBertConfig(
        vocab_size=40,
        hidden_size=18,
        num_hidden_layers=1,
        num_attention_heads=3,
        intermediate_size=24,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        backend="eager",
    )
    return TupeBertForMultiChoicePretraining(cfg, mask_token_id=4, num_candidates=4)


def _row_draws(monkeypatch):
    """MC-BERT's draws as a function of each token's controller features alone (its top-K pieces), so any batching
    of the same rows draws the same candidates (the sampler's random stream would not)."""
    import effbert.models.mc_bert as mc

    def draws(feats, weight, bias, k, **kw):
        return torch.topk(feats.double() @ weight.double().T + bias.double(), k, dim=1).indices

    monkeypatch.setattr(mc, "mc_sample_fused", draws)


def test_mcbert_accumulated_step_equals_the_whole_batch(tmp_path, monkeypatch):
    """MC-BERT's step is weighted over the whole step, micro-batches and ranks together: the controller's masked-LM
    loss summed over the step's [MASK] tokens / their count (fairseq's sample_size), the multi-choice loss summed over
    the step's real tokens / their count. So 4 micro-batches of 2 rows, whose [MASK] and real-token counts differ,
    give the loss and the SGD update of one batch of 8; the mean of the micro-batches' own losses would not."""
    _row_draws(monkeypatch)
    whole, loss_whole = _train_once(tmp_path, 8, 1, make=_tiny_mcbert)
    accum, loss_accum = _train_once(tmp_path, 2, 4, make=_tiny_mcbert)
    model = _tiny_mcbert()
    rows = _fixed_rows()
    with torch.no_grad():
        want = float(model(**_collate(rows)).loss)  # the model's means over the whole batch
        parts = [float(model(**_collate(rows[i : i + 2])).loss) for i in range(0, 8, 2)]
    assert loss_whole == pytest.approx(want, rel=1e-6)
    assert loss_accum == pytest.approx(want, rel=1e-5)
    assert (
        abs(sum(parts) / 4 - want) > 1e-3 * want
    )  # the uneven counts matter: averaging the means is another loss
    for (name, a), b in zip(whole.named_parameters(), accum.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert not torch.equal(whole.mlm_head.dense.weight, model.mlm_head.dense.weight)
    assert not torch.equal(
        whole.controller_weight(), model.controller_weight()
    )  # both losses stepped


class _Seen:
    """The PretrainingTrainer a command built (its args and optimizer)."""

    def __init__(self, monkeypatch, cls):
        self.trainers = []
        init = cls.__init__

        def record(trainer, *args, **kwargs):
            init(trainer, *args, **kwargs)
            self.trainers.append(trainer)

        monkeypatch.setattr(cls, "__init__", record)

    def optimizer(self):
        args, group = self.trainers[-1].args, self.trainers[-1].optimizer.param_groups[0]
        return (
            args.adam_beta1,
            args.adam_beta2,
            args.adam_epsilon,
            args.max_grad_norm,
            args.learning_rate,
            args.warmup_steps,
            group["betas"],
            group["eps"],
        )


def test_optimizer_flags_reach_adamw_and_a_resume_keeps_them(tmp_path, files, capsys, monkeypatch):
    from effbert.training import PretrainingTrainer

    seen = _Seen(monkeypatch, PretrainingTrainer)
    out = tmp_path / "run"
    base = _args(
        files,
        out,
        "--max-steps",
        "2",
        "--save-steps",
        "2",
        "--adam-beta1",
        "0.8",
        "--adam-beta2",
        "0.95",
        "--adam-epsilon",
        "1e-6",
        "--max-grad-norm",
        "0",
    )
    _run(base)
    assert seen.optimizer() == (0.8, 0.95, 1e-6, 0.0, 2e-3, 0, (0.8, 0.95), 1e-6)
    run = json.loads((out / "pretrain.json").read_text())["training"]
    assert (run["adam_beta1"], run["adam_beta2"], run["adam_epsilon"], run["max_grad_norm"]) == (
        0.8,
        0.95,
        1e-6,
        0,
    )
    capsys.readouterr()
    # the optimizer's state comes back from the checkpoint: its settings cannot change on a resume
    _error(
        capsys,
        [*base, "--max-steps", "3", "--resume", "--adam-beta2", "0.9"],
        "--adam-beta2 0.95 -> 0.9",
    )
    _error(
        capsys,
        [*base, "--max-steps", "3", "--resume", "--max-grad-norm", "1"],
        "--max-grad-norm 0.0 -> 1.0",
    )
    _error(
        capsys,
        [*base, "--max-steps", "3", "--resume", "--recipe", "tupe"],
        "--recipe None -> 'tupe'",
    )
    _run(_args(files, out, "--max-steps", "3", "--resume"))  # the flags left out: the run's values
    assert seen.optimizer() == (0.8, 0.95, 1e-6, 0.0, 2e-3, 0, (0.8, 0.95), 1e-6)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--adam-beta1", "1", "--adam-beta1 must be in [0, 1), got 1.0"),
        ("--adam-beta2", "-0.1", "--adam-beta2 must be in [0, 1), got -0.1"),
        ("--adam-epsilon", "0", "--adam-epsilon must be > 0, got 0.0"),
        ("--adam-epsilon", "nan", "--adam-epsilon must be > 0, got nan"),
        ("--max-grad-norm", "-1", "--max-grad-norm must be >= 0 (0: no clipping), got -1.0"),
        ("--max-grad-norm", "inf", "--max-grad-norm must be >= 0 (0: no clipping), got inf"),
        (
            "--recipe",
            "deebert",
            "--recipe deebert is a recipe of effbert finetune, not pretrain (effbert pretrain's: "
            "tupe, mcbert, tnf)",
        ),
        (
            "--recipe",
            "bert",
            "--recipe 'bert': no such recipe (pretrain: tupe, mcbert, tnf; finetune: deebert, pabee, "
            "romebert)",
        ),
    ],
)
def test_bad_optimizer_flags_and_recipes_exit_2(tmp_path, files, capsys, flag, value, message):
    out = tmp_path / "run"
    _error(capsys, _args(files, out, "--max-steps", "1", flag, value), message)
    assert not out.exists() and not capsys.readouterr().out


# The published values, stated here (not read from effbert.commands.recipes), so a wrong table fails.
PRETRAIN_RECIPES = {
    # guolinke/TUPE README: lr 1e-4, 10k warm-up of 1M updates, betas (0.9, 0.999), eps 1e-6, clip 1.0, wd 0.01,
    # fairseq masked_lm's 80/10/10
    "tupe": {
        "objective": "mlm",
        "tnf": False,
        "learning_rate": 1e-4,
        "warmup_steps": 20,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-6,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "mask_replace_prob": 0.8,
        "random_replace_prob": 0.1,
    },
    # MC-BERT/MC-BERT README: lr 1e-4, 10k of 1M, betas (0.9, 0.98), eps 1e-6, no clipping, wd 0.01; every target
    # [MASK] (its mcbert task's leave-unmasked and random-token probabilities 0)
    "mcbert": {
        "objective": "mcbert",
        "tnf": False,
        "learning_rate": 1e-4,
        "warmup_steps": 20,
        "adam_beta1": 0.9,
        "adam_beta2": 0.98,
        "adam_epsilon": 1e-6,
        "weight_decay": 0.01,
        "max_grad_norm": 0.0,
        "mask_replace_prob": 1.0,
        "random_replace_prob": 0.0,
    },
    # TNF paper, Sec. 4.1: Adam eps 1e-6, betas (0.9, 0.98), peak lr 1e-4, 10k warm-up of 1000k steps, wd 0.01
    "tnf": {
        "objective": "mlm",
        "tnf": True,
        "learning_rate": 1e-4,
        "warmup_steps": 20,
        "adam_beta1": 0.9,
        "adam_beta2": 0.98,
        "adam_epsilon": 1e-6,
        "weight_decay": 0.01,
    },
}


@pytest.mark.parametrize("name", sorted(PRETRAIN_RECIPES))
def test_each_recipe_sets_exactly_the_published_values(name, capsys):
    from effbert.commands import recipes

    base = ["--data", "c.txt", "--out", "o", "--max-steps", "2000"]
    plain = vars(pretrain.build_parser().parse_args(base))
    argv = [*base, "--recipe", name]
    a = pretrain.build_parser().parse_args(argv)
    line = recipes.apply(a, "pretrain", pretrain.build_parser, argv)
    got = {k: v for k, v in vars(a).items() if v != plain[k] and k != "recipe"}
    assert got == PRETRAIN_RECIPES[name]
    assert type(got["warmup_steps"]) is int  # 1% of --max-steps, in steps
    assert (
        line.startswith(f"recipe {name}, ")
        and "--warmup-steps 20 (1% of --max-steps)" in line
        and "yours" not in line
    )


def test_a_recipe_under_the_users_flags_and_its_line(tmp_path, files, capsys, monkeypatch):
    """--recipe mcbert with the user's --learning-rate and --max-grad-norm: theirs win, the rest is
    the recipe's, one line says which; the run file records the recipe and its values, a resume
    keeps them and refuses another recipe."""
    from effbert.training import PretrainingTrainer

    seen = _Seen(monkeypatch, PretrainingTrainer)
    out = tmp_path / "run"
    argv = _args(
        files,
        out,
        "--max-steps",
        "2",
        "--save-steps",
        "2",
        "--recipe",
        "mcbert",
        "--learning-rate",
        "5e-4",
        "--max-grad-norm",
        "2",
    )
    _run(argv)  # the warm-up: 1% of 2 steps
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("recipe ")]
    assert lines == [
        "recipe mcbert, MC-BERT (Xu et al., 2020): --objective mcbert --no-tnf --warmup-steps 0 "
        "(1% of --max-steps) --adam-beta1 0.9 --adam-beta2 0.98 --adam-epsilon 1e-06 "
        "--weight-decay 0.01 --mask-replace-prob 1 --random-replace-prob 0; yours kept: "
        "--learning-rate 0.0005 --max-grad-norm 2"
    ]
    assert seen.optimizer() == (0.9, 0.98, 1e-6, 2.0, 5e-4, 0, (0.9, 0.98), 1e-6)
    run = json.loads((out / "pretrain.json").read_text())
    assert run["training"]["recipe"] == "mcbert" and run["settings"]["objective"] == "mcbert"
    assert not run["settings"]["tnf"] and run["settings"]["mask_replace_prob"] == 1.0
    _error(
        capsys,
        [*argv, "--max-steps", "3", "--resume", "--recipe", "tnf"],
        "--recipe 'mcbert' -> 'tnf'",
    )
    _run(
        [*argv, "--max-steps", "3", "--resume"]
    )  # the same command line: the run's values, no line printed
    assert seen.optimizer() == (0.9, 0.98, 1e-6, 2.0, 5e-4, 0, (0.9, 0.98), 1e-6)
    assert "recipe " not in capsys.readouterr().out


# ------------------------------ the flag vocabulary, --eval, --report-to, file modes, step functions


@pytest.mark.parametrize(
    "old, value, new",
    [
        ("--steps", "2", "--max-steps"),
        ("--lr", "1e-3", "--learning-rate"),
        ("--warmup", "1", "--warmup-steps"),
        ("--grad-accum", "2", "--gradient-accumulation-steps"),
        ("--save-every", "1", "--save-steps"),
        ("--log-every", "1", "--logging-steps"),
        ("--max-len", "24", "--max-seq-length"),
        ("--eval-batch-size", "4", "--per-device-eval-batch-size"),
    ],
)
def test_old_spellings_are_refused_with_the_new_name(tmp_path, files, capsys, old, value, new):
    """Each old spelling (as a separate value or with ``=``) is one line naming its new flag;
    nothing is written."""
    out = tmp_path / "run"
    for given in ([old, value], [f"{old}={value}"]):
        err = _error(capsys, [*_args(files, out), *given], f"{old} is now {new}")
        assert "usage:" not in err
    assert not out.exists()


def test_every_flag_is_checked_before_any_work(tmp_path, files, capsys):
    """A missing corpus, a missing --eval file and exclusive flags are refused before the vocabulary
    is trained."""
    out = tmp_path / "run"
    base = [
        "--out",
        str(out),
        "--vocab-size",
        "100",
        "--max-steps",
        "1",
        "--device",
        "cpu",
        "--quiet",
    ]
    for args, match in (
        (["--data", str(tmp_path / "missing.txt")], "--data: "),
        (["--data", str(tmp_path)], "is a directory"),
        (["--data", files["corpus"], "--eval", str(tmp_path / "held.txt")], "--eval: "),
        (
            ["--data", files["corpus"], "--batch-size", "8", "--per-device-train-batch-size", "4"],
            "--batch-size (global) or --per-device-train-batch-size",
        ),
        (
            ["--data", files["corpus"], "--warmup-steps", "1", "--warmup-ratio", "0.1"],
            "--warmup-steps or --warmup-ratio",
        ),
        (["--data", files["corpus"], "--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1]"),
        (["--data", files["corpus"], "--save-total-limit", "0"], "--save-total-limit must be >= 1"),
    ):
        assert pretrain.main([*base, *args]) == 2
        got = capsys.readouterr()
        assert got.out == "" and match in got.err and len(got.err.strip().splitlines()) == 1, got
    assert "no such file" in _error(
        capsys, [*base, "--data", str(tmp_path / "missing.txt")], "missing.txt"
    )
    assert not out.exists()


def test_report_to_is_checked_and_passed_to_trainer(tmp_path, files, capsys, monkeypatch):
    """--report-to: an integration that is not installed, or not one of transformers', is one line;
    one that is installed reaches TrainingArguments.report_to (default: none)."""
    import transformers.integrations as integrations

    from effbert.training.pretrain import training_arguments

    available = integrations.get_available_reporting_integrations()
    out = tmp_path / "run"
    if "tensorboard" not in available:
        _error(
            capsys,
            [*_args(files, out), "--report-to", "tensorboard"],
            "--report-to tensorboard: tensorboard is not installed here",
        )
    _error(
        capsys,
        [*_args(files, out), "--report-to", "carrier-pigeon"],
        "not one of transformers' integrations",
    )
    _error(
        capsys,
        [*_args(files, out), "--report-to", "none", "tensorboard"],
        "--report-to none goes alone",
    )
    assert not out.exists()
    settings = pretrain.build_parser().parse_args(_args(files, out))
    args = training_arguments(
        settings,
        dict(seed=0),
        dict(train_pretrain.TRAINING_DEFAULTS, batch_size=8),
        {"steps": 10, "warmup": 1},
        8,
        torch.device("cpu"),
        False,
    )
    assert args.report_to in ([], ["none"], "none")
    monkeypatch.setattr(
        integrations, "get_available_reporting_integrations", lambda: available + ["tensorboard"]
    )
    settings = pretrain.build_parser().parse_args(
        [*_args(files, out), "--report-to", "tensorboard"]
    )
    pretrain._check_report_to(settings.report_to)  # installed (as patched): accepted
    if "tensorboard" in available:  # TrainingArguments checks the integration itself
        args = training_arguments(
            settings,
            dict(seed=0),
            dict(train_pretrain.TRAINING_DEFAULTS, batch_size=8),
            {"steps": 10, "warmup": 1},
            8,
            torch.device("cpu"),
            False,
        )
        assert args.report_to == ["tensorboard"]


def test_step_functions_resolve_the_settings_and_trainers_arguments(tmp_path, files):
    """The steps of effbert.training.pretrain, called directly: the global batch from the per-device
    one, the warm-up from a share (floor of ratio x steps; default 10%), Trainer's arguments
    (checkpoints under DIR/checkpoints, the newest --save-total-limit kept, evaluation at the saves
    by default)."""
    out = tmp_path / "run"
    parse = pretrain.build_parser().parse_args
    settings = parse(
        [
            "--data",
            files["corpus"],
            "--out",
            str(out),
            "--max-steps",
            "25",
            "--save-steps",
            "10",
            "--save-total-limit",
            "3",
            "--eval",
            files["corpus"],
            "--per-device-train-batch-size",
            "4",
            "--gradient-accumulation-steps",
            "3",
            "--warmup-ratio",
            "0.3",
        ]
    )
    s, tr = train_pretrain.resolve(settings, None, world=2)
    assert tr["batch_size"] == 4 * 2 * 3 and train_pretrain.per_device_batch(tr, 2) == 4
    assert (
        s["max_seq_length"] == 128
        and s["mask_replace_prob"] == 0.8
        and s["random_replace_prob"] == 0.1
    )
    schedule = train_pretrain.learning_rate_schedule(settings, tr, None, None)
    assert schedule == {"steps": 25, "warmup": 7}  # floor(0.3 * 25)
    assert (
        train_pretrain.warmup_of(dict(tr, warmup_ratio=None), 25) == 2
    )  # the default: 10%, floored
    assert train_pretrain.warmup_of(dict(tr, warmup_steps=5), 25) == 5
    args = train_pretrain.training_arguments(
        settings, s, tr, schedule, 4, torch.device("cpu"), False
    )
    assert args.output_dir == os.path.join(str(out), "checkpoints") and args.save_total_limit == 3
    assert (
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.warmup_steps,
    ) == (4, 3, 7)
    assert args.eval_strategy == "steps" and args.eval_steps == 10
    assert args.per_device_eval_batch_size == 4
    saved = {"settings": dict(s), "training": dict(tr)}
    with pytest.raises(cli.UsageError, match="--learning-rate 0.0001 -> 0.002"):
        train_pretrain.resolve(parse([*_args(files, out)]), saved, world=1)


def _held_out(tmp_path):
    """Held-out text: sentences of the same licences, from past the training corpus's 400."""
    path = tmp_path / "held.txt"
    _real_text(path, lines=460)
    lines = path.read_text(encoding="utf-8").splitlines()[400:]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_eval_reports_held_out_loss_and_perplexity(tmp_path, files, capsys):
    """--eval: the masked-LM loss and perplexity at --eval-steps and at the end, in log.jsonl,
    report.json and on loss.png; the final loss equals the model's own loss on the eval texts under
    the eval masks (seed, step 0), and training itself (its masks and losses) is the run's without
    --eval."""
    from effbert.data.collator import DataCollatorForTupeMLM
    from effbert.data.corpus import load_corpus

    held = _held_out(tmp_path)
    common = [
        "--max-steps",
        "5",
        "--logging-steps",
        "1",
        "--save-steps",
        "0",
        "--per-device-eval-batch-size",
        "512",
    ]
    _run(_args(files, tmp_path / "plain", *common))
    out = tmp_path / "eval"
    _run(_args(files, out, *common, "--eval", held, "--eval-steps", "2"))
    text = capsys.readouterr().out
    log = _log(out)
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]  # every 2 steps, and at the end
    assert all(
        abs(r["eval_perplexity"] - torch.tensor(r["eval_loss"]).double().exp().item())
        < 1e-6 * r["eval_perplexity"]
        for r in evals
    )
    assert re.search(r"step +5  eval loss \d+\.\d{4}  perplexity \d", text), text
    assert [r["loss"] for r in log if "loss" in r] == [r["loss"] for r in _log(tmp_path / "plain")]
    report = json.loads((out / "report.json").read_text())
    assert report["eval_step"] == 5 and report["eval_loss"] == evals[-1]["eval_loss"]
    assert (
        report["eval_perplexity"] == evals[-1]["eval_perplexity"]
        and (out / "loss.png").stat().st_size > 0
    )
    # the reference: the saved model on the eval texts (one batch), masked as evaluation masks them
    model, tok, table = load_pretrained(out, backend="eager")
    texts = load_corpus([held], tok, 24, cache_dir=files["cache"])
    collator = DataCollatorForTupeMLM(tok, rare_words=table, seed=0)
    batch = collator([{"input_ids": ids} for ids in texts["input_ids"]])
    batch.pop("note_spans")
    with torch.no_grad():
        want = model.double()(**batch).loss.item()
    assert abs(report["eval_loss"] - want) < 1e-5, (report["eval_loss"], want)


def test_eval_with_mcbert_reports_its_training_loss(tmp_path, files, capsys):
    """With --objective mcbert, --eval gives the loss MC-BERT trains (masked LM + lambda x
    multi-choice), no perplexity, as --help says."""
    held = _held_out(tmp_path)
    out = tmp_path / "mc"
    _run(
        _args(
            files,
            out,
            "--objective",
            "mcbert",
            "--no-pack",
            "--max-steps",
            "2",
            "--save-steps",
            "0",
            "--eval",
            held,
            tnf=False,
        )
    )
    evals = [r for r in _log(out) if "eval_loss" in r]
    assert (
        [r["step"] for r in evals] == [2]
        and evals[0]["eval_loss"] > 0
        and "eval_perplexity" not in evals[0]
    )
    assert "masked LM + lambda x multi-choice" in " ".join(
        subprocess.run(
            [sys.executable, "-m", "effbert.commands", "pretrain", "--help"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "COLUMNS": "200"},
        ).stdout.split()
    )


def test_every_file_of_a_run_is_0644(tmp_path, files):
    """The final model.safetensors and every checkpoint file are 0644 like the run's other files
    (safetensors writes 0600 through its temporary file)."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        _run(_args(files, out, "--max-steps", "2", "--save-steps", "1"))
    finally:
        os.umask(old)
    modes = {
        os.path.relpath(os.path.join(r, n), out): os.stat(os.path.join(r, n)).st_mode & 0o777
        for r, _, names in os.walk(out)
        for n in names
    }
    assert (
        "model.safetensors" in modes
        and os.path.join("checkpoints", "checkpoint-2", "model.safetensors") in modes
    )
    assert {k: oct(v) for k, v in modes.items() if v != 0o644} == {}
