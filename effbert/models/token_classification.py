"""Token classification (sequence labeling) on the TUPE-BERT encoder, with one classifier per layer and the
sentence- and token-level early exit of Li et al., "Accelerating BERT Inference for Sequence Labeling via
Early-Exit" (ACL 2021); published code LeeSureman/Sequence-Labeling-Early-Exit (``V0/modeling_bert_ee.py``,
commit 9717770: training ``train_mode='joint'``, inference ``test_mode='s_level_ee'`` (SENTEE) and
``'t_level_win_ee_copy'`` (TOKEE, the default of ``V0/test.py``)).

Words are given by their labelled tokens: as transformers' token classification does, a word's label sits on its
first word piece and every other token carries -100 (``label_mask`` at inference). A word's pieces are its labelled
token and the unlabelled tokens after it, up to the next labelled token or the row's last real token ([SEP]).
"""

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import TokenClassifierOutput

from ..ops import exit_entropy, token_exit_decision
from .multi_exit import MultiExitMixin
from .tupe_bert import (
    TupeBertModel,
    TupeBertPreTrainedModel,
    _as_requested,
    _check_ids,
    _check_labels,
    _values_in_range,
)

__all__ = [
    "TupeBertForTokenClassification",
    "MultiExitTokenClassifierOutput",
    "TokenClassifierOutput",
    "TokenExitOutput",
    "published_token_thresholds",
    "multi_exit_token_loss",
    "TOKEN_EXIT_MODES",
    "SelfSamplingDraw",
    "draw_self_sampling",
    "simulate_word_exits",
    "self_sampling_token_exit_layers",
    "self_sampling_token_loss",
    "SELF_SAMPLING_WINDOWS",
    "SELF_SAMPLING_THRESHOLDS",
    "SELF_SAMPLING_TOKEN_THRESHOLDS",
]

TOKEN_EXIT_MODES = ("tokee", "sentee")


@dataclass
class MultiExitTokenClassifierOutput(TokenClassifierOutput):
    """``TokenClassifierOutput`` of a multi-exit model: ``logits [B, N, C]`` are the last layer's classifier's,
    ``exit_logits [L, B, N, C]`` every layer's, first layer first (zeros at padded slots)."""

    exit_logits: Optional[torch.FloatTensor] = None


class TokenExitOutput(NamedTuple):
    """What ``early_exit_token_labels`` returns, a tuple ``(labels, exit_layer, token_layers, logits)`` as the
    sequence classifiers' ``early_exit`` returns ``(logits, exit_layer)``:
    ``labels [B, N]`` int64, each word's predicted class at its labelled token, -100 elsewhere; ``exit_layer
    [B, N]`` int64, 1-based, at labelled tokens (0 elsewhere); ``token_layers`` int, the token-layers run (each
    layer's query tokens summed over the layers, the paper's cost measure); ``logits [B, N, C]`` each word's logits
    from its exit layer's classifier (zeros elsewhere), as the published code keeps them (``pred[j]``)."""

    labels: torch.Tensor
    exit_layer: torch.Tensor
    token_layers: int
    logits: torch.Tensor


def published_token_thresholds(threshold, num_layers=12):
    """The per-layer thresholds of the published TOKEE scripts: ``threshold`` for the first half of the layers and
    ``2 * threshold`` for the rest (``V0/test.py`` lines 142-146: ``[t] * 6 + [2 * t] * 6`` for 12 layers, each
    capped by ``--max_threshold``, default 100, which no normalised entropy reaches). An odd ``num_layers`` gives
    the extra layer to the second half. Returns a list of ``num_layers`` floats."""
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not math.isfinite(threshold)
    ):
        raise ValueError(f"threshold must be a finite float, got {threshold!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    half = num_layers // 2
    return [float(threshold)] * half + [2.0 * float(threshold)] * (num_layers - half)


def multi_exit_token_loss(exit_logits, labels):
    """The published joint training loss (stage 1): ``sum_i (i + 1) * CE_i / sum_i (i + 1)`` over the layers
    ``i = 0..L-1``, each ``CE_i`` the mean cross-entropy of layer i's classifier over the tokens whose label is not
    -100 (``nn.CrossEntropyLoss(ignore_index=-100)``). ``V0/modeling_bert_ee.py`` lines 2191-2223 at commit 9717770
    (``train_mode='joint'``, ``joint_weighted=1``, the defaults of ``V0/main.py``).

    ``exit_logits``: ``[L, T, C]`` float; ``labels``: int ``[T]`` in ``[0, C)`` or -100. Returns a float32 scalar
    (float64 for float64 logits); NaN when no token has a label, as the cross-entropy's mean gives."""
    depth = exit_logits.shape[0]
    dtype = torch.float64 if exit_logits.dtype == torch.float64 else torch.float32
    weights = torch.arange(1, depth + 1, dtype=dtype, device=exit_logits.device)
    losses = torch.stack(
        [F.cross_entropy(z.to(dtype), labels, ignore_index=-100) for z in exit_logits]
    )
    return (weights * losses).sum() / weights.sum()


def _check_thresholds(thresholds, depth, name="thresholds"):
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        thresholds = [thresholds] * depth
    if not isinstance(thresholds, (list, tuple)) or len(thresholds) != depth:
        raise ValueError(
            f"{name} must be a float or a list of {depth} floats (one per layer), got {thresholds!r}"
        )
    for t in thresholds:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"{name} must hold finite floats, got {thresholds!r}")
    return [float(t) for t in thresholds]


