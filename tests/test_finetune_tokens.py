"""``effbert finetune --task token-classification`` end to end on the CPU eager backend: a tiny
random HF BERT folder (and a tiny ``effbert pretrain`` run) and generated CoNLL files of a two-type
chunking task; both stages (joint training, then self-sampling), the report's per-layer F1 against
seqeval on the saved model's own predictions, the TOKEE/SENTEE rows against the model's batched
early exit, the calibrated threshold reloaded, resume, and every bad input refused in one line
naming its flag."""

import json
import math
import random
import shutil

import pytest
import torch

from effbert import commands as cli
from effbert.commands import finetune
from effbert.models import loading
from test_finetune import FILLER, WORDS, save_tiny_bert

pytestmark = pytest.mark.requires("datasets", "accelerate", "seqeval")

TYPES = {"sport": "SPORT", "food": "FOOD"}


def write_conll(path, n, seed, docstart=True):
    """``n`` sentences: runs of one topic's words are a chunk of its type (B- then I-), filler
    words are O; some words take an ``s`` (two word pieces)."""
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- O O", ""] if docstart else []
    for _ in range(n):
        prev = None
        for _ in range(rng.randint(3, 9)):
            topic = rng.choice([None, "sport", "food"])
            word = rng.choice(WORDS[topic] if topic else FILLER)
            word += "s" if topic and rng.random() < 0.3 else ""
            tag = "O" if topic is None else ("I-" if prev == topic else "B-") + TYPES[topic]
            prev = topic
            lines.append(f"{word} X {tag}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conll")
    write_conll(folder / "train.conll", 64, seed=1)
    write_conll(folder / "dev.conll", 24, seed=2, docstart=False)
    return folder


def argv(source, data, out, *extra, flag="--hf"):
    return [
        "finetune",
        "--task",
        "token-classification",
        flag,
        str(source),
        "--train",
        str(data / "train.conll"),
        "--eval",
        str(data / "dev.conll"),
        "--out",
        str(out),
        "--max-steps",
        "6",
        "--per-device-train-batch-size",
        "16",
        "--learning-rate",
        "3e-3",
        "--logging-steps",
        "3",
        "--backend",
        "eager",
        "--device",
        "cpu",
        "--per-device-eval-batch-size",
        "8",
        "--max-seq-length",
        "32",
        "--token-exit-thresholds",
        "0.2",
        "0.6",
        "--quiet",
        *extra,
    ]


def saved_predictions(out, data):
    """The saved model's every-layer logits on dev.conll, in float64, and the gold labels."""
    from effbert.data.conll import encode_conll, read_conll, token_classification_collator

    model, tokenizer, labels, settings = loading.load_finetuned(out, backend="eager")
    words, tags = read_conll(data / "dev.conll", "--eval")
    rows = encode_conll(tokenizer, words, tags, {n: i for i, n in enumerate(labels)}, 32)
    batch = token_classification_collator(tokenizer)(rows)
    model = model.double()
    with torch.no_grad():
        z = model(batch["input_ids"], attention_mask=batch["attention_mask"]).exit_logits
    return model, batch, labels, settings, z


def seqeval_f1(pred, gold, labels):
    from seqeval.metrics import f1_score

    y_true = [[labels[g] for g in row if g != -100] for row in gold.tolist()]
    y_pred = [
        [labels[p] for p, g in zip(prow, grow) if g != -100]
        for prow, grow in zip(pred.tolist(), gold.tolist())
    ]
    return f1_score(y_true, y_pred, zero_division=0)


