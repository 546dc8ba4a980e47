"""Multi-exit training in one home (``effbert.models.multi_exit``): ``exit_loss`` against the
published formulas in float64, the loss each model's config names (``model(..., labels=...)``),
DeeBERT's stages on the three multi-exit models, and ``MultiExitTrainer`` taking the model's loss as
it is."""

import pytest
import torch
import torch.nn.functional as F

from effbert.models import (
    TupeBertConfig,
    TupeBertForSequenceClassification,
    TupeBertForTokenClassification,
)
from effbert.models.multi_exit import EXIT_LOSSES, exit_loss
from helpers import assert_close

RTOL64 = 1e-12


def tiny_config(**overrides):
    values = dict(
        vocab_size=53,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        position_mode="tupe-r",
        num_buckets=8,
        max_distance=12,
        num_labels=3,
        backend="eager",
        multi_exit=True,
    )
    values.update(overrides)
    return TupeBertConfig(**values)


def batch(b=4, n=7, vocab=53):
    ids = torch.randint(1, vocab, (b, n))
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    return ids, mask


def distillation64(z, y, gamma, temperature):
    """RomeBERT's loss written out: CE of the last exit; each other exit (1 - gamma) CE + gamma T^2
    KL from the detached last exit, KL averaged over B * C (``KDLoss``)."""
    teacher = F.softmax(z[-1].detach() / temperature, -1)
    total = F.cross_entropy(z[-1], y)
    for zi in z[:-1]:
        kl = (teacher * (teacher.log() - F.log_softmax(zi / temperature, -1))).mean()
        total = total + (1 - gamma) * F.cross_entropy(zi, y) + gamma * temperature**2 * kl
    return total


def pabee64(z, y):
    per_exit = [F.mse_loss(zi[:, 0], y) if z.shape[-1] == 1 else F.cross_entropy(zi, y) for zi in z]
    return sum((i + 1) * li for i, li in enumerate(per_exit)) / sum(range(1, len(per_exit) + 1))


@pytest.mark.parametrize("loss", EXIT_LOSSES)
def test_exit_loss_is_the_published_formula_in_float64(loss, seeded):
    z = torch.randn(4, 6, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    if loss == "romebert":
        want = distillation64(z, y, 0.7, 2.5)
        got = exit_loss(z, y, loss=loss, gamma=0.7, temperature=2.5, backend="eager")
        assert_close(got, want, rtol=RTOL64, what="romebert")
        assert_close(
            exit_loss(z, y), distillation64(z, y, 0.9, 3.0), rtol=RTOL64, what="defaults 0.9, 3"
        )
    elif loss == "pabee":
        assert_close(exit_loss(z, y, loss=loss), pabee64(z, y), rtol=RTOL64, what="pabee")
    else:
        assert_close(
            exit_loss(z, y, loss=loss, stage=1),
            F.cross_entropy(z[-1], y),
            rtol=RTOL64,
            what="stage 1",
        )
        want = sum(F.cross_entropy(zi, y) for zi in z[:-1])
        assert_close(exit_loss(z, y, loss=loss, stage=2), want, rtol=RTOL64, what="stage 2")
    assert exit_loss(z, y, loss=loss).dtype == torch.float64
    assert exit_loss(z.float(), y, loss=loss).dtype == torch.float32


def test_regression_head_and_gradient_equilibrium(seeded):
    z = torch.randn(3, 5, 1, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, dtype=torch.float64)
    for loss in ("romebert", "pabee"):  # RomeBERT has no regression loss: PABEE's weighted MSE
        assert_close(
            exit_loss(z, y, loss=loss), pabee64(z, y), rtol=RTOL64, what=f"{loss} regression"
        )
    mse = [F.mse_loss(zi[:, 0], y) for zi in z]
    assert_close(
        exit_loss(z, y, loss="deebert", stage=2), mse[0] + mse[1], rtol=RTOL64, what="deebert mse"
    )
    # --ge: the same value, exit i's gradient scaled by 1 / (L - i)
    c = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (5,))
    plain = torch.autograd.grad(exit_loss(c, labels, loss="pabee"), c)[0]
    ge_loss = exit_loss(c, labels, loss="pabee", gradient_equilibrium=True)
    assert_close(ge_loss, exit_loss(c, labels, loss="pabee"), rtol=RTOL64, what="ge value")
    scaled = torch.autograd.grad(ge_loss, c)[0]
    factor = torch.tensor([1 / 3, 1 / 2, 1.0], dtype=torch.float64)[:, None, None]
    assert_close(scaled, plain * factor, rtol=RTOL64, what="ge gradient")


