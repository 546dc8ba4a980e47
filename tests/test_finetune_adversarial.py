"""``effbert finetune --adversarial`` and ``--ensemble`` end to end on the tiny BERT folder and the
two-topic TSV of tests/test_finetune.py: the method reaches the Trainer (the losses change, the
config is recorded, --resume gives the uninterrupted run), DeeBERT uses it in stage 1 only, the
ensemble row is the mean softmax of the members, and bad combinations are one line, exit 2."""

import json
import os
import shutil

import pytest
import torch

from effbert import commands as cli
from effbert.models import loading

pytestmark = pytest.mark.requires("datasets", "accelerate", "transformers")

from test_finetune import encode, save_tiny_bert, write_data  # noqa: E402  (the same tiny data)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=2)  # 2 layers: faster


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), train_rows=48)


def argv(hf_dir, data, out, *extra):
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
        "8",
        "--learning-rate",
        "3e-3",
        "--logging-steps",
        "2",
        "--backend",
        "eager",
        "--device",
        "cpu",
        "--per-device-eval-batch-size",
        "16",
        "--quiet",
        *extra,
    ]


def report_of(out):
    return json.loads((out / "report.json").read_text())


def test_fgm_changes_the_training_is_recorded_and_resumes(hf_dir, data, tmp_path, capsys):
    """--adversarial fgm: the first step's (clean) loss is the plain run's, the later ones differ
    (the weights moved otherwise); finetune.json holds the config; a run cut after its step-3
    checkpoint and resumed ends with the uninterrupted run's weights and losses."""
    from safetensors.torch import load_file

    from effbert.training.adversarial import AdversarialConfig

    steps = ["--max-steps", "6", "--save-steps", "3"]
    assert cli.main(argv(hf_dir, data, tmp_path / "plain", *steps)) == 0
    assert "adversarial" not in capsys.readouterr().out
    assert cli.main(argv(hf_dir, data, tmp_path / "fgm", *steps, "--adversarial", "fgm")) == 0
    assert (
        "loss romebert (gamma 0.9, temperature 3.0), adversarial fgm (epsilon 1.0)"
        in capsys.readouterr().out
    )
    plain, fgm = report_of(tmp_path / "plain")["losses"], report_of(tmp_path / "fgm")["losses"]
    assert len(plain) == len(fgm) == 6 and plain[0] == fgm[0]
    assert all(a != b for a, b in zip(plain[1:], fgm[1:])), (plain, fgm)
    record = json.loads((tmp_path / "fgm" / "finetune.json").read_text())
    from dataclasses import asdict

    assert record["adversarial"] == asdict(AdversarialConfig("fgm"))
    assert json.loads((tmp_path / "plain" / "finetune.json").read_text())["adversarial"] is None
    # the resume
    cut = tmp_path / "cut"
    assert cli.main(argv(hf_dir, data, cut, *steps, "--adversarial", "fgm")) == 0
    shutil.rmtree(cut / "checkpoints" / "checkpoint-6")
    for name in ("model.safetensors", "report.json"):
        os.remove(cut / name)
    capsys.readouterr()
    assert cli.main(argv(hf_dir, data, cut, *steps, "--adversarial", "fgm", "--resume")) == 0
    assert "resumed from" in capsys.readouterr().out
    want, got = (
        load_file(tmp_path / "fgm" / "model.safetensors"),
        load_file(cut / "model.safetensors"),
    )
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert report_of(cut)["losses"] == fgm


@pytest.mark.parametrize(
    "extra,said",
    [
        (
            ["--adversarial", "pgd", "--adv-steps", "2", "--adv-alpha", "0.5"],
            "adversarial pgd (epsilon 1.0, alpha 0.5, 2 steps)",
        ),
        (
            ["--adversarial", "freelb", "--adv-norm-type", "linf", "--adv-no-clean"],
            "adversarial freelb (3 steps, adv-lr 0.1, init 1.0, max norm 0.6 (linf), no clean pass)",
        ),
    ],
)
def test_pgd_and_freelb_from_the_command_line(hf_dir, data, tmp_path, capsys, extra, said):
    out = tmp_path / "run"
    assert cli.main(argv(hf_dir, data, out, "--max-steps", "2", *extra)) == 0
    assert said in capsys.readouterr().out
    config = json.loads((out / "finetune.json").read_text())["adversarial"]
    assert config["method"] == extra[1]
    if extra[1] == "freelb":
        assert config["norm_type"] == "linf" and config["keep_clean"] is False
    else:
        assert (config["steps"], config["alpha"]) == (2, 0.5)