def test_both_stages_report_and_reload(hf_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        argv(hf_dir, data, out, "--self-sampling-steps", "4", "--target-exit", "2", "--seed", "3")
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "stage 1: every layer's classifier" in text and "stage 2: self-sampling" in text
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "token-classification" and report["num_layers"] == 3
    assert report["labels"] == ["O", "B-FOOD", "B-SPORT", "I-FOOD", "I-SPORT"]
    assert report["stage_steps"] == {"stage-1": 6, "stage-2": 4} and len(report["losses"]) == 10
    assert all(math.isfinite(x) for x in report["losses"])
    assert len(report["per_layer_f1"]["stage-1"]) == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["stage-1", "stage-2"]
    # the report's final per-layer F1 is seqeval's on the saved model's own predictions
    model, batch, labels, settings, z = saved_predictions(out, data)
    assert settings["task"] == "token-classification" and settings["complete"]
    want = [seqeval_f1(z[i].argmax(-1), batch["labels"], labels) for i in range(3)]
    assert report["final_per_layer_f1"] == pytest.approx(want, abs=1e-12)
    assert report["per_layer_f1"]["stage-2"] == report["final_per_layer_f1"]
    # full depth equals the last layer's F1; every row's accounting holds
    rows = report["rows"]
    assert rows[0]["mode"] == "full" and rows[0]["f1"] == pytest.approx(want[-1], abs=1e-12)
    assert [(r["mode"], r["threshold"]) for r in rows[1:]] == [
        ("tokee", 0.2),
        ("tokee", 0.6),
        ("sentee", 0.2),
        ("sentee", 0.6),
    ]
    for r in rows[1:]:
        assert 1 <= r["avg_exit_layer"] <= 3 and 0 <= r["token_layers_saved"] < 1
        assert r["layers_saved"] == pytest.approx(1 - r["avg_exit_layer"] / 3)
        assert r["speedup_bound"] == pytest.approx(1 / (1 - r["token_layers_saved"]))
        assert r["above_bound"] == (r["speedup"] > 1.05 * r["speedup_bound"])
        assert r["delta"] == pytest.approx(r["f1"] - rows[0]["f1"])
    # a row equals the saved model's batched early exit at its threshold (float64 here)
    from effbert.models.token_classification import published_token_thresholds

    ee = model.early_exit_token_labels(
        batch["input_ids"],
        batch["attention_mask"],
        label_mask=batch["labels"] != -100,
        mode="tokee",
        thresholds=published_token_thresholds(0.6, 3),
        window=5,
    )
    keep = batch["labels"] != -100
    assert rows[2]["avg_exit_layer"] == pytest.approx(float(ee.exit_layer[keep].double().mean()))
    assert rows[2]["f1"] == pytest.approx(seqeval_f1(ee.labels, batch["labels"], labels))
    # the calibrated threshold: recorded, in the config, and reproduced by TOKEE on the reload
    cal = report["token_exit"]
    assert cal == settings["token_exit"] == model.config.token_exit
    assert cal["target_exit"] == 2 and cal["reached"]
    assert cal["thresholds"] == published_token_thresholds(cal["threshold"], 3)
    ee = model.early_exit_token_labels(
        batch["input_ids"],
        batch["attention_mask"],
        label_mask=keep,
        thresholds=cal["thresholds"],
        window=cal["window"],
    )
    avg = float(ee.exit_layer[keep].double().mean())
    assert avg == pytest.approx(cal["avg_exit_layer"], abs=1e-9) and avg >= 2
    # transformers' Auto class loads the folder too
    from transformers import AutoModelForTokenClassification

    auto = AutoModelForTokenClassification.from_pretrained(out).double().eval()
    with torch.no_grad():
        again = auto(batch["input_ids"], attention_mask=batch["attention_mask"]).exit_logits
    assert torch.allclose(again, z, atol=1e-12)
    assert (out / "report.png").is_file()


def test_stage_one_only_from_a_pretrain_run(data, tmp_path, capsys):
    """--init an effbert pretrain run (made by the command): its encoder weights are the model's."""
    from effbert.commands.pretrain import load_pretrained

    corpus = tmp_path / "corpus.txt"
    sentences, words = [], []
    for line in (data / "train.conll").read_text().splitlines():
        if line.strip() and not line.startswith("-DOCSTART-"):
            words.append(line.split()[0])
        elif words:
            sentences.append(" ".join(words))
            words = []
    corpus.write_text("".join(s + ".\n" for s in sentences))
    pre = tmp_path / "pre"
    code = cli.main(
        [
            "pretrain",
            "--data",
            str(corpus),
            "--out",
            str(pre),
            "--vocab-size",
            "120",
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
            "--max-steps",
            "2",
            "--backend",
            "eager",
            "--tnf-min-count",
            "3",
            "--quiet",
        ]
    )
    assert code == 0
    out = tmp_path / "run"
    assert cli.main(argv(pre, data, out, flag="--init")) == 0
    text = capsys.readouterr().out
    assert "stage 2" not in text and "stage 1 entity F1" in text
    report = json.loads((out / "report.json").read_text())
    assert report["per_layer_f1"]["stage-2"] is None and report["stage_steps"]["stage-2"] == 0
    model, _, _, settings = loading.load_finetuned(out)
    assert type(model).__name__ == "TupeBertForTokenClassification" and settings["init"] == str(pre)
    assert report["token_exit"] is None and settings["token_exit"] is None
    # the model starts from the pretrain run's encoder, every weight
    from types import SimpleNamespace

    from effbert.training.finetune_tokens import _from_pretrain

    mlm, _, _ = load_pretrained(pre)
    start, _ = _from_pretrain(SimpleNamespace(init=str(pre), cased=None, backend="eager"), 5)
    want, got = mlm.bert.state_dict(), start.bert.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert model.config.num_hidden_layers == 2 and len(model.exits) == 2


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_gives_the_uninterrupted_run(hf_dir, data, tmp_path, capsys, stage):
    """Stopped after stage 1's step-4 checkpoint (stage 2 never started) or after stage 2's step-2
    checkpoint, and resumed: the weights and every loss of the run never stopped (stage 1 from its
    checkpoint; in stage 2 the stage-1 model from stage 1's last checkpoint, the draws seeded by
    the step)."""
    from safetensors.torch import load_file

    extra = ("--self-sampling-steps", "4", "--save-steps", "2", "--token-exit-thresholds", "0.3")

    def run(out, *more):
        return cli.main(argv(hf_dir, data, out, *extra, *more))

    assert run(tmp_path / "whole") == 0
    cut = tmp_path / "cut"
    assert run(cut) == 0
    if stage == 1:
        shutil.rmtree(cut / "checkpoints" / "stage-2")
        shutil.rmtree(cut / "checkpoints" / "stage-1" / "checkpoint-6")
    else:
        shutil.rmtree(cut / "checkpoints" / "stage-2" / "checkpoint-4")
    for name in ("model.safetensors", "report.json"):
        (cut / name).unlink()
    capsys.readouterr()
    assert run(cut, "--resume") == 0
    text = capsys.readouterr().out
    assert ("stage 1 finished before the resume" in text) == (stage == 2)
    assert f"resumed from {cut / 'checkpoints' / f'stage-{stage}'}" in text
    want, got = (load_file(d / "model.safetensors") for d in (tmp_path / "whole", cut))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    losses = [
        json.loads((d / "report.json").read_text())["losses"] for d in (tmp_path / "whole", cut)
    ]
    assert len(losses[0]) == 10 and losses[0] == losses[1]


@pytest.mark.parametrize(
    "change, message",
    [
        (("--train", "MISSING"), "--train: no such file"),
        (("--eval", "ONECOL"), "--eval: line 2 of"),
        (("--train", "NONBIO"), "--train: line 1 of"),
        (("--train", "EMPTY"), "--train: "),
        (("--task", "chunks"), "--task: invalid choice"),
        (("--self-sampling-steps", "-1"), "--self-sampling-steps must be >= 0"),
        (("--window", "4"), "--window must be an odd number"),
        (("--target-exit", "0.5"), "--target-exit must be >= 1"),
        (("--target-exit", "9"), "--target-exit must be at most the model's 3 layers"),
        (("--loss", "deebert"), "--loss applies to --task sequence-classification"),
        (("--regression",), "--regression applies to --task sequence-classification"),
        (("--no-flooding",), "--no-flooding is a stage-2 setting: it goes with --self-sampling"),
        (("--sandwich-full", "4"), "--sandwich-full is a stage-2 setting"),
    ],
)
def test_bad_inputs_are_one_line_naming_the_flag(hf_dir, data, tmp_path, capsys, change, message):
    bad = {
        "MISSING": tmp_path / "missing.conll",
        "ONECOL": tmp_path / "onecol.conll",
        "NONBIO": tmp_path / "nonbio.conll",
        "EMPTY": tmp_path / "empty.conll",
    }
    bad["ONECOL"].write_text("ball X B-SPORT\nsoup\n")
    bad["NONBIO"].write_text("ball X I-SPORT\n")
    bad["EMPTY"].write_text("\n-DOCSTART- -X- O O\n\n")
    args = argv(hf_dir, data, tmp_path / "out")
    flag, *value = change
    if flag in args and value:
        i = args.index(flag)
        args[i + 1] = str(bad.get(value[0], value[0]))
    else:
        args += [flag, *value]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    if flag == "--task":  # argparse's own refusal: its usage, then the one error line
        err = err.splitlines()[-1]
    assert message in err and "\n" not in err, err
    if flag in ("--train", "--eval") and value[0] != "MISSING":
        assert str(bad[value[0]]) in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ("--self-sampling-steps", "3"),
            "--self-sampling-steps goes with --task token-classification",
        ),
        (("--no-flooding",), "--no-flooding goes with --task token-classification"),
        (("--target-exit", "2"), "--target-exit goes with --task token-classification"),
        (("--sandwich-full", "1"), "--sandwich-full goes with --task token-classification"),
    ],
)
def test_token_flags_without_the_token_task_are_refused(
    hf_dir, data, tmp_path, capsys, extra, message
):
    args = [
        "finetune",
        "--hf",
        str(hf_dir),
        "--train",
        str(data / "train.conll"),
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_target_exit_needs_eval(hf_dir, data, tmp_path, capsys):
    args = argv(hf_dir, data, tmp_path / "out", "--target-exit", "2")
    i = args.index("--eval")
    del args[i : i + 2]
    assert cli.main(args) == 2
    assert "--target-exit goes with --eval" in capsys.readouterr().err


def test_help_lists_the_token_flags(capsys):
    with pytest.raises(SystemExit):
        finetune.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--task {sequence-classification,token-classification}",
        "--self-sampling-steps N",
        "--self-sampling-learning-rate X",
        "--self-sampling-encoder-lr-scale X",
        "--no-flooding",
        "--flooding-bias X",
        "--sandwich-small N",
        "--sandwich-full N",
        "--copy-wordpieces {all,first}",
        "--window N",
        "--token-exit-thresholds X [X ...]",
        "--target-exit X",
    ):
        assert flag in text, flag


