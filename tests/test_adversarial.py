"""Adversarial fine-tuning (FGM, PGD, FreeLB) through the Trainer mixin, each against a plain-torch
write-out of the published algorithm on a tiny float64 model, and the probability ensemble."""

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")

from effbert.training.adversarial import (  # noqa: E402
    AdversarialConfig,
    fgm_perturbation,
    freelb_ascent,
    freelb_init,
    project_to_ball,
    segment_norms,
    with_adversarial,
)

LABELS = torch.tensor([0, 2, 1])


def tiny(seed=0, dtype=torch.float64):
    from effbert.models import TupeBertConfig, TupeBertForSequenceClassification

    torch.manual_seed(seed)
    cfg = TupeBertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        position_mode="tupe-r",
        backend="eager",
        num_labels=3,
        multi_exit=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return TupeBertForSequenceClassification(cfg).to(dtype).train()


def tiny_hf(seed=0):
    """effbert's MultiExitBert over a transformers BertModel: its word embeddings come out padded
    [B, N, H]."""
    from transformers import BertConfig, BertModel

    from effbert.integrations.hf import multi_exit_bert

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    bert = BertModel(cfg).to(torch.float64)
    return multi_exit_bert(bert, num_labels=3, dropout=0.0, backend="eager").train()


def batch(seed=1, lengths=(7, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(5, 40, (len(lengths), n), generator=g)
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    ids = ids.masked_fill(~mask, 0)
    labels = LABELS[: len(lengths)].clone()
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}


def trainer_for(model, cfg, tmp_path, plain=False, **args):
    from transformers import Trainer, TrainingArguments

    from effbert.training import MultiExitTrainer

    targs = TrainingArguments(
        output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", **args
    )
    cls = with_adversarial(Trainer if plain else MultiExitTrainer)
    trainer = cls(model=model, args=targs, adversarial=cfg)
    # train() sets it
    trainer.current_gradient_accumulation_steps = targs.gradient_accumulation_steps
    return trainer


def emb_weight(model):
    core = model.bert if hasattr(model, "bert") else model
    return core.embeddings.word_embeddings.weight


def ref_loss(model, b, ga=1):
    return model(**b).loss / ga


def grads(model):
    return {
        n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()
    }


def assert_grads_equal(model, ref, rtol=1e-9, atol=1e-12):
    for (name, p), (rname, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert name == rname
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, name
        err = (p.grad - q.grad).abs().max().item()
        assert torch.allclose(p.grad, q.grad, rtol=rtol, atol=atol), (
            f"{name}: max abs diff {err:.3e}"
        )


# ---------------------------------------------------------------------------------------- written-
# out references


def fgm_reference(model, b, epsilon, ga=1):
    """The common FGM code: backward, attack (epsilon * grad / ||grad||, skipped for a zero or NaN
    norm), backward of the adversarial loss, restore."""
    ref_loss(model, b, ga).backward()
    w = emb_weight(model)
    backup = w.data.clone()
    norm = torch.norm(w.grad)
    if norm != 0 and not torch.isnan(norm):
        w.data.add_(epsilon * w.grad / norm)
    ref_loss(model, b, ga).backward()
    w.data = backup


def pgd_reference(model, b, epsilon, alpha, k):
    """The common PGD code: backup_grad, K attacks each projected to the epsilon ball, zero_grad
    between them, restore_grad before the last adversarial backward, restore."""
    ref_loss(model, b).backward()
    w = emb_weight(model)
    backup = w.data.clone()
    saved = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for t in range(k):
        norm = torch.norm(w.grad)
        if norm != 0 and not torch.isnan(norm):
            w.data.add_(alpha * w.grad / norm)
            r = w.data - backup
            if torch.norm(r) > epsilon:
                r = epsilon * r / torch.norm(r)
            w.data = backup + r
        if t != k - 1:
            model.zero_grad()
        else:
            for n, p in model.named_parameters():
                if n in saved:
                    p.grad = saved[n]
        ref_loss(model, b).backward()
    w.data = backup


def freelb_reference(model, b, cfg, init_padded=None):
    """run_glue_freelb.py's loop (l2), with the delta [B, N, H] of padded rows and one norm per row;
    the clean pass first when keep_clean (issue #10). The delta enters as an addition to the
    word-embedding output, in whichever layout the model embeds (effbert's models embed the packed
    real tokens)."""
    from effbert.models.packing import unpad_input

    ids, mask = b["input_ids"], b["attention_mask"].bool()
    bsz, n = ids.shape
    hidden = emb_weight(model).shape[1]
    indices = unpad_input(mask, shape=(bsz, n), device=ids.device).indices
    if cfg.keep_clean:
        ref_loss(model, b).backward()
    delta = (
        init_padded.clone()
        if init_padded is not None
        else torch.zeros(bsz, n, hidden, dtype=torch.float64)
    )
    state = {}

    def hook(module, args, out):
        d = state["delta"]
        if out.dim() == 3:
            return out + d
        return out + d.reshape(-1, hidden).index_select(0, indices)

    module = (model.bert if hasattr(model, "bert") else model).embeddings.word_embeddings
    handle = module.register_forward_hook(hook)
    try:
        for astep in range(cfg.steps):
            delta.requires_grad_()
            state["delta"] = delta
            loss = ref_loss(model, b) / cfg.steps
            loss.backward()
            if astep == cfg.steps - 1:
                break
            delta_grad = delta.grad.clone().detach()
            denorm = torch.norm(delta_grad.view(bsz, -1), dim=1).view(-1, 1, 1).clamp(min=1e-8)
            delta = (delta + cfg.adv_lr * delta_grad / denorm).detach()
            if cfg.adv_max_norm > 0:
                delta_norm = torch.norm(delta.view(bsz, -1), p=2, dim=1).detach()
                exceed = (delta_norm > cfg.adv_max_norm).to(delta)
                reweights = (cfg.adv_max_norm / delta_norm * exceed + (1 - exceed)).view(-1, 1, 1)
                delta = (delta * reweights).detach()
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("plain", [False, True], ids=["MultiExitTrainer", "Trainer"])
def test_fgm_step_equals_the_common_code_and_restores_the_weight(tmp_path, plain):
    model = tiny()
    ref = copy.deepcopy(model)
    b = batch()
    trainer = trainer_for(model, AdversarialConfig("fgm", epsilon=0.7), tmp_path, plain=plain)
    before = emb_weight(model).detach().clone()
    loss = trainer.training_step(model, dict(b))
    fgm_reference(ref, b, 0.7)
    assert_grads_equal(model, ref)
    assert torch.equal(emb_weight(model), before)  # put back bit for bit
    with torch.no_grad():
        assert torch.allclose(loss, ref_loss(ref, b).float().to(loss.dtype), rtol=1e-6)


def test_pgd_step_equals_the_common_code(tmp_path):
    model = tiny(seed=3)
    ref = copy.deepcopy(model)
    b = batch(seed=4)
    cfg = AdversarialConfig("pgd", epsilon=0.5, alpha=0.3, steps=3)
    trainer = trainer_for(model, cfg, tmp_path)
    before = emb_weight(model).detach().clone()
    trainer.training_step(model, dict(b))
    pgd_reference(ref, b, 0.5, 0.3, 3)
    assert_grads_equal(model, ref)
    assert torch.equal(emb_weight(model), before)


def test_pgd_projection_binds():
    """With a step larger than the radius the projection must act (so the test above is not vacuous
    in kind)."""
    r = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert torch.allclose(project_to_ball(r, 1.0), r / 5)
    assert torch.equal(project_to_ball(r, 6.0), r)


@pytest.mark.parametrize("keep_clean", [True, False])
@pytest.mark.parametrize("make", [tiny, tiny_hf], ids=["packed-embedding", "padded-embedding"])
def test_freelb_step_equals_the_published_loop(tmp_path, keep_clean, make):
    """effbert's models embed the packed real tokens ([total, H], cu_seqlens); MultiExitBert on
    transformers' BertModel embeds padded rows [B, N, H]: both equal the published per-row loop."""
    model = make(seed=5)
    ref = copy.deepcopy(model)
    b = batch(seed=6)
    cfg = AdversarialConfig(
        "freelb", steps=3, adv_lr=0.3, adv_init_mag=0.0, adv_max_norm=0.2, keep_clean=keep_clean
    )
    trainer = trainer_for(model, cfg, tmp_path, plain=make is tiny_hf)
    trainer.training_step(model, dict(b))
    freelb_reference(ref, b, cfg)
    assert_grads_equal(model, ref, rtol=1e-7, atol=1e-10)


def test_freelb_random_start_follows_each_text(tmp_path):
    """With adv_init_mag > 0 the step equals the published loop started from the same delta, which
    is uniform in +-adv_init_mag / sqrt(length * hidden) on each text's real tokens."""
    from effbert.models.packing import unpad_input

    model = tiny(seed=7)
    ref = copy.deepcopy(model)
    b = batch(seed=8)
    cfg = AdversarialConfig("freelb", steps=2, adv_lr=0.2, adv_init_mag=0.5, adv_max_norm=0.0)
    mask = b["attention_mask"].bool()
    packing = unpad_input(mask, shape=tuple(mask.shape), device=mask.device)
    torch.manual_seed(11)
    init = freelb_init(torch.empty(packing.total, 16, dtype=torch.float64), packing.cu_seqlens, 0.5)
    lengths = mask.sum(1)
    bound = 0.5 / torch.sqrt(lengths * 16.0)
    seg = torch.repeat_interleave(torch.arange(3), lengths)
    per_token = bound[seg][:, None]
    assert (init.abs() <= per_token).all() and (init.abs() > 0.5 * per_token).any()
    padded = torch.zeros(3 * mask.shape[1], 16, dtype=torch.float64)
    padded = padded.index_copy(0, packing.indices, init)
    trainer = trainer_for(model, cfg, tmp_path)
    torch.manual_seed(11)
    trainer.training_step(model, dict(b))
    freelb_reference(ref, b, cfg, init_padded=padded.view(3, mask.shape[1], 16))
    assert_grads_equal(model, ref, rtol=1e-7, atol=1e-10)


def test_per_example_norms_follow_cu_seqlens_as_padded_rows():
    """Three texts packed into two rows (position_ids restarting at 0) give, text by text, the
    norms, step and bound that the published code computes on the same texts as three padded
    rows."""
    from effbert.training.adversarial import _batch_packing

    torch.manual_seed(0)
    lengths = [5, 3, 4]
    h = 6
    texts = [torch.randn(n, h, dtype=torch.float64) for n in lengths]
    grads_ = [torch.randn(n, h, dtype=torch.float64) for n in lengths]
    # packed: row 0 holds texts 0 and 1, row 1 holds text 2 and padding
    ids = torch.ones(2, 8, dtype=torch.long)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 4 + [0] * 4])
    indices, cu = _batch_packing(
        {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
    )
    assert cu.tolist() == [0, 5, 8, 12] and indices.shape[0] == 12
    delta, grad = torch.cat(texts), torch.cat(grads_)
    # padded rows, as run_glue_freelb.py holds them
    pd = torch.zeros(3, 5, h, dtype=torch.float64)
    pg = torch.zeros(3, 5, h, dtype=torch.float64)
    for i, n in enumerate(lengths):
        pd[i, :n], pg[i, :n] = texts[i], grads_[i]
    assert torch.allclose(segment_norms(delta, cu), torch.norm(pd.view(3, -1), dim=1))
    assert torch.allclose(segment_norms(delta, cu, "linf"), pd.view(3, -1).abs().amax(1))
    denorm = torch.norm(pg.view(3, -1), dim=1).view(-1, 1, 1).clamp(min=1e-8)
    want = pd + 0.4 * pg / denorm
    norm = torch.norm(want.view(3, -1), dim=1)
    bound = float(norm.sort().values[1])  # the longest text's step is bounded, the others not
    exceed = (norm > bound).to(want)
    assert exceed.sum() == 1
    want = want * (bound / norm * exceed + (1 - exceed)).view(-1, 1, 1)
    new = freelb_ascent(delta, grad, cu, adv_lr=0.4, adv_max_norm=bound)
    got = torch.zeros_like(pd)
    for i, n in enumerate(lengths):
        got[i, :n] = new[cu[i] : cu[i + 1]]
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_nan_gradients_skip_the_perturbation(tmp_path):
    """A NaN gradient moves nothing: FGM/PGD's perturbation is zero, FreeLB's delta is kept, and the
    embedding weight after the step holds no NaN (exactly the weight before)."""
    g = torch.tensor([[1.0, float("nan")], [0.0, 2.0]], dtype=torch.float64)
    assert torch.equal(fgm_perturbation(g, 1.0), torch.zeros_like(g))
    assert torch.equal(fgm_perturbation(torch.zeros(3), 1.0), torch.zeros(3))
    assert torch.equal(fgm_perturbation(torch.tensor([float("inf"), 1.0]), 1.0), torch.zeros(2))
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    d = torch.ones(2, 2, dtype=torch.float64)
    assert torch.equal(freelb_ascent(d, g, cu, 0.5, 1.0), d)
    for method in ("fgm", "pgd"):
        model = tiny()
        trainer = trainer_for(model, AdversarialConfig(method), tmp_path)
        w = emb_weight(model)
        before = w.detach().clone()
        w.grad = torch.full_like(w, float("nan"))  # an earlier micro-batch left NaN in the gradient
        trainer.training_step(model, dict(batch()))
        assert torch.equal(w, before) and torch.isfinite(w).all(), method


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb"])
def test_gradient_accumulation_sums_the_micro_batches_run_alone(tmp_path, method):
    """Two micro-batches accumulated give the mean of what each gives alone in a step of its own
    (the common FGM code would perturb the second by the sum of both gradients)."""
    cfg = AdversarialConfig(method, steps=2, adv_init_mag=0.0)
    b1, b2 = batch(seed=1), batch(seed=2, lengths=(3, 6, 6))
    alone = []
    for b in (b1, b2):
        model = tiny(seed=9)
        trainer_for(model, cfg, tmp_path).training_step(model, dict(b))
        alone.append(grads(model))
    model = tiny(seed=9)
    trainer = trainer_for(model, cfg, tmp_path, gradient_accumulation_steps=2)
    trainer.training_step(model, dict(b1))
    trainer.training_step(model, dict(b2))
    for name, p in model.named_parameters():
        a, c = alone[0][name], alone[1][name]
        if a is None:
            continue
        assert torch.allclose(p.grad, (a + c) / 2, rtol=1e-7, atol=1e-11), name


@pytest.mark.parametrize("method", ["fgm", "freelb"])
def test_the_adversarial_loss_covers_every_exit(tmp_path, method):
    """The adversarial passes' gradient (step minus clean gradient) reaches every off-ramp's
    classifier."""
    cfg = AdversarialConfig(method, steps=2, adv_init_mag=0.0)
    b = batch()
    model, clean = tiny(), tiny()
    trainer_for(model, cfg, tmp_path).training_step(model, dict(b))
    ref_loss(clean, b).backward()
    for i, (head, ch) in enumerate(zip(model.exits, clean.exits)):
        extra = head.classifier.weight.grad - ch.classifier.weight.grad
        assert extra.abs().max() > 1e-6 * ch.classifier.weight.grad.abs().max(), f"exit {i + 1}"


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb"])
def test_bf16_autocast_on_the_cpu(tmp_path, method):
    """Trainer's bf16 mixed precision (CPU autocast): the step runs, its gradients are finite and
    near the fp32 step's, and the embedding weight is restored."""
    # perturbations at the scale of the tiny model's embeddings (std 0.02 a coordinate)
    cfg = AdversarialConfig(
        method, steps=2, epsilon=0.05, alpha=0.02, adv_lr=0.02, adv_init_mag=0.02, adv_max_norm=0.05
    )
    b = batch()
    model, ref = tiny(dtype=torch.float32), tiny(dtype=torch.float32)
    trainer = trainer_for(model, cfg, tmp_path, bf16=True)
    ref_trainer = trainer_for(ref, cfg, tmp_path)
    before = emb_weight(model).detach().clone()
    torch.manual_seed(0)
    loss = trainer.training_step(model, dict(b))
    torch.manual_seed(0)
    ref_trainer.training_step(ref, dict(b))
    assert math.isfinite(float(loss)) and torch.equal(emb_weight(model), before)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    gw, rw = model.exits[-1].classifier.weight.grad, ref.exits[-1].classifier.weight.grad
    assert (gw - rw).norm() <= 0.1 * rw.norm()


def test_freelb_reuses_the_dropout_masks(tmp_path):
    """With dropout on, every FreeLB pass sees the same masks (the published code's dp_masks): with
    a zero step the passes are the clean pass repeated, so the step's gradient is twice the clean
    gradient (keep_clean adds one)."""
    model = tiny(seed=2)
    model.config.hidden_dropout_prob = 0.3
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    ref = copy.deepcopy(model)
    b = batch()
    cfg = AdversarialConfig("freelb", steps=3, adv_lr=0.0, adv_init_mag=0.0)
    trainer = trainer_for(model, cfg, tmp_path)  # Trainer seeds the generator when built
    torch.manual_seed(4)
    trainer.training_step(model, dict(b))
    torch.manual_seed(4)
    (2 * ref_loss(ref, b)).backward()
    # the passes' float32 losses (the exits' logits are cast, as the Trainer's loss does) sum in
    # another order
    assert_grads_equal(model, ref, rtol=1e-6, atol=1e-8)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="method"):
        AdversarialConfig("fgsm")
    with pytest.raises(ValueError, match="epsilon"):
        AdversarialConfig("fgm", epsilon=0)
    with pytest.raises(ValueError, match="steps"):
        AdversarialConfig("pgd", steps=0)
    with pytest.raises(ValueError, match="norm_type"):
        AdversarialConfig("freelb", norm_type="l1")
    with pytest.raises(ValueError, match="trainer_class"):
        with_adversarial(object)
    with pytest.raises(ValueError, match="cu_seqlens"):
        segment_norms(torch.zeros(3, 2), torch.tensor([0.0, 3.0]))


