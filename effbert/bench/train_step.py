"""End-to-end: one BERT masked-LM training step (forward, backward, optimizer and, with TNF, the note update).

Providers at the same size, side by side:
- ``effbert``: ``TupeBertForMaskedLM`` with TUPE-R positions and the TNF note dictionary, every op on the fused
  backends (``backend="auto"``);
- ``effbert-absolute``: the same model with plain BERT positions and no notes (what TUPE and TNF cost);
- ``effbert-eager``: TUPE-R + TNF on the eager backend (the same model written in plain PyTorch);
- ``hf-sdpa``: transformers' ``BertForMaskedLM`` with its SDPA attention: the baseline;
- ``effbert-mcbert``: the same TUPE-R + TNF model trained with the MC-BERT objective instead
  (``TupeBertForMultiChoicePretraining``: the 1/3-width controller's masked-LM, its K = 10 draws at every position,
  the main model's multi-choice head), so the two objectives compare at one model size.

On a GPU: BERT-base (12 layers, 768 wide, vocabulary 30522) under bf16 autocast with fp32 master weights and fused
AdamW, at ``B=32, N=512`` and ``B=128, N=128``. On the CPU: a tiny model in fp32, so the suite runs anywhere. The
row's FLOPs are the matrix products the provider runs (3x the forward; effbert's MLM head runs at the labelled
positions only, transformers' at every position), so its percent of floor is its FLOPs utilisation against the bf16
matrix rate measured in the same run; ``tokens`` gives tokens/s, the number to compare.
"""

import importlib.util

import torch

from .case import Case
from .notes import make_spans

OP = "bert_mlm_train_step"


