"""``effbert pretrain``: trains on a text file and writes what it says; stopping and resuming gives bitwise the run
that did not stop; ``load_pretrained`` gives the model back; masked rare words get no note; user errors exit with 2
and one line; two gloo ranks under torchrun keep identical parameters and notes, equal to one process on the whole
batch."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from effbert import commands as cli
from effbert.commands import pretrain
from effbert.data.text import WordPieceTokenizer

from helpers import rel_error

COMMON = ["--vocab-size", "120", "--layers", "2", "--hidden", "32", "--heads", "2", "--max-len", "24",
          "--batch-size", "8", "--lr", "2e-3", "--backend", "eager", "--tnf-min-count", "3", "--tnf-max-count",
          "100", "--quiet"]
RARE = ["zebra", "walrus", "aardvark", "platypus", "axolotl", "narwhal"]


def _corpus(path, lines=300, seed=0):
    rng = random.Random(seed)
    words = ["the", "a", "cat", "dog", "runs", "jumps", "over", "under", "house", "tree", "big", "small", "and"]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            w = [rng.choice(words) for _ in range(rng.randint(4, 12))]
            if rng.random() < 0.6:  # rare words in most batches, so the notes move
                w.insert(rng.randrange(len(w)), rng.choice(RARE))
            f.write(" ".join(w).capitalize() + ".\n")
    return str(path)


def _run(args):
    assert pretrain.main(args) == 0


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


def test_the_rare_word_band_defaults_to_the_papers_100_to_500(tmp_path, corpus, capsys):
    """TNF (Wu et al., ICLR 2021) takes notes for words seen 100 to 500 times; the command says how many fell in."""
    import collections

    assert pretrain.MODEL_DEFAULTS["tnf_min_count"] == 100 and pretrain.MODEL_DEFAULTS["tnf_max_count"] == 500
    out = tmp_path / "run"
    base = [x for x in COMMON if x not in ("--tnf-min-count", "3", "--tnf-max-count", "100")]
    assert cli.main(["pretrain", "--data", corpus, "--out", str(out), *base, "--steps", "1"]) == 0
    tok = WordPieceTokenizer.from_file(str(out / "vocab.txt"))
    counts = collections.Counter(w for line in open(corpus, encoding="utf-8") for w in tok.words(line))
    want = {w for w, c in counts.items() if 100 <= c <= 500 and any(ch.isalnum() for ch in w)}
    assert want and not want & set(RARE)  # the corpus's six rarest words occur ~30 times: outside the band
    got = (out / "rare_words.txt").read_text().split()
    assert set(got) == want
    assert f"TNF notes for {len(want)} rare words (the words seen 100 to 500 times in the corpus)" in \
        capsys.readouterr().out


def test_trains_and_writes_the_run(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert cli.main(["pretrain", "--data", corpus, "--out", str(out), *COMMON, "--steps", "30",
                     "--log-every", "10", "--save-every", "10"]) == 0
    text = capsys.readouterr().out
    assert "TNF notes for 6 rare words" in text and "step      30" in text
    assert sorted(os.listdir(out)) == ["checkpoint-00000020.pt", "checkpoint-00000030.pt", "config.json",
                                       "log.jsonl", "model.pt", "pretrain.json", "rare_words.txt", "vocab.txt"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30]
    assert log[-1]["loss"] < log[0]["loss"] - 0.3  # it learns
    assert log[-1]["notes_taken"] == 6
    assert sorted((out / "rare_words.txt").read_text().split()) == sorted(RARE)
    assert len(WordPieceTokenizer.from_file(out)) == 120


def test_resume_equals_not_stopping(tmp_path, corpus):
    """4 steps in one go == 2 steps, a stop, --resume, 2 more: parameters, notes, optimizer state bitwise."""
    args = ["--data", corpus, *COMMON, "--steps", "4", "--save-every", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _run([*args, "--out", str(whole), "--dump-state", str(tmp_path / "whole.pt")])
    _run([*args, "--out", str(parts)])
    # the run stopped after step 2: what it wrote after that is gone
    os.remove(parts / "checkpoint-00000004.pt")
    os.remove(parts / "model.pt")
    _run(["--data", corpus, "--out", str(parts), "--resume", "--steps", "4", "--save-every", "2", "--quiet",
          "--backend", "eager", "--batch-size", "8", "--lr", "2e-3", "--log-every", "1",
          "--dump-state", str(tmp_path / "parts.pt")])
    a, b = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "parts.pt")
    _same(a, b)
    assert int((a["notes.counts"] > 0).sum()) > 0 and float(a["notes.notes"].abs().sum()) > 0
    ca = torch.load(whole / "checkpoint-00000004.pt", weights_only=False)
    cb = torch.load(parts / "checkpoint-00000004.pt", weights_only=False)
    assert ca["step"] == cb["step"] == 4
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        _same(sa, sb)
    assert ca["scheduler"] == cb["scheduler"]
    # the log goes on where it stopped
    steps = [json.loads(line)["step"] for line in (parts / "log.jsonl").read_text().splitlines()]
    assert steps[-2:] == [3, 4]


def test_keeps_the_last_two_checkpoints(tmp_path, corpus):
    out = tmp_path / "run"
    _run(["--data", corpus, "--out", str(out), *COMMON, "--steps", "5", "--save-every", "1"])
    assert [os.path.basename(p) for p in pretrain.checkpoints(out)] == ["checkpoint-00000004.pt",
                                                                        "checkpoint-00000005.pt"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_load_pretrained(tmp_path, corpus):
    from effbert.models import TupeBertConfig, TupeBertForSequenceClassification

    out = tmp_path / "run"
    _run(["--data", corpus, "--out", str(out), *COMMON, "--steps", "3", "--dump-state", str(tmp_path / "s.pt")])
    model, tok, table = pretrain.load_pretrained(out, backend="eager")
    _same(model.state_dict(), torch.load(tmp_path / "s.pt"))
    assert not model.training and model.config.vocab_size == len(tok) == 120
    assert table.words == (out / "rare_words.txt").read_text().split()
    assert model.notes.num_slots == len(table) and model.notes.window == 16
    ids, lengths = tok.encode_batch(["the zebra runs.", "a dog"], 24)
    spans, slots = table.find(ids, lengths)
    assert spans[:, 3].tolist() == [table.slot_of["zebra"]]
    mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
    with torch.no_grad():
        logits = model(ids, mask, note_slots=slots).logits
    assert logits.shape == (2, ids.shape[1], 120) and torch.isfinite(logits).all()
    # what effbert finetune does: the encoder weights into a classification model
    values = model.config.to_dict()
    values.update(multi_exit=True, num_labels=3)
    clf = TupeBertForSequenceClassification(TupeBertConfig.from_dict(values))
    clf.bert.load_state_dict(model.bert.state_dict())
    # an unfinished run loads from its latest checkpoint
    os.remove(out / "model.pt")
    again, _, _ = pretrain.load_pretrained(out)
    _same(again.state_dict(), model.state_dict())
    with pytest.raises(FileNotFoundError, match="path"):
        pretrain.load_pretrained(tmp_path / "nothing")


def test_masking_and_no_peeking(corpus):
    lines = pretrain.read_corpus([corpus])
    tok = WordPieceTokenizer.build(lines, 120)
    from effbert.data.tnf import RareWordTable

    table = RareWordTable.build(pretrain.rare_words(tok, lines, 3, 100), tok.word_ids, tok.continuation)
    assert sorted(table.words) == sorted(RARE)
    ids, lengths = tok.encode_batch(lines, 24)
    maskable = torch.ones(len(tok), dtype=torch.bool)
    maskable[[tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id]] = False
    seen_masked_rare = total_targets = total_real = 0
    for step in range(40):
        masked, labels, real, b_len, spans, slots = pretrain.step_batch(step, ids, lengths, 32, 0, tok, maskable,
                                                                        table, torch.arange(32))
        full = ids[pretrain.batch_rows(step, 32, len(lines), 0), : masked.shape[1]]
        target = labels != -100
        assert torch.equal(labels[target], full[target])  # labels are the original pieces
        assert torch.equal(masked[~target], full[~target])  # nothing else changes
        assert not target[~real].any() and maskable[full[target]].all()  # no padding or special is a target
        assert maskable[masked[target & (masked != tok.mask_id)]].all()
        total_targets += int(target.sum())
        total_real += int((real & maskable[full]).sum())
        # a rare word with a [MASK] piece is not recognised, so it gets neither a note nor an update
        _, unmasked_slots = table.find(full, b_len)
        hidden = (unmasked_slots >= 0) & target
        seen_masked_rare += int(hidden.sum())
        assert (slots[masked == tok.mask_id] == -1).all()
        # (a random replacement piece may happen to spell a rare word: only rows without one are checked)
        plain = ~((masked != full) & (masked != tok.mask_id)).any(1)
        assert ((slots[plain] >= 0) <= (unmasked_slots[plain] >= 0)).all()
        assert set(spans[:, 3].tolist()) <= set(unmasked_slots[unmasked_slots >= 0].tolist())
    assert seen_masked_rare > 0 and 0.12 < total_targets / total_real < 0.18
    # every step draws fresh lines; an epoch visits every line once
    rows = torch.cat([pretrain.batch_rows(s, 32, 96, 5) for s in range(3)])
    assert sorted(rows.tolist()) == list(range(96))
    assert not torch.equal(pretrain.batch_rows(3, 32, 96, 5), pretrain.batch_rows(0, 32, 96, 5))


def _error(capsys, args, match):
    code = pretrain.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and match in err, err


def test_user_errors(tmp_path, corpus, capsys):
    out = str(tmp_path / "run")
    base = ["--out", out, *COMMON, "--steps", "2"]
    _error(capsys, ["--data", str(tmp_path / "missing.txt"), *base], "--data: no such file")
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    _error(capsys, ["--data", str(tmp_path / "blank.txt"), *base], "holds no text")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 99, "hidden_size": 32,
                                                       "num_attention_heads": 2, "num_hidden_layers": 1}))
    cfg = ["--data", corpus, "--out", out, "--vocab-size", "120", "--config", str(tmp_path / "config.json"),
           "--steps", "1"]
    _error(capsys, cfg, "vocab/config mismatch")
    _error(capsys, [*cfg, "--layers", "2"], "give --config or the model size flags")
    (tmp_path / "bad.json").write_text("{nope")
    _error(capsys, [*cfg[:-4], "--config", str(tmp_path / "bad.json")], "is not JSON")
    _error(capsys, ["--data", corpus, *base, "--heads", "3"], "multiple of num_attention_heads")
    _error(capsys, ["--data", corpus, *base, "--vocab", str(tmp_path / "nothing.txt")], "--vocab")
    _error(capsys, ["--data", corpus, *base, "--vocab-size", "7"], "vocab_size must be >= 55 for this corpus")
    _error(capsys, ["--data", corpus, *base, "--tnf-min-count", "50", "--tnf-max-count", "10"], "--tnf-min-count")
    _error(capsys, ["--data", corpus, "--out", out, "--resume"], "nothing to resume")
    _error(capsys, ["--data", corpus, *base[2:], "--out", corpus], "is not a folder")
    _error(capsys, ["--data", corpus, *base, "--backend", "fastest"], "--backend must be auto or one of")
    assert pretrain.main(["--data", corpus, *base]) == 0
    capsys.readouterr()
    _error(capsys, ["--data", corpus, *base], "already holds a run")
    _error(capsys, ["--data", corpus, "--out", out, "--resume", "--layers", "3"],
           "--resume with different model flags than the run in --out: --layers 2 -> 3")
    _error(capsys, ["--data", corpus, "--out", out, "--resume", "--no-tnf"], "--tnf True -> False")
    _error(capsys, ["--data", corpus, "--out", out, "--resume", "--vocab-size", "200"], "--vocab-size 200 differs")
    _error(capsys, ["--data", corpus, *base[:2], "--steps", "0"], "--steps must be >= 1")
    assert pretrain.main(["--data", corpus, "--out", out, "--bogus"]) == 2  # argparse's own message


def test_command_line_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "effbert.commands", "pretrain", "--data", str(tmp_path / "none.txt"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"effbert pretrain: error: --data: no such file "
                                                f"{str(tmp_path / 'none.txt')!r}"]


def _gloo_available():
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is not available")
def test_torchrun_two_cpu_ranks(tmp_path, corpus):
    """2 steps on 2 gloo ranks: identical parameters and notes on both, some notes taken, and the same as one
    process on the whole batch (fp32 tolerance: the gradient all-reduce sums in another order)."""
    args = ["--data", corpus, *COMMON, "--steps", "2", "--dropout", "0", "--log-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "effbert.commands", "pretrain", *args, "--out", str(tmp_path / "ddp"),
                           "--dump-state", str(tmp_path / "ddp.pt")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("pretraining a 2-layer") == 1  # only rank 0 prints
    r0, r1 = torch.load(tmp_path / "ddp.pt.rank0"), torch.load(tmp_path / "ddp.pt.rank1")
    _same(r0, r1)
    taken = r0["notes.counts"] > 0
    assert 0 < int(taken.sum()) and float(r0["notes.notes"][taken].abs().min()) > 0
    assert [json.loads(x)["step"] for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()] == [1, 2]
    _run([*args, "--out", str(tmp_path / "one"), "--dump-state", str(tmp_path / "one.pt")])
    one = torch.load(tmp_path / "one.pt")
    assert torch.equal(one["notes.counts"], r0["notes.counts"])
    for k in one:
        if one[k].is_floating_point():
            # cls_row adds a constant to the whole [CLS] query row, which softmax ignores: its gradient is rounding
            # noise and its value stays ~1e-10, so it is held to an absolute bound
            err = rel_error(r0[k], one[k].double())
            assert err <= 1e-5 or float((r0[k] - one[k]).abs().max()) <= 1e-8, (k, err)
    # the ranks trained on the whole batch together: one process on half of it ends elsewhere
    log_one = [json.loads(x)["loss"] for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    log_ddp = [json.loads(x)["loss"] for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert log_one == pytest.approx(log_ddp, rel=1e-5)


def test_config_file_no_tnf_and_resume(tmp_path, corpus):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 40, "max_position_embeddings": 20, "position_mode": "tupe-a"}))
    out = tmp_path / "run"
    base = ["--data", corpus, "--out", str(out), "--vocab-size", "120", "--backend", "eager", "--quiet",
            "--batch-size", "4", "--save-every", "2"]
    _run([*base, "--config", str(cfg), "--no-tnf", "--steps", "2"])
    settings = json.loads((out / "pretrain.json").read_text())["settings"]
    assert (settings["layers"], settings["intermediate"], settings["max_len"], settings["tnf"]) == (1, 40, 20, False)
    assert not (out / "rare_words.txt").exists()
    _run([*base[:-2], "--resume", "--steps", "3", "--layers", "1"])  # a flag that agrees with the run is fine
    model, tok, table = pretrain.load_pretrained(out)
    assert table is None and model.notes is None and model.config.position_mode == "tupe-a"
    assert model.config.intermediate_size == 40 and len(tok) == 120
    assert [os.path.basename(p) for p in pretrain.checkpoints(out)] == ["checkpoint-00000002.pt",
                                                                        "checkpoint-00000003.pt"]


def _log_steps(out):
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_resume_with_the_starting_command_line(tmp_path, corpus, capsys):
    """The very command line that started a run resumes it, even with a --vocab-size the corpus does not fill;
    after a crash between a logged step and its checkpoint the log does not repeat steps; --steps below the
    saved step is an error, not "done"."""
    out = tmp_path / "run"
    argv = ["--data", corpus, "--out", str(out), *COMMON, "--vocab-size", "5000", "--steps", "4",
            "--save-every", "2", "--log-every", "1"]
    _run(argv)
    assert len(WordPieceTokenizer.from_file(out)) < 5000  # the corpus filled fewer pieces than asked
    assert _log_steps(out) == [1, 2, 3, 4]
    # the run died after logging step 4, before its checkpoint
    os.remove(out / "checkpoint-00000004.pt")
    os.remove(out / "model.pt")
    _run([*argv, "--resume"])
    assert _log_steps(out) == [1, 2, 3, 4]
    capsys.readouterr()
    _error(capsys, [*argv, "--resume", "--steps", "3"], "--steps 3 is below the step the run")
    assert _log_steps(out) == [1, 2, 3, 4] and (out / "checkpoint-00000004.pt").exists()


def test_resume_applies_a_new_lr_and_weight_decay(tmp_path, corpus):
    out = tmp_path / "run"
    argv = ["--data", corpus, "--out", str(out), *COMMON, "--steps", "4", "--warmup", "0", "--save-every", "2",
            "--log-every", "1"]
    _run(argv)
    os.remove(out / "checkpoint-00000004.pt")
    _run([*argv, "--resume", "--lr", "1e-3", "--weight-decay", "0.25"])
    lrs = {json.loads(x)["step"]: json.loads(x)["lr"] for x in (out / "log.jsonl").read_text().splitlines()}
    # linear decay from the peak over 4 steps: after step s the rate is peak * (4 - s) / 4
    assert lrs[2] == pytest.approx(2e-3 * 2 / 4) and lrs[3] == pytest.approx(1e-3 * 1 / 4)
    groups = torch.load(out / "checkpoint-00000004.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.25, 0.0]
    assert [g["initial_lr"] for g in groups] == [1e-3, 1e-3]


@pytest.mark.parametrize("save_every,message,kept", [
    ("1", "non-finite weights after step 5", ["checkpoint-00000003.pt", "checkpoint-00000004.pt"]),
    ("0", "the loss is nan at step 6", []),
])
def test_nan_stops_the_run_and_keeps_the_good_checkpoints(tmp_path, corpus, capsys, monkeypatch, save_every,
                                                          message, kept):
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
    _error(capsys, ["--data", corpus, "--out", str(out), *COMMON, "--steps", "8", "--save-every", save_every],
           message)
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == kept
    assert not (out / "model.pt").exists()
    for name in kept:
        state = torch.load(out / name, weights_only=True)["model"]
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_no_word_in_the_rare_band_trains_without_notes(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    argv = ["--data", corpus, "--out", str(out), *COMMON, "--tnf-min-count", "5000", "--tnf-max-count", "9000",
            "--steps", "2", "--save-every", "1"]
    _run(argv)
    assert "training without TNF notes" in capsys.readouterr().out
    model, _, table = pretrain.load_pretrained(out)
    assert table is None and model.notes is None
    _run([*argv, "--resume", "--steps", "3"])
    assert _log_steps(out)[-1] == 3


class _Payload:
    def __reduce__(self):
        return (os.mkdir, ("PWNED_DIR",))


def test_damaged_run_folders_and_checkpoints_exit_2(tmp_path, corpus, capsys, monkeypatch):
    """A tampered (arbitrary pickle), truncated or foreign checkpoint and a damaged run file are one-line errors;
    nothing in them is ever executed."""
    import shutil

    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good"
    argv = ["--data", corpus, *COMMON, "--steps", "2", "--save-every", "1"]
    _run([*argv, "--out", str(good)])
    capsys.readouterr()

    def damaged(name, edit):
        out = tmp_path / name
        shutil.copytree(good, out)
        os.remove(out / "model.pt")
        edit(out)
        return ["--data", corpus, "--out", str(out), *COMMON, "--steps", "3", "--resume"]

    latest = "checkpoint-00000002.pt"
    tampered = damaged("tampered", lambda o: torch.save({"step": 2, "model": _Payload()}, o / latest))
    _error(capsys, tampered, "cannot read checkpoint")
    truncated = damaged("truncated", lambda o: (o / latest).write_bytes((o / latest).read_bytes()[:500]))
    _error(capsys, truncated, "cannot read checkpoint")
    foreign = damaged("foreign", lambda o: torch.save({"weights": torch.ones(2)}, o / latest))
    _error(capsys, foreign, "is not a checkpoint of effbert pretrain")
    other = damaged("other", lambda o: torch.save(dict(torch.load(o / latest, weights_only=True),
                                                       model={"x": torch.ones(1)}), o / latest))
    _error(capsys, other, "does not fit the run")
    _error(capsys, damaged("run-file", lambda o: (o / "pretrain.json").write_text("{cut")), "damaged")
    _error(capsys, damaged("no-settings", lambda o: (o / "pretrain.json").write_text("[]")), "not the run file")
    _error(capsys, damaged("no-vocab", lambda o: os.remove(o / "vocab.txt")), "vocab.txt")
    _error(capsys, damaged("no-rare", lambda o: os.remove(o / "rare_words.txt")), "rare_words.txt")
    assert not (tmp_path / "PWNED_DIR").exists()
    # the loader a fine-tuning run uses refuses the tampered weights too, without running them
    shutil.copy(tmp_path / "tampered" / latest, tmp_path / "tampered" / "model.pt")
    with pytest.raises(ValueError, match="cannot read"):
        pretrain.load_pretrained(tmp_path / "tampered")
    assert not (tmp_path / "PWNED_DIR").exists()


def test_bad_devices_sizes_and_folders_fail_first(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    base = ["--data", corpus, "--out", str(out), *COMMON, "--steps", "2"]
    _error(capsys, [*base, "--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'")
    if not torch.cuda.is_available():
        _error(capsys, [*base, "--device", "cuda"], "--device cuda: no CUDA device is available")
        _error(capsys, [*base, "--backend", "cuda"], "--backend cuda cannot run here")
    _error(capsys, [*base, "--max-len", "100000"], "--max-len must be <= 8192")
    assert not out.exists()  # nothing half-made blocks the retry
    (tmp_path / "file").write_text("x")
    _error(capsys, [*base[:2], "--out", str(tmp_path / "file" / "run"), *base[4:]], "is a file")
    # a folder holding another command's output is never overwritten
    other = tmp_path / "finetuned"
    other.mkdir()
    for name in ("config.json", "model.pt", "finetune.json"):
        (other / name).write_text("theirs")
    _error(capsys, [*base[:2], "--out", str(other), *base[4:]], "no pretrain.json")
    assert all((other / n).read_text() == "theirs" for n in ("config.json", "model.pt", "finetune.json"))


def test_a_model_too_big_for_memory_leaves_no_folder(tmp_path, corpus, capsys, monkeypatch):
    """The model is built before any file is written: an allocation failure is one line and the retry is free."""
    import effbert.models

    def too_big(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 80000000000 bytes")

    monkeypatch.setattr(effbert.models, "TupeBertForMaskedLM", too_big)
    out = tmp_path / "run"
    _error(capsys, ["--data", corpus, "--out", str(out), *COMMON, "--steps", "2"], "does not fit in memory on cpu")
    assert not out.exists()
    monkeypatch.undo()
    _run(["--data", corpus, "--out", str(out), *COMMON, "--steps", "1"])