def test_stage_two_optimizer_has_the_published_learning_rates(hf_dir):
    """Stage 2's AdamW: the encoder at --self-sampling-learning-rate x
    --self-sampling-encoder-lr-scale (published --lr 1e-4, --ptm_lr_rate 0.1), the classifiers at
    the rate itself; every trainable weight in exactly one group, weight decay on matrices and
    embeddings only."""
    from effbert.integrations.hf import token_classifier_from_hf_bert
    from effbert.training.finetune_tokens import stage2_optimizer

    s = finetune.build_parser().parse_args(["--train", "x", "--out", "o", "--weight-decay", "0.05"])
    model = token_classifier_from_hf_bert(str(hf_dir), 5, backend="eager")
    opt = stage2_optimizer(s, model)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.append(name)
            want_lr = 1e-4 * (0.1 if name.startswith("bert.") else 1.0)
            assert group["lr"] == pytest.approx(want_lr, rel=1e-12), name
            decayed = p.dim() >= 2 and "norm" not in name
            assert group["weight_decay"] == (0.05 if decayed else 0.0), name
    assert sorted(seen) == sorted(names.values())


def test_eval_without_seqeval_says_how_to_install(hf_dir, data, tmp_path, capsys, monkeypatch):
    """The report's entity F1 needs seqeval: without it the command stops before any work, in one
    line naming --eval and the install."""
    import builtins

    real_import = builtins.__import__

    def no_seqeval(name, *args, **kwargs):
        if name.split(".")[0] == "seqeval":
            raise ImportError("No module named 'seqeval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_seqeval)
    assert cli.main(argv(hf_dir, data, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert "--eval: entity F1 needs seqeval: pip install" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_without_eval_both_stages_train_and_save_without_a_report(hf_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    args = argv(hf_dir, data, out, "--self-sampling-steps", "2", "--max-steps", "2")
    i = args.index("--eval")
    del args[i : i + 2]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "stage 2: self-sampling" in text and "entity F1" not in text
    assert not (out / "report.json").exists()
    model, _, labels, settings = loading.load_finetuned(out)
    assert settings["stage_steps"] == {"stage-1": 2, "stage-2": 2} and settings["steps"] == 4
    assert labels == ["O", "B-FOOD", "B-SPORT", "I-FOOD", "I-SPORT"] and model.exits is not None