def test_deebert_trains_adversarially_in_its_first_stage_only(
    hf_dir, data, tmp_path, capsys, monkeypatch
):
    """--loss deebert --adversarial fgm: the stage-1 Trainer holds the config, the stage-2 one none,
    and the log says so."""
    from effbert.training import finetune as finetune_run

    held = []
    make = finetune_run.make_trainer

    def spy(*a, **kw):
        trainer, kept = make(*a, **kw)
        held.append(trainer.adversarial)
        return trainer, kept

    monkeypatch.setattr(finetune_run, "make_trainer", spy)
    assert (
        cli.main(
            argv(
                hf_dir,
                data,
                tmp_path / "run",
                "--max-steps",
                "2",
                "--loss",
                "deebert",
                "--adversarial",
                "fgm",
            )
        )
        == 0
    )
    text = capsys.readouterr().out
    assert [None if c is None else c.method for c in held] == ["fgm", None]
    assert "adversarial fgm (epsilon 1.0) in DeeBERT's stage 1 only" in text
    assert "no adversarial training (--adversarial applies to DeeBERT's stage 1 only)" in text


def test_the_ensemble_row_is_the_mean_softmax_of_the_members(hf_dir, data, tmp_path, capsys):
    """--ensemble A B: the report's ensemble row is the accuracy of the mean (float64) softmax of
    this run's and A's and B's full-depth logits on --eval, computed here from the saved runs."""
    from effbert.data import tsv

    for seed in ("1", "2"):  # members that disagree with each other and with the run
        assert (
            cli.main(argv(hf_dir, data, tmp_path / f"m{seed}", "--max-steps", "24", "--seed", seed))
            == 0
        )
    out = tmp_path / "run"
    capsys.readouterr()
    assert (
        cli.main(
            argv(
                hf_dir,
                data,
                out,
                "--max-steps",
                "12",
                "--seed",
                "3",
                "--ensemble",
                str(tmp_path / "m1"),
                str(tmp_path / "m2"),
            )
        )
        == 0
    )
    text = capsys.readouterr().out
    row = report_of(out)["ensemble"]
    names, texts = tsv.read_tsv(str(data / "eval.tsv"))
    probs = []
    for folder in (out, tmp_path / "m1", tmp_path / "m2"):
        model, tokenizer, labels, settings = loading.load_finetuned(folder, backend="eager")
        ids, mask = encode(tokenizer, texts, settings["max_len"])
        with torch.no_grad():
            probs.append(model(ids, mask).logits.double().softmax(-1))
    y = torch.tensor([labels.index(n) for n in names])
    want = float((torch.stack(probs).mean(0).argmax(-1) == y).double().mean())
    assert row["accuracy"] == want
    # no single run, and not the members without this run, gives that accuracy
    alone = [float((p.argmax(-1) == y).double().mean()) for p in probs]
    members = float((torch.stack(probs[1:]).mean(0).argmax(-1) == y).double().mean())
    assert want not in alone + [members], (want, alone, members)
    full = report_of(out)["full_depth_accuracy"]
    assert row["delta"] == pytest.approx(want - full)
    assert row["members"] == [str(p.resolve()) for p in (out, tmp_path / "m1", tmp_path / "m2")]
    assert "ensemble of this run and 2 --ensemble run(s)" in text and f"accuracy {want:.4f}" in text
    # a member of other labels or another --max-seq-length: one line naming --ensemble, before
    # any work
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "m1", other)
    config = json.loads((other / "config.json").read_text())
    config["id2label"] = {"0": "sport", "1": "food"}
    (other / "config.json").write_text(json.dumps(config))
    longer = tmp_path / "longer"
    shutil.copytree(tmp_path / "m1", longer)
    record = json.loads((longer / "finetune.json").read_text())
    (longer / "finetune.json").write_text(json.dumps(dict(record, max_len=16)))
    for member, what in (
        (other, "labels"),
        (longer, "max_len"),
        (tmp_path / "nothing", "is not a folder"),
        (data, "holds no finetune.json"),
    ):
        capsys.readouterr()
        assert (
            cli.main(
                argv(
                    hf_dir,
                    data,
                    tmp_path / "bad",
                    "--max-steps",
                    "1",
                    "--ensemble",
                    str(tmp_path / "m1"),
                    str(member),
                )
            )
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert err.startswith("effbert finetune: error: --ensemble: ") and what in err, err
        assert len(err.splitlines()) == 1
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--adversarial", "fgm", "--grad-reg"], "--adversarial does not combine with --grad-reg"),
        (["--adversarial", "gan"], "invalid choice"),
        (["--adv-alpha", "0.5"], "--adv-alpha goes with --adversarial pgd"),
        (
            ["--adversarial", "fgm", "--adv-lr", "0.2"],
            "--adv-lr applies to --adversarial freelb, not fgm",
        ),
        (
            ["--adversarial", "pgd", "--adv-no-clean"],
            "--adv-no-clean applies to --adversarial freelb",
        ),
        (["--adversarial", "fgm", "--adv-epsilon", "0"], "--adv-epsilon must be > 0, got 0.0"),
        (["--adversarial", "freelb", "--adv-steps", "0"], "--adv-steps must be >= 1, got 0"),
        (["--adversarial", "freelb", "--adv-max-norm", "-1"], "--adv-max-norm must be >= 0"),
    ],
)
def test_bad_adversarial_flags_are_one_line(hf_dir, data, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert cli.main(argv(hf_dir, data, out, "--max-steps", "1", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    if message != "invalid choice":  # argparse's own error comes after the usage line
        assert len(err.splitlines()) == 1, err
    assert not out.exists()


def test_ensemble_needs_eval(hf_dir, data, tmp_path, capsys):
    args = argv(hf_dir, data, tmp_path / "run", "--max-steps", "1", "--ensemble", str(data))
    i = args.index("--eval")
    del args[i : i + 2]
    assert cli.main(args) == 2
    assert "--ensemble goes with --eval" in capsys.readouterr().err


def test_a_regression_ensemble_row_is_the_mse_of_the_mean_output(hf_dir, tmp_path, capsys):
    """With --regression the ensemble row is the mean squared error of the members' mean output
    (float64 here); a classification run as a member is refused by name."""
    import random

    from effbert.data import tsv

    folder = tmp_path / "data"
    folder.mkdir()
    rng = random.Random(3)
    for name, n in (("train.tsv", 32), ("eval.tsv", 17)):
        with open(folder / name, "w") as f:
            for _ in range(n):
                k = rng.randint(1, 6)
                f.write(f"{k / 2}\t{' '.join(['ball'] * k)}\n")
    regression = ["--regression", "--criterion", "patience", "--max-steps", "4"]
    for seed in ("1", "2"):
        assert (
            cli.main(argv(hf_dir, folder, tmp_path / f"m{seed}", *regression, "--seed", seed)) == 0
        )
    out = tmp_path / "run"
    assert (
        cli.main(
            argv(
                hf_dir,
                folder,
                out,
                *regression,
                "--ensemble",
                str(tmp_path / "m1"),
                str(tmp_path / "m2"),
            )
        )
        == 0
    )
    names, texts = tsv.read_tsv(str(folder / "eval.tsv"))
    y = torch.tensor([float(n) for n in names], dtype=torch.float64)
    outputs = []
    for run in (out, tmp_path / "m1", tmp_path / "m2"):
        model, tokenizer, _, settings = loading.load_finetuned(run, backend="eager")
        ids, mask = encode(tokenizer, texts, settings["max_len"])
        with torch.no_grad():
            outputs.append(model(ids, mask).logits[:, 0].double())
    want = float(((torch.stack(outputs).mean(0) - y) ** 2).mean())
    row = report_of(out)["ensemble"]
    assert row["accuracy"] == pytest.approx(want, rel=1e-6)
    alone = float(((outputs[0] - y) ** 2).mean())
    assert abs(want - alone) > 1e-4 * alone  # the members count
    assert "mse" in capsys.readouterr().out.split("ensemble of this run")[1].splitlines()[0]
    # a classification member
    classify = tmp_path / "classify"
    shutil.copytree(tmp_path / "m1", classify)
    record = json.loads((classify / "finetune.json").read_text())
    (classify / "finetune.json").write_text(json.dumps(dict(record, regression=False)))
    assert (
        cli.main(argv(hf_dir, folder, tmp_path / "bad", *regression, "--ensemble", str(classify)))
        == 2
    )
    assert "head (regression or not)" in capsys.readouterr().err
