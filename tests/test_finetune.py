"""``effbert finetune`` end to end on the CPU eager backend: a tiny random HF BERT folder and a generated two-class
TSV; the report is consistent, the saved model loads back and reproduces the reported accuracy; bad arguments exit 2
with a clear message."""

import importlib.util
import io
import json
import os
import random
import re
import sys

import pytest
import torch

from effbert import commands as cli
from effbert.commands import finetune
from effbert.data import tsv
from effbert.models import loading
from effbert.training import finetune as finetune_run

pytestmark = pytest.mark.requires("datasets", "accelerate")  # corpora and Trainer


def installed(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


needs_hf = pytest.mark.skipif(
    not installed("transformers"), reason="transformers is not installed (pip install transformers)"
)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# two topics with their own words, and shared filler words; topic words are split in pieces for some
WORDS = {
    "sport": ["ball", "goal", "team", "match", "score", "coach"],
    "food": ["bread", "soup", "salt", "cheese", "apple", "rice"],
}
FILLER = ["the", "a", "of", "and", "then", "was", "it"]
SUFFIXES = ["##s", "##ed"]


def vocab():
    words = [w for ws in WORDS.values() for w in ws] + FILLER
    return SPECIALS + words + SUFFIXES + [".", ","]


def write_tsv(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            label = rng.choice(sorted(WORDS))
            words = []
            for _ in range(rng.randint(3, 9)):
                words.append(rng.choice(WORDS[label]) if rng.random() < 0.5 else rng.choice(FILLER))
                if rng.random() < 0.2:
                    words[-1] += "s"
            f.write(f"{label}\t{' '.join(words).capitalize()}.\n")


def save_tiny_bert(folder, layers):
    """A tiny transformers BERT (hidden 32, 2 heads, seed 0) and its vocab.txt in ``folder``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab()),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    BertModel(cfg).save_pretrained(folder)
    (folder / "vocab.txt").write_text("".join(v + "\n" for v in vocab()), encoding="utf-8")
    return folder


def write_data(folder, train_rows):
    """``train.tsv`` (``train_rows`` examples) and ``eval.tsv`` (41) of the two-topic task."""
    write_tsv(folder / "train.tsv", train_rows, seed=1)
    write_tsv(folder / "eval.tsv", 41, seed=2)
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), train_rows=96)


def args(hf_dir, data, out, *extra):
    return [
        "finetune",
        "--hf",
        str(hf_dir),
        "--train",
        str(data / "train.tsv"),
        "--eval",
        str(data / "eval.tsv"),
        "--out",
        str(out),
        "--per-device-train-batch-size",
        "16",
        "--learning-rate",
        "3e-3",
        "--logging-steps",
        "10",
        "--backend",
        "eager",
        "--device",
        "cpu",
        "--per-device-eval-batch-size",
        "16",
        "--quiet",
        *extra,
    ]


def check_report(out, criterion, steps):
    report = json.loads((out / "report.json").read_text())
    depth, rows = report["num_layers"], report["rows"]
    assert depth == 3 and report["criterion"] == criterion and report["labels"] == ["food", "sport"]
    assert (
        report["num_examples"] == 41
        and report["train_steps"] == steps
        and len(report["losses"]) == steps
    )
    per_exit = report["per_exit_accuracy"]
    assert len(per_exit) == depth and all(0.0 <= v <= 1.0 for v in per_exit)
    assert per_exit[-1] == report["full_depth_accuracy"]
    full = rows[0]
    assert (
        full["threshold"] is None and full["avg_exit_layer"] == depth and full["layers_saved"] == 0
    )
    assert full["accuracy"] == report["full_depth_accuracy"]
    assert len(rows) > 1
    for r in rows[1:]:
        assert (
            1.0 <= r["avg_exit_layer"] <= depth and r["speedup"] > 0 and 0.0 <= r["accuracy"] <= 1.0
        )
        assert r["layers_saved"] == pytest.approx(1 - r["avg_exit_layer"] / depth)
        assert r["delta"] == pytest.approx(r["accuracy"] - full["accuracy"])
    # thresholds are listed from the latest exits to the earliest
    exits = [r["avg_exit_layer"] for r in rows]
    assert all(a >= b for a, b in zip(exits, exits[1:])), exits
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report


def encode(tokenizer, texts, max_len):
    """Right-padded ids and the attention mask (True = real token) of ``texts``, as the fast tokenizer gives them."""
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_len,
        padding=True,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return enc["input_ids"], enc["attention_mask"].bool()


def check_reload(out, data, report):
    """The saved model reproduces the reported full-depth accuracy and every row's exits; transformers' Auto class
    loads the same multi-exit model from the folder."""
    from transformers import AutoModelForSequenceClassification

    model, tokenizer, labels, settings = loading.load_finetuned(out, backend="eager")
    assert labels == ["food", "sport"] and model.config.multi_exit and not model.training
    names, texts = tsv.read_tsv(str(data / "eval.tsv"))
    ids, mask = encode(tokenizer, texts, settings["max_len"])
    y = torch.tensor([labels.index(n) for n in names])
    with torch.no_grad():
        every = model(ids, mask).exit_logits
        auto = AutoModelForSequenceClassification.from_pretrained(out).eval()
        auto.set_backend("eager")
        assert type(auto) is type(model) and auto.config.id2label == {0: "food", 1: "sport"}
        assert torch.equal(auto(input_ids=ids, attention_mask=mask.long()).exit_logits, every)
    full_logits = every[-1]
    assert float((full_logits.argmax(-1) == y).double().mean()) == report["full_depth_accuracy"]
    assert [float((z.argmax(-1) == y).double().mean()) for z in every] == report[
        "per_exit_accuracy"
    ]
    criterion = report["criterion"]
    for r in report["rows"][1:]:
        kw = (
            dict(patience=int(r["threshold"]))
            if criterion == "patience"
            else dict(threshold=r["threshold"])
        )
        logits, layer = model.early_exit(ids, mask, criterion=criterion, **kw)
        assert float(layer.double().mean()) == pytest.approx(r["avg_exit_layer"])
        assert float((logits.argmax(-1) == y).double().mean()) == pytest.approx(r["accuracy"])


@needs_hf
def test_finetune_learns_reports_and_reloads(hf_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(args(hf_dir, data, out, "--max-steps", "60")) == 0
    text = capsys.readouterr().out
    assert "step     60  loss" in text and "batched early exit" in text and "done in" in text
    report = check_report(out, "entropy", 60)
    # the two topics are separable by their words: the model learnt them
    assert report["full_depth_accuracy"] >= 0.8, report["full_depth_accuracy"]
    assert report["train_loss_last"] < report["train_loss_first"]
    check_reload(out, data, report)


@needs_hf
def test_finetune_on_the_cpu_backend(hf_dir, data, tmp_path):
    """--backend cpu (the C++ CPU backend for the model's ops) trains: the loss, which has no such backend, goes to
    the dispatcher."""
    out = tmp_path / "run"
    assert cli.main(args(hf_dir, data, out, "--max-steps", "2", "--backend", "cpu")) == 0
    assert json.loads((out / "finetune.json").read_text())["complete"]


@needs_hf
@pytest.mark.parametrize(
    "criterion,loss",
    [
        ("max_prob", "romebert"),
        ("patience", "pabee"),
        ("entropy", "romebert --grad-reg"),
        ("entropy", "romebert --grad-reg --project final --ge"),
        ("patience", "pabee --shared-pooler --ge"),
        ("entropy", "deebert"),
    ],
)
def test_finetune_other_criteria_and_losses(hf_dir, data, tmp_path, capsys, criterion, loss):
    out = tmp_path / "run"
    assert (
        cli.main(
            args(
                hf_dir,
                data,
                out,
                "--max-steps",
                "6",
                "--criterion",
                criterion,
                "--loss",
                *loss.split(),
            )
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "batched early exit" in text and ("gradient regularization:" in text) == (
        "--grad-reg" in loss
    )
    assert "every exit on 41 eval examples (accuracy):" in text
    if "--project final" in loss:
        assert "the final side projected on" in text and "gradient equilibrium" in text
    steps = 12 if loss == "deebert" else 6  # DeeBERT: both stages
    if loss == "deebert":
        assert "DeeBERT stage 1" in text and "DeeBERT stage 2" in text
    check_reload(out, data, check_report(out, criterion, steps))
    model, _, _, settings = loading.load_finetuned(out, backend="eager")
    pooler = model.exits[-1].pooler
    assert all((h.pooler is pooler) == ("--shared-pooler" in loss) for h in model.exits[:-1])
    assert settings["shared_pooler"] == ("--shared-pooler" in loss)


@needs_hf
def test_every_off_ramp_starts_from_the_checkpoint_pooler(hf_dir):
    from transformers import BertModel

    hf_model = BertModel.from_pretrained(hf_dir)
    model, _, _ = loading.from_hf_folder(str(hf_dir), 2, "eager", None)
    for head in model.exits:
        assert torch.equal(head.pooler.weight, hf_model.pooler.dense.weight)
        assert torch.equal(head.pooler.bias, hf_model.pooler.dense.bias)
    assert len({id(h.pooler) for h in model.exits}) == 3  # one copy each
    shared, _, _ = loading.from_hf_folder(str(hf_dir), 2, "eager", None, shared_pooler=True)
    assert len({id(h.pooler) for h in shared.exits}) == 1
    assert torch.equal(shared.exits[0].pooler.weight, hf_model.pooler.dense.weight)


@needs_hf
def test_deebert_stage_two_leaves_backbone_and_final_classifier_alone(
    hf_dir, data, tmp_path, monkeypatch
):
    """Stage 2 changes the off-ramps only: the backbone and the final exit are those stage 1 left."""
    after_stage1 = {}
    from effbert.models.multi_exit import MultiExitMixin

    real_stage = MultiExitMixin.set_deebert_stage

    def spy(model, stage):
        if stage == 2:
            after_stage1.update({k: v.clone() for k, v in model.state_dict().items()})
        return real_stage(model, stage)

    monkeypatch.setattr(MultiExitMixin, "set_deebert_stage", spy)
    out = tmp_path / "run"
    assert cli.main(args(hf_dir, data, out, "--max-steps", "4", "--loss", "deebert")) == 0
    final = loading.load_finetuned(out, backend="eager")[0].state_dict()
    changed = {k for k in final if not torch.equal(final[k], after_stage1[k])}
    assert changed and all(
        k.startswith("exits.") and not k.startswith("exits.2.") for k in changed
    ), changed


@needs_hf
def test_finetune_regression_head(hf_dir, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    rng = random.Random(3)
    for name, n in (("train.tsv", 48), ("eval.tsv", 17)):
        with open(folder / name, "w") as f:
            for _ in range(n):
                k = rng.randint(1, 6)
                f.write(f"{k / 2}\t{' '.join(rng.choice(WORDS['sport']) for _ in range(k))}\n")
    out = tmp_path / "run"
    argv = [
        "finetune",
        "--hf",
        str(hf_dir),
        "--train",
        str(folder / "train.tsv"),
        "--eval",
        str(folder / "eval.tsv"),
        "--out",
        str(out),
        "--max-steps",
        "8",
        "--per-device-train-batch-size",
        "16",
        "--backend",
        "eager",
        "--device",
        "cpu",
        "--quiet",
        "--regression",
        "--criterion",
        "patience",
    ]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "every exit on 17 eval examples (mse):" in text
    report = json.loads((out / "report.json").read_text())
    model, tokenizer, labels, settings = loading.load_finetuned(out, backend="eager")
    assert model.config.num_labels == 1 and settings["regression"] and report["metric"] == "mse"
    names, texts = tsv.read_tsv(str(folder / "eval.tsv"))
    ids, mask = encode(tokenizer, texts, settings["max_len"])
    y = torch.tensor([float(n) for n in names], dtype=torch.float64)
    with torch.no_grad():
        every = model(ids, mask).exit_logits.double()
    want = [float(((z[:, 0] - y) ** 2).mean()) for z in every]
    assert report["per_exit_accuracy"] == pytest.approx(want, rel=1e-6)
    assert cli.main(argv[:-2] + ["--criterion", "entropy"]) == 2
    assert "--regression needs --criterion patience" in capsys.readouterr().err
    (folder / "bad.tsv").write_text("high\tthe ball\n")
    swap = {str(folder / "train.tsv"): str(folder / "bad.tsv"), str(out): str(tmp_path / "run2")}
    assert cli.main([swap.get(x, x) for x in argv]) == 2
    assert "not a finite number" in capsys.readouterr().err


def write_pretrain_folder(folder, tnf_notes=True, weights_in=None):
    """A folder in ``effbert pretrain``'s layout: the masked-LM model's ``save_pretrained`` (config.json,
    model.safetensors, TNF notes included), its tokenizer (vocab.txt) and pretrain.json; ``weights_in``: a
    subfolder (``checkpoint-N``, a run stopped early) that holds the config and weights instead."""
    from effbert.models import TupeBertConfig, TupeBertForMaskedLM

    folder.mkdir()
    cfg = TupeBertConfig(
        vocab_size=len(vocab()),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        position_mode="tupe-r",
        backend="eager",
        tnf_num_notes=4 if tnf_notes else None,
    )
    mlm = TupeBertForMaskedLM(cfg)
    assert (mlm.notes is not None) == tnf_notes
    mlm.save_pretrained(folder / weights_in if weights_in else folder)
    (folder / "vocab.txt").write_text("".join(v + "\n" for v in vocab()))
    (folder / "pretrain.json").write_text(json.dumps({"settings": {"tnf": tnf_notes}}))
    return mlm


def test_finetune_from_a_pretrain_folder(tmp_path, data, capsys):
    mlm = write_pretrain_folder(tmp_path / "pre", tnf_notes=False)
    model, tokenizer, cased = loading.from_pretrain_folder(str(tmp_path / "pre"), 2, "eager", None)
    assert cased is False and model.config.multi_exit and model.config.position_mode == "tupe-r"
    want = mlm.bert.state_dict()
    got = model.bert.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # no pooler in a pretraining run: every off-ramp starts from the same one, as from a checkpoint's
    assert all(torch.equal(h.pooler.weight, model.exits[-1].pooler.weight) for h in model.exits)
    assert len({id(h.pooler) for h in model.exits}) == 3
    assert tokenizer.tokenize("Balls") == ["ball", "##s"]
    # TNF's notes are left out; a run stopped early starts from its latest checkpoint-N folder
    tnf = write_pretrain_folder(tmp_path / "pre-tnf", weights_in="checkpoint-7")
    (tmp_path / "pre-tnf" / "checkpoint-3").mkdir()  # an older one, never read
    enc, tok, _ = loading.from_pretrain_folder(str(tmp_path / "pre-tnf"), 2, "eager", None)
    assert enc.config.tnf_num_notes is None and not any(
        k.startswith("notes.") for k in enc.state_dict()
    )
    assert len(tok) == len(vocab())
    assert all(torch.equal(enc.bert.state_dict()[k], v) for k, v in tnf.bert.state_dict().items())
    out = tmp_path / "run"
    argv = [
        "finetune",
        "--init",
        str(tmp_path / "pre"),
        "--train",
        str(data / "train.tsv"),
        "--eval",
        str(data / "eval.tsv"),
        "--out",
        str(out),
        "--max-steps",
        "4",
        "--per-device-train-batch-size",
        "16",
        "--learning-rate",
        "1e-3",
        "--backend",
        "eager",
        "--device",
        "cpu",
        "--quiet",
        "--per-device-eval-batch-size",
        "16",
    ]
    assert cli.main(argv) == 0
    check_reload(out, data, check_report(out, "entropy", 4))
    argv.append("--overwrite")  # the run above is in --out
    assert cli.main(argv[:2] + [str(tmp_path / "missing")] + argv[3:]) == 2
    assert "--init:" in capsys.readouterr().err
    with open(tmp_path / "pre" / "vocab.txt", "a") as f:
        f.write("extra\n")  # a piece id the embeddings do not have
    assert cli.main(argv) == 2
    assert "more than the model's vocab_size" in capsys.readouterr().err


def test_a_pretrain_layout_that_never_shipped_is_refused_in_one_line(tmp_path, data, capsys):
    """A folder of config.json, vocab.txt, pretrain.json and a model.pt (a layout effbert pretrain
    never wrote) is not a pretraining run: one line naming --init and what it lacks, exit 2, nothing
    unpickled."""
    from effbert.models import TupeBertConfig, TupeBertForMaskedLM

    folder = tmp_path / "old"
    folder.mkdir()
    cfg = TupeBertConfig(
        vocab_size=len(vocab()),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        position_mode="tupe-r",
        tnf_num_notes=4,
    )
    (folder / "config.json").write_text(cfg.to_json())
    (folder / "vocab.txt").write_text("".join(v + "\n" for v in vocab()))
    (folder / "pretrain.json").write_text(json.dumps({"settings": {"cased": True}}))
    torch.save(TupeBertForMaskedLM(cfg).state_dict(), folder / "model.pt")
    assert (
        cli.main(
            [
                "finetune",
                "--init",
                str(folder),
                "--train",
                str(data / "train.tsv"),
                "--out",
                str(tmp_path / "run"),
                "--max-steps",
                "1",
                "--backend",
                "eager",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("effbert finetune: error: --init:") and "holds no weights" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.skipif(
    not installed("effbert.commands.pretrain"), reason="effbert pretrain is not in this tree"
)
def test_finetune_after_a_real_pretrain_run(tmp_path, data, capsys):
    from effbert.commands.pretrain import load_pretrained

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(line.split("\t", 1)[1] for line in open(data / "train.tsv")))
    pre = tmp_path / "pre"
    assert (
        cli.main(
            [
                "pretrain",
                "--data",
                str(corpus),
                "--out",
                str(pre),
                "--vocab-size",
                "120",
                "--layers",
                "3",
                "--hidden",
                "32",
                "--heads",
                "2",
                "--max-seq-length",
                "24",
                "--batch-size",
                "8",
                "--max-steps",
                "3",
                "--backend",
                "eager",
                "--tnf-min-count",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    mlm, _, _ = load_pretrained(pre)
    model, _, _ = loading.from_pretrain_folder(str(pre), 2, "eager", None)
    want, got = mlm.bert.state_dict(), model.bert.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "finetune",
                "--init",
                str(pre),
                "--train",
                str(data / "train.tsv"),
                "--eval",
                str(data / "eval.tsv"),
                "--out",
                str(out),
                "--max-steps",
                "4",
                "--per-device-train-batch-size",
                "16",
                "--learning-rate",
                "1e-3",
                "--backend",
                "eager",
                "--device",
                "cpu",
                "--quiet",
                "--per-device-eval-batch-size",
                "16",
            ]
        )
        == 0
    )
    capsys.readouterr()
    check_reload(out, data, check_report(out, "entropy", 4))


@needs_hf
def test_finetune_from_a_classifier_checkpoint_starts_from_its_head(tmp_path, data, hf_dir):
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path / "clf"
    cfg = BertConfig(
        vocab_size=len(vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf_model = BertForSequenceClassification(cfg).eval()
    hf_model.save_pretrained(folder)
    (folder / "vocab.txt").write_text((hf_dir / "vocab.txt").read_text())
    model, tokenizer, cased = loading.from_hf_folder(str(folder), 2, "eager", None)
    assert cased is False and model.config.multi_exit and model.config.num_labels == 2
    ids, mask = encode(tokenizer, ["The ball and the goal.", "Soup of rice"], 16)
    with torch.no_grad():
        got = model.eval()(ids, mask).exit_logits[-1]
        want = hf_model.double()(input_ids=ids, attention_mask=mask.long()).logits
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)


@needs_hf
@pytest.mark.parametrize(
    "change,message",
    [
        ({"--max-steps": "0"}, "--max-steps must be >= 1"),
        ({"--learning-rate": "-1"}, "--learning-rate must be > 0"),
        ({"--gamma": "2"}, "--gamma must be in [0, 1]"),
        ({"--loss": "pabee --grad-reg"}, "--grad-reg goes with --loss romebert"),
        ({"--loss": "deebert --grad-reg"}, "--grad-reg goes with --loss romebert"),
        ({"--regression-delta": "0"}, "--regression-delta must be > 0"),
        ({"--adam-beta1": "1"}, "--adam-beta1 must be in [0, 1), got 1.0"),
        ({"--adam-beta2": "1.5"}, "--adam-beta2 must be in [0, 1), got 1.5"),
        ({"--adam-epsilon": "0"}, "--adam-epsilon must be > 0, got 0.0"),
        ({"--max-grad-norm": "nan"}, "--max-grad-norm must be >= 0 (0: no clipping), got nan"),
        (
            {"--recipe": "tupe"},
            "--recipe tupe is a recipe of effbert pretrain, not finetune (effbert finetune's: "
            "deebert, pabee, romebert)",
        ),
        ({"--recipe": "rome"}, "--recipe 'rome': no such recipe"),
        ({"--backend": "fast"}, "--backend must be auto or one of"),
        ({"--train": "MISSING"}, "--train: no such file"),
        ({"--hf": "MISSING"}, "--hf:"),
        ({"--train": "BAD"}, "has no TAB"),
        ({"--eval": "UNKNOWN"}, "do not occur in --train"),
        ({"--train": "ONE"}, "classification needs two"),
        ({"--train": "LATIN1"}, "is not UTF-8 text (invalid continuation byte at byte 23"),
        ({"--train": "SWAPPED"}, "is the file text<TAB>label?"),
        ({"--train": "HEADER"}, "looks like a header row"),
        ({"--device": "tpu"}, "--device must be cpu, cuda or cuda:N, got 'tpu'"),
        ({"--out": "FILE"}, "exists and is not a folder"),
        ({"--out": "UNDER_FILE"}, "is a file"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(hf_dir, data, tmp_path, capsys, change, message):
    """Every mistake fails first, in one line, before any training (nothing is printed to stdout)."""
    (tmp_path / "bad.tsv").write_text("sport\tthe ball\nfood the soup\n")
    (tmp_path / "unknown.tsv").write_text("music\tthe song\n")
    (tmp_path / "one.tsv").write_text("food\tsoup\nfood\trice\n")
    (tmp_path / "latin1.tsv").write_bytes(
        "food\tsoup\nsport\tthe caf\u00e9 team\n".encode("latin-1")
    )
    rows = (data / "train.tsv").read_text().splitlines()
    (tmp_path / "swapped.tsv").write_text(
        "".join("\t".join(r.split("\t")[::-1]) + "\n" for r in rows)
    )
    (tmp_path / "header.tsv").write_text("label\ttext\n" + "\n".join(rows) + "\n")
    (tmp_path / "file").write_text("not a folder")
    files = {
        "MISSING": str(tmp_path / "nope.tsv"),
        "BAD": str(tmp_path / "bad.tsv"),
        "UNKNOWN": str(tmp_path / "unknown.tsv"),
        "ONE": str(tmp_path / "one.tsv"),
        "LATIN1": str(tmp_path / "latin1.tsv"),
        "SWAPPED": str(tmp_path / "swapped.tsv"),
        "HEADER": str(tmp_path / "header.tsv"),
        "FILE": str(tmp_path / "file"),
        "UNDER_FILE": str(tmp_path / "file" / "run"),
    }
    argv = args(hf_dir, data, tmp_path / "out", "--max-steps", "2")
    for flag, value in change.items():
        if flag not in argv:
            argv += [flag, "x"]
        i = argv.index(flag)
        argv[i : i + 2] = [flag, *files.get(value, value).split()]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("effbert finetune: error:") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "fine-tuning" not in captured.out
    assert not (tmp_path / "out" / "model.pt").exists()


def test_hf_without_transformers_says_how_to_install(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(
        sys.modules, "transformers", None
    )  # import transformers now raises ImportError
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("".join(v + "\n" for v in vocab()))
    assert cli.main(args(folder, data, tmp_path / "out", "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert "pip install transformers safetensors" in err and "effbert[hf]" not in err


def test_usage_errors_from_argparse(capsys):
    assert finetune.main(["--train", "x.tsv", "--out", "o"]) == 2  # neither --init nor --hf
    assert "--init" in capsys.readouterr().err
    assert finetune.main(["--train", "x.tsv", "--out", "o", "--init", "a", "--hf", "b"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_load_finetuned_refuses_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        loading.load_finetuned(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        loading.load_finetuned(tmp_path)


def test_load_finetuned_never_unpickles_code(tmp_path, data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_pretrain_folder(tmp_path / "pre", tnf_notes=False)
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "finetune",
                "--init",
                str(tmp_path / "pre"),
                "--train",
                str(data / "train.tsv"),
                "--out",
                str(out),
                "--max-steps",
                "1",
                "--backend",
                "eager",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    os.remove(out / "model.safetensors")  # weights in torch's pickle format: read as tensors only
    torch.save(_Payload(), out / "pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot read the model"):
        loading.load_finetuned(out)
    assert not (tmp_path / "PWNED_DIR").exists()


def test_out_never_destroys_another_run(tmp_path, data, capsys):
    """--out equal to --init, or holding a pretraining run, an earlier fine-tuning run or foreign files, is refused
    before any work and left as it was; --overwrite replaces an earlier fine-tuning run only."""
    write_pretrain_folder(tmp_path / "pre", tnf_notes=False)

    def argv(out, *extra):
        return [
            "finetune",
            "--init",
            str(tmp_path / "pre"),
            "--train",
            str(data / "train.tsv"),
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--per-device-train-batch-size",
            "16",
            "--save-steps",
            "0",
            "--backend",
            "eager",
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ]

    def snapshot(folder):
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    before = snapshot(tmp_path / "pre")
    for out, message in (
        (tmp_path / "pre", "is the folder of --init"),
        (tmp_path / "pre" / ".." / "pre", "is the folder of --init"),
    ):
        assert cli.main(argv(out)) == 2
        assert message in capsys.readouterr().err
    write_pretrain_folder(tmp_path / "pre2", tnf_notes=False)
    before2 = snapshot(tmp_path / "pre2")
    assert cli.main(argv(tmp_path / "pre2", "--overwrite")) == 2
    assert "holds an effbert pretrain run" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    assert cli.main(argv(foreign, "--overwrite")) == 2
    assert "of something else" in capsys.readouterr().err
    assert snapshot(tmp_path / "pre") == before and snapshot(tmp_path / "pre2") == before2
    assert (foreign / "config.json").read_text() == "{}"
    # an earlier fine-tuning run: refused, then replaced on request
    assert cli.main(argv(tmp_path / "ft")) == 0
    first = snapshot(tmp_path / "ft")
    capsys.readouterr()
    assert cli.main(argv(tmp_path / "ft", "--seed", "1")) == 2
    assert "pass --overwrite" in capsys.readouterr().err and snapshot(tmp_path / "ft") == first
    assert cli.main(argv(tmp_path / "ft", "--seed", "1", "--overwrite")) == 0
    assert snapshot(tmp_path / "ft")["model.safetensors"] != first["model.safetensors"]
    # the user's own files: --out must be new or empty (or a run of this command)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "my-notes.txt").write_text("mine")
    assert cli.main(argv(notes)) == 2
    assert "holds files effbert finetune did not write (my-notes.txt)" in capsys.readouterr().err
    assert sorted(os.listdir(notes)) == ["my-notes.txt"]
    (tmp_path / "ft" / "my-notes.txt").write_text("mine")
    assert cli.main(argv(tmp_path / "ft", "--overwrite")) == 2
    assert "did not write (my-notes.txt)" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(argv(empty)) == 0  # a new, empty folder is fine


class _Payload:
    def __reduce__(self):
        return (os.mkdir, ("PWNED_DIR",))


@pytest.mark.parametrize("where", ["top", "checkpoint"])
def test_tampered_pretrain_checkpoint_is_never_unpickled(
    tmp_path, data, capsys, monkeypatch, where
):
    """Weights that unpickle to code (torch's pickle format, in the folder or in the latest checkpoint-N of a run
    stopped early): the finetune command refuses them in one line and runs nothing."""
    monkeypatch.chdir(tmp_path)
    pre = tmp_path / "pre"
    write_pretrain_folder(
        pre, tnf_notes=False, weights_in=None if where == "top" else "checkpoint-1"
    )
    folder = pre if where == "top" else pre / "checkpoint-1"
    os.remove(folder / "model.safetensors")
    torch.save({"embeddings.word_embeddings.weight": _Payload()}, folder / "pytorch_model.bin")
    assert (
        cli.main(
            [
                "finetune",
                "--init",
                str(pre),
                "--train",
                str(data / "train.tsv"),
                "--out",
                str(tmp_path / "run"),
                "--max-steps",
                "2",
                "--backend",
                "eager",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("effbert finetune: error: --init:") and len(err.strip().splitlines()) == 1
    ), err
    assert not (tmp_path / "PWNED_DIR").exists() and not (tmp_path / "run").exists()


def test_a_suspicious_label_column_warns(tmp_path, data, capsys):
    names, texts = tsv.read_tsv(str(data / "train.tsv"))
    warned = []
    tsv.check_labels(names + ["spoort"], texts + ["the ball"], "t.tsv", warn=warned.append)
    assert len(warned) == 1 and "'spoort'" in warned[0]
    tsv.check_labels(names, texts, "t.tsv", warn=warned.append)
    assert len(warned) == 1  # well-formed data is quiet


@pytest.mark.parametrize(
    "damage",
    [
        "config-cut",
        "config-bad-size",
        "other-model-type",
        "weights-cut",
        "weights-other",
        "no-vocab",
        "tokenizer-bad",
        "no-weights",
    ],
)
def test_damaged_init_folder_is_one_line(tmp_path, data, capsys, damage):
    """A damaged pretraining folder, a checkpoint of another model type or a tokenizer that does not load: one line
    naming --init, exit 2, no --out folder."""
    from safetensors.torch import save_file

    pre = tmp_path / "pre"
    write_pretrain_folder(pre, tnf_notes=False)
    config = json.loads((pre / "config.json").read_text())
    edit = {
        "config-cut": lambda: (pre / "config.json").write_text('{"hidden_size": 3'),
        "config-bad-size": lambda: (pre / "config.json").write_text(
            json.dumps(dict(config, hidden_size=-4))
        ),
        "other-model-type": lambda: (pre / "config.json").write_text(
            json.dumps(dict(config, model_type="bert"))
        ),
        "weights-cut": lambda: (pre / "model.safetensors").write_bytes(
            (pre / "model.safetensors").read_bytes()[:300]
        ),
        "weights-other": lambda: save_file(
            {"embeddings.word_embeddings.weight": torch.ones(2, 2)}, pre / "model.safetensors"
        ),
        "no-vocab": lambda: os.remove(pre / "vocab.txt"),
        "tokenizer-bad": lambda: (pre / "tokenizer.json").write_text(
            '{"model": {"type": "WordPiece", "vocab": 3'
        ),
        "no-weights": lambda: os.remove(pre / "model.safetensors"),
    }
    edit[damage]()
    capsys.readouterr()  # what building the folder printed (save_pretrained's progress bar) is not the command's
    assert (
        cli.main(
            [
                "finetune",
                "--init",
                str(pre),
                "--train",
                str(data / "train.tsv"),
                "--out",
                str(tmp_path / "run"),
                "--max-steps",
                "2",
                "--backend",
                "eager",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("effbert finetune: error: --init:") and len(err.strip().splitlines()) == 1
    ), err
    assert "Traceback" not in err
    if damage == "other-model-type":
        assert "model type 'bert', not 'tupe-bert'" in err and "--hf" in err
    if damage == "tokenizer-bad":
        assert "the tokenizer in" in err and "does not load" in err
    assert not (tmp_path / "run").exists()


def test_hf_folder_of_another_model_type_or_a_bad_tokenizer_is_one_line(
    hf_dir, data, tmp_path, capsys
):
    """--hf given an effbert checkpoint, or a BERT whose tokenizer does not load: one line, exit 2."""
    import shutil

    write_pretrain_folder(tmp_path / "pre", tnf_notes=False)
    assert cli.main(args(tmp_path / "pre", data, tmp_path / "out", "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert (
        len(err.strip().splitlines()) == 1
        and "model type 'tupe-bert', not 'bert'" in err
        and "--init" in err
    )
    bad = tmp_path / "bert"
    shutil.copytree(hf_dir, bad)
    (bad / "vocab.txt").write_bytes(b"\xff\xfe\x00binary")
    assert cli.main(args(bad, data, tmp_path / "out", "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("effbert finetune: error: --hf: the tokenizer in")
        and len(err.strip().splitlines()) == 1
    )
    assert not (tmp_path / "out").exists()


def test_read_tsv_splits_on_newlines_only(tmp_path):
    """A text holding U+2028 or a form feed stays one example; CRLF files read like LF ones."""
    path = tmp_path / "t.tsv"
    path.write_bytes("a\tone\u2028two\r\nb\tthree\x0cfour\n\n".encode("utf-8"))
    assert tsv.read_tsv(str(path)) == (["a", "b"], ["one\u2028two", "three\x0cfour"])


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bar_only_on_a_terminal(tmp_path, data, capsys, monkeypatch, terminal):
    """stderr not a terminal (a log file): periodic summary lines, never a carriage return; on a terminal, Trainer's
    progress bar."""
    write_pretrain_folder(tmp_path / "pre", tnf_notes=False)
    capsys.readouterr()
    screen = _Terminal()
    if terminal:
        monkeypatch.setattr(sys, "stderr", screen)
    assert (
        cli.main(
            [
                "finetune",
                "--init",
                str(tmp_path / "pre"),
                "--train",
                str(data / "train.tsv"),
                "--out",
                str(tmp_path / "run"),
                "--max-steps",
                "4",
                "--logging-steps",
                "2",
                "--per-device-train-batch-size",
                "16",
                "--backend",
                "eager",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "step      2  loss" in captured.out and "step      4  loss" in captured.out
    if terminal:
        assert "\r" in screen.getvalue() and "4/4" in screen.getvalue()
    else:
        assert "\r" not in captured.out + captured.err and "it/s" not in captured.err
        assert "{'loss'" not in captured.out  # Trainer's own log dicts are not printed
        assert (
            "MISSING" not in captured.out + captured.err
        )  # the new off-ramps are no loading problem to report


def test_resume_from_a_checkpoint_gives_the_uninterrupted_run(tmp_path, data, capsys):
    """A run stopped after its step-3 checkpoint and resumed with --resume ends with the weights and per-step losses
    of the run that was never stopped (Trainer restores the optimizer, schedule, data order and random state)."""
    from safetensors.torch import load_file

    write_pretrain_folder(tmp_path / "pre", tnf_notes=False)

    def argv(out, *extra):
        return [
            "finetune",
            "--init",
            str(tmp_path / "pre"),
            "--train",
            str(data / "train.tsv"),
            "--eval",
            str(data / "eval.tsv"),
            "--out",
            str(out),
            "--max-steps",
            "6",
            "--save-steps",
            "3",
            "--per-device-train-batch-size",
            "8",
            "--learning-rate",
            "1e-3",
            "--backend",
            "eager",
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ]

    assert cli.main(argv(tmp_path / "whole")) == 0
    assert cli.main(argv(tmp_path / "cut")) == 0
    cut = tmp_path / "cut"
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == [
        "checkpoint-3",
        "checkpoint-6",
    ]
    import shutil

    shutil.rmtree(cut / "checkpoints" / "checkpoint-6")  # as if stopped after step 3
    for name in ("model.safetensors", "report.json"):
        os.remove(cut / name)
    capsys.readouterr()
    assert cli.main(argv(cut, "--resume")) == 0
    assert "resumed from" in capsys.readouterr().out
    want, got = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(cut / "model.safetensors"),
    )
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    losses = [
        json.loads((d / "report.json").read_text())["losses"] for d in (tmp_path / "whole", cut)
    ]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    assert cli.main(argv(tmp_path / "new", "--resume")) == 2
    assert "there is no run to resume" in capsys.readouterr().err


def test_resume_on_another_train_file_is_refused_by_name(tmp_path, data, capsys):
    """finetune.json records the --train file's fingerprint: a --resume on other examples is refused."""
    import shutil

    write_pretrain_folder(tmp_path / "pre", tnf_notes=False)
    train = tmp_path / "train.tsv"
    shutil.copy(data / "train.tsv", train)

    def argv(*extra):
        return [
            "finetune",
            "--init",
            str(tmp_path / "pre"),
            "--train",
            str(train),
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "2",
            "--save-steps",
            "1",
            "--per-device-train-batch-size",
            "16",
            "--backend",
            "eager",
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ]

    assert cli.main(argv()) == 0
    assert (
        json.loads((tmp_path / "run" / "finetune.json").read_text())["train_data"]["size"]
        == train.stat().st_size
    )
    with open(train, "a", encoding="utf-8") as f:
        f.write("sport\tOne more goal.\n")
    capsys.readouterr()
    assert cli.main(argv("--max-steps", "3", "--resume")) == 2
    err = capsys.readouterr().err
    assert (
        "--train:" in err
        and "train.tsv" in err
        and "bytes then" in err
        and len(err.strip().splitlines()) == 1
    )


def test_a_longer_resume_keeps_the_schedule_unless_reshaped(tmp_path, data, capsys):
    """--resume with more --steps keeps the run's linear schedule (steps past its end train at lr 0) and says so;
    --reshape-schedule stretches it to the new --steps (from the first step after the checkpoint on)."""
    import shutil

    write_pretrain_folder(tmp_path / "pre", tnf_notes=False)

    def argv(out, *extra):
        return [
            "finetune",
            "--init",
            str(tmp_path / "pre"),
            "--train",
            str(data / "train.tsv"),
            "--out",
            str(out),
            "--per-device-train-batch-size",
            "16",
            "--warmup-ratio",
            "0",
            "--save-steps",
            "2",
            "--backend",
            "eager",
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ]

    def lrs(out, step):
        with open(
            out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json", encoding="utf-8"
        ) as f:
            return [h["learning_rate"] for h in json.load(f)["log_history"] if "learning_rate" in h]

    assert cli.main(argv(tmp_path / "kept", "--max-steps", "2")) == 0
    shutil.copytree(tmp_path / "kept", tmp_path / "reshaped")
    capsys.readouterr()
    assert cli.main(argv(tmp_path / "kept", "--max-steps", "4", "--resume")) == 0
    assert (
        "keeping the run's learning-rate schedule: linear decay to 0 at step 2"
        in capsys.readouterr().out
    )
    assert lrs(tmp_path / "kept", 4)[2:] == [0.0, 0.0]
    assert (
        cli.main(argv(tmp_path / "reshaped", "--max-steps", "4", "--resume", "--reshape-schedule"))
        == 0
    )
    assert (
        "reshaping the learning-rate schedule (--reshape-schedule): linear decay to 0 at step 4, was 2"
        in capsys.readouterr().out
    )
    assert cli.main(argv(tmp_path / "long", "--max-steps", "4")) == 0
    assert (
        lrs(tmp_path / "reshaped", 4)[2:] == lrs(tmp_path / "long", 4)[2:]
        and lrs(tmp_path / "long", 4)[2] > 0
    )


def test_gradient_accumulation_equals_the_whole_batch(tmp_path, data):
    """--grad-accum 2 of 8 examples takes the steps of one batch of 16: the same weights (without dropout, to
    rounding), as Trainer averages the micro-batches' losses."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=len(vocab()),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    ).save_pretrained(bert)
    (bert / "vocab.txt").write_text("".join(v + "\n" for v in vocab()))
    runs = {}
    accum = ["--per-device-train-batch-size", "8", "--gradient-accumulation-steps", "2"]
    for name, extra in (("whole", ["--per-device-train-batch-size", "16"]), ("accum", accum)):
        argv = [
            "finetune",
            "--hf",
            str(bert),
            "--train",
            str(data / "train.tsv"),
            "--out",
            str(tmp_path / name),
            "--max-steps",
            "3",
            "--learning-rate",
            "1e-3",
            "--warmup-ratio",
            "0",
            "--backend",
            "eager",
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ]
        assert cli.main(argv) == 0
        runs[name] = load_file(tmp_path / name / "model.safetensors")
    start = loading.from_hf_folder(str(bert), 2, "eager", None)[0].state_dict()
    assert runs["whole"].keys() == runs["accum"].keys()
    for k in runs["whole"]:
        assert torch.allclose(runs["whole"][k], runs["accum"][k], rtol=1e-4, atol=2e-6), k
    encoder = [k for k in start if k.startswith("bert.")]
    moved = max(float((runs["whole"][k] - start[k]).abs().max()) for k in encoder)
    apart = max(float((runs["whole"][k] - runs["accum"][k]).abs().max()) for k in encoder)
    assert moved > 100 * apart, (
        moved,
        apart,
    )  # training moved the weights; the two runs moved them alike


@needs_hf
@pytest.mark.parametrize("project", ["others", "final"])
def test_grad_reg_training_step_is_romebert_projection(hf_dir, tmp_path, project):
    """MultiExitTrainer's training step with --grad-reg leaves in .grad exactly what RomeBERT's projection
    (gradient_regularized_backward on the last exit's cross-entropy and the rest of the loss) gives, each side
    divided by the micro-batches of the step as Trainer divides a loss."""
    import copy

    from transformers import TrainingArguments

    from effbert.losses import (
        gradient_regularized_backward,
        multi_exit_distillation_loss,
        romebert_projected_parameters,
    )
    from effbert.training import MultiExitTrainer

    model, tokenizer, _ = loading.from_hf_folder(str(hf_dir), 2, "eager", None)
    twin = copy.deepcopy(model)
    trainer = MultiExitTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none"),
        grad_reg=True,
        project=project,
        gradient_equilibrium=True,
    )
    trainer.current_gradient_accumulation_steps = 2
    ids, mask = encode(tokenizer, ["the ball and the goal", "soup of rice and salt", "a coach"], 16)
    labels = torch.tensor([1, 0, 1])
    torch.manual_seed(5)
    got_loss = trainer.training_step(
        model, {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}
    )
    torch.manual_seed(5)  # the same dropout masks
    twin.train()
    z = twin(ids, mask.long()).exit_logits.float()
    loss = multi_exit_distillation_loss(z, labels, gradient_equilibrium=True, backend="eager")
    final = torch.nn.functional.cross_entropy(z[-1], labels)
    params = [p for p in twin.parameters() if p.requires_grad]
    gradient_regularized_backward(
        final / 2,
        (loss - final) / 2,
        params,
        romebert_projected_parameters(twin.bert.encoder),
        project=project,
    )
    assert torch.equal(got_loss, (loss / 2).detach())
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-9), name
    assert int(trainer.projected) in (0, 1)


@needs_hf
def test_torchrun_two_processes_write_one_run(hf_dir, data, tmp_path):
    """Under torchrun (2 gloo processes) Trainer trains data parallel; one process prints the summary and writes the
    folder, which loads with its report; checkpoints come from that process too."""
    import subprocess

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "effbert.commands",
        "finetune",
        "--hf",
        str(hf_dir),
        "--train",
        str(data / "train.tsv"),
        "--eval",
        str(data / "eval.tsv"),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--save-steps",
        "2",
        "--per-device-train-batch-size",
        "8",
        "--backend",
        "eager",
        "--device",
        "cpu",
        "--logging-steps",
        "1",
        "--per-device-eval-batch-size",
        "16",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert text.count("done in") == 1 and text.count("step      2  loss") == 1, text
    assert "2 steps of 16" in text  # 8 a process, 2 processes
    report = json.loads((out / "report.json").read_text())
    assert report["train_steps"] == 2 and (out / "checkpoints" / "checkpoint-2").is_dir()
    model, _, labels, settings = loading.load_finetuned(out, backend="eager")
    assert labels == ["food", "sport"] and settings["complete"] and settings["steps"] == 2


@needs_hf
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["--fp16", "--bf16"])
def test_mixed_precision_on_cuda_with_grad_reg(hf_dir, data, tmp_path, capsys, precision):
    """Trainer's mixed precision on a GPU, through RomeBERT's two-backward step too (fp16: both losses carry the
    loss scale): the run learns with finite losses and its folder loads."""
    out = tmp_path / "run"
    argv = [
        "finetune",
        "--hf",
        str(hf_dir),
        "--train",
        str(data / "train.tsv"),
        "--eval",
        str(data / "eval.tsv"),
        "--out",
        str(out),
        "--max-steps",
        "30",
        "--per-device-train-batch-size",
        "16",
        "--learning-rate",
        "3e-3",
        "--device",
        "cuda",
        "--quiet",
        "--grad-reg",
        precision,
    ]
    assert cli.main(argv) == 0
    assert "gradient regularization: the others side projected on" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert all(torch.isfinite(torch.tensor(report["losses"])))
    assert report["train_loss_last"] < report["train_loss_first"]
    loading.load_finetuned(out, device="cuda")


@needs_hf
def test_multi_exit_trainer_checks_its_arguments(hf_dir, tmp_path):
    """Each bad setting raises naming its argument, before Trainer is built."""
    from transformers import TrainingArguments

    from effbert.training import MultiExitTrainer

    model, _, _ = loading.from_hf_folder(str(hf_dir), 2, "eager", None)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none")
    for kw, message in (
        ({"loss": "kd"}, "loss must be one of"),
        ({"gamma": 1.5}, "gamma must be in"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"stage": 3}, "stage must be 1 or 2"),
        ({"project": "both"}, "project must be one of"),
        ({"loss": "pabee", "grad_reg": True}, "grad_reg goes with"),
    ):
        with pytest.raises(ValueError, match=message):
            MultiExitTrainer(model=model, args=args, **kw)
    with pytest.raises(TypeError, match="gradient_equilibrium must be a bool"):
        MultiExitTrainer(model=model, args=args, gradient_equilibrium=1)
    with pytest.raises(ValueError, match="model must be a multi-exit classifier"):
        MultiExitTrainer(model=model.bert, args=args)


def test_multi_exit_trainer_from_a_users_script(tmp_path):
    """The docs' script: a pretraining folder through the Auto class with off-ramps, a dataset, Trainer's collator
    and MultiExitTrainer with PABEE's loss train the off-ramps; no effbert command involved."""
    import datasets
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        TrainingArguments,
    )

    from effbert.data.tokenization import load_tokenizer
    from effbert.training import MultiExitTrainer

    write_pretrain_folder(tmp_path / "pre")
    model = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "pre", multi_exit=True, num_labels=2, tnf_num_notes=None, backend="eager"
    )
    tokenizer = load_tokenizer(tmp_path / "pre")
    ds = datasets.Dataset.from_dict(
        {"text": ["the ball", "the soup", "a goal", "rice"] * 4, "labels": [1, 0, 1, 0] * 4}
    )
    ds = ds.map(
        lambda b: tokenizer(b["text"], return_token_type_ids=False),
        batched=True,
        remove_columns=["text"],
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = MultiExitTrainer(
        model=model,
        args=TrainingArguments(
            str(tmp_path / "out"),
            max_steps=2,
            per_device_train_batch_size=8,
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
        ),
        train_dataset=ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        loss="pabee",
    )
    trainer.train()
    after = model.state_dict()
    assert all(
        not torch.equal(
            after[f"exits.{i}.classifier.weight"], before[f"exits.{i}.classifier.weight"]
        )
        for i in range(3)
    )
    assert trainer.state.global_step == 2


def test_a_nan_loss_stops_the_run_before_its_checkpoint(tmp_path, data, capsys, monkeypatch):
    """A non-finite loss at step 3 ends the run in one line (exit 2): the checkpoints of steps 1 and 2 stay, no
    checkpoint of step 3 and no model are written."""
    import effbert.losses

    real, calls = effbert.losses.multi_exit_distillation_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(effbert.losses, "multi_exit_distillation_loss", poisoned)
    write_pretrain_folder(tmp_path / "pre", tnf_notes=False)
    capsys.readouterr()
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "finetune",
                "--init",
                str(tmp_path / "pre"),
                "--train",
                str(data / "train.tsv"),
                "--out",
                str(out),
                "--max-steps",
                "5",
                "--save-steps",
                "1",
                "--per-device-train-batch-size",
                "8",
                "--backend",
                "eager",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "the loss is nan at step 3: lower --learning-rate" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-1",
        "checkpoint-2",
    ]
    assert not (out / "model.safetensors").exists()


def test_deebert_resume_in_its_second_stage(tmp_path, data, capsys):
    """DeeBERT stopped in stage 2 resumes there (stage 1 is not run again, its losses come from its last
    checkpoint) and ends with the weights and losses of the run that was never stopped."""
    import shutil

    from safetensors.torch import load_file

    write_pretrain_folder(tmp_path / "pre", tnf_notes=False)

    def argv(out, *extra):
        return [
            "finetune",
            "--init",
            str(tmp_path / "pre"),
            "--train",
            str(data / "train.tsv"),
            "--eval",
            str(data / "eval.tsv"),
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--save-steps",
            "1",
            "--per-device-train-batch-size",
            "8",
            "--loss",
            "deebert",
            "--backend",
            "eager",
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ]

    assert cli.main(argv(tmp_path / "whole")) == 0
    assert cli.main(argv(tmp_path / "cut")) == 0
    cut = tmp_path / "cut"
    shutil.rmtree(
        cut / "checkpoints" / "stage-2" / "checkpoint-2"
    )  # stopped after stage 2's first step
    os.remove(cut / "model.safetensors")
    capsys.readouterr()
    assert cli.main(argv(cut, "--resume")) == 0
    text = capsys.readouterr().out
    assert "stage 1 finished before the resume" in text and "resumed from" in text
    want, got = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(cut / "model.safetensors"),
    )
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    losses = [
        json.loads((d / "report.json").read_text())["losses"] for d in (tmp_path / "whole", cut)
    ]
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_bf16_mixed_precision_on_the_cpu(tmp_path, data):
    """--bf16 runs Trainer's autocast on the CPU too; the saved weights stay float32 and finite."""
    from safetensors.torch import load_file

    write_pretrain_folder(tmp_path / "pre", tnf_notes=False)
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "finetune",
                "--init",
                str(tmp_path / "pre"),
                "--train",
                str(data / "train.tsv"),
                "--out",
                str(out),
                "--max-steps",
                "2",
                "--per-device-train-batch-size",
                "8",
                "--bf16",
                "--backend",
                "eager",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    weights = load_file(out / "model.safetensors")
    assert all(w.dtype == torch.float32 and bool(torch.isfinite(w).all()) for w in weights.values())
    assert json.loads((out / "finetune.json").read_text())["complete"]


# The published values, stated here (not read from effbert.commands.recipes), so a wrong table fails. Each code's
# AdamW is transformers' (betas (0.9, 0.999)) with its script's --adam_epsilon 1e-8, --max_grad_norm 1.0,
# --weight_decay 0.0 and --warmup_steps 0 (the defaults its run script keeps).
FINETUNE_RECIPES = {
    # castorini/DeeBERT scripts/train_highway.sh (bert): lr 2e-5, batch 8, 3 epochs (a stage), max_seq_length 128
    "deebert": {
        "loss": "deebert",
        "criterion": "entropy",
        "learning_rate": 2e-5,
        "warmup_steps": 0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "per_device_train_batch_size": 8,
        "num_train_epochs": 3.0,
        "max_seq_length": 128,
    },
    # JetRunner/PABEE finetune_bert.sh: lr 2e-5, batch 32, 5 epochs, max_seq_length 128; one shared pooler; patience
    "pabee": {
        "loss": "pabee",
        "shared_pooler": True,
        "criterion": "patience",
        "learning_rate": 2e-5,
        "warmup_steps": 0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "per_device_train_batch_size": 32,
        "num_train_epochs": 5.0,
        "max_seq_length": 128,
    },
    # romebert/RomeBERT scripts/train_high.sh (bert): lr 2e-5, batch 8, 3 epochs, max_seq_length 128, gamma 0.9,
    # temper 3.0
    "romebert": {
        "loss": "romebert",
        "gamma": 0.9,
        "temperature": 3.0,
        "criterion": "entropy",
        "learning_rate": 2e-5,
        "warmup_steps": 0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "per_device_train_batch_size": 8,
        "num_train_epochs": 3.0,
        "max_seq_length": 128,
    },
}


@pytest.mark.parametrize("name", sorted(FINETUNE_RECIPES))
def test_each_recipe_sets_exactly_the_published_values(name):
    from effbert.commands import recipes

    base = ["--hf", "b", "--train", "t.tsv", "--out", "o"]
    plain = vars(finetune.build_parser().parse_args(base))
    argv = [*base, "--recipe", name]
    a = finetune.build_parser().parse_args(argv)
    line = recipes.apply(a, "finetune", finetune.build_parser, argv)
    want = FINETUNE_RECIPES[name]
    assert {k: getattr(a, k) for k in want} == want
    assert {k: v for k, v in vars(a).items() if k not in want and k != "recipe"} == {
        k: v for k, v in plain.items() if k not in want and k != "recipe"
    }  # nothing else
    assert line.startswith(f"recipe {name}, ") and "--learning-rate 2e-05" in line
    assert "--warmup-steps 0 " in line


@needs_hf
def test_a_recipe_under_the_users_flags_reaches_trainer(
    hf_dir, data, tmp_path, capsys, monkeypatch
):
    """--recipe pabee with the user's --lr, --batch-size and --adam-beta2: theirs win, the recipe sets the rest,
    one line says which; Trainer and its AdamW get them; finetune.json records them."""
    from effbert.training import MultiExitTrainer

    seen = []
    init = MultiExitTrainer.__init__

    def record(trainer, *a, **kw):
        init(trainer, *a, **kw)
        seen.append(trainer)

    monkeypatch.setattr(MultiExitTrainer, "__init__", record)
    out = tmp_path / "run"
    assert (
        cli.main(
            args(hf_dir, data, out, "--max-steps", "2", "--recipe", "pabee", "--adam-beta2", "0.98")
        )
        == 0
    )
    text = capsys.readouterr().out
    assert [x for x in text.splitlines() if x.startswith("recipe ")] == [
        "recipe pabee, PABEE (Zhou et al., NeurIPS 2020): --loss pabee --shared-pooler --criterion patience "
        "--warmup-steps 0 --adam-beta1 0.9 --adam-epsilon 1e-08 --weight-decay 0 --max-grad-norm 1 "
        "--num-train-epochs 5 --max-seq-length 128; yours kept: --learning-rate 0.003 --adam-beta2 "
        "0.98 "
        "--per-device-train-batch-size 16"
    ]
    t = seen[-1]
    assert (
        t.args.learning_rate,
        t.args.adam_beta1,
        t.args.adam_beta2,
        t.args.adam_epsilon,
        t.args.weight_decay,
        t.args.max_grad_norm,
        t.args.per_device_train_batch_size,
    ) == (3e-3, 0.9, 0.98, 1e-8, 0.0, 1.0, 16)
    group = t.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-8
    assert t.exit_loss["loss"] == "pabee"
    settings = json.loads((out / "finetune.json").read_text())
    assert (
        settings["recipe"],
        settings["loss"],
        settings["shared_pooler"],
        settings["adam_beta2"],
    ) == ("pabee", "pabee", True, 0.98)
    assert "batched early exit" in text and "patience" in text


# ------------------------------------------------------------------------------- the flag
# vocabulary and steps


@pytest.mark.parametrize(
    "old,new",
    [
        ("--lr", "--learning-rate"),
        ("--steps", "--max-steps"),
        ("--epochs", "--num-train-epochs"),
        ("--grad-accum", "--gradient-accumulation-steps"),
        ("--warmup", "--warmup-steps"),
        ("--save-every", "--save-steps"),
        ("--log-every", "--logging-steps"),
        ("--eval-batch-size", "--per-device-eval-batch-size"),
        ("--max-len", "--max-seq-length"),
    ],
)
def test_old_spellings_are_refused_with_the_new_name(tmp_path, capsys, old, new):
    """Each old flag (also as --flag=value) is one line naming its new spelling, before anything
    runs."""
    for spelled in ([old, "3"], [f"{old}=3"]):
        argv = ["finetune", "--hf", "b", "--train", "t.tsv", "--out", str(tmp_path / "o"), *spelled]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"effbert finetune: error: {old} is now {new}" or (
            err.startswith(f"effbert finetune: error: {old} is now {new}")
            and len(err.splitlines()) == 1
        ), err
    assert not (tmp_path / "o").exists()


def _checked(tmp_path, *extra):
    s = finetune.build_parser().parse_args(
        ["--hf", "b", "--train", "t.tsv", "--out", str(tmp_path / "o"), "--device", "cpu", *extra]
    )
    try:
        finetune.check(s)
    finally:
        if getattr(s, "run_folder", None) is not None:
            s.run_folder.release()
    return s


def test_global_batch_size_and_warmup_are_resolved_once(tmp_path):
    """--batch-size is global rows an optimizer step (processes x accumulation x per-device); the
    per-device batch defaults to 32 and the warm-up to a 0.1 share; each exclusive pair is refused
    together."""
    s = _checked(tmp_path)
    assert (s.per_device_train_batch_size, s.warmup_ratio, s.warmup_steps) == (32, 0.1, None)
    s = _checked(
        tmp_path, "--batch-size", "48", "--gradient-accumulation-steps", "3", "--warmup-steps", "7"
    )
    assert (s.per_device_train_batch_size, s.warmup_ratio, s.warmup_steps) == (16, None, 7)
    for extra, message in (
        (["--batch-size", "10", "--gradient-accumulation-steps", "4"], "not a multiple"),
        (["--batch-size", "8", "--per-device-train-batch-size", "8"], "exclude each other"),
        (["--warmup-steps", "1", "--warmup-ratio", "0.1"], "exclude each other"),
        (["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1)"),
    ):
        with pytest.raises(cli.UsageError, match=re.escape(message)):
            _checked(tmp_path, *extra)


def test_help_has_a_line_for_every_option_and_each_default_once(capsys):
    """finetune --help: every option has help, no RST backticks, a default printed at most once."""
    p = finetune.build_parser()
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "--per-device-train-batch-size" in text and "--report-to" in text
    blocks = re.split(r"\n  (?=-)", text)
    assert all(b.count("default") <= 1 for b in blocks), [
        b for b in blocks if b.count("default") > 1
    ]
    # --save-steps, --seed (0 and 1 are shown)
    assert "(default: 500)" in text and "(default: 0)" in text


def _settings(tmp_path, data, **kw):
    import types

    base = dict(
        train=str(data / "train.tsv"),
        eval=str(data / "eval.tsv"),
        out=str(tmp_path / "o"),
        resume=False,
        regression=False,
    )
    return types.SimpleNamespace(**{**base, **kw})


def test_read_examples_step(tmp_path, data):
    """training.finetune.read_examples on its own: sorted labels, class ids, --eval mapped by
    --train's labels; an --eval label --train lacks is a one-line UsageError naming --eval."""
    ex = finetune_run.read_examples(_settings(tmp_path, data))
    names, texts = tsv.read_tsv(str(data / "train.tsv"))
    assert ex.labels == ["food", "sport"] and ex.train_texts == texts
    assert ex.train_targets.dtype == torch.int64
    assert ex.train_targets.tolist() == [ex.labels.index(n) for n in names]
    e_names, _ = tsv.read_tsv(str(data / "eval.tsv"))
    assert ex.eval_targets.tolist() == [ex.labels.index(n) for n in e_names]
    (tmp_path / "u.tsv").write_text("music\tthe song\n")
    with pytest.raises(
        cli.UsageError, match="--eval: labels \\['music'\\] do not occur in --train"
    ):
        finetune_run.read_examples(_settings(tmp_path, data, eval=str(tmp_path / "u.tsv")))
    (tmp_path / "bin.tsv").write_bytes(b"a\tx\0y\n")
    with pytest.raises(cli.UsageError, match="--train: .* is binary, not text"):
        finetune_run.read_examples(_settings(tmp_path, data, train=str(tmp_path / "bin.tsv")))


def test_training_args_step(tmp_path, data):
    """training.finetune.training_args on its own: the settled flags reach TrainingArguments by
    Trainer's names."""
    s = _checked(
        tmp_path,
        "--batch-size",
        "24",
        "--gradient-accumulation-steps",
        "2",
        "--warmup-steps",
        "5",
        "--save-steps",
        "0",
        "--learning-rate",
        "1e-4",
        "--max-steps",
        "9",
    )
    t = finetune_run.training_args(s, str(tmp_path / "ck"), torch.device("cpu"), 1)
    assert (
        t.per_device_train_batch_size,
        t.gradient_accumulation_steps,
        t.warmup_steps,
        t.learning_rate,
        t.max_steps,
        t.save_strategy,
        t.report_to,
    ) == (12, 2, 5, 1e-4, 9, "no", [])
    s = _checked(tmp_path)
    t = finetune_run.training_args(s, str(tmp_path / "ck"), torch.device("cpu"), 2)
    assert (t.save_steps, t.save_total_limit, t.seed) == (500, 2, 1)


@needs_hf
def test_saved_files_are_mode_0644(hf_dir, tmp_path):
    """save_finetuned writes every file readable by all (0644), the weights included, whatever its
    writer does."""
    import stat

    model, tokenizer, _ = loading.from_hf_folder(str(hf_dir), 2, "eager")
    loading.save_finetuned(tmp_path / "run", model, tokenizer, ["a", "b"], {"max_len": 32})
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    assert "model.safetensors" in modes and "finetune.json" in modes
    assert all(m == 0o644 for m in modes.values()), modes
    with pytest.raises(ValueError, match="labels must name the model's 2 outputs"):
        loading.save_finetuned(tmp_path / "run2", model, tokenizer, ["a"], {})
