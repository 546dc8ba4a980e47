"""MC-BERT pretraining on the TUPE BERT: a multi-choice cloze test with a reject option, whose inputs and candidates
come from a small masked-LM meta controller (Xu, Gong, Ke, He et al., "MC-BERT: Efficient Language Pre-Training
via a Meta Controller", arXiv 2006.05744; code: github.com/MC-BERT/MC-BERT, ``fairseq/models/mcbert/model.py`` and
``fairseq/criterions/mcbert.py``).

As the published code does it:

* the controller has the main model's depth and 1/3 of its width, FFN size and heads (``mc_size_divider = 3``); its
  input embedding is ``proj(E[ids])`` with ``E`` the main model's word embeddings and ``proj`` a linear map with
  bias (``embed_linear``); its output layer is ``dense, activation, LayerNorm``, then ``proj(E)`` (the same
  projection of the same matrix) plus the main model's per-token candidate bias;
* the controller is trained with the masked-LM loss at the ``[MASK]`` positions of the input;
* with no gradient, K = 10 tokens are drawn with replacement at every position from the controller's softmax; at
  the ``[MASK]`` positions the first draw replaces the input token;
* candidates: slot 0 is the reject option, slot 1 the original token where the input differs from it (else a
  draw), slots 2..K-1 draws; the label is 1 where the input differs from the original, else 0;
* the main model scores candidate c at a position as ``<dense-act-LayerNorm(h), E[c]> + bias[c]`` (``GenLMHead``,
  which looks the candidates up in the input's ``nn.Embedding`` with ``padding_idx``: a drawn [PAD] sends no
  gradient to its embedding row, only to its bias entry) and the loss is ``mlm_loss + lambda *
  multi_choice_loss`` with both means (masked positions; real tokens) and ``lambda = 50`` (``--loss-lamda``).

Checked against that code line by line, the same too: a draw equal to the original at a [MASK] position leaves
the token unreplaced (label 0); draws may repeat each other, the original or the reject token, and are kept as
they are (a repeat shares its score; the loss targets the labelled slot); the multi-choice loss counts every real
token, [CLS] and [SEP] included (the published ``not_pad_tokens``); the controller's output bias is the main
model's candidate bias itself (so the reject option's bias, which the multi-choice loss raises, also raises the
controller's odds of drawing the reject token, as ``<neither>``'s does there); the draws and the input they make
carry no gradient; the controller gets gradient from its masked-LM loss only. What the model does not fix, the
caller chooses: the published task masks every one of its 15% targets with ``[MASK]`` (``--mask-prob 0.15``,
``MaskTokensDataset2`` with no random or kept tokens; a random replacement here counts as replaced, as it would
there) and trains with Adam (0.9, 0.98), eps 1e-6, weight decay 0.01, peak learning rate 1e-4 after 10,000
warm-up steps, no gradient clipping, 256 sequences of 512 tokens a step.

Deviations, each for a reason: the reject option is the ``[MASK]`` row of the word embeddings, where the published
code adds a ``<neither>`` token to the dictionary (after replacement the main model sees ``[MASK]`` only where the
controller drew it, as the published controller can draw ``<neither>``, so the row is nearly free, and vocabularies
stay as they are; ``reject_token_id`` chooses another row); draws are
made at the real tokens only, not at padding (the published code draws at padding too and never uses those); the
controller's positions follow the main model's ``position_mode`` (TUPE-A/R or absolute) instead of fairseq's
learned absolute positions; the candidate bias starts at 0 (it is the masked-LM head's bias, so the main model
loads as a ``TupeBertForMaskedLM``), where the published ``nn.Embedding(V, 1)`` starts at normal(0, 0.02).

Metrics (no gradient): ``mc_accuracy`` over real tokens (always choosing the reject option scores the unreplaced
fraction), ``mc_replaced_accuracy`` at the replaced tokens (the published ``replace_acc``), and the cloze part
alone there: ``mc_choice_accuracy`` (the original outscores the other non-reject candidates) beside its chance
level ``mc_choice_chance`` (a uniform pick among the distinct non-reject candidates).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..ops import mc_candidate_loss, mc_sample_fused
from .tupe_bert import (
    TupeBertForMaskedLM,
    TupeBertModel,
    _activation,
    _check_ids,
    _check_labels,
    _values_in_range,
)

__all__ = [
    "TupeBertForMultiChoicePretraining",
    "MultiChoicePretrainingOutput",
    "controller_config",
    "multi_choice_inputs",
]


@dataclass
class MultiChoicePretrainingOutput(ModelOutput):
    """A ``transformers`` output (attribute access, ``.to_tuple()``) of MC-BERT's pretraining step."""

    loss: Optional[torch.Tensor] = None  # mlm_loss + loss_lambda * mc_loss
    # the two terms keep their graphs, so a trainer can weight each over a whole step (effbert.training does)
    mlm_loss: Optional[torch.Tensor] = (
        None  # the controller's masked-LM loss (mean over [MASK] positions; 0 if none)
    )
    mc_loss: Optional[torch.Tensor] = (
        None  # the main model's multi-choice cross-entropy (mean over real tokens)
    )
    mc_accuracy: Optional[torch.Tensor] = (
        None  # fraction of real tokens whose highest-scored candidate is the label
    )
    replaced_fraction: Optional[torch.Tensor] = (
        None  # fraction of real tokens whose input differs from the original
    )
    mc_replaced_accuracy: Optional[torch.Tensor] = (
        None  # accuracy at those tokens (reject counts as wrong there)
    )
    # at the replaced tokens, the cloze part alone: how often the original outscores the other non-reject
    # candidates, and what a uniform pick among the distinct non-reject candidates would score (its chance level)
    mc_choice_accuracy: Optional[torch.Tensor] = None
    mc_choice_chance: Optional[torch.Tensor] = None
    last_hidden_state: Optional[torch.Tensor] = (
        None  # the main model's [B, N, hidden] (what update_notes folds in)
    )


