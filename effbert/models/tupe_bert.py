"""The reference model: a post-LN BERT encoder on effbert's TUPE ops, with masked-LM and classification heads.

``position_mode="absolute"`` is plain BERT (and loads Hugging Face checkpoints, see ``effbert.integrations.hf``);
``"tupe-a"`` / ``"tupe-r"`` drop the positions from the input embedding and add one positional term ``P [H, N, N]``,
computed once per forward pass by ``effbert.nn.TupePositionBias``, to every layer's attention logits.

The pieces a later wrapper needs are separate methods of ``TupeBertModel`` (``embed``, ``position_bias``,
``padding_mask``, and the layers in ``encoder.layers``), so an encoder that stops early or mixes notes into the
embeddings can drive the same modules without copying them.

The models are ``transformers`` ``PreTrainedModel``s (model type ``"tupe-bert"``, registered with the ``Auto*``
classes by ``import effbert``): ``save_pretrained`` / ``from_pretrained`` through safetensors, transformers' output
classes, gradient checkpointing per layer. TUPE (Ke, He, Liu, ICLR 2021; code: guolinke/TUPE) initialises its
relative table like every embedding, normal(0, 0.02); official TUPE checkpoints load through
``effbert.integrations.tupe_fairseq``.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

try:  # transformers 5: initialisers that leave weights loaded by from_pretrained alone
    from transformers import initialization as _init
except ImportError:  # transformers 4: from_pretrained initialises before it loads
    import types

    _init = types.SimpleNamespace(normal_=nn.init.normal_, zeros_=nn.init.zeros_,
                                  copy_=lambda tensor, value: tensor.copy_(value))
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_outputs import MaskedLMOutput as _MaskedLMOutput
from transformers.modeling_outputs import SequenceClassifierOutput

from ..losses import multi_exit_distillation_loss, pabee_loss
from ..nn import ExitHead, MultiExitEncoder, NoteDictionary, TupePositionBias, TupeSelfAttention
from ..ops import t5_relative_buckets
from ..ops._checks import as_bool_attention_mask
from ..ops._dispatch import BACKENDS
from .config import TupeBertConfig

__all__ = ["TupeBertConfig", "TupeBertPreTrainedModel", "TupeBertModel", "TupeBertForMaskedLM",
           "TupeBertForSequenceClassification", "BaseModelOutputWithPooling", "MaskedLMOutput",
           "SequenceClassifierOutput", "MultiExitSequenceClassifierOutput"]


@dataclass
class MaskedLMOutput(_MaskedLMOutput):
    """``transformers``' ``MaskedLMOutput`` plus ``last_hidden_state [B, N, hidden]``: what TNF's
    ``update_notes`` folds into the notes after a training step."""

    last_hidden_state: Optional[torch.FloatTensor] = None


@dataclass
class MultiExitSequenceClassifierOutput(SequenceClassifierOutput):
    """``SequenceClassifierOutput`` of a multi-exit model: ``logits [B, C]`` are the last exit's (what a plain
    classifier returns), ``exit_logits [L, B, C]`` every exit's, first layer first."""

    exit_logits: Optional[torch.FloatTensor] = None


def _activation(name):
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return nn.ReLU()


def _values_in_range(name, t, low, high, *, allow=None):
    """One host read for the range check: an out-of-range index would be a device-side assert on a GPU."""
    if t.numel() == 0 or torch.compiler.is_compiling():
        return
    vals = t if allow is None else t[t != allow]
    if vals.numel() == 0:
        return
    lo, hi = torch.stack([vals.min(), vals.max()]).tolist()
    if lo < low or hi >= high:
        extra = f" (or {allow})" if allow is not None else ""
        raise ValueError(f"{name} must hold values in [{low}, {high}){extra}, got values in [{lo}, {hi}]")


def _check_ids(name, t, shape):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be [B, N] = {list(shape)}, got {list(t.shape)}")


