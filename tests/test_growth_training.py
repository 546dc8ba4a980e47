"""CompoundGrow's schedule and Trainer callback (effbert.training.growth): SPEC parsing, growth
mid-run, the optimizer rebuilt, checkpoints and resume across a growth."""

import os

import pytest
import torch
from transformers import TrainingArguments

from effbert.models import TupeBertConfig, TupeBertForMaskedLM
from effbert.models import growth as ops
from effbert.training import PretrainingTrainer
from effbert.training.growth import (
    GrowthCallback,
    GrowthSchedule,
    mark_growth,
    prepare_for_resume,
    read_growth_log,
)

SPEC = "pool=2->1@3,layers=2->4@5,ffn=12->24@5"


def test_spec_parses_into_stages():
    s = GrowthSchedule.parse(" layers=2->4@5, ffn=12->24@5,pool=2->1@3,layers=4->8@9")
    assert s.steps == (3, 5, 9)
    assert s.sizes_at(0) == {"pool": 2, "layers": 2, "ffn": 12}
    assert s.sizes_at(4) == {"pool": 1, "layers": 2, "ffn": 12}
    assert s.sizes_at(5) == {"pool": 1, "layers": 4, "ffn": 24}
    assert s.sizes_at(9)["layers"] == 8
    assert [g.dim for g in s.at(5)] == ["layers", "ffn"]
    cfg = TupeBertConfig(num_hidden_layers=8, intermediate_size=24)
    small = s.initial_config(cfg)
    assert (small.num_hidden_layers, small.intermediate_size) == (2, 12)
    assert cfg.num_hidden_layers == 8
    with pytest.raises(ValueError, match="ends layers at 8"):
        s.initial_config(TupeBertConfig(num_hidden_layers=6, intermediate_size=24))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("layers=2-4@5", "DIM=FROM->TO@STEP"),
        ("depth=2->4@5", "DIM must be one of"),
        ("ffn=12->30@5", "multiple"),
        ("layers=4->2@5", "must grow"),
        ("pool=2->2@5", "pool grows"),
        ("layers=2->4@5,layers=3->6@9", "previous growth ends at 4"),
        ("layers=2->4@0", "step must be >= 1"),
        ("layers=2->4@5,layers=4->6@5", "already grows"),
    ],
)
def test_bad_specs_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        GrowthSchedule.parse(spec)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=48, length=12, vocab=41, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, vocab, (n, length), generator=g)
        self.labels = torch.where(torch.rand(n, length, generator=g) < 0.25, self.ids, -100)
        self.labels[:, 3] = self.ids[:, 3]
        self.inputs = torch.where(self.labels != -100, 4, self.ids)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.inputs[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def final_config():
    return TupeBertConfig(
        vocab_size=41,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        type_vocab_size=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        position_mode="tupe-r",
        num_buckets=8,
        max_distance=12,
        backend="eager",
    )


def small_model(schedule):
    torch.manual_seed(0)
    return TupeBertForMaskedLM(schedule.initial_config(final_config()))


def make_trainer(model, out, callback, steps=8):
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        warmup_steps=2,
        save_steps=2,
        save_total_limit=None,
        logging_steps=1,
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return PretrainingTrainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback])


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer_state", ["fresh", "grow"])
def test_trainer_grows_mid_run_and_resumes_across_the_growth(tmp_path, optimizer_state):
    schedule = GrowthSchedule.parse(SPEC)
    model = small_model(schedule)
    callback = GrowthCallback(schedule, optimizer_state=optimizer_state)
    trainer = make_trainer(model, tmp_path / "a", callback)
    trainer.train()
    assert trainer.model is model
    assert len(model.bert.encoder.layers) == 4 and model.config.intermediate_size == 24
    assert ops.input_pooling(model) == 1
    assert [e["step"] for e in callback.events] == [3, 5]
    assert callback.events[1]["params_after"] > callback.events[1]["params_before"]
    assert [e["step"] for e in read_growth_log(tmp_path / "a")] == [3, 5]
    opt = (
        trainer.optimizer.optimizer
        if hasattr(trainer.optimizer, "optimizer")
        else trainer.optimizer
    )
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_opt) == sorted(id(p) for p in model.parameters())
    decay = set(trainer.get_decay_parameter_names(model))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)] in decay for p in opt.param_groups[0]["params"])
    steps = {int(v["step"]) for v in opt.state.values()}
    assert steps == (
        {3} if optimizer_state == "fresh" else {8}
    )  # fresh: restarted at step 5; grow: kept
    final = _params(model)
    # after the pooling was dropped and before the depth growth; after both growths
    for ckpt in (4, 6):
        path = tmp_path / "a" / f"checkpoint-{ckpt}"
        resumed = small_model(schedule)
        assert prepare_for_resume(resumed, schedule, str(path)) == ckpt
        cb = GrowthCallback(schedule, optimizer_state=optimizer_state)
        make_trainer(resumed, tmp_path / f"b{ckpt}", cb).train(resume_from_checkpoint=str(path))
        assert [e["step"] for e in cb.events] == ([5] if ckpt == 4 else [])
        got = _params(resumed)
        assert got.keys() == final.keys()
        for name in final:
            torch.testing.assert_close(got[name], final[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_grown_checkpoint_loads_in_the_grown_shape(tmp_path):
    schedule = GrowthSchedule.parse(SPEC)
    model = small_model(schedule)
    make_trainer(model, tmp_path, GrowthCallback(schedule), steps=6).train()
    loaded = TupeBertForMaskedLM.from_pretrained(tmp_path / "checkpoint-6")
    assert loaded.config.num_hidden_layers == 4 and loaded.config.intermediate_size == 24
    small = TupeBertForMaskedLM.from_pretrained(tmp_path / "checkpoint-2")
    assert small.config.num_hidden_layers == 2


def test_the_callback_refuses_a_model_of_the_wrong_shape(tmp_path):
    schedule = GrowthSchedule.parse(SPEC)
    torch.manual_seed(0)
    model = TupeBertForMaskedLM(final_config())
    with pytest.raises(ValueError, match="model must have the sizes"):
        make_trainer(model, tmp_path, GrowthCallback(schedule)).train()
    with pytest.raises(ValueError, match="optimizer_state"):
        GrowthCallback(schedule, optimizer_state="reset")


def test_mark_growth_draws_a_line_per_growth(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    mark_growth(ax, [{"step": 3, "growth": "pool=2->1"}, 5])
    assert sorted(line.get_xdata()[0] for line in ax.lines) == [3, 5]
    with pytest.raises(TypeError, match="events"):
        mark_growth(ax, ["x"])
    plt.close(fig)
    assert not os.path.exists(tmp_path / "growth.jsonl")
    assert read_growth_log(tmp_path) == []