# --------------------------------------------------------------------------------------------------
# ensemble


def write_run(folder, seed, labels=("law", "food", "science"), vocab_extra=()):
    from transformers import BertTokenizerFast

    from effbert.models.loading import save_finetuned

    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(35)]
    words += list(vocab_extra)
    (folder / "vocab.txt").write_text("".join(w + "\n" for w in words))
    tok = BertTokenizerFast.from_pretrained(str(folder))
    assert len(tok.get_vocab()) == len(words)
    model = tiny(seed=seed, dtype=torch.float32).eval()
    if vocab_extra:
        model.resize_token_embeddings(len(words))
    save_finetuned(str(folder), model, tok, list(labels), {"max_len": 16, "regression": False})
    return model


def test_ensemble_is_the_mean_of_the_members_softmax(tmp_path):
    from effbert.models.ensemble import ProbabilityEnsemble

    models = [write_run(tmp_path / f"run{i}", seed=i) for i in range(3)]
    ens = ProbabilityEnsemble.from_run_folders(
        [tmp_path / f"run{i}" for i in range(3)], backend="eager"
    )
    assert len(ens) == 3 and ens.labels == ["law", "food", "science"]
    b = batch()
    with torch.no_grad():
        want = torch.stack(
            [m(b["input_ids"], b["attention_mask"]).logits.double().softmax(-1) for m in models]
        ).mean(0)
    got = ens.predict_proba(b["input_ids"], b["attention_mask"])
    assert got.shape == (3, 3) and torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7)
    texts = ["w1 w2 w3", "w4"]
    by_text = ens.predict_proba_texts(texts)
    enc = ens.tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    assert torch.allclose(by_text, ens.predict_proba(enc["input_ids"], enc["attention_mask"]))


def test_ensemble_refuses_mixed_runs(tmp_path):
    from effbert.models.ensemble import ProbabilityEnsemble

    write_run(tmp_path / "a", 0)
    write_run(tmp_path / "b", 1, labels=("food", "law", "science"))
    write_run(tmp_path / "c", 2, vocab_extra=("extra",))
    with pytest.raises(ValueError, match="labels"):
        ProbabilityEnsemble.from_run_folders([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="tokenizer"):
        ProbabilityEnsemble.from_run_folders([tmp_path / "a", tmp_path / "c"])
    with pytest.raises(ValueError, match="paths"):
        ProbabilityEnsemble.from_run_folders(str(tmp_path / "a"))
    with pytest.raises(ValueError, match="models"):
        ProbabilityEnsemble([])