def _cu(counts):
    """int32 offsets ``[n + 1]`` from per-sequence counts."""
    return F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))


class TupeBertForTokenClassification(MultiExitMixin, TupeBertPreTrainedModel):
    """Dropout and a linear classifier over ``config.num_labels`` on every token's final state, or, with
    ``config.multi_exit``, one such classifier after every layer (``exits``), as Li et al. (ACL 2021) train them.

    ``forward(input_ids, attention_mask=None, token_type_ids=None, labels=None, output_hidden_states=False,
    return_dict=None, position_ids=None)``: ``labels [B, N]`` int class indices, -100 where a token has no label
    (every word piece but a word's first, [CLS], [SEP], padding; a label at a padded slot is no target). Returns
    ``TokenClassifierOutput(loss, logits [B, N, C], hidden_states)``; with ``multi_exit``
    ``MultiExitTokenClassifierOutput`` with ``exit_logits [L, B, N, C]`` and ``logits`` the last layer's, and the
    loss ``multi_exit_token_loss`` (the published joint loss, weights ``i + 1``: PABEE's, the
    default ``config.exit_loss``), or, for another ``config.exit_loss`` (``"romebert"``,
    ``"deebert"`` of the stage ``set_deebert_stage`` set) or with ``exit_gradient_equilibrium``,
    ``effbert.models.multi_exit.exit_loss`` over the labelled tokens as a batch. Without multi-exit
    the loss is the cross-entropy of the one classifier. The layers run on the packed real tokens.

    ``early_exit_token_labels(...)``: batched SENTEE / TOKEE inference (see there).
    """

    # fine-tuning starts from a masked-LM or base checkpoint: its MLM head, TNF notes and pooler are not used here
    _keys_to_ignore_on_load_unexpected = [r"^mlm_head\.", r"^notes\.", r"^bert\.pooler\."]

    def __init__(self, config):
        super().__init__(config)
        self.bert = TupeBertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        if config.multi_exit:
            self.classifier = None
            self.exits = nn.ModuleList(
                nn.Linear(config.hidden_size, config.num_labels)
                for _ in range(config.num_hidden_layers)
            )
        else:
            self.exits = None
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def exit_loss_settings(self):
        c = self.config
        return dict(
            loss=c.exit_loss or "pabee",
            gamma=c.exit_loss_gamma,
            temperature=c.exit_loss_temperature,
            gradient_equilibrium=c.exit_gradient_equilibrium,
            backend=c.backend,
        )

    def deebert_parts(self):
        if self.exits is None:
            raise ValueError(
                "the model has no per-layer classifiers: build it with config.multi_exit=True"
            )
        return [self.bert], self.exits

    def _token_loss(self, packed, labels):
        """The loss of the per-layer logits ``packed [L, T, C]`` at the packed tokens'
        ``labels [T]`` (-100: none)."""
        settings = self.exit_loss_settings()
        joint = settings["loss"] == "pabee" and not settings["gradient_equilibrium"]
        if self.exits is None or joint:  # the published joint loss (ignore_index -100)
            return multi_exit_token_loss(packed, labels)
        keep = labels != -100  # the labelled tokens as the batch of every exit
        return self.compute_exit_loss(packed[:, keep], labels[keep])

    def _check_token_labels(self, labels, shape, device):
        _check_labels(labels, shape, device, "[B, N]")
        _check_ids("labels", labels, None)
        _values_in_range("labels", labels, 0, self.config.num_labels, allow=-100)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        output_hidden_states=False,
        return_dict=None,
        position_ids=None,
        token_exit_layer=None,
        flooding_bias=None,
    ):
        if labels is not None:
            self._check_token_labels(labels, tuple(input_ids.shape), input_ids.device)
        if token_exit_layer is not None or flooding_bias is not None:
            self._check_self_sampling(input_ids, labels, token_exit_layer, flooding_bias)
        bert = self.bert
        hidden, packing = bert.embed_packed(input_ids, attention_mask, token_type_ids, position_ids)
        if token_exit_layer is not None:
            hidden, states = self._encode_copy(hidden, packing, packing.gather(token_exit_layer))
        else:
            every = output_hidden_states or self.exits is not None
            hidden, states = bert.encode(hidden, packing, output_hidden_states=every)
        if self.exits is not None:  # every layer's classifier on that layer's packed states
            packed = torch.stack([head(self.dropout(t)) for t, head in zip(states[1:], self.exits)])
        else:
            packed = self.classifier(self.dropout(hidden))[None]
        loss = None
        if labels is not None and token_exit_layer is not None:
            bias = None
            if flooding_bias is not None:
                bias = torch.stack([packing.gather(f) for f in flooding_bias])
            loss = self_sampling_token_loss(
                packed, packing.gather(labels).long(), packing.gather(token_exit_layer), bias
            )
        elif labels is not None:
            loss = self._token_loss(packed, packing.gather(labels).long())
        logits = torch.stack([packing.pad(z) for z in packed])
        states = tuple(packing.pad(t) for t in states) if output_hidden_states else None
        if self.exits is None:
            out = TokenClassifierOutput(loss=loss, logits=logits[0], hidden_states=states)
        else:
            out = MultiExitTokenClassifierOutput(
                loss=loss, logits=logits[-1], exit_logits=logits, hidden_states=states
            )
        return _as_requested(out, return_dict)

    def _check_self_sampling(self, input_ids, labels, token_exit_layer, flooding_bias):
        if self.exits is None:
            raise ValueError(
                "self-sampling fine-tuning needs a classifier per layer: build the "
                "model with config.multi_exit=True"
            )
        if token_exit_layer is None:
            raise ValueError("flooding_bias needs token_exit_layer (the self-sampling stage)")
        shape, depth = tuple(input_ids.shape), len(self.exits)
        if (
            not isinstance(token_exit_layer, torch.Tensor)
            or tuple(token_exit_layer.shape) != shape
            or token_exit_layer.dtype not in (torch.int32, torch.int64)
            or token_exit_layer.device != input_ids.device
        ):
            raise ValueError(
                f"token_exit_layer must be an int [B, N] = {list(shape)} tensor on "
                f"{input_ids.device}"
            )
        if bool(((token_exit_layer < 0) | (token_exit_layer > depth)).any()):
            raise ValueError(
                f"token_exit_layer must be in [0, {depth}] (1-based layers; 0 at padding)"
            )
        if flooding_bias is not None and (
            not isinstance(flooding_bias, torch.Tensor)
            or tuple(flooding_bias.shape) != (depth,) + shape
            or not flooding_bias.is_floating_point()
        ):
            raise ValueError(f"flooding_bias must be a float [L, B, N] = {[depth, *shape]} tensor")
        if flooding_bias is not None and labels is None:
            raise ValueError("flooding_bias is a loss term: it needs labels")

    def _encode_copy(self, hidden, packing, exit_layer):
        """The layers with the published masked copy rule of self-sampling training: after layer
        i (1-based) a token whose ``exit_layer`` (packed ``[T]``) is below i keeps its state,
        ``h = where(exit_layer >= i, layer(h), h)``; every token still runs through the layer, so
        exited tokens stay keys and values. The frozen state is the post-LayerNorm one, as
        effbert's TOKEE inference freezes it (the published ``--keep_norm_same 0``; the README's
        run merges before each layer's output LayerNorm instead).
        Returns ``(hidden, states)`` as ``TupeBertModel.encode`` with every layer's states."""
        bert = self.bert
        rows = packing.max_seqlen if bert.config.unpad_inputs else packing.rows_len
        pos_bias = bert.position_bias(rows)
        states = [hidden]
        for i, layer in enumerate(bert.encoder.layers):
            new = bert.encoder.run_layer(layer, hidden, pos_bias, packing)
            hidden = torch.where((exit_layer > i)[:, None], new, hidden)
            states.append(hidden)
        return hidden, tuple(states)

    # ---- early-exit inference ------------------------------------------------------------------------------

    def _word_layout(self, packing, label_mask):
        """``(tok_sent, lengths, labelled, word_tok, word_sent, owner)``: each packed token's sentence, the
        sentence lengths, whether each token is labelled, the packed index of each word's labelled token, each
        word's sentence, and the word owning each token (-1: none, e.g. [CLS], [SEP])."""
        lengths = (packing.cu_seqlens[1:] - packing.cu_seqlens[:-1]).long()
        texts = lengths.shape[0]
        device = packing.indices.device
        tok_sent = torch.repeat_interleave(
            torch.arange(texts, device=device), lengths, output_size=packing.total
        )
        labelled = packing.gather(label_mask)
        word_tok = labelled.nonzero().flatten()
        word_sent = tok_sent[word_tok]
        # the latest labelled token at or before each token, when it is in the same sentence
        last = labelled.long().cumsum(0) - 1
        owner = torch.where(last >= 0, last, torch.zeros_like(last))
        same = (last >= 0) & (
            word_sent[owner] == tok_sent if word_tok.numel() else torch.zeros_like(labelled)
        )
        is_last = torch.zeros_like(labelled)
        if packing.total:
            is_last[(packing.cu_seqlens[1:].long() - 1).clamp_min(0)[lengths > 0]] = True
        owner = torch.where(same & (labelled | ~is_last), owner, torch.full_like(owner, -1))
        return tok_sent, lengths, labelled, word_tok, word_sent, owner

    @torch.no_grad()
    def early_exit_token_labels(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        *,
        label_mask=None,
        mode="tokee",
        thresholds,
        window=3,
        pool="max",
        copy_wordpieces="all",
        token_thresholds=None,
    ):
        """Batched early-exit sequence labeling on packed tokens: SENTEE or TOKEE of Li et al. (ACL 2021), each
        sentence getting exactly what the published per-sentence loop gives it (batch size 1, every layer on the
        full hidden states, exited tokens' states copied forward).

        After layer ``l`` (1-based) each word's uncertainty is ``u = H(softmax(z)) / log(C)`` of layer l's
        classifier on the state of its labelled token (``get_uncertainty`` in the published code).

        - ``mode="sentee"`` (``test_mode='s_level_ee'``): a sentence exits when its words' ``u``, pooled by
          ``pool`` (``"max"``, the published default, or ``"mean"``), is below ``thresholds[l - 1]``; all its words
          take layer l's labels. Running sentences go through whole layers.
        - ``mode="tokee"`` (``test_mode='t_level_win_ee_copy'``): ``effbert.token_exit_decision`` over each
          sentence's words (window max of ``u`` with width ``window``, ``u_win < thresholds[l - 1]``; exited words
          stay in the windows with their current ``u``, as published). An exited word takes layer l's label; its
          word pieces (``copy_wordpieces="all"``, the published default, or its first piece only, ``"first"``)
          keep their state from then on: they stay keys and values for the running tokens (projected by each later
          layer's K/V weights, as the published code computes them) but are no longer queries and skip the FFN
          (``tupe_attention_varlen_subset``). [CLS], [SEP] and tokens of no word never stop.

        Words still running after the last layer take its labels. A sentence leaves the batch once all its words
        have exited (a sentence without words leaves after layer 1, as the published loop returns there). Call in
        eval mode (dropout would make the layers random); gradients are off inside.

        Arguments:
            input_ids: int ``[B, N]``; attention_mask: ``[B, N]`` bool or 0/1 ints (True = real token), None = all
                real; token_type_ids: int ``[B, N]`` or None. One text per row (``position_ids`` is not taken).
            label_mask: bool ``[B, N]`` or None: the tokens that get a label, the first word piece of each word
                (``labels != -100`` of training); None: every real token but each row's first and last.
            mode: ``"tokee"`` or ``"sentee"``.
            thresholds: a float or a list of ``num_hidden_layers`` floats, one per layer
                (``published_token_thresholds`` gives the published TOKEE schedule).
            window: odd int >= 1, TOKEE's window over words (published scripts: ``--win_size``, default 5).
            pool: ``"max"`` or ``"mean"``, SENTEE's pooling over a sentence's words.
            copy_wordpieces: ``"all"`` or ``"first"``, which pieces of an exited word stop (TOKEE).
            token_thresholds: None or a float or one per layer (TOKEE): a word also exits when its own ``u`` is
                below it (the published ``--t_level_t``, ``token_exit_decision``'s ``token_threshold`` with
                ``token_rule="or"``; the published default -1 disables it, as does None).

        Returns:
            ``TokenExitOutput(labels [B, N] int64, exit_layer [B, N] int64, token_layers int, logits [B, N, C])``
            (a named tuple, see there).

        Raises:
            ValueError naming the argument: no multi-exit heads, bad ``mode``, ``pool``, ``copy_wordpieces``,
            ``window``, thresholds that are not finite or not one per layer, ``label_mask`` of the wrong shape
            or set on padding, and the checks of ``TupeBertModel.check_inputs``.
        """
        if self.exits is None:
            raise ValueError(
                "early_exit_token_labels needs a classifier per layer: build the model with "
                "config.multi_exit=True"
            )
        if mode not in TOKEN_EXIT_MODES:
            raise ValueError(f"mode must be one of {TOKEN_EXIT_MODES}, got {mode!r}")
        if pool not in ("max", "mean"):
            raise ValueError(f"pool must be 'max' or 'mean', got {pool!r}")
        if copy_wordpieces not in ("all", "first"):
            raise ValueError(f"copy_wordpieces must be 'all' or 'first', got {copy_wordpieces!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f"window must be an odd int >= 1, got {window!r}")
        depth = len(self.exits)
        thresholds = _check_thresholds(thresholds, depth)
        if token_thresholds is not None:
            token_thresholds = _check_thresholds(token_thresholds, depth, "token_thresholds")
        bert = self.bert
        token_type_ids, mask = bert.check_inputs(input_ids, attention_mask, token_type_ids)
        b, n = input_ids.shape
        device = input_ids.device
        real = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=device)
        if label_mask is None:
            first = real.long().argmax(1)
            last = n - 1 - real.long().flip(1).argmax(1)
            label_mask = real.clone()
            rows = torch.arange(b, device=device)
            label_mask[rows, first] = False
            label_mask[rows, last] = False
        else:
            if (
                not isinstance(label_mask, torch.Tensor)
                or label_mask.dtype != torch.bool
                or tuple(label_mask.shape) != (b, n)
                or label_mask.device != device
            ):
                raise ValueError(f"label_mask must be a bool [B, N] = {[b, n]} tensor on {device}")
            if bool((label_mask & ~real).any()):
                raise ValueError("label_mask must not mark padding (attention_mask 0) as labelled")
        labels_out = torch.full((b * n,), -100, dtype=torch.int64, device=device)
        layers_out = torch.zeros(b * n, dtype=torch.int64, device=device)
        dtype = (
            self.bert.embeddings.word_embeddings.weight.dtype
        )  # exits may be quantised linears (no .weight)
        logits_out = torch.zeros(b * n, self.config.num_labels, dtype=dtype, device=device)
        if b == 0:
            return TokenExitOutput(
                labels=labels_out.view(b, n),
                exit_layer=layers_out.view(b, n),
                token_layers=0,
                logits=logits_out.view(b, n, self.config.num_labels),
            )

        packing = bert.packing(input_ids, real, None)
        hidden = bert.embed(
            packing.gather(input_ids), packing.gather(token_type_ids), packing.positions
        )
        pos_bias = bert.position_bias(n)  # once, for every layer and every compaction
        tok_sent, lengths, labelled, word_tok, word_sent, owner = self._word_layout(
            packing, label_mask
        )
        texts = lengths.shape[0]
        if copy_wordpieces == "first":
            owner = torch.where(labelled, owner, torch.full_like(owner, -1))
        words = word_tok.shape[0]
        word_active = torch.ones(words, dtype=torch.bool, device=device)
        word_exit = torch.zeros(words, dtype=torch.int32, device=device)
        word_label = torch.full((words,), -100, dtype=torch.int64, device=device)
        word_logits = torch.zeros(words, self.config.num_labels, dtype=dtype, device=device)
        live = torch.ones(texts, dtype=torch.bool, device=device)
        no_keep = torch.zeros(words, dtype=torch.bool, device=device)
        token_layers = 0
        for i, (layer, head) in enumerate(zip(bert.encoder.layers, self.exits)):
            step = i + 1
            live_tok = live[tok_sent]
            tok_idx = live_tok.nonzero().flatten()
            cu_k = _cu(lengths[live])
            max_k = int(lengths[live].max())
            if mode == "tokee":
                # a token runs while its word does; [CLS], [SEP] and tokens of no word always run
                running = (
                    live_tok
                    if not words
                    else live_tok & ((owner < 0) | word_active[owner.clamp_min(0)])
                )
                q_idx = running.nonzero().flatten()
                q_counts = torch.bincount(tok_sent[q_idx], minlength=texts)[live]
                new = layer.forward_subset(
                    hidden[q_idx],
                    hidden[tok_idx],
                    _cu(q_counts),
                    cu_k,
                    packing.positions[q_idx],
                    pos_bias,
                    max_seqlen_q=int(q_counts.max()),
                    max_seqlen_k=max_k,
                )
            else:
                q_idx = tok_idx
                new = layer(hidden[tok_idx], pos_bias, None, cu_k, max_k)
            hidden = hidden.index_copy(
                0, q_idx, new
            )  # exited tokens keep (copy forward) their state
            token_layers += int(q_idx.numel())
            live_words = live[word_sent].nonzero().flatten()
            if (
                live_words.numel() == 0
            ):  # the live sentences have no words: the published loop stops here
                break
            logits = head(hidden[word_tok[live_words]])
            pred = logits.argmax(-1)
            if step == depth:  # the last layer labels every word still running
                left = live_words[word_active[live_words]]
                word_label[left] = pred[word_active[live_words]]
                word_logits[left] = logits[word_active[live_words]]
                word_exit[left] = step
                break
            live_counts = torch.bincount(word_sent[live_words], minlength=texts)[live]
            if mode == "tokee":
                active, exit_layer, _ = token_exit_decision(
                    logits,
                    word_active[live_words],
                    word_exit[live_words],
                    threshold=thresholds[i],
                    layer=step,
                    window=window,
                    keep=no_keep[live_words],
                    cu_seqlens=_cu(live_counts),
                    token_threshold=None if token_thresholds is None else token_thresholds[i],
                    token_rule="or",
                    max_seqlen=int(live_counts.max()),
                    backend=self.config.backend,
                )
                now = word_active[live_words] & ~active
                word_label[live_words[now]] = pred[now]
                word_logits[live_words[now]] = logits[now]
                word_exit[live_words] = exit_layer
                word_active[live_words] = active
            else:
                u = exit_entropy(logits, backend=self.config.backend) / math.log(logits.shape[-1])
                sent = word_sent[live_words]
                if pool == "max":
                    pooled = torch.full(
                        (texts,), -math.inf, dtype=u.dtype, device=device
                    ).scatter_reduce(0, sent, u, "amax")
                else:
                    pooled = torch.zeros(texts, dtype=u.dtype, device=device).index_add(
                        0, sent, u
                    ) / torch.bincount(sent, minlength=texts).clamp_min(1)
                leave = live & (pooled < thresholds[i])
                now = leave[sent]
                word_label[live_words[now]] = pred[now]
                word_logits[live_words[now]] = logits[now]
                word_exit[live_words[now]] = step
                word_active[live_words[now]] = False
            # sentences whose words have all exited (or that have none) leave the batch
            live = live & (torch.bincount(word_sent[word_active], minlength=texts) > 0)
            if not bool(live.any()):
                break
        slots = packing.indices[word_tok]
        labels_out[slots] = word_label
        layers_out[slots] = word_exit.long()
        logits_out[slots] = word_logits
        return TokenExitOutput(
            labels=labels_out.view(b, n),
            exit_layer=layers_out.view(b, n),
            token_layers=token_layers,
            logits=logits_out.view(b, n, self.config.num_labels),
        )


