"""scripts/mcbert_real_text.py at tiny sizes: its pretraining flags are ones ``effbert pretrain`` takes, its log table
reads the run's log, its held-out test loads the last checkpoint's MC-BERT model (controller included) and the run's
initial weights, and its fine-tuning files have the label<TAB>text layout. The full run is the README's."""

import importlib.util
import json
import os

import pytest
import torch

pytestmark = pytest.mark.requires("datasets", "accelerate")  # corpora and Trainer

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "mcbert_real_text.py")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("mcbert_real_text", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(script):
    paras = [p for _, p in script.paragraphs()]
    if len(paras) < 60:  # a machine without licence texts: the standard library's prose
        import re

        text = " ".join(m.__doc__ or "" for m in (os, re, json, importlib.util, pytest, torch))
        paras = [
            s for s in re.split(r"(?<=[.;:])\s+", " ".join(text.split())) if len(s.split()) >= 8
        ]
    return paras


def _flags(script, **sizes):
    args = list(script.PRETRAIN)
    for flag, value in sizes.items():
        args[args.index("--" + flag.replace("_", "-")) + 1] = str(value)
    return args


def test_script_pieces(script, tmp_path, capsys):
    from safetensors.torch import load_file

    from effbert.commands import pretrain

    lines = _lines(script)
    corpus = tmp_path / "train.txt"
    corpus.write_text("".join(p + "\n" for p in lines[12:200]), encoding="utf-8")
    run_dir = tmp_path / "mcbert"
    args = _flags(
        script,
        vocab_size=200,
        layers=1,
        hidden=36,
        heads=3,
        max_seq_length=32,
        max_steps=4,
        batch_size=8,
        warmup_steps=1,
        logging_steps=2,
        save_steps=2,
    )
    assert (
        pretrain.main(
            [
                "--data",
                str(corpus),
                "--out",
                str(run_dir),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--backend",
                "eager",
                *args,
            ]
        )
        == 0
    )
    run = json.loads((run_dir / "pretrain.json").read_text())["settings"]
    assert run["objective"] == "mcbert" and run["mask_replace_prob"] == 1.0  # the published masking
    log, text = script.read_log(str(run_dir))
    assert [r["step"] for r in log] == [2, 4] and len(text.splitlines()) == 3
    assert f"{log[-1]['mc_choice_chance']:12.3f}" in text.splitlines()[-1]

    trained, initial, tok = script.load_run(str(run_dir))
    assert type(trained).__name__ == "TupeBertForMultiChoicePretraining"
    final = load_file(
        run_dir / "model.safetensors"
    )  # the main model at the last step: the last checkpoint's
    state = trained.state_dict()
    assert any(k.startswith("controller.") for k in state)
    assert all(torch.equal(final[k], state[k]) for k in final)
    moved = [k for k in final if not torch.equal(initial.state_dict()[k], state[k])]
    assert moved  # the initial weights are not the trained ones
    again = script.load_run(str(run_dir))[
        1
    ].state_dict()  # seeded with the run's seed: the same every time
    assert all(torch.equal(again[k], v) for k, v in initial.state_dict().items())

    res = script.held_out_test(str(run_dir), lines[:12], seeds=(0,), batch=8)
    for name in ("trained", "initial"):
        r = res[name]
        assert set(r) == set(script.KEYS) and all(v == v for v in r.values())  # no NaN
        assert 0 <= r["mc_accuracy"] <= 1 and 0 < r["replaced_fraction"] < 0.3
        assert r["replaced_fraction"] == 0 or 1 / 9 <= r["mc_choice_chance"] <= 1
    assert res["trained"]["mlm_loss"] != res["initial"]["mlm_loss"]
    table = script.table(res, 12, seeds=1)
    assert "held-out multi-choice test (12 paragraphs, 1 maskings" in table
    assert f"{res['trained']['mc_choice_accuracy']:.3f}" in table.splitlines()[2]

    paras = [
        ("/usr/share/common-licenses/GPL-3", "free software " * 3),
        ("/usr/share/common-licenses/Apache-2.0", "the license " * 3),
        ("/usr/share/doc/x/copyright", "not a licence text"),
    ] * 5
    dev = script.finetune_data(paras, str(tmp_path))
    train_rows = (tmp_path / "ft_train.tsv").read_text().splitlines()
    assert len(train_rows) == 8 and len(dev) == 2
    assert all(r.split("\t")[0] in ("gnu", "other") for r in train_rows)
    assert sorted(r.split("\t")[0] for r in train_rows).count("gnu") + dev.count("gnu") == 5
