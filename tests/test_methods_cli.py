"""CompoundGrow (``--grow``) and EarlyBERT (``--early-bird``) through ``effbert pretrain`` and
``effbert finetune``, end to end on the tiny corpora and models of tests/test_pretrain.py and
tests/test_finetune.py: a run grows at its step and saves the grown shape, a resume across a growth
equals the run that did not stop, a run with --early-bird saves a pruned model the loaders load (and
a resume does not search again), and the refusals are one line each."""

import json
import os
import shutil

import pytest
import torch

from effbert.commands import finetune
from effbert.models import load_pretrained
from effbert.models.loading import load_finetuned

from test_finetune import args as finetune_args, data, hf_dir  # noqa: F401  (fixtures)
from test_pretrain import _args, _error, _log, _run, _same, files  # noqa: F401  (fixtures)

pytestmark = pytest.mark.requires("datasets", "accelerate")

GROW = "layers=1->2@2,ffn=64->128@2"  # test_pretrain's model: 2 layers, FFN 4 x 32
BIRD = [
    "--early-bird",
    "--early-bird-draw-every",
    "1",
    "--early-bird-patience",
    "2",
    "--early-bird-search-steps",
    "6",
    "--early-bird-head-ratio",
    "0.5",
]


def _tensor_shapes(folder):
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# ------------------------------------------------------------------------------------------ --grow


def test_grow_grows_at_its_step_and_saves_the_grown_model(tmp_path, files, capsys):
    out = tmp_path / "run"
    _run(
        _args(
            files,
            out,
            "--max-steps",
            "4",
            "--save-steps",
            "1",
            "--save-total-limit",
            "4",
            "--logging-steps",
            "1",
            "--grow",
            GROW,
        )
    )
    text = capsys.readouterr().out
    assert "pretraining a 1-layer" in text  # built at the schedule's first sizes
    assert "growth after step 2: layers=1->2,ffn=64->128" in text
    # the checkpoints before the growth hold the small model, those after it the grown one
    ckpt = out / "checkpoints"
    small, grown = _tensor_shapes(ckpt / "checkpoint-1"), _tensor_shapes(ckpt / "checkpoint-2")
    assert small["bert.encoder.layers.0.intermediate.weight"] == (64, 32)
    assert not any(k.startswith("bert.encoder.layers.1.") for k in small)
    assert grown["bert.encoder.layers.1.intermediate.weight"] == (128, 32)
    model, _, _ = load_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 128
    assert [layer.intermediate.out_features for layer in model.bert.encoder.layers] == [128, 128]
    events = [json.loads(line) for line in (out / "growth.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [2] and events[0]["optimizer_state"] == "fresh"
    assert events[0]["params_after"] > events[0]["params_before"]
    assert events[0]["params_after"] == sum(p.numel() for p in model.parameters())
    report = json.loads((out / "report.json").read_text())
    assert report["growths"] == events
    assert (report["parameters_before"], report["parameters_after"]) == (
        events[0]["params_before"],
        events[0]["params_after"],
    )
    assert json.loads((out / "pretrain.json").read_text())["settings"]["grow"] == GROW
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("state", ["fresh", "grow"])
def test_resume_across_a_growth_equals_not_stopping(tmp_path, files, state):
    """4 steps in one go == 2 steps (the growth after step 1), a stop, --resume (which inherits
    --grow), 2 more: parameters bitwise, the same losses."""
    spec = "layers=1->2@1,ffn=64->128@1"
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = ["--max-steps", "4", "--save-steps", "2", "--logging-steps", "1"]
    _run(
        _args(
            files,
            whole,
            *common,
            "--grow",
            spec,
            "--grow-optimizer-state",
            state,
            "--dump-state",
            str(tmp_path / "whole.pt"),
        )
    )
    _run(_args(files, parts, *common, "--grow", spec, "--grow-optimizer-state", state))
    shutil.rmtree(parts / "checkpoints" / "checkpoint-4")
    os.remove(parts / "model.safetensors")
    _run(_args(files, parts, *common, "--resume", "--dump-state", str(tmp_path / "parts.pt")))
    _same(torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "parts.pt"))
    assert [r["loss"] for r in _log(parts)] == [r["loss"] for r in _log(whole)]
    report = json.loads((parts / "report.json").read_text())
    assert [e["step"] for e in report["growths"]] == [1]


def test_grow_input_pooling_runs_unpacked_without_notes(tmp_path, files):
    out = tmp_path / "run"
    _run(
        _args(
            files,
            out,
            "--max-steps",
            "3",
            "--save-steps",
            "0",
            "--grow",
            "pool=2->1@2",
            "--no-pack",
            "--no-tnf",
            tnf=False,
        )
    )
    growths = json.loads((out / "report.json").read_text())["growths"]
    assert [e["growth"] for e in growths] == ["pool=2->1"]
    assert all(r["loss"] == r["loss"] for r in _log(out))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--grow", "pool=2->1@2", "--no-tnf"], "add --no-pack"),
        (["--grow", "pool=2->1@2", "--no-pack"], "add --no-tnf"),
        (["--grow", GROW, "--objective", "mcbert"], "not with --objective mcbert"),
        (["--grow", GROW, "--early-bird"], "--early-bird and --grow exclude each other"),
        (
            ["--grow", "layers=1->3@2"],
            "--grow: spec ends layers at 3, but the model's num_hidden_layers is 2",
        ),
        (["--grow", "layers=2->1@2"], "--grow: spec item 'layers=2->1@2'"),
        (["--grow", "depth=1->2@2"], "--grow: spec item 'depth=1->2@2'"),
        (["--grow-optimizer-state", "grow"], "--grow-optimizer-state goes with --grow"),
        (["--early-bird-l1", "1e-3"], "--early-bird-l1 goes with --early-bird"),
        (
            ["--early-bird", "--early-bird-head-ratio", "1"],
            "--early-bird-head-ratio must be in [0, 1)",
        ),
        (["--early-bird", "--early-bird-draw-every", "0"], "--early-bird-draw-every must be >= 1"),
    ],
)
def test_method_flags_are_refused_in_one_line_before_any_work(
    tmp_path, files, capsys, extra, message
):
    out = tmp_path / "run"
    _error(capsys, _args(files, out, "--max-steps", "4", *extra), message)
    assert not out.exists()