# ---- self-sampling fine-tuning (stage 2)
# --------------------------------------------------------------------------
# Li et al. (ACL 2021), section 4.3; LeeSureman/Sequence-Labeling-Early-Exit at commit 9717770:
# ``V0/further_train.py`` (the stage-1 model's per-layer predictions on the training set, computed
# once in eval
# mode: ``get_pred``), ``V0/utils.py`` (``Sample_Stop_Update_Callback.on_batch_begin``,
# ``simulate_ee``,
# ``inverse_pull_word_to_wordpiece``, ``exit_layers_to_should_exit``) and ``V0/modeling_bert_ee.py``
# (``train_mode='joint_sample_copy'``: the masked copy rule, lines 369-420, and the loss, lines
# 2101-2150).

SELF_SAMPLING_WINDOWS = (3, 5, 7, 9, 11, 13, 15)
SELF_SAMPLING_THRESHOLDS = (0.01, 0.03, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
SELF_SAMPLING_TOKEN_THRESHOLDS = (-1.0, 0.01, 0.03, 0.05, 0.1, 0.2, 0.3)


class SelfSamplingDraw(NamedTuple):
    """One batch's simulated exit settings, one entry per sample (``draw_self_sampling``):
    ``windows`` odd ints, ``thresholds`` floats (the first half's threshold; the second half's is
    twice it), ``token_thresholds`` floats (the published ``t_level_t``, second half of the layers
    only; -1 disables it) and ``full`` bools (the sandwich's full-depth samples: every token runs
    every layer)."""

    windows: list
    thresholds: list
    token_thresholds: list
    full: list


def _choices(values, name):
    values = tuple(values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must hold finite numbers, got {v!r}")
    return values


def draw_self_sampling(
    batch_size,
    *,
    windows=SELF_SAMPLING_WINDOWS,
    thresholds=SELF_SAMPLING_THRESHOLDS,
    token_thresholds=SELF_SAMPLING_TOKEN_THRESHOLDS,
    sandwich_small=2,
    sandwich_full=3,
    generator=None,
):
    """Draws the simulated exit settings of one batch as the published stage 2 does
    (``Sample_Stop_Update_Callback.on_batch_begin``): each sample gets a window, a threshold and a
    token threshold drawn uniformly from the lists; then the "sandwich": each of the first
    ``sandwich_small`` samples gets the most aggressive setting on one axis (a fair coin: the
    smallest window, else the largest threshold) and the largest token threshold; the last
    ``sandwich_full`` samples run at full depth (applied after, so they win where the two overlap in
    a small batch).

    Arguments: ``batch_size`` int >= 0; ``windows`` odd ints >= 1, ascending (the published list is
    filtered by ``--min_win_size``/``--max_win_size``; its first entry is the smallest);
    ``thresholds`` and ``token_thresholds`` ascending finite floats (the last is the largest);
    ``sandwich_small``, ``sandwich_full`` ints >= 0 (published defaults 2 and 3; the README's run
    uses 2 and 4); ``generator``: a ``torch.Generator`` or None (the published code draws with numpy
    and ``random``).
    Returns ``SelfSamplingDraw``. Raises ``ValueError`` naming the argument."""
    for name, v in (
        ("batch_size", batch_size),
        ("sandwich_small", sandwich_small),
        ("sandwich_full", sandwich_full),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    windows = _choices(windows, "windows")
    if any(not isinstance(w, int) or w < 1 or w % 2 == 0 for w in windows):
        raise ValueError(f"windows must be odd ints >= 1, got {windows!r}")
    thresholds = _choices(thresholds, "thresholds")
    token_thresholds = _choices(token_thresholds, "token_thresholds")
    for name, values in (
        ("windows", windows),
        ("thresholds", thresholds),
        ("token_thresholds", token_thresholds),
    ):
        if list(values) != sorted(values):
            raise ValueError(f"{name} must be ascending, got {values!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )

    def pick(values):
        idx = torch.randint(len(values), (batch_size,), generator=generator).tolist()
        return [values[i] for i in idx]

    win, thr, tok = pick(windows), pick(thresholds), pick(token_thresholds)
    for i in range(min(sandwich_small, batch_size)):
        if int(torch.randint(2, (), generator=generator)) % 2:
            win[i] = windows[0]
        else:
            thr[i] = thresholds[-1]
        tok[i] = token_thresholds[-1]
    full = [False] * batch_size
    for i in range(min(sandwich_full, batch_size)):
        full[batch_size - 1 - i] = True
    return SelfSamplingDraw(win, thr, tok, full)


def simulate_word_exits(
    word_logits, window, threshold, token_threshold=-1.0, *, max_threshold=1000.0
):
    """The exit layer of each word of one sentence as TOKEE would give it, from a fixed model's
    per-layer logits (``simulate_ee`` of the published ``V0/utils.py``, the first-stage model's
    predictions as input).

    After layer ``i`` (1-based, ``i < L``): ``u = H(softmax(z_i)) / log(C)`` per word, ``u_win =
    max_pool1d(u, window, stride 1, padding window // 2)`` over all the sentence's words (exited
    ones included, with their layer-i ``u``, as published); a word still running exits at layer i
    when ``u_win < t_i`` or ``u < s_i``, with ``t = published_token_thresholds(threshold, L)`` each
    capped at ``max_threshold`` (``--max_threshold_2``) and ``s_i`` = ``token_threshold`` for the
    second half of the layers, 0 for the first (published ``[0] * 6 + [t_level_t] * 6``). Words left
    after layer L - 1 exit at L.

    Arguments: ``word_logits`` float ``[L, n, C]`` (``n`` >= 0 words, ``C`` >= 2); ``window`` odd
    int >= 1; ``threshold``, ``token_threshold``, ``max_threshold`` finite floats. Returns int64
    ``[n]``, 1-based exit layers in ``[1, L]``. Raises ``ValueError`` naming the argument. The
    published code hard-codes 12 layers
    (``[t] * 6 + [2t] * 6``); for another depth the halves are ``published_token_thresholds``'."""
    if (
        not isinstance(word_logits, torch.Tensor)
        or word_logits.dim() != 3
        or not word_logits.is_floating_point()
    ):
        raise ValueError("word_logits must be a float [L, n, C] tensor")
    depth, n, classes = word_logits.shape
    if depth < 1 or classes < 2:
        raise ValueError(f"word_logits must have L >= 1 and C >= 2, got {tuple(word_logits.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 1, got {window!r}")
    for name, v in (
        ("threshold", threshold),
        ("token_threshold", token_threshold),
        ("max_threshold", max_threshold),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite float, got {v!r}")
    exits = torch.full((n,), depth, dtype=torch.int64, device=word_logits.device)
    if n == 0 or depth == 1:
        return exits
    t = torch.tensor(
        [min(x, max_threshold) for x in published_token_thresholds(threshold, depth)],
        dtype=word_logits.dtype,
        device=word_logits.device,
    )
    half = depth // 2
    s = torch.tensor(
        [0.0] * half + [float(token_threshold)] * (depth - half),
        dtype=word_logits.dtype,
        device=word_logits.device,
    )
    logp = torch.log_softmax(word_logits[:-1], -1)
    u = -(logp.exp() * logp).sum(-1) / math.log(classes)  # [L - 1, n]
    win = F.max_pool1d(u[:, None], kernel_size=window, stride=1, padding=window // 2)[:, 0]
    hit = (win < t[:-1, None]) | (u < s[:-1, None])  # [L - 1, n]
    first = hit.long().argmax(0) + 1
    return torch.where(hit.any(0), first, exits)


def self_sampling_token_exit_layers(
    stage1_logits, label_mask, attention_mask, draw, *, copy_wordpieces="all", max_threshold=1000.0
):
    """Each token's simulated exit layer for one batch of stage 2: ``simulate_word_exits`` per row
    with that row's drawn settings on the first-stage model's logits at the row's labelled tokens
    (the words), then spread to word pieces as ``inverse_pull_word_to_wordpiece`` does: with
    ``copy_wordpieces="all"`` (published default) every piece of a word (its labelled token and the
    unlabelled tokens after it up to the next labelled token or the row's last real token) takes the
    word's layer, with ``"first"`` only the labelled one; [CLS], [SEP] and other tokens of no word
    run every layer (L), a ``draw.full`` row too.

    Arguments: ``stage1_logits`` float ``[L, B, N, C]`` (the stage-1 model's ``exit_logits``, eval
    mode, computed once before stage 2 as the published ``get_pred`` does); ``label_mask`` bool
    ``[B, N]`` (``labels != -100``); ``attention_mask`` ``[B, N]`` bool or 0/1 ints; ``draw`` a
    ``SelfSamplingDraw`` of B samples. Returns int64 ``[B, N]``: 1-based exit layers in ``[1, L]``
    at real tokens, 0 at padding (the model's
    ``token_exit_layer`` input). Raises ``ValueError`` naming the argument."""
    if not isinstance(stage1_logits, torch.Tensor) or stage1_logits.dim() != 4:
        raise ValueError("stage1_logits must be a float [L, B, N, C] tensor")
    depth, b, n, _ = stage1_logits.shape
    for name, t in (("label_mask", label_mask), ("attention_mask", attention_mask)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b, n):
            raise ValueError(f"{name} must be a [B, N] = {[b, n]} tensor")
    if label_mask.dtype != torch.bool:
        raise ValueError(f"label_mask must be bool, got {label_mask.dtype}")
    if not isinstance(draw, SelfSamplingDraw) or any(len(x) != b for x in draw):
        raise ValueError(f"draw must be a SelfSamplingDraw of {b} samples")
    if copy_wordpieces not in ("all", "first"):
        raise ValueError(f"copy_wordpieces must be 'all' or 'first', got {copy_wordpieces!r}")
    real = attention_mask.bool()
    if bool((label_mask & ~real).any()):
        raise ValueError("label_mask must not mark padding (attention_mask 0) as labelled")
    out = torch.where(real, depth, 0).to(torch.int64)
    for r in range(b):
        if draw.full[r]:
            continue
        words = label_mask[r].nonzero().flatten()
        exits = simulate_word_exits(
            stage1_logits[:, r, words],
            draw.windows[r],
            draw.thresholds[r],
            draw.token_thresholds[r],
            max_threshold=max_threshold,
        )
        last = int(real[r].nonzero().max()) if bool(real[r].any()) else 0
        ends = words[1:].tolist() + [last]
        for w, (start, end) in enumerate(zip(words.tolist(), ends)):
            stop = start + 1 if copy_wordpieces == "first" else max(end, start + 1)
            out[r, start:stop] = exits[w]
    return out


def self_sampling_token_loss(exit_logits, labels, token_exit_layer, flooding_bias=None):
    """The published stage-2 loss (``train_mode='joint_sample_copy'``, ``true_label=1``,
    ``joint_weighted=1``, the loss's reduction ``'none'`` as ``V0/further_train.py`` sets it): layer
    i's (1-based) cross-entropy over the labelled tokens still running there (``token_exit_layer >=
    i``), summed and divided by the number of labelled tokens (all of them, not only the running
    ones); then ``sum_i i * loss_i / sum_i i``.

    With ``flooding_bias`` (``--flooding 1``, the published default of stage 2) each labelled
    token's term is ``|CE - flooding_bias[i]|`` where ``CE`` is 0 for a token that has exited (a
    constant with no gradient then, kept as the published sum keeps it); ``flooding_bias`` is the
    first-stage model's per-token cross-entropy at each layer plus the published ``--flooding_bias``
    constant (0 in the README's run). The published sum also holds ``|1 - constant|`` at each padded
    word slot (its bias is padded with -1): a gradient-free term that depends on the batch's
    padding, left out here.

    Arguments: ``exit_logits`` float ``[L, T, C]``; ``labels`` int ``[T]`` in ``[0, C)`` or -100;
    ``token_exit_layer`` int ``[T]``, 1-based; ``flooding_bias`` None or float ``[L, T]``. Returns a
    scalar in the logits' dtype (float32 for half types); NaN when no token has a label. Raises
    ``ValueError`` naming the
    argument."""
    if not isinstance(exit_logits, torch.Tensor) or exit_logits.dim() != 3:
        raise ValueError("exit_logits must be a float [L, T, C] tensor")
    depth, total, _ = exit_logits.shape
    for name, t in (("labels", labels), ("token_exit_layer", token_exit_layer)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (total,):
            raise ValueError(f"{name} must be a [T] = [{total}] tensor")
    if flooding_bias is not None and (
        not isinstance(flooding_bias, torch.Tensor) or tuple(flooding_bias.shape) != (depth, total)
    ):
        raise ValueError(f"flooding_bias must be None or a [L, T] = {[depth, total]} tensor")
    dtype = torch.float64 if exit_logits.dtype == torch.float64 else torch.float32
    labelled = labels != -100
    count = labelled.sum().to(dtype)
    loss = exit_logits.new_zeros((), dtype=dtype)
    for i in range(depth):
        running = labelled & (token_exit_layer > i)
        target = labels.masked_fill(~running, -100)
        ce = F.cross_entropy(exit_logits[i].to(dtype), target, ignore_index=-100, reduction="none")
        if flooding_bias is not None:
            flooded = (ce - flooding_bias[i].to(dtype)).abs()
            ce = torch.where(labelled, flooded, torch.zeros_like(ce))
        loss = loss + (i + 1) * ce.sum() / count
    return loss / (depth * (depth + 1) / 2)