def test_bad_settings_name_the_argument():
    z, y = torch.randn(2, 3, 4), torch.tensor([0, 1, 3])
    for kw, error, name in (
        (dict(loss="kd"), ValueError, "loss must be one of"),
        (dict(gamma=1.5), ValueError, "gamma"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(gradient_equilibrium=1), TypeError, "gradient_equilibrium"),
        (dict(stage=3, loss="deebert"), ValueError, "stage must be 1 or 2"),
    ):
        with pytest.raises(error, match=name):
            exit_loss(z, y, **kw)
    for kw, name in (
        (dict(exit_loss="kd"), "exit_loss"),
        (dict(exit_loss_gamma=-0.1), "exit_loss_gamma"),
        (dict(exit_loss_temperature=0.0), "exit_loss_temperature"),
    ):
        with pytest.raises(ValueError, match=name):
            tiny_config(**kw)
    with pytest.raises(TypeError, match="exit_gradient_equilibrium"):
        tiny_config(exit_gradient_equilibrium="yes")


@pytest.mark.parametrize("loss", [None] + list(EXIT_LOSSES))
def test_sequence_classifier_returns_the_loss_its_config_names(loss, tmp_path, seeded):
    cfg = tiny_config(exit_loss=loss, exit_loss_gamma=0.6, exit_loss_temperature=2.0)
    model = TupeBertForSequenceClassification(cfg).double().eval()
    ids, mask = batch()
    y = torch.tensor([0, 2, 1, 2])
    out = model(ids, mask, labels=y)
    z = out.exit_logits
    want = {
        None: distillation64(z, y, 0.6, 2.0),
        "romebert": distillation64(z, y, 0.6, 2.0),
        "pabee": pabee64(z, y),
        "deebert": F.cross_entropy(z[-1], y),
    }[loss]
    assert_close(out.loss, want, rtol=RTOL64, what=f"{loss} loss")
    model.save_pretrained(tmp_path)
    loaded = TupeBertForSequenceClassification.from_pretrained(tmp_path)
    c = loaded.config
    assert (c.exit_loss, c.exit_loss_gamma, c.exit_loss_temperature) == (loss, 0.6, 2.0)


def test_default_config_keeps_romeberts_published_loss(seeded):
    model = TupeBertForSequenceClassification(tiny_config()).double()
    ids, mask = batch()
    y = torch.tensor([1, 0, 2, 1])
    out = model(ids, mask, labels=y)
    assert_close(
        out.loss, distillation64(out.exit_logits, y, 0.9, 3.0), rtol=RTOL64, what="default loss"
    )
    with pytest.raises(ValueError, match="-100"):
        model(ids, mask, labels=torch.tensor([1, -100, 2, 1]))