def _sizes(device, quick):
    if device.type == "cuda":
        model = dict(
            vocab_size=30522,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
        )
        shapes = [(32, 512), (128, 128)] if not quick else [(32, 512)]
        return model, shapes, torch.bfloat16
    model = dict(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return model, [(8, 32)], torch.float32


def step_flops(model, batch, seq, head_rows=None):
    """Matrix FLOPs of one training step: 3x the forward's (the backward computes two products per forward one).
    ``head_rows``: the positions the MLM head runs at (default every one, as transformers does; effbert's training
    path runs it at the labelled positions only)."""
    dm, dff, vocab, layers = (
        model["hidden_size"],
        model["intermediate_size"],
        model["vocab_size"],
        model["num_hidden_layers"],
    )
    tokens = batch * seq
    per_layer = 2 * tokens * (4 * dm * dm + 2 * dm * dff) + 2 * 2 * batch * seq * seq * dm
    head = (
        2 * (tokens if head_rows is None else head_rows) * (dm * dm + dm * vocab)
    )  # transform, tied decoder
    return 3.0 * (layers * per_layer + head)


def mc_step_flops(model, batch, seq, masked_rows, num_candidates=10, divider=3):
    """Matrix FLOPs of one MC-BERT step (``TupeBertForMultiChoicePretraining``, every position real).

    Main model: the encoder and the candidate head's transform (3x forward), the K candidate scores (3x) and, for
    the accuracy, once more without gradient. Controller (1/``divider`` of the width and FFN, same depth): the
    encoder, the projection of the shared embeddings at the input and of the whole matrix for the output, the
    transform at every position (3x each), the masked-LM logits at the ``masked_rows`` (3x) and, forward only, the
    full-vocabulary logits at every position that the draws take (the fused sampler computes them in registers)."""
    dm, vocab, k = model["hidden_size"], model["vocab_size"], num_candidates
    heads = max(1, model["num_attention_heads"] // divider)
    dc = max(heads, (dm // divider) // heads * heads)
    small = dict(
        model, hidden_size=dc, intermediate_size=max(1, model["intermediate_size"] // divider)
    )
    tokens = batch * seq
    main = (
        step_flops(model, batch, seq, 0)
        + 3.0 * 2 * tokens * dm * dm
        + 3.0 * 2 * tokens * k * dm
        + 2.0 * tokens * k * dm
    )
    controller = (
        step_flops(small, batch, seq, 0)
        + 3.0 * 2 * (tokens + vocab) * dm * dc
        + 3.0 * 2 * tokens * dc * dc
        + 3.0 * 2 * masked_rows * dc * vocab
        + 2.0 * tokens * dc * vocab
    )
    return main + controller


def _tnf_batch(batch, seq, num_slots, seed):
    """Rare-word spans as the data loader would hand them over: 20% of sentences hold one to three rare words of
    one to three pieces (`make_spans`), and the per-token slots they imply."""
    lengths = torch.full((batch,), seq, dtype=torch.int64)
    spans = make_spans(batch, seq, lengths, seed=seed)
    spans[:, 3] %= num_slots
    slots = torch.full((batch, seq), -1, dtype=torch.int64)
    for b, start, end, slot in spans.tolist():
        slots[b, start:end] = slot
    return spans, slots, lengths


def _mlm_batch(vocab, batch, seq):
    """A pretraining batch as BERT masks it (15% targets, 80% of them [MASK]) with its TNF spans; fixed per shape,
    so every provider sees the same one."""
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(5, vocab, (batch, seq), generator=gen)
    target = torch.rand(batch, seq, generator=gen) < 0.15
    labels = torch.where(target, ids, torch.full_like(ids, -100))
    ids = torch.where(
        target & (torch.rand(batch, seq, generator=gen) < 0.8), torch.full_like(ids, 4), ids
    )
    mask = torch.ones(batch, seq, dtype=torch.bool)
    spans, slots, lengths = _tnf_batch(batch, seq, _Trainer.NUM_SLOTS, seed=batch + seq)
    return ids, mask, labels, spans, slots, lengths


class _Trainer:
    """A model, its optimizer and its step, built on first use (so that a listed case costs nothing)."""

    NUM_SLOTS = 4096

    def __init__(self, provider, model_sizes, device, dtype, dropout=0.1):
        self.provider, self.sizes, self.device, self.dtype = provider, model_sizes, device, dtype
        self.dropout = dropout  # BERT's
        self.model = None

    def build(self):
        torch.manual_seed(0)
        if self.provider == "hf-sdpa":
            from transformers import BertConfig, BertForMaskedLM

            cfg = BertConfig(
                **self.sizes,
                hidden_dropout_prob=self.dropout,
                attention_probs_dropout_prob=self.dropout,
            )
            cfg._attn_implementation = "sdpa"
            self.model = BertForMaskedLM(cfg)
        else:
            from ..models import (
                TupeBertConfig,
                TupeBertForMaskedLM,
                TupeBertForMultiChoicePretraining,
            )
            from ..nn import NoteDictionary

            absolute = self.provider == "effbert-absolute"
            cfg = TupeBertConfig(
                **self.sizes,
                position_mode="absolute" if absolute else "tupe-r",
                hidden_dropout_prob=self.dropout,
                attention_probs_dropout_prob=self.dropout,
                backend="eager" if self.provider == "effbert-eager" else "auto",
            )
            notes = None if absolute else NoteDictionary(self.NUM_SLOTS, cfg.hidden_size, window=16)
            if self.provider == "effbert-mcbert":
                self.model = TupeBertForMultiChoicePretraining(
                    cfg, note_dictionary=notes, mask_token_id=4
                )
            else:
                self.model = TupeBertForMaskedLM(cfg, note_dictionary=notes)
        self.model = self.model.to(self.device).train()
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01, **fused)

    def __call__(self, ids, mask, labels, spans, slots, lengths):
        if self.model is None:
            self.build()
        model = self.model
        model.zero_grad(set_to_none=True)
        with torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        ):
            if self.provider == "hf-sdpa":
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
            elif self.provider == "effbert-mcbert":
                out = model(ids, mask, labels=labels, note_slots=slots)
            elif self.provider == "effbert-absolute":
                out = model(ids, mask, labels=labels, return_logits=False)
            else:
                out = model(ids, mask, labels=labels, note_slots=slots, return_logits=False)
        out.loss.backward()
        self.opt.step()
        if self.provider in ("effbert", "effbert-eager", "effbert-mcbert"):
            model.update_notes(out.last_hidden_state, spans, lengths)
        return out.loss.detach()


def _transformers_reason():
    try:
        return (
            []
            if importlib.util.find_spec("transformers")
            else ["transformers is not installed (pip install transformers safetensors)"]
        )
    except (ImportError, ValueError):
        return ["transformers is not importable"]


def cases(device, quick):
    model_sizes, shapes, dtype = _sizes(device, quick)
    params = None
    out = []
    for batch, seq in shapes:

        def make_inputs(batch=batch, seq=seq):
            return tuple(t.to(device) for t in _mlm_batch(model_sizes["vocab_size"], batch, seq))

        b_ids, _, b_labels, _, _, _ = _mlm_batch(model_sizes["vocab_size"], batch, seq)
        labelled = int((b_labels != -100).sum())
        masked_rows = int((b_ids == 4).sum())

        if (
            params is None
        ):  # BERT's parameter count without building one: embeddings, layers, MLM head
            dm, dff, v = (
                model_sizes["hidden_size"],
                model_sizes["intermediate_size"],
                model_sizes["vocab_size"],
            )
            params = (
                (v + model_sizes["max_position_embeddings"] + 2) * dm
                + model_sizes["num_hidden_layers"] * (4 * dm * dm + 2 * dm * dff + 9 * dm + dff)
                + dm * dm
                + 4 * dm
                + v
            )
        for provider in (
            "effbert",
            "effbert-absolute",
            "effbert-eager",
            "hf-sdpa",
            "effbert-mcbert",
        ):
            trainer = _Trainer(provider, model_sizes, device, dtype)
            out.append(
                Case(
                    op=OP,
                    params={
                        "B": batch,
                        "N": seq,
                        "L": model_sizes["num_hidden_layers"],
                        "Dm": model_sizes["hidden_size"],
                    },
                    dtype=str(dtype).replace("torch.", ""),
                    mode="train step",
                    provider=provider,
                    fn=trainer,
                    make_inputs=make_inputs,
                    reference=lambda *inputs: None,
                    # AdamW reads weight, gradient and both moments and writes three of them back: 28 bytes per
                    # fp32 parameter is the least a step moves; the matrix products bound it long before that
                    bytes=28 * params,
                    tokens=batch * seq,
                    flops=(
                        mc_step_flops(model_sizes, batch, seq, masked_rows)
                        if provider == "effbert-mcbert"
                        else step_flops(
                            model_sizes, batch, seq, None if provider == "hf-sdpa" else labelled
                        )
                    ),
                    skip_reasons=_transformers_reason() if provider == "hf-sdpa" else [],
                    baseline="hf-sdpa",
                    check=False,
                )
            )
    return out