def controller_config(config, size_divider=3):
    """The controller's config: the main model's depth, ``1/size_divider`` of its width, FFN size and heads (the
    width rounded down to a multiple of the heads), the same positions, dropout and backend."""
    if isinstance(size_divider, bool) or not isinstance(size_divider, int) or size_divider < 1:
        raise ValueError(f"size_divider must be an int >= 1, got {size_divider!r}")
    heads = max(1, config.num_attention_heads // size_divider)
    hidden = max(heads, (config.hidden_size // size_divider) // heads * heads)
    return config.replace(
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=max(1, config.intermediate_size // size_divider),
        multi_exit=False,
    )


def multi_choice_inputs(input_ids, original, masked, draws, reject_token_id):
    """The main model's input and its multi-choice test at R positions, as the published ``McbertModel.forward``
    builds them: ``input_ids``, ``original`` and ``masked`` (bool) are ``[R]``, ``draws [R, K]`` the controller's.

    Returns ``(new_ids [R], candidates [R, K], labels [R])``: the first draw replaces the input where ``masked``;
    a position is "replaced" where the new input differs from the original (the 10% random tokens of BERT's
    masking count too); candidates are the draws with slot 1 set to the original where replaced and slot 0 the
    reject option; the label is 1 where replaced, else 0."""
    new_ids = torch.where(masked, draws[:, 0], input_ids.long())
    replaced = new_ids != original
    candidates = draws.clone()
    candidates[:, 1] = torch.where(replaced, original, draws[:, 1])
    candidates[:, 0] = reject_token_id
    return new_ids, candidates, replaced.long()


def _choice_metrics(scores, candidates):
    """At replaced rows (``scores``, ``candidates`` ``[R, K]``, the original in slot 1): the fraction whose slot 1
    outscores slots 2..K-1 (ties to the lower slot, as ``argmax``), and the mean of ``1 / (distinct tokens in slots
    1..K-1)``: the accuracy of a uniform pick among the distinct non-reject candidates. Both 0 for no rows."""
    if scores.shape[0] == 0:
        zero = scores.new_zeros(())
        return zero, zero.clone()
    accuracy = (scores[:, 1:].argmax(-1) == 0).float().mean()
    rest = candidates[:, 1:].sort(-1).values
    distinct = 1 + (rest[:, 1:] != rest[:, :-1]).sum(-1)
    return accuracy, (1.0 / distinct.float()).mean()


class _ProjectedEmbedding(nn.Module):
    """``proj(E[ids])`` for a word embedding ``E`` owned elsewhere (kept out of this module's parameters so the
    state dict holds ``E`` once)."""

    def __init__(self, source, proj):
        super().__init__()
        self._source = (source,)  # a tuple: not registered as a submodule
        self.proj = proj

    def forward(self, ids):
        src = self._source[0]
        return self.proj(F.embedding(ids, src.weight, padding_idx=src.padding_idx))


class _Controller(nn.Module):
    """The meta controller: a small TUPE BERT whose word embeddings are a projection of the main model's, with an
    MLM transform (dense, activation, LayerNorm)."""

    def __init__(self, ccfg, main_embeddings):
        super().__init__()
        self.bert = TupeBertModel(ccfg, add_pooling_layer=False)
        # the controller's own [V, hidden/3] table is replaced by the projection of the shared one
        self.bert.embeddings.word_embeddings = _ProjectedEmbedding(
            main_embeddings, nn.Linear(main_embeddings.embedding_dim, ccfg.hidden_size)
        )
        self.dense = nn.Linear(ccfg.hidden_size, ccfg.hidden_size)
        self.act = _activation(ccfg.hidden_act)
        self.layer_norm = nn.LayerNorm(ccfg.hidden_size, eps=ccfg.layer_norm_eps)

    @property
    def proj(self):
        """The projection of the main model's word embeddings (``embed_linear`` of the published code)."""
        return self.bert.embeddings.word_embeddings.proj

    def forward(self, input_ids, attention_mask, token_type_ids, position_ids=None):
        hidden = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids
        ).last_hidden_state
        return self.layer_norm(self.act(self.dense(hidden)))


class TupeBertForMultiChoicePretraining(TupeBertForMaskedLM):
    """MC-BERT pretraining of a TUPE BERT (TUPE-A/R and TNF notes on the main model), with its meta controller
    inside (module ``controller``).

    ``forward(input_ids, attention_mask=None, token_type_ids=None, labels=None, note_slots=None,
    position_ids=None)`` (``position_ids``: several texts per row, as ``TupeBertModel``):
    ``input_ids [B, N]`` are the masked inputs (BERT's masking), ``labels [B, N]`` the original token at the masked
    positions and -100 elsewhere (as for ``TupeBertForMaskedLM``). Returns ``MultiChoicePretrainingOutput``.
    ``num_candidates`` K >= 2 (10 published), ``loss_lambda`` (50 published), ``mask_token_id`` (the positions the
    controller fills) and ``reject_token_id`` (the word-embedding row of the reject option; default
    ``mask_token_id``). ``controller_size_divider``: 3 published for BERT-base.

    The main model's parameters and notes have exactly the names and shapes of ``TupeBertForMaskedLM``'s (the
    candidate head is its ``mlm_head``: transform and per-token bias), so ``finetuning_state_dict()`` (the state
    without the controller) loads into a ``TupeBertForMaskedLM`` for fine-tuning. ``set_backend`` reaches the
    controller's ops too.
    """

    def __init__(
        self,
        config,
        note_dictionary=None,
        *,
        mask_token_id,
        reject_token_id=None,
        num_candidates=10,
        loss_lambda=50.0,
        controller_size_divider=3,
    ):
        super().__init__(config, note_dictionary=note_dictionary)
        for name, value in (("mask_token_id", mask_token_id), ("reject_token_id", reject_token_id)):
            if value is None and name == "reject_token_id":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 <= value < config.vocab_size
            ):
                raise ValueError(
                    f"{name} must be a token id in [0, {config.vocab_size}), got {value!r}"
                )
        if (
            isinstance(num_candidates, bool)
            or not isinstance(num_candidates, int)
            or num_candidates < 2
        ):
            raise ValueError(
                f"num_candidates must be an int >= 2 (the reject option and one more), got "
                f"{num_candidates!r}"
            )
        if (
            isinstance(loss_lambda, bool)
            or not isinstance(loss_lambda, (int, float))
            or not loss_lambda >= 0
        ):
            raise ValueError(f"loss_lambda must be a number >= 0, got {loss_lambda!r}")
        self.mask_token_id = mask_token_id
        self.reject_token_id = mask_token_id if reject_token_id is None else reject_token_id
        self.num_candidates = num_candidates
        self.loss_lambda = float(loss_lambda)
        self.controller_config = controller_config(config, controller_size_divider)
        self.controller = _Controller(self.controller_config, self.bert.embeddings.word_embeddings)
        self.controller.apply(self._init_weights)

    def controller_weight(self):
        """The controller's output matrix ``proj(E)``, ``[V, controller hidden]``."""
        return self.controller.proj(self.bert.embeddings.word_embeddings.weight)

    def finetuning_state_dict(self):
        """The state dict without the controller: the keys of a ``TupeBertForMaskedLM``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("controller.")}

    def _candidate_features(self, hidden):
        head = self.mlm_head
        return head.layer_norm(head.act(head.dense(hidden)))

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        note_slots=None,
        position_ids=None,
    ):
        if labels is None:
            raise ValueError(
                "labels are needed: MC-BERT's controller trains on the masked positions' originals"
            )
        _check_ids("labels", labels, None)
        _check_labels(labels, tuple(input_ids.shape), input_ids.device, "[B, N]")
        _values_in_range("labels", labels, 0, self.config.vocab_size, allow=-100)
        backend = self.config.backend
        token_type_ids, mask = self.bert.check_inputs(input_ids, attention_mask, token_type_ids)
        real = mask if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        original = torch.where(labels != -100, labels, input_ids).long()

        # the controller: MLM at the [MASK] positions (the published criterion's masked_tokens)
        c_feat = self.controller(
            input_ids, attention_mask, token_type_ids, position_ids
        )  # [B, N, Dc]
        c_weight = self.controller_weight()  # [V, Dc]
        bias = self.mlm_head.bias
        masked = (input_ids == self.mask_token_id) & real
        m_idx = masked.reshape(-1).nonzero().squeeze(1)
        flat_feat = c_feat.reshape(-1, c_feat.shape[-1])
        if m_idx.numel():
            m_logits = F.linear(flat_feat[m_idx], c_weight, bias)
            mlm_loss = F.cross_entropy(m_logits.float(), original.reshape(-1)[m_idx])
        else:
            mlm_loss = flat_feat.sum() * 0.0  # keeps every parameter in the graph (DDP)

        # K draws at every real token, no gradient; the first replaces the input at the [MASK] positions
        r_idx = real.reshape(-1).nonzero().squeeze(1)
        with torch.no_grad():
            # the fused kernel draws straight from the features and proj(E): no [R, V] logits in memory
            draws = mc_sample_fused(
                flat_feat[r_idx],
                c_weight,
                bias.to(c_weight.dtype),
                self.num_candidates,
                backend=backend,
            )  # [R, K]
            if bool((draws < 0).any()):
                raise FloatingPointError("the controller's logits hold NaN: no token can be drawn")
            new_r, candidates, mc_labels = multi_choice_inputs(
                input_ids.reshape(-1)[r_idx],
                original.reshape(-1)[r_idx],
                masked.reshape(-1)[r_idx],
                draws,
                self.reject_token_id,
            )
            replaced = mc_labels == 1
            new_ids = input_ids.clone().long().reshape(-1)
            new_ids[r_idx] = new_r
            new_ids = new_ids.view_as(input_ids)

        # the main model on the controller's input
        bert = self.bert
        hidden, packing = bert.embed_packed(
            new_ids, attention_mask, token_type_ids, position_ids
        )  # real tokens
        if note_slots is not None:
            if self.notes is None:
                raise ValueError("note_slots needs a model built with a note_dictionary")
            if not isinstance(note_slots, torch.Tensor) or tuple(note_slots.shape) != tuple(
                input_ids.shape
            ):
                raise ValueError(f"note_slots must be a [B, N] = {list(input_ids.shape)} tensor")
            hidden = self.notes.mix(
                hidden[None], packing.gather(note_slots)[None], backend=backend
            )[0]
        hidden, _ = bert.encode(hidden, packing)
        feats = self._candidate_features(hidden)  # the packed real tokens, in r_idx's order
        words = bert.embeddings.word_embeddings.weight
        # [PAD] drawn as a candidate: no gradient to its embedding row, as the published lookup with padding_idx
        mc_loss = mc_candidate_loss(
            feats,
            words,
            bias,
            candidates,
            mc_labels,
            padding_idx=self.config.pad_token_id,
            backend=backend,
        )
        with torch.no_grad():
            scores = (
                torch.einsum("md,mkd->mk", feats.float(), words.float()[candidates])
                + bias.float()[candidates]
            )
            correct = (scores.argmax(-1) == mc_labels).float()
            accuracy = correct.mean() if correct.numel() else correct.sum()
            replaced_frac = replaced.float().mean() if replaced.numel() else replaced.float().sum()
            hit = correct[replaced]
            replaced_acc = hit.mean() if hit.numel() else hit.sum()
            choice_acc, choice_chance = _choice_metrics(scores[replaced], candidates[replaced])
        loss = mlm_loss + self.loss_lambda * mc_loss
        return MultiChoicePretrainingOutput(
            loss=loss,
            mlm_loss=mlm_loss,
            mc_loss=mc_loss,
            mc_accuracy=accuracy,
            replaced_fraction=replaced_frac,
            mc_replaced_accuracy=replaced_acc,
            mc_choice_accuracy=choice_acc,
            mc_choice_chance=choice_chance,
            last_hidden_state=packing.pad(hidden),
        )