def _frozen_names(model):
    return {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("shared", [False, True])
def test_deebert_stages_of_the_sequence_classifier(shared, seeded):
    cfg = tiny_config(exit_loss="deebert", shared_exit_pooler=shared)
    model = TupeBertForSequenceClassification(cfg).double()
    ids, mask = batch()
    y = torch.tensor([0, 2, 1, 2])
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        model.set_deebert_stage(True)
    assert not _frozen_names(model) and model.deebert_stage == 1
    assert model.set_deebert_stage(2) is model and model.deebert_stage == 2
    frozen = _frozen_names(model)
    assert {n for n, _ in model.bert.named_parameters(prefix="bert")} <= frozen
    assert not any(p.requires_grad for p in model.exits[-1].parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("exits.0.", "exits.1.")) for n in trainable)
    # a pooler shared with the last exit stays frozen
    assert any(".pooler." in n for n in trainable) is not shared
    out = model(ids, mask, labels=y)
    want = sum(F.cross_entropy(zi, y) for zi in out.exit_logits[:-1])
    assert_close(out.loss, want, rtol=RTOL64, what="stage 2 loss")
    out.loss.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.set_deebert_stage(1)
    assert not _frozen_names(model) and model.deebert_stage == 1


def test_token_classifier_losses_and_stages(seeded):
    from effbert.models import multi_exit_token_loss

    ids, mask = batch()
    labels = torch.randint(0, 3, ids.shape).masked_fill(torch.rand(ids.shape) < 0.4, -100)
    labels = labels.masked_fill(mask == 0, -100)
    base = TupeBertForTokenClassification(tiny_config()).double()
    out = base(ids, mask, labels=labels)
    keep = labels != -100
    z = out.exit_logits[:, keep]  # [L, T, C] at the labelled tokens
    y = labels[keep]
    assert_close(
        out.loss, multi_exit_token_loss(out.exit_logits[:, keep], y), rtol=RTOL64, what="joint"
    )
    assert_close(out.loss, pabee64(z, y), rtol=RTOL64, what="joint = pabee weights")
    for loss, want in (
        ("romebert", distillation64(z, y, 0.9, 3.0)),
        ("deebert", F.cross_entropy(z[-1], y)),
    ):
        model = TupeBertForTokenClassification(tiny_config(exit_loss=loss)).double()
        model.load_state_dict(base.state_dict())
        assert_close(model(ids, mask, labels=labels).loss, want, rtol=RTOL64, what=f"token {loss}")
    model.set_deebert_stage(2)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"exits.{i}.{w}" for i in range(2) for w in ("weight", "bias")
    }
    assert_close(
        model(ids, mask, labels=labels).loss,
        sum(F.cross_entropy(zi, y) for zi in z[:-1]),
        rtol=RTOL64,
        what="token stage 2",
    )
    with pytest.raises(ValueError, match="multi_exit"):
        TupeBertForTokenClassification(tiny_config(multi_exit=False)).set_deebert_stage(2)


def test_multi_exit_trainer_takes_the_models_loss(tmp_path, seeded):
    """The Trainer's loss is the model's own (divided over the step's micro-batches); its loss
    keywords set the model's config and its stage the model's DeeBERT stage, after every argument
    was checked."""
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from effbert.training import MultiExitTrainer, trainers

    model = TupeBertForSequenceClassification(tiny_config())
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        MultiExitTrainer(model=model, args=args, loss="pabee", stage=0)
    assert model.config.exit_loss is None  # nothing changed by the refused call
    trainer = MultiExitTrainer(model=model, args=args, loss="deebert", stage=2)
    assert model.config.exit_loss == "deebert" and model.deebert_stage == 2
    assert trainer.exit_loss["loss"] == "deebert" and trainer.exit_loss["stage"] == 2
    assert not any(p.requires_grad for p in model.bert.parameters())
    ids, mask = batch()
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}
    trainer.current_gradient_accumulation_steps = 2
    model.train()
    got = trainer.compute_loss(model, inputs)
    want = model(**inputs).loss
    # the step's share, times what the installed Trainer's training_step divides by afterwards
    assert torch.equal(got, trainers._undo_trainer_division(trainer, want / 2, None))
    model.set_deebert_stage(1)
    plain = MultiExitTrainer(model=model, args=args)  # no keywords: the config as it is
    assert plain.exit_loss["loss"] == "deebert" and model.deebert_stage == 1