class TupeBertEmbeddings(nn.Module):
    """Word + token type (none with ``type_vocab_size=0``) (+ learned absolute positions, in ``"absolute"`` mode
    only), LayerNorm, dropout."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = (nn.Embedding(config.type_vocab_size, config.hidden_size)
                                      if config.type_vocab_size > 0 else None)
        # TUPE keeps positions out of the token embedding: they enter every layer's logits instead
        self.position_embeddings = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                    if config.position_mode == "absolute" else None)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        x = self.word_embeddings(input_ids)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings.weight[: input_ids.shape[1]][None]
        return self.dropout(self.layer_norm(x))


class TupeBertLayer(nn.Module):
    """One post-LN BERT layer: fused self-attention, dropout, residual, LayerNorm; GELU FFN, dropout, residual,
    LayerNorm."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.attention = TupeSelfAttention(h, config.num_attention_heads, dropout=config.attention_probs_dropout_prob,
                                           backend=config.backend)
        self.attention_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(h, config.intermediate_size)
        self.act = _activation(config.hidden_act)
        self.output = nn.Linear(config.intermediate_size, h)
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.output_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, hidden, pos_bias=None, attention_mask=None):
        packing = _packing(hidden, attention_mask, self.attention.backend)
        if packing is not None:  # right-padded batch on the CPU: every matmul on real tokens only
            rows, cu_seqlens, max_seqlen = packing
            b, n, width = hidden.shape
            packed = self._forward_tokens(hidden.reshape(b * n, width).index_select(0, rows), pos_bias,
                                          (cu_seqlens, max_seqlen))
            return hidden.new_zeros(b * n, width).index_copy(0, rows, packed).view(b, n, width)
        return self._forward_tokens(hidden, pos_bias, attention_mask)

    def _forward_tokens(self, hidden, pos_bias, mask_or_packing):
        if isinstance(mask_or_packing, tuple):
            cu_seqlens, max_seqlen = mask_or_packing
            attn = self.attention(hidden, pos_bias=pos_bias, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        else:
            attn = self.attention(hidden, pos_bias=pos_bias, attention_mask=mask_or_packing)
        hidden = self.attention_norm(hidden + self.attention_dropout(attn))
        ffn = self.output(self.act(self.intermediate(hidden)))
        return self.output_norm(hidden + self.output_dropout(ffn))


def _packing(hidden, attention_mask, backend):
    """``(rows, cu_seqlens, max_seqlen)`` when a layer should run on the real tokens only: CPU tensors on the CPU
    attention backend, a right-padded batch (each sequence's real tokens first) with some padding. The layer is
    token-wise but for attention, so packing gives the real tokens exactly what the padded batch gives them, and
    skips the padded rows' projections and FFN (a third of a layer's work at two-thirds real tokens); the padded
    positions come back as 0 (their hidden states carry no meaning). None otherwise."""
    if attention_mask is None or hidden.device.type != "cpu" or hidden.dim() != 3:
        return None
    from ..ops.tupe_attention import attention_backend

    try:
        if attention_backend(hidden, backend) != "cpu":
            return None
    except Exception:  # the attention call itself reports what cannot serve
        return None
    real = attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask
    if tuple(real.shape) != tuple(hidden.shape[:2]):
        return None
    lengths = real.sum(1)
    n = hidden.shape[1]
    if bool(real.all()) or not bool((real == (torch.arange(n) < lengths[:, None])).all()):
        return None
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    return real.flatten().nonzero().squeeze(1), cu_seqlens, max(int(lengths.max()), 1)


class TupeBertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(TupeBertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable()

    def run_layer(self, layer, hidden, pos_bias=None, attention_mask=None):
        """One layer, recomputed in the backward pass when gradient checkpointing is on (training only)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(layer.__call__, hidden, pos_bias, attention_mask)
        return layer(hidden, pos_bias=pos_bias, attention_mask=attention_mask)

    def forward(self, hidden, pos_bias=None, attention_mask=None, output_hidden_states=False):
        states = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = self.run_layer(layer, hidden, pos_bias, attention_mask)
            if states is not None:
                states.append(hidden)
        return hidden, (tuple(states) if states is not None else None)


class TupeBertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


class TupeBertPreTrainedModel(PreTrainedModel):
    """Shared by the model and its heads: the config, BERT's initialisation, gradient checkpointing and switching
    the ops' backend. ``save_pretrained`` / ``from_pretrained`` (safetensors) and the ``Auto*`` classes work as for
    any ``transformers`` model once ``effbert`` is imported."""

    config_class = TupeBertConfig
    base_model_prefix = "bert"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TupeBertLayer"]

    def __init__(self, config, *inputs, **kwargs):
        if not isinstance(config, TupeBertConfig):
            raise TypeError(f"config must be a TupeBertConfig, got {type(config).__name__}")
        super().__init__(config, *inputs, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        """BERT's initialisation (normal(0, initializer_range) weights, zero biases, unit LayerNorms) and TUPE's
        relative table normal(0, initializer_range) as TUPE's ``init_bert_params`` gives its ``nn.Embedding``
        (guolinke/TUPE, fairseq/modules/transformer_sentence_encoder.py). The [CLS] scalars start at 0 (TUPE derives
        them from positions 0 and 1 instead of learning them directly)."""
        super()._init_weights(module)  # Linear, Embedding (padding row 0), LayerNorm as BERT does
        std = self.config.initializer_range
        if isinstance(module, TupePositionBias):
            if module.rel_table is not None:
                _init.normal_(module.rel_table, mean=0.0, std=std)
                # a non-persistent buffer: from_pretrained builds the model without running its constructor's values
                cfg = self.config
                _init.copy_(module.rel_buckets, t5_relative_buckets(cfg.max_position_embeddings, cfg.num_buckets,
                                                                    cfg.max_distance, device=module.rel_buckets.device))
            if module.cls_row is not None:
                _init.zeros_(module.cls_row)
                _init.zeros_(module.cls_col)
        elif isinstance(module, TupeBertMLMHead):
            _init.zeros_(module.bias)

    def set_backend(self, backend):
        """Run every effbert op of this model on ``backend`` (``"auto"``, ``"triton"``, ``"eager"``, ...)."""
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        self.config.backend = backend
        for module in self.modules():
            if isinstance(module, (TupeSelfAttention, TupePositionBias)):
                module.backend = backend
        return self


class TupeBertModel(TupeBertPreTrainedModel):
    """The encoder: ``forward(input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False)``
    returns ``BaseModelOutputWithPooling(last_hidden_state [B, N, hidden], pooler_output [B, hidden] (None without a
    pooler), hidden_states (embeddings, then every layer's output))``.

    ``attention_mask [B, N]`` (bool or 0/1 ints, 1 = real token) keeps padding out of every softmax. The hidden
    states at padded positions carry no meaning (the fused attention writes 0 there); read real tokens only.
    """

    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config)
        self.embeddings = TupeBertEmbeddings(config)
        self.position_encoder = None
        if config.position_mode != "absolute":
            self.position_encoder = TupePositionBias(
                config.hidden_size, config.num_attention_heads, max_positions=config.max_position_embeddings,
                num_buckets=config.num_buckets if config.position_mode == "tupe-r" else None,
                max_distance=config.max_distance, untie_cls=config.untie_cls,
                layer_norm_eps=config.position_layer_norm_eps,
                backend=config.backend)
        self.encoder = TupeBertEncoder(config)
        self.pooler = TupeBertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def check_inputs(self, input_ids, attention_mask=None, token_type_ids=None):
        """Checks the inputs; returns ``token_type_ids`` (zeros when None) and the bool key padding mask."""
        return check_bert_inputs(self.config, input_ids, attention_mask, token_type_ids)

    @staticmethod
    def padding_mask(attention_mask, shape, device):
        """``attention_mask`` (bool or 0/1 integers, ``[B, N]``, True/1 = real token) as a bool tensor; a float mask
        is refused (``TypeError``)."""
        return as_bool_attention_mask(attention_mask, shape, device)

    def embed(self, input_ids, token_type_ids):
        return self.embeddings(input_ids, token_type_ids)

    def position_bias(self, seq_len):
        """The positional term ``P [H, N, N]`` every layer adds to its logits (None in ``"absolute"`` mode)."""
        return self.position_encoder(seq_len) if self.position_encoder is not None else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False,
                return_dict=None):
        token_type_ids, mask = self.check_inputs(input_ids, attention_mask, token_type_ids)
        hidden = self.embed(input_ids, token_type_ids)
        pos_bias = self.position_bias(input_ids.shape[1])  # once per forward, shared by every layer
        hidden, states = self.encoder(hidden, pos_bias=pos_bias, attention_mask=mask,
                                      output_hidden_states=output_hidden_states)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        out = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled, hidden_states=states)
        return _as_requested(out, return_dict)


def _as_requested(out, return_dict):
    """``return_dict=False`` gives the output as a tuple (its non-None fields), as ``transformers`` models do."""
    if return_dict is not None and not isinstance(return_dict, bool):
        raise TypeError(f"return_dict must be a bool or None, got {type(return_dict).__name__}")
    return out.to_tuple() if return_dict is False else out


def check_bert_inputs(config, input_ids, attention_mask=None, token_type_ids=None):
    """Checks a BERT's inputs against ``config`` (ours or a transformers ``BertConfig``: both name the sizes the
    same); returns ``token_type_ids`` (zeros when None) and the bool key padding mask (True = real token)."""
    _check_ids("input_ids", input_ids, None)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, N], got {list(input_ids.shape)}")
    b, n = input_ids.shape
    if not 1 <= n <= config.max_position_embeddings:
        raise ValueError(f"input_ids must have 1 <= N <= max_position_embeddings "
                         f"({config.max_position_embeddings}), got N = {n}")
    _values_in_range("input_ids", input_ids, 0, config.vocab_size)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    else:
        _check_ids("token_type_ids", token_type_ids, (b, n))
        if token_type_ids.device != input_ids.device:
            raise ValueError(f"token_type_ids must be on {input_ids.device}, got {token_type_ids.device}")
        # without token-type embeddings (type_vocab_size 0) only all-zero ids mean anything (what tokenizers send)
        _values_in_range("token_type_ids", token_type_ids, 0, max(config.type_vocab_size, 1))
    return token_type_ids, TupeBertModel.padding_mask(attention_mask, (b, n), input_ids.device)


class TupeBertMLMHead(nn.Module):
    """BERT's LM head: dense, activation, LayerNorm, then the word embeddings (tied) plus a bias."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _activation(config.hidden_act)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden, word_embeddings):
        return F.linear(self.layer_norm(self.act(self.dense(hidden))), word_embeddings, self.bias)


def _check_labels(labels, shape, device, what):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must be {what} = {list(shape)}, got {list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on {device}, got {labels.device}")


class TupeBertForMaskedLM(TupeBertPreTrainedModel):
    """``forward(input_ids, attention_mask=None, token_type_ids=None, labels=None, note_slots=None,
    return_logits=True)`` -> ``MaskedLMOutput(loss, logits [B, N, vocab], hidden_states, last_hidden_state)``. The
    decoder is the word embedding matrix (tied). ``labels [B, N]``: -100 marks positions without a target; the loss
    is the mean over the others (0 when there are none). ``return_logits=False`` (training) runs the head at the
    labelled positions only and returns ``logits=None``: the same loss, a fraction of the head's cost.

    TNF: with ``note_dictionary`` (a ``NoteDictionary`` of dim ``hidden_size``), ``note_slots [B, N]`` (from
    ``effbert.data.tnf.RareWordTable.find``; -1 = not a rare word) mixes each rare word's note into the embeddings fed to
    the first layer, and the training loop calls ``update_notes(out.last_hidden_state, spans, lengths)`` after each
    step. The notes are buffers of the submodule ``notes``, so they travel in the state dict; the dictionary's sizes
    are written into the config (``tnf_*``), so ``from_pretrained`` rebuilds it and loads the notes. Without
    ``note_dictionary``, a config with ``tnf_num_notes`` set builds an empty one of that size.
    """

    def __init__(self, config, note_dictionary=None):
        super().__init__(config)
        if note_dictionary is not None:
            if not isinstance(note_dictionary, NoteDictionary):
                raise TypeError(f"note_dictionary must be an effbert.nn.NoteDictionary or None, got "
                                f"{type(note_dictionary).__name__}")
            if note_dictionary.dim != config.hidden_size:
                raise ValueError(f"note_dictionary must have dim == hidden_size ({config.hidden_size}), got "
                                 f"{note_dictionary.dim}")
            self.config.tnf_num_notes = note_dictionary.num_slots  # from_pretrained rebuilds it from these
            self.config.tnf_window, self.config.tnf_gamma, self.config.tnf_lam = (
                note_dictionary.window, note_dictionary.gamma, note_dictionary.lam)
        elif config.tnf_num_notes is not None:
            note_dictionary = NoteDictionary(config.tnf_num_notes, config.hidden_size, window=config.tnf_window,
                                             gamma=config.tnf_gamma, lam=config.tnf_lam)
        self.bert = TupeBertModel(config, add_pooling_layer=False)
        self.mlm_head = TupeBertMLMHead(config)
        self.notes = note_dictionary
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, output_hidden_states=False,
                note_slots=None, return_logits=True, return_dict=None):
        if not isinstance(return_logits, bool):
            raise TypeError(f"return_logits must be a bool, got {type(return_logits).__name__}")
        if not return_logits and labels is None:
            raise ValueError("return_logits=False computes the head at the labelled positions only: it needs labels")
        if labels is not None:
            _check_ids("labels", labels, None)
            _check_labels(labels, tuple(input_ids.shape), input_ids.device, "[B, N]")
            _values_in_range("labels", labels, 0, self.config.vocab_size, allow=-100)
        bert = self.bert
        token_type_ids, mask = bert.check_inputs(input_ids, attention_mask, token_type_ids)
        hidden = bert.embed(input_ids, token_type_ids)
        if note_slots is not None:
            if self.notes is None:
                raise ValueError("note_slots needs a model built with a note_dictionary")
            if not isinstance(note_slots, torch.Tensor):
                raise TypeError(f"note_slots must be a tensor, got {type(note_slots).__name__}")
            if tuple(note_slots.shape) != tuple(input_ids.shape):
                raise ValueError(f"note_slots must be [B, N] = {list(input_ids.shape)}, got {list(note_slots.shape)}")
            if note_slots.device != input_ids.device:
                raise ValueError(f"note_slots must be on {input_ids.device}, got {note_slots.device}")
            hidden = self.notes.mix(hidden, note_slots, backend=self.config.backend)
        pos_bias = bert.position_bias(input_ids.shape[1])  # once per forward, shared by every layer
        hidden, states = bert.encoder(hidden, pos_bias=pos_bias, attention_mask=mask,
                                      output_hidden_states=output_hidden_states)
        words = bert.embeddings.word_embeddings.weight
        if not return_logits:
            # Training needs the head only where there is a target (15% of tokens in BERT's recipe): gathering those
            # rows first skips ~85% of the vocabulary-wide product and of the [B*N, vocab] logits traffic. The
            # same loss as below, at the price of one host sync for the row count.
            flat = labels.reshape(-1)
            rows = (flat != -100).nonzero().squeeze(1)
            picked = self.mlm_head(hidden.reshape(-1, hidden.shape[-1])[rows], words)
            total = F.cross_entropy(picked.float(), flat[rows].long(), reduction="sum")
            out = MaskedLMOutput(loss=total / max(rows.numel(), 1), logits=None, hidden_states=states,
                                 last_hidden_state=hidden)
            return _as_requested(out, return_dict)
        logits = self.mlm_head(hidden, words)
        loss = None
        if labels is not None:
            flat = labels.reshape(-1).long()
            total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=-100,
                                    reduction="sum")
            loss = total / (flat != -100).sum().clamp_min(1)  # no NaN for a batch with no target
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=states, last_hidden_state=hidden)
        return _as_requested(out, return_dict)

    @torch.no_grad()
    def update_notes(self, hidden, spans, lengths=None, process_group=None):
        """TNF's note update after a training step: fold the window means of the rare-word ``spans [M, 4]`` over
        ``hidden [B, N, hidden]`` (the last hidden state) into the notes (``NoteDictionary.update``)."""
        if self.notes is None:
            raise ValueError("update_notes needs a model built with a note_dictionary")
        self.notes.update(hidden, spans, lengths, process_group=process_group, backend=self.config.backend)


class _ExitLayer(nn.Module):
    """A model layer with ``MultiExitEncoder``'s call shape ``(hidden, attention_mask)``: the shared positional term
    is bound once per forward."""

    def __init__(self, layer, pos_bias):
        super().__init__()
        self.layer = layer
        self.pos_bias = pos_bias

    def forward(self, hidden, attention_mask=None):
        return self.layer(hidden, pos_bias=self.pos_bias, attention_mask=attention_mask)


class TupeBertForSequenceClassification(TupeBertPreTrainedModel):
    """Pooler, dropout, a linear classifier over ``config.num_labels``. ``labels [B]``: class indices with
    cross-entropy (-100 ignored), or float targets with mean squared error when ``num_labels == 1``.

    Returns ``SequenceClassifierOutput(loss, logits [B, C], hidden_states)``.

    With ``config.multi_exit``: an off-ramp (``ExitHead``: pooler and classifier) after every layer and no separate
    pooler (``config.shared_exit_pooler``: one pooler shared by every off-ramp, as PABEE). ``forward`` returns
    ``MultiExitSequenceClassifierOutput``: ``exit_logits [L, B, C]`` (every exit) and ``logits`` the last exit's;
    with labels the loss is RomeBERT's self-distillation loss (``multi_exit_distillation_loss``, gamma 0.9, T 3), or
    PABEE's weighted MSE for ``num_labels == 1``. ``init_exit_poolers`` starts every off-ramp from a checkpoint's
    pooler. ``early_exit`` runs batched early-exit inference.
    """

    # a masked-LM checkpoint (fine-tuning starts from one) holds the MLM head and TNF's notes, which serve pretraining
    _keys_to_ignore_on_load_unexpected = [r"^mlm_head\.", r"^notes\."]

    def __init__(self, config):
        super().__init__(config)
        multi = config.multi_exit
        self.bert = TupeBertModel(config, add_pooling_layer=not multi)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if multi:
            self.classifier = None
            self.exits = nn.ModuleList(ExitHead(config.hidden_size, config.num_labels, config.hidden_dropout_prob)
                                       for _ in range(config.num_hidden_layers))
            if config.shared_exit_pooler:  # PABEE: one pooler before every off-ramp's classifier
                last = config.num_hidden_layers - 1
                for head in self.exits:
                    head.pooler = self.exits[last].pooler
                # declared, so save_pretrained writes the shared pooler once and from_pretrained ties it again
                self._tied_weights_keys = {f"exits.{i}.pooler.{w}": f"exits.{last}.pooler.{w}"
                                           for i in range(last) for w in ("weight", "bias")}
        else:
            self.exits = None
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def init_exit_poolers(self, pooler_state):
        """Start every off-ramp's pooler from one pooler's weights (``pooler_state``: the state dict of a
        ``Linear(hidden, hidden)``, e.g. a pretrained checkpoint's pooler dense layer), as DeeBERT and RomeBERT do
        (``init_highway_pooler``). With ``shared_exit_pooler`` the one shared pooler gets them."""
        if self.exits is None:
            raise ValueError("the model has no off-ramps: build it with config.multi_exit=True")
        with torch.no_grad():
            for head in self.exits:
                head.pooler.load_state_dict(pooler_state)

    def multi_exit_encoder(self, pos_bias):
        """The layers and off-ramps as a ``MultiExitEncoder`` with ``pos_bias`` bound to every layer (built per call:
        it owns no parameters of its own)."""
        if self.exits is None:
            raise ValueError("the model has no off-ramps: build it with config.multi_exit=True")
        return MultiExitEncoder([_ExitLayer(layer, pos_bias) for layer in self.bert.encoder.layers], self.exits)

    def _check_class_labels(self, labels, batch, device):
        _check_labels(labels, (batch,), device, "[B]")
        if self.config.num_labels == 1:
            if not labels.is_floating_point():
                raise TypeError(f"labels must be float targets when num_labels == 1, got {labels.dtype}")
        else:
            _check_ids("labels", labels, None)
            _values_in_range("labels", labels, 0, self.config.num_labels, allow=-100)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, output_hidden_states=False,
                return_dict=None):
        if labels is not None:
            self._check_class_labels(labels, input_ids.shape[0], input_ids.device)
        if self.exits is not None:
            out = self._forward_exits(input_ids, attention_mask, token_type_ids, labels, output_hidden_states)
            return _as_requested(out, return_dict)
        out = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=-100)
        return _as_requested(SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states),
                             return_dict)

    def _forward_exits(self, input_ids, attention_mask, token_type_ids, labels, output_hidden_states):
        bert = self.bert
        token_type_ids, mask = bert.check_inputs(input_ids, attention_mask, token_type_ids)
        hidden = bert.embed(input_ids, token_type_ids)
        pos_bias = bert.position_bias(input_ids.shape[1])  # once per forward, shared by every layer
        states = [hidden] if output_hidden_states else None
        exit_logits = []
        for layer, head in zip(bert.encoder.layers, self.exits):
            hidden = bert.encoder.run_layer(layer, hidden, pos_bias, mask)
            exit_logits.append(head(hidden))
            if states is not None:
                states.append(hidden)
        exit_logits = torch.stack(exit_logits)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = pabee_loss(exit_logits.float(), labels.float())
            else:
                if bool((labels == -100).any()):
                    raise ValueError("labels must not hold -100 with config.multi_exit (the distillation loss "
                                     "averages over every sample)")
                loss = multi_exit_distillation_loss(exit_logits.float(), labels.long(), backend=self.config.backend)
        return MultiExitSequenceClassifierOutput(loss=loss, logits=exit_logits[-1], exit_logits=exit_logits,
                                                 hidden_states=tuple(states) if states is not None else None)

    @torch.no_grad()
    def early_exit(self, input_ids, attention_mask=None, token_type_ids=None, *, criterion, threshold=None,
                   patience=None):
        """Batched early-exit inference: ``(logits [B, C], exit_layer [B] int64, 1-based)``, each sample exactly
        what it gets alone through the layers (``MultiExitEncoder.early_exit``). The positional term is computed
        once and handed to every layer; samples that exit leave the batch. Call in eval mode."""
        if self.exits is None:
            raise ValueError("early_exit needs off-ramps: build the model with config.multi_exit=True")
        bert = self.bert
        token_type_ids, mask = bert.check_inputs(input_ids, attention_mask, token_type_ids)
        hidden = bert.embed(input_ids, token_type_ids)
        encoder = self.multi_exit_encoder(bert.position_bias(input_ids.shape[1]))
        return encoder.early_exit(hidden, mask, criterion=criterion, threshold=threshold, patience=patience,
                                  backend=self.config.backend)