# ------------------------------------------------------------------------------------ --early-bird


def test_pretrain_early_bird_saves_a_pruned_model_and_a_resume_does_not_search(
    tmp_path, files, capsys
):
    out = tmp_path / "run"
    common = [
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--heads",
        "4",
        *BIRD,
    ]
    _run(_args(files, out, *common))
    text = capsys.readouterr().out
    assert text.count("EarlyBERT search") == 2  # what it does, and where it stopped
    searched = json.loads((out / "early_bird.json").read_text())
    assert searched["search_steps"] <= 6
    assert (searched["heads_kept"], searched["heads_total"]) == (4, 8)
    assert f"heads kept 4/8, FFN kept {searched['ffn_kept']}/256" in text
    assert searched["distances"] and all(0 <= d <= 1 for _, d in searched["distances"])
    model, _, _ = load_pretrained(out)
    assert model.config.early_bird_ticket == searched["ticket"]
    assert [layer.attention.num_heads for layer in model.bert.encoder.layers] == [2, 2]
    params = sum(p.numel() for p in model.parameters())
    assert params == searched["params_after"] < searched["params_before"]
    report = json.loads((out / "report.json").read_text())
    assert report["early_bird"] == searched
    # a resume from the pruned checkpoint builds the pruned shapes and goes on without a search
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    _run(_args(files, out, *common[: -len(BIRD)], "--resume"))
    text = capsys.readouterr().out
    assert "EarlyBERT search" not in text and "resuming from step 2" in text
    assert load_pretrained(out)[0].config.early_bird_ticket == searched["ticket"]
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]
    # finetune --init takes the pruned model as it is, and refuses to search a second ticket in it
    tsv = tmp_path / "train.tsv"
    tsv.write_text(
        "".join(f"{'ab'[i % 2]}\tthe licence {'is' if i % 2 else 'was'} here\n" for i in range(16))
    )
    ft = [
        "--init",
        str(out),
        "--train",
        str(tsv),
        "--max-steps",
        "2",
        "--backend",
        "eager",
        "--device",
        "cpu",
        "--quiet",
        "--save-steps",
        "0",
    ]
    assert finetune.main([*ft, "--out", str(tmp_path / "ft")]) == 0
    tuned = load_finetuned(tmp_path / "ft", backend="eager")[0]
    assert tuned.config.early_bird_ticket == searched["ticket"]
    capsys.readouterr()
    assert finetune.main([*ft, "--out", str(tmp_path / "ft2"), "--early-bird"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "--early-bird: the model of --init is pruned already" in err


def test_finetune_early_bird_saves_a_model_load_finetuned_loads(
    hf_dir,
    data,  # noqa: F811
    tmp_path,
    capsys,
):
    out = tmp_path / "ft"
    assert (
        finetune.main(
            finetune_args(
                hf_dir,
                data,
                out,
                "--max-steps",
                "4",
                "--save-steps",
                "2",
                "--loss",
                "deebert",
                *BIRD,
            )[1:]
        )
        == 0
    )
    text = capsys.readouterr().out
    # DeeBERT's two stages: one search, before stage 1
    assert text.count("EarlyBERT search stopped at step") + text.count("EarlyBERT search ran") == 1
    assert text.index("EarlyBERT search") < text.index("fine-tuning 3 off-ramps")
    searched = json.loads((out / "early_bird.json").read_text())
    assert searched["heads_kept"] == 3 and searched["heads_total"] == 6
    model, _, labels, settings = load_finetuned(out, backend="eager")
    assert labels == ["food", "sport"] and settings["early_bird"] is True
    assert model.config.early_bird_ticket == searched["ticket"]
    assert [layer.attention.num_heads for layer in model.bert.encoder.layers] == [1, 1, 1]
    assert sum(p.numel() for p in model.bert.encoder.parameters()) < 3 * (4 * 32 * 32 + 2 * 32 * 48)
    assert json.loads((out / "report.json").read_text())["early_bird"] == searched
    # a resume in stage 2 prunes to the checkpoint's ticket and does not search again
    shutil.rmtree(out / "checkpoints" / "stage-2" / "checkpoint-4")
    assert (
        finetune.main(
            finetune_args(
                hf_dir,
                data,
                out,
                "--max-steps",
                "4",
                "--save-steps",
                "2",
                "--loss",
                "deebert",
                "--resume",
                *BIRD,
            )[1:]
        )
        == 0
    )
    assert "EarlyBERT search" not in capsys.readouterr().out
    assert load_finetuned(out, backend="eager")[0].config.early_bird_ticket == searched["ticket"]


def test_finetune_early_bird_flags_are_checked(hf_dir, data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ft"
    code = finetune.main(
        finetune_args(hf_dir, data, out, "--early-bird", "--early-bird-ffn-ratio", "1.5")[1:]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert "--early-bird-ffn-ratio must be in [0, 1), got 1.5" in err
    assert not out.exists()


# ---------------------------------------------------------------------------- the helpers they use


def test_ticket_masks_invert_the_recorded_ticket_and_refuse_bad_ones():
    from effbert.training.early_bird import ticket_masks

    heads, ffn = ticket_masks({"heads": [[0, 2], [1]], "ffn": [[3], []]}, 3, 4)
    assert heads.tolist() == [[True, False, True], [False, True, False]]
    assert ffn.tolist() == [[False, False, False, True], [False] * 4]
    with pytest.raises(ValueError, match=r"must be in \[0, 3\)"):
        ticket_masks({"heads": [[3]], "ffn": [[0]]}, 3, 4)
    with pytest.raises(ValueError, match="the same layers"):
        ticket_masks({"heads": [[0]], "ffn": [[0], [1]]}, 3, 4)
    with pytest.raises(ValueError, match="keys 'heads' and 'ffn'"):
        ticket_masks({"heads": [[0]]}, 3, 4)


def test_growth_callback_log_dir_is_checked():
    from effbert.training.growth import GrowthCallback

    with pytest.raises(TypeError, match="log_dir must be a folder path"):
        GrowthCallback("layers=1->2@1", log_dir=3)
