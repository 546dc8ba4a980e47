"""effbert's training step against transformers' ``BertForMaskedLM`` (op
``train_step_vs_transformers``).

The batch of ``train_step_padding`` (right-padded rows, half of the slots padding, 15% of the real
tokens labelled), the same sizes, dropout (BERT's 0.1), AdamW settings and precision, one masked-LM
training step (forward, backward, AdamW step) per call:
- ``hf-mlm`` (the baseline): transformers' ``BertForMaskedLM`` (SDPA attention, absolute positions)
  as a user runs it: ``model(input_ids, attention_mask, labels).loss`` on the padded rows, the MLM
  head (transform and tied vocabulary decoder) at every slot;
- ``hf-mlm-labelled-head``: the same model with the MLM head on the labelled rows only
  (``model.bert``, then ``model.cls`` on ``hidden[labels != -100]``, the same cross-entropy): the
  trick effbert's model uses, so that the table separates what the head costs from what padding
  costs;
- ``effbert-padded`` / ``effbert-unpadded``: ``TupeBertForMaskedLM`` (TUPE-R) on all slots / on the
  real tokens (``train_step_padding``'s ``padded`` and ``unpadded`` models).
FLOPs: the matrix products each provider runs (3x the forward): the transformers rows and
``effbert-padded`` on all ``B * N`` slots (``hf-mlm``'s head at every slot, the others' at the
labelled rows), ``effbert-unpadded`` on the real tokens. tokens/s counts the real tokens on every
row: compare those. Sizes as ``train_step_padding``: BERT-base under bf16 autocast on a GPU, a
2-layer 512-wide fp32 model on the CPU.
"""

import importlib.util

import torch

from .case import Case
from .train_step_padding import (
    PAD_ID,
    _model_reasons,
    _param_bytes,
    _sizes,
    _Trainer,
    half_padded_lengths,
    matrix_flops,
    mlm_rows,
)

OP = "train_step_vs_transformers"


class HFTrainer:
    """transformers' ``BertForMaskedLM`` (SDPA attention, absolute positions, ``sizes`` as
    ``BertConfig`` takes them) and AdamW (lr 1e-4, weight decay 0.01, fused on CUDA), built on first
    use (seed 0).

    ``labelled_head=False``: ``model(input_ids, attention_mask, labels).loss``, the head at every
    slot; ``labelled_head=True``: ``model.cls`` on ``model.bert``'s hidden states at the rows where
    ``labels != -100``, cross-entropy averaged over those rows (what transformers' loss averages
    over: the same value and gradients). ``__call__(input_ids, attention_mask, labels)`` ([B, N]
    int64) takes one step and returns the detached loss."""

    def __init__(self, labelled_head, sizes, device, dtype, dropout=0.1):
        self.labelled_head, self.sizes = bool(labelled_head), sizes
        self.device, self.dtype = device, dtype
        self.dropout = dropout
        self.model = None

    def build(self):
        from transformers import BertConfig, BertForMaskedLM

        torch.manual_seed(0)
        cfg = BertConfig(
            **self.sizes,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            pad_token_id=PAD_ID,
        )
        cfg._attn_implementation = "sdpa"
        self.model = BertForMaskedLM(cfg).to(self.device).train()
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01, **fused)

    def loss(self, ids, mask, labels):
        """The step's loss (0-d, with its graph); builds the model on first use."""
        if self.model is None:
            self.build()
        model = self.model
        lowp = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=lowp):
            if not self.labelled_head:
                return model(input_ids=ids, attention_mask=mask, labels=labels).loss
            hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            rows = labels != -100
            logits = model.cls(hidden[rows])
        # as autocast runs cross_entropy: in float32
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return torch.nn.functional.cross_entropy(logits, labels[rows])

    def __call__(self, ids, mask, labels):
        if self.model is None:
            self.build()
        self.model.zero_grad(set_to_none=True)
        loss = self.loss(ids, mask, labels)
        loss.backward()
        self.opt.step()
        return loss.detach()


def _hf_reasons():
    return (
        []
        if importlib.util.find_spec("transformers")
        else ["transformers is not installed (pip install transformers safetensors)"]
    )


def cases(device, quick):
    sizes, shapes, _, dtype = _sizes(device, quick)
    dname = str(dtype).replace("torch.", "")
    out = []
    for batch, seq in shapes:
        lengths = half_padded_lengths(batch, seq, seed=batch + seq)
        _, _, labels = mlm_rows(lengths, seq, sizes["vocab_size"], seed=batch * seq)
        head_rows = int((labels != -100).sum())
        real = int(lengths.sum())
        slots = batch * seq

        def make_inputs(lengths=lengths, seq=seq, batch=batch):
            rows = mlm_rows(lengths, seq, sizes["vocab_size"], seed=batch * seq)
            return tuple(t.to(device) for t in rows)

        params = {
            "B": batch,
            "N": seq,
            "real": real,
            "L": sizes["num_hidden_layers"],
            "Dm": sizes["hidden_size"],
        }
        common = dict(
            op=OP,
            params=params,
            dtype=dname,
            mode="train step",
            make_inputs=make_inputs,
            reference=lambda *a: None,
            bytes=_param_bytes(sizes),
            tokens=real,
            baseline="hf-mlm",
            check=False,
        )
        out += [
            Case(
                provider="hf-mlm",
                fn=HFTrainer(False, sizes, device, dtype),
                flops=matrix_flops(sizes, slots, slots * seq, slots),
                skip_reasons=_hf_reasons(),
                note=f"transformers BertForMaskedLM as a user runs it (SDPA): every layer and "
                f"the MLM head on all {slots} slots; tokens/s counts the {real} real tokens",
                **common,
            ),
            Case(
                provider="hf-mlm-labelled-head",
                fn=HFTrainer(True, sizes, device, dtype),
                flops=matrix_flops(sizes, slots, slots * seq, head_rows),
                skip_reasons=_hf_reasons(),
                note=f"the same BertForMaskedLM, its MLM head on the {head_rows} labelled rows "
                "only (effbert's trick), the encoder on all slots",
                **common,
            ),
            Case(
                provider="effbert-padded",
                fn=_Trainer(False, sizes, device, dtype),
                flops=matrix_flops(sizes, slots, slots * seq, head_rows),
                note="TupeBertForMaskedLM (TUPE-R) on all slots, head on the labelled rows",
                **common,
            ),
            Case(
                provider="effbert-unpadded",
                fn=_Trainer(True, sizes, device, dtype),
                flops=matrix_flops(sizes, real, int((lengths**2).sum()), head_rows),
                skip_reasons=_model_reasons(False),
                note="TupeBertForMaskedLM (TUPE-R) on the real tokens only, head on the labelled "
                "rows",
                **common,
            ),
        ]
    return out
