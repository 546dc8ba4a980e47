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

    _init = types.SimpleNamespace(
        normal_=nn.init.normal_,
        zeros_=nn.init.zeros_,
        copy_=lambda tensor, value: tensor.copy_(value),
    )
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_outputs import MaskedLMOutput as _MaskedLMOutput
from transformers.modeling_outputs import SequenceClassifierOutput

from ..nn import (
    ExitHead,
    Linear,
    MultiExitEncoder,
    NoteDictionary,
    TupePositionBias,
    TupeSelfAttention,
)
from ..ops import t5_relative_buckets
from ..ops.checks import as_bool_attention_mask
from ..ops import early_exit as ee_ops
from ..ops import BACKENDS
from .config import TupeBertConfig
from .multi_exit import MultiExitMixin
from .packing import Packing, unpad_input

__all__ = [
    "TupeBertConfig",
    "TupeBertPreTrainedModel",
    "TupeBertModel",
    "TupeBertForMaskedLM",
    "TupeBertForSequenceClassification",
    "BaseModelOutputWithPooling",
    "MaskedLMOutput",
    "SequenceClassifierOutput",
    "MultiExitSequenceClassifierOutput",
]


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
        raise ValueError(
            f"{name} must hold values in [{low}, {high}){extra}, got values in [{lo}, {hi}]"
        )


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
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size)
            if config.type_vocab_size > 0
            else None
        )
        # TUPE keeps positions out of the token embedding: they enter every layer's logits instead
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_mode == "absolute"
            else None
        )
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids=None):
        """``input_ids`` ``[B, N]`` or packed ``[total]``; ``position_ids`` of the same shape (None: ``0..N-1`` along
        the last dim), used in ``"absolute"`` mode only."""
        x = self.word_embeddings(input_ids)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            if position_ids is None:
                x = x + self.position_embeddings.weight[: input_ids.shape[-1]]
            else:
                x = x + self.position_embeddings(position_ids)
        return self.dropout(self.layer_norm(x))


class TupeBertLayer(nn.Module):
    """One post-LN BERT layer: fused self-attention, dropout, residual, LayerNorm; GELU FFN, dropout, residual,
    LayerNorm."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.attention = TupeSelfAttention(
            h,
            config.num_attention_heads,
            dropout=config.attention_probs_dropout_prob,
            backend=config.backend,
        )
        self.attention_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.intermediate = Linear(h, config.intermediate_size, backend=config.backend)
        self.act = _activation(config.hidden_act)
        self.output = Linear(config.intermediate_size, h, backend=config.backend)
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.output_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.register_parameter(
            "ffn_coef", None
        )  # EarlyBERT's per-neuron coefficients (models/early_bird.py)

    def _ffn_inner(self, hidden):
        """The activated FFN neurons ``[..., intermediate]``, scaled by ``ffn_coef`` when set. GELU
        runs inside the up projection's GEMM (``Linear.forward_gelu``; oneDNN's epilogue on the
        packed CPU path)."""
        if isinstance(self.intermediate, Linear) and type(self.act) is nn.GELU:
            inner = self.intermediate.forward_gelu(hidden, self.act.approximate)
        else:
            inner = self.act(self.intermediate(hidden))
        return inner if self.ffn_coef is None else inner * self.ffn_coef.to(inner.dtype)

    def forward(
        self,
        hidden,
        pos_bias=None,
        attention_mask=None,
        cu_seqlens=None,
        max_seqlen=None,
        check_offsets=True,
    ):
        """Padded ``hidden [B, N, hidden]`` with ``attention_mask [B, N]``, or packed ``hidden [total, hidden]``
        with ``cu_seqlens`` / ``max_seqlen`` (every matmul, LayerNorm and dropout then runs on real tokens only)."""
        if cu_seqlens is not None:
            attn = self.attention(
                hidden,
                pos_bias=pos_bias,
                cu_seqlens=cu_seqlens,
                max_seqlen=max_seqlen,
                check_offsets=check_offsets,
            )
        else:
            attn = self.attention(hidden, pos_bias=pos_bias, attention_mask=attention_mask)
        hidden = self.attention_norm(hidden + self.attention_dropout(attn))
        ffn = self.output(self._ffn_inner(hidden))
        return self.output_norm(hidden + self.output_dropout(ffn))

    def forward_subset(
        self,
        hidden_q,
        hidden_kv,
        cu_seqlens_q,
        cu_seqlens_k,
        position_ids_q,
        pos_bias=None,
        max_seqlen_q=None,
        max_seqlen_k=None,
        check_offsets=True,
    ):
        """The layer for the active tokens only (token-level early exit, inference): ``hidden_q [Tq, hidden]``
        are the queries and the only rows that go through the residuals, LayerNorms and FFN; ``hidden_kv
        [Tk, hidden]`` (every token, exited ones frozen) gives the keys and values. Offsets and positions as
        ``TupeSelfAttention.forward_subset``. Returns the active tokens' new states ``[Tq, hidden]``. Forward only:
        call it under ``torch.no_grad()`` (the subset attention has no autograd and refuses inputs that need grad)."""
        attn = self.attention.forward_subset(
            hidden_q,
            hidden_kv,
            cu_seqlens_q,
            cu_seqlens_k,
            position_ids_q,
            pos_bias,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            check_offsets=check_offsets,
        )
        hidden = self.attention_norm(hidden_q + self.attention_dropout(attn))
        ffn = self.output(self._ffn_inner(hidden))
        return self.output_norm(hidden + self.output_dropout(ffn))


class TupeBertEncoder(nn.Module):
    """The layer stack. On a ``Packing`` (``packing=``) it takes and returns packed ``[total, hidden]`` tokens and
    runs every layer on them (``config.unpad_inputs``, the default), or lays the texts out as padded rows once,
    runs every layer on ``[S, L, hidden]`` with a padding mask and packs the result again (``unpad_inputs=False``).
    Called with a padded ``hidden [B, N, hidden]`` and ``attention_mask`` it unpads, runs and pads back itself."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(TupeBertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = (
            False  # set by PreTrainedModel.gradient_checkpointing_enable()
        )

    def _call(self, layer, *args):
        """One layer, recomputed in the backward pass when gradient checkpointing is on (training only)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(layer.__call__, *args)
        return layer(*args)

    def run_layer(self, layer, hidden, pos_bias, packing):
        """One layer on packed tokens ``hidden [total, hidden]`` (early exit steps layer by layer)."""
        if self.config.unpad_inputs:
            return self._call(
                layer, hidden, pos_bias, None, packing.cu_seqlens, packing.max_seqlen, False
            )
        index, mask = packing.rows_layout()
        bias = None if pos_bias is None else pos_bias[:, : mask.shape[1], : mask.shape[1]]
        return packing.from_rows(
            self._call(layer, packing.to_rows(hidden, index, mask), bias, mask), index
        )

    def forward(
        self, hidden, pos_bias=None, attention_mask=None, output_hidden_states=False, packing=None
    ):
        if packing is None:
            if hidden.dim() != 3:
                raise ValueError(
                    f"hidden must be [B, N, hidden] without a packing, got {tuple(hidden.shape)}"
                )
            mask = as_bool_attention_mask(attention_mask, tuple(hidden.shape[:2]), hidden.device)
            packing = unpad_input(
                mask,
                None,
                shape=tuple(hidden.shape[:2]),
                device=hidden.device,
                exact_max_seqlen=not torch.compiler.is_compiling(),
            )
            out, states = self(
                packing.gather(hidden), pos_bias, None, output_hidden_states, packing
            )
            return packing.pad(out), (
                tuple(packing.pad(t) for t in states) if states is not None else None
            )
        states = [hidden] if output_hidden_states else None
        if self.config.unpad_inputs:
            for layer in self.layers:
                hidden = self._call(
                    layer, hidden, pos_bias, None, packing.cu_seqlens, packing.max_seqlen, False
                )
                if states is not None:
                    states.append(hidden)
            return hidden, (tuple(states) if states is not None else None)
        index, mask = packing.rows_layout()  # once per forward: the layers run on padded rows
        length = mask.shape[1]
        bias = None if pos_bias is None else pos_bias[:, :length, :length]
        rows = packing.to_rows(hidden, index, mask)
        for layer in self.layers:
            rows = self._call(layer, rows, bias, mask)
            if states is not None:
                states.append(packing.from_rows(rows, index))
        return packing.from_rows(rows, index), (tuple(states) if states is not None else None)


class TupeBertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, backend=config.backend)

    def forward(self, hidden):
        """``[B, N, hidden]`` (token 0 is pooled) or each row's first token ``[B, hidden]``."""
        return torch.tanh(self.dense(hidden[:, 0] if hidden.dim() == 3 else hidden))


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
                _init.copy_(
                    module.rel_buckets,
                    t5_relative_buckets(
                        cfg.max_position_embeddings,
                        cfg.num_buckets,
                        cfg.max_distance,
                        device=module.rel_buckets.device,
                    ),
                )
            if module.cls_row is not None:
                _init.zeros_(module.cls_row)
                _init.zeros_(module.cls_col)
        elif isinstance(module, TupeBertMLMHead):
            _init.zeros_(module.bias)

    def set_backend(self, backend):
        """Run every effbert op of this model on ``backend`` (``"auto"``, ``"triton"``, ``"eager"``,
        ...); ``"eager"`` also keeps every ``effbert.nn.Linear`` on ``F.linear`` (no packed CPU
        weights)."""
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        self.config.backend = backend
        for module in self.modules():
            if isinstance(module, (TupeSelfAttention, TupePositionBias, Linear)):
                module.backend = backend
        return self


class TupeBertModel(TupeBertPreTrainedModel):
    """The encoder: ``forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
    output_hidden_states=False, return_dict=None)`` returns ``BaseModelOutputWithPooling(last_hidden_state
    [B, N, hidden], pooler_output [B, hidden] (None without a pooler), hidden_states (embeddings, then every layer's
    output, each [B, N, hidden]))``.

    ``attention_mask [B, N]`` (bool or 0/1 ints, 1 = real token; right or left padding) keeps padding out of every
    softmax. ``position_ids [B, N]`` int64 (None: one text per row, positions 0..len-1 over its real tokens) packs
    several texts into a row: a text starts where the positions restart at 0 (transformers'
    ``DataCollatorWithFlattening`` convention), attention never crosses a text boundary and TUPE's positions (and
    the absolute embeddings) restart with each text, so each text's first token is position 0. The pooler reads each
    row's first real token.

    With ``config.unpad_inputs`` (default) the real tokens are gathered once after the embeddings
    (``effbert.models.packing.unpad_input``) and every layer runs on ``[total, hidden]``
    (``tupe_attention_varlen``); the outputs are scattered back to ``[B, N, hidden]`` at the end, with zeros at
    the padded slots. ``unpad_inputs=False`` runs the layers on the padded batch (the texts as right-padded rows
    when the batch is not already one text per right-padded row); the real tokens get the same values.
    """

    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config)
        self.embeddings = TupeBertEmbeddings(config)
        self.position_encoder = None
        if config.position_mode != "absolute":
            self.position_encoder = TupePositionBias(
                config.hidden_size,
                config.num_attention_heads,
                max_positions=config.max_position_embeddings,
                num_buckets=config.num_buckets if config.position_mode == "tupe-r" else None,
                max_distance=config.max_distance,
                untie_cls=config.untie_cls,
                layer_norm_eps=config.position_layer_norm_eps,
                backend=config.backend,
            )
        self.encoder = TupeBertEncoder(config)
        if getattr(config, "early_bird_ticket", None):  # EarlyBERT-pruned: the ticket's layer sizes
            from .early_bird import apply_ticket_shapes

            apply_ticket_shapes(self)
        self.pooler = TupeBertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def check_inputs(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """Checks the inputs; returns ``token_type_ids`` (zeros when None) and the bool key padding mask."""
        return check_bert_inputs(
            self.config, input_ids, attention_mask, token_type_ids, position_ids
        )

    @staticmethod
    def padding_mask(attention_mask, shape, device):
        """``attention_mask`` (bool or 0/1 integers, ``[B, N]``, True/1 = real token) as a bool tensor; a float mask
        is refused (``TypeError``)."""
        return as_bool_attention_mask(attention_mask, shape, device)

    def embed(self, input_ids, token_type_ids, position_ids=None):
        return self.embeddings(input_ids, token_type_ids, position_ids)

    def position_bias(self, seq_len):
        """The positional term ``P [H, N, N]`` every layer adds to its logits (None in ``"absolute"`` mode)."""
        return self.position_encoder(seq_len) if self.position_encoder is not None else None

    def packing(self, input_ids, mask, position_ids, exact_max_seqlen=True):
        """The batch's ``Packing`` (once per forward; ``mask`` from ``check_inputs``)."""
        return unpad_input(
            mask,
            position_ids,
            shape=tuple(input_ids.shape),
            device=input_ids.device,
            exact_max_seqlen=exact_max_seqlen,
        )

    def embed_packed(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """Checks the inputs, packs them and embeds the real tokens only: ``(hidden [total, hidden], packing)``.

        Under torch.compile the packed length never recompiles: with ``fullgraph=True`` (or
        ``capture_dynamic_output_shape_ops``) ``total`` is an unbacked size and the whole model is one graph;
        otherwise this step runs eagerly at one graph break and marks ``total`` dynamic for the layers after it.
        """
        if torch.compiler.is_compiling():
            if not _traces_dynamic_output_shapes():
                return self._embed_packed_eager(
                    input_ids, attention_mask, token_type_ids, position_ids
                )
            return self._embed_packed(
                input_ids, attention_mask, token_type_ids, position_ids, False
            )
        return self._embed_packed(input_ids, attention_mask, token_type_ids, position_ids, True)

    def _embed_packed(
        self, input_ids, attention_mask, token_type_ids, position_ids, exact_max_seqlen
    ):
        token_type_ids, mask = self.check_inputs(
            input_ids, attention_mask, token_type_ids, position_ids
        )
        packing = self.packing(input_ids, mask, position_ids, exact_max_seqlen=exact_max_seqlen)
        hidden = self.embed(
            packing.gather(input_ids), packing.gather(token_type_ids), packing.positions
        )
        return hidden, packing

    @torch.compiler.disable
    def _embed_packed_eager(self, input_ids, attention_mask, token_type_ids, position_ids):
        # max_seqlen = N: a bound that does not change with the lengths, so the graph after it does not recompile
        hidden, packing = self._embed_packed(
            input_ids, attention_mask, token_type_ids, position_ids, False
        )
        for t in (hidden, packing.indices, packing.positions, packing.cu_seqlens):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return hidden, packing

    def encode(self, hidden, packing, output_hidden_states=False):
        """The layers on packed embeddings, with the positional term computed once for all of them:
        ``(hidden [total, hidden], states or None)``."""
        pos_bias = self.position_bias(
            packing.max_seqlen if self.config.unpad_inputs else packing.rows_len
        )
        return self.encoder(
            hidden, pos_bias=pos_bias, output_hidden_states=output_hidden_states, packing=packing
        )

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        output_hidden_states=False,
        return_dict=None,
    ):
        hidden, packing = self.embed_packed(input_ids, attention_mask, token_type_ids, position_ids)
        hidden, states = self.encode(hidden, packing, output_hidden_states)
        pooled = self.pooler(packing.first_tokens(hidden)) if self.pooler is not None else None
        out = BaseModelOutputWithPooling(
            last_hidden_state=packing.pad(hidden),
            pooler_output=pooled,
            hidden_states=tuple(packing.pad(t) for t in states) if states is not None else None,
        )
        return _as_requested(out, return_dict)


@torch._dynamo.assume_constant_result
def _traces_dynamic_output_shapes():
    """While torch.compile traces: whether an op whose output size depends on data (nonzero) is captured in the
    graph (``fullgraph=True`` or ``capture_dynamic_output_shape_ops``) rather than breaking it. Evaluated once at
    trace time."""
    ctx = torch._guards.TracingContext.try_get()
    env = getattr(getattr(ctx, "fake_mode", None), "shape_env", None)
    if env is not None:
        return bool(env.allow_dynamic_output_shape_ops)
    return bool(torch._dynamo.config.capture_dynamic_output_shape_ops)


def _as_requested(out, return_dict):
    """``return_dict=False`` gives the output as a tuple (its non-None fields), as ``transformers`` models do."""
    if return_dict is not None and not isinstance(return_dict, bool):
        raise TypeError(f"return_dict must be a bool or None, got {type(return_dict).__name__}")
    return out.to_tuple() if return_dict is False else out


def check_bert_inputs(
    config, input_ids, attention_mask=None, token_type_ids=None, position_ids=None
):
    """Checks a BERT's inputs against ``config`` (ours or a transformers ``BertConfig``: both name the sizes the
    same); returns ``token_type_ids`` (zeros when None) and the bool key padding mask (True = real token).
    ``position_ids`` is checked for type, shape and device here; its values by ``unpad_input``."""
    _check_ids("input_ids", input_ids, None)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, N], got {list(input_ids.shape)}")
    b, n = input_ids.shape
    if not 1 <= n <= config.max_position_embeddings:
        raise ValueError(
            f"input_ids must have 1 <= N <= max_position_embeddings "
            f"({config.max_position_embeddings}), got N = {n}"
        )
    _values_in_range("input_ids", input_ids, 0, config.vocab_size)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    else:
        _check_ids("token_type_ids", token_type_ids, (b, n))
        if token_type_ids.device != input_ids.device:
            raise ValueError(
                f"token_type_ids must be on {input_ids.device}, got {token_type_ids.device}"
            )
        # without token-type embeddings (type_vocab_size 0) only all-zero ids mean anything (what tokenizers send)
        _values_in_range("token_type_ids", token_type_ids, 0, max(config.type_vocab_size, 1))
    if position_ids is not None:
        _check_ids("position_ids", position_ids, (b, n))
        if position_ids.device != input_ids.device:
            raise ValueError(
                f"position_ids must be on {input_ids.device}, got {position_ids.device}"
            )
    return token_type_ids, TupeBertModel.padding_mask(attention_mask, (b, n), input_ids.device)


class TupeBertMLMHead(nn.Module):
    """BERT's LM head: dense, activation, LayerNorm, then the word embeddings (tied) plus a bias."""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, backend=config.backend)
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
    """``forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
    output_hidden_states=False, note_slots=None, return_logits=True, return_dict=None)`` -> ``MaskedLMOutput(loss,
    logits [B, N, vocab], hidden_states, last_hidden_state [B, N, hidden])``. The decoder is the word embedding
    matrix (tied). ``labels [B, N]``: -100 marks positions without a target, and a padded position has none
    whatever its label (it has no hidden state); the loss is the mean over the others (0 when there are none).
    ``return_logits=False`` (training) runs the head at the labelled positions only and returns ``logits=None``:
    the same loss, a fraction of the head's cost; ``last_hidden_state`` is then scattered back to
    ``[B, N, hidden]`` only when the model has notes (TNF's update reads it) or ``output_hidden_states`` is set,
    else None. Full logits are 0 at padded slots. ``position_ids`` packs several texts per row (see
    ``TupeBertModel``).

    TNF: with ``note_dictionary`` (a ``NoteDictionary`` of dim ``hidden_size``), ``note_slots [B, N]`` (from
    ``effbert.data.tnf.RareWordTable.find``; -1 = not a rare word) mixes each rare word's note into the embeddings
    fed to the first layer, and the training loop calls ``update_notes(out.last_hidden_state, spans, lengths,
    position_ids=position_ids)`` after each step. The notes are buffers of the submodule ``notes``, so they travel
    in the state dict; the dictionary's sizes are written into the config (``tnf_*``), so ``from_pretrained``
    rebuilds it and loads the notes. Without
    ``note_dictionary``, a config with ``tnf_num_notes`` set builds an empty one of that size.
    """

    def __init__(self, config, note_dictionary=None):
        super().__init__(config)
        if note_dictionary is not None:
            if not isinstance(note_dictionary, NoteDictionary):
                raise TypeError(
                    f"note_dictionary must be an effbert.nn.NoteDictionary or None, got "
                    f"{type(note_dictionary).__name__}"
                )
            if note_dictionary.dim != config.hidden_size:
                raise ValueError(
                    f"note_dictionary must have dim == hidden_size ({config.hidden_size}), got "
                    f"{note_dictionary.dim}"
                )
            self.config.tnf_num_notes = (
                note_dictionary.num_slots
            )  # from_pretrained rebuilds it from these
            self.config.tnf_window, self.config.tnf_gamma, self.config.tnf_lam = (
                note_dictionary.window,
                note_dictionary.gamma,
                note_dictionary.lam,
            )
        elif config.tnf_num_notes is not None:
            note_dictionary = NoteDictionary(
                config.tnf_num_notes,
                config.hidden_size,
                window=config.tnf_window,
                gamma=config.tnf_gamma,
                lam=config.tnf_lam,
            )
        self.bert = TupeBertModel(config, add_pooling_layer=False)
        self.mlm_head = TupeBertMLMHead(config)
        self.notes = note_dictionary
        self.post_init()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        output_hidden_states=False,
        note_slots=None,
        return_logits=True,
        return_dict=None,
        position_ids=None,
    ):
        if not isinstance(return_logits, bool):
            raise TypeError(f"return_logits must be a bool, got {type(return_logits).__name__}")
        if not return_logits and labels is None:
            raise ValueError(
                "return_logits=False computes the head at the labelled positions only: it needs labels"
            )
        if labels is not None:
            _check_ids("labels", labels, None)
            _check_labels(labels, tuple(input_ids.shape), input_ids.device, "[B, N]")
            _values_in_range("labels", labels, 0, self.config.vocab_size, allow=-100)
        if note_slots is not None:
            self._check_note_slots(note_slots, input_ids)
        bert = self.bert
        hidden, packing = bert.embed_packed(input_ids, attention_mask, token_type_ids, position_ids)
        if note_slots is not None:
            hidden = self.notes.mix(
                hidden[None], packing.gather(note_slots)[None], backend=self.config.backend
            )[0]
        hidden, states = bert.encode(hidden, packing, output_hidden_states)
        states = tuple(packing.pad(t) for t in states) if states is not None else None
        words = bert.embeddings.word_embeddings.weight
        flat = packing.gather(labels).long() if labels is not None else None
        if not return_logits:
            # Training needs the head only where there is a target (15% of tokens in BERT's recipe): gathering those
            # rows first skips ~85% of the vocabulary-wide product and of the logits traffic.
            rows = (flat != -100).nonzero().squeeze(1)
            picked = self.mlm_head(hidden.index_select(0, rows), words)
            total = F.cross_entropy(picked.float(), flat.index_select(0, rows), reduction="sum")
            last = packing.pad(hidden) if self.notes is not None or output_hidden_states else None
            out = MaskedLMOutput(
                loss=total / max(rows.numel(), 1),
                logits=None,
                hidden_states=states,
                last_hidden_state=last,
            )
            return _as_requested(out, return_dict)
        logits = self.mlm_head(hidden, words)
        loss = None
        if labels is not None:
            total = F.cross_entropy(logits.float(), flat, ignore_index=-100, reduction="sum")
            loss = total / (flat != -100).sum().clamp_min(1)  # no NaN for a batch with no target
        out = MaskedLMOutput(
            loss=loss,
            logits=packing.pad(logits),
            hidden_states=states,
            last_hidden_state=packing.pad(hidden),
        )
        return _as_requested(out, return_dict)

    def _check_note_slots(self, note_slots, input_ids):
        if self.notes is None:
            raise ValueError("note_slots needs a model built with a note_dictionary")
        if not isinstance(note_slots, torch.Tensor):
            raise TypeError(f"note_slots must be a tensor, got {type(note_slots).__name__}")
        if tuple(note_slots.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"note_slots must be [B, N] = {list(input_ids.shape)}, got {list(note_slots.shape)}"
            )
        if note_slots.device != input_ids.device:
            raise ValueError(f"note_slots must be on {input_ids.device}, got {note_slots.device}")

    @torch.no_grad()
    def update_notes(self, hidden, spans, lengths=None, process_group=None, position_ids=None):
        """TNF's note update after a training step: fold the window means of the rare-word ``spans [M, 4]`` (rows
        ``(row, start, end_exclusive, slot)``) over ``hidden [B, N, hidden]`` (the last hidden state) into the notes
        (``NoteDictionary.update``). ``lengths [B]`` int64: real tokens per row (right padding; None = N).

        ``position_ids [B, N]`` (packed rows, as given to ``forward``): each span's window is clipped at the
        boundaries of its own text (where the positions restart at 0, and at ``lengths``), exactly as if every text
        were a row of its own; a span must lie within one text (``ValueError`` otherwise). The rows are applied in
        the same order either way.
        """
        if self.notes is None:
            raise ValueError("update_notes needs a model built with a note_dictionary")
        if position_ids is None:
            self.notes.update(
                hidden, spans, lengths, process_group=process_group, backend=self.config.backend
            )
            return
        hidden, spans, lengths = _per_text(
            hidden,
            spans,
            lengths,
            position_ids,
            self.notes.num_slots,
            raise_here=process_group is None,
        )
        self.notes.update(
            hidden, spans, lengths, process_group=process_group, backend=self.config.backend
        )


def _per_text(hidden, spans, lengths, position_ids, num_slots, raise_here=True):
    """TNF's update inputs with every text of a packed row as a row of its own: ``(hidden [S, L, Dm], spans with
    rows and offsets in text coordinates, lengths [S])``. Spans are checked against the rows first, so an error
    names the caller's coordinates. ``raise_here=False`` (a process group: every rank must raise together, which
    ``NoteDictionary.update`` arranges): bad rows are handed on as they are, and a span crossing a text boundary
    ends past its text, for the update's own check to refuse."""
    from ..ops import notes as note_ops

    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(
            f"hidden must be a [B, N, Dm] tensor, got "
            f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}"
        )
    batch, seq, _ = hidden.shape
    _check_ids("position_ids", position_ids, (batch, seq))
    if position_ids.device != hidden.device:
        raise ValueError(f"position_ids must be on {hidden.device}, got {position_ids.device}")
    if (
        not isinstance(spans, torch.Tensor)
        or spans.dim() != 2
        or spans.shape[1] != 4
        or spans.dtype != torch.int64
    ):
        raise ValueError(
            "spans must be an int64 [M, 4] tensor of rows (row, start, end_exclusive, slot)"
        )
    if lengths is not None:
        _check_ids("lengths", lengths, None)
        if tuple(lengths.shape) != (batch,):
            raise ValueError(f"lengths must be [B] = [{batch}], got {tuple(lengths.shape)}")
    spans = spans.to(hidden.device)
    try:
        note_ops.validate_rows(spans, batch, seq, num_slots, lengths)
    except ValueError:
        if raise_here:
            raise
        return hidden, spans, lengths
    real = (
        None
        if lengths is None
        else torch.arange(seq, device=hidden.device) < lengths.to(hidden.device)[:, None]
    )
    packing = unpad_input(real, position_ids, shape=(batch, seq), device=hidden.device)
    # packed index of every slot (-1 at slots past a row's length)
    where = torch.full((batch * seq,), -1, dtype=torch.int64, device=hidden.device)
    where = where.index_copy(0, packing.indices, torch.arange(packing.total, device=hidden.device))
    cu = packing.cu_seqlens.long()
    start = where[spans[:, 0] * seq + spans[:, 1]]
    text = torch.searchsorted(cu[1:], start, right=True)
    new_start = start - cu[text.clamp(max=max(packing.num_texts - 1, 0))]
    new_end = new_start + (spans[:, 2] - spans[:, 1])
    text_len = (
        (cu[1:] - cu[:-1]).index_select(0, text.clamp(max=max(packing.num_texts - 1, 0)))
        if packing.num_texts
        else torch.zeros_like(start)
    )
    crossing = (
        (new_end > text_len)
        if spans.shape[0]
        else torch.zeros(0, dtype=torch.bool, device=hidden.device)
    )
    if raise_here and spans.shape[0] and bool(crossing.any()):
        r = int(crossing.nonzero()[0, 0])
        raise ValueError(
            f"spans[{r}] = {spans[r].tolist()} crosses a text boundary of its row (position_ids "
            "restart at 0 inside it)"
        )
    if packing.right_padded:  # one text per row already
        return hidden, spans, lengths
    index, mask = packing.rows_layout()
    rows = Packing.to_rows(packing.gather(hidden), index, mask)
    per_text = torch.stack([text, new_start, new_end, spans[:, 3]], 1) if spans.shape[0] else spans
    return rows, per_text.contiguous(), (cu[1:] - cu[:-1])


class _ExitLayer(nn.Module):
    """A model layer with ``MultiExitEncoder``'s call shape ``(hidden, attention_mask)``: the shared positional term
    is bound once per forward."""

    def __init__(self, layer, pos_bias):
        super().__init__()
        self.layer = layer
        self.pos_bias = pos_bias

    def forward(self, hidden, attention_mask=None):
        return self.layer(hidden, pos_bias=self.pos_bias, attention_mask=attention_mask)


class TupeBertForSequenceClassification(MultiExitMixin, TupeBertPreTrainedModel):
    """Pooler, dropout, a linear classifier over ``config.num_labels``. ``labels [B]``: class indices with
    cross-entropy (-100 ignored), or float targets with mean squared error when ``num_labels == 1``.

    Returns ``SequenceClassifierOutput(loss, logits [B, C], hidden_states)``.

    With ``config.multi_exit``: an off-ramp (``ExitHead``: pooler and classifier) after every layer and no separate
    pooler (``config.shared_exit_pooler``: one pooler shared by every off-ramp, as PABEE). ``forward`` returns
    ``MultiExitSequenceClassifierOutput``: ``exit_logits [L, B, C]`` (every exit) and ``logits`` the last exit's;
    with labels the loss the config names (``effbert.models.multi_exit.exit_loss``; by default
    RomeBERT's self-distillation loss, gamma 0.9, T 3, or PABEE's weighted MSE for
    ``num_labels == 1``). ``set_deebert_stage`` freezes for DeeBERT's second stage.
    ``init_exit_poolers`` starts every off-ramp from a checkpoint's pooler. ``early_exit`` runs
    batched early-exit inference.
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
            self.exits = nn.ModuleList(
                ExitHead(config.hidden_size, config.num_labels, config.hidden_dropout_prob)
                for _ in range(config.num_hidden_layers)
            )
            if config.shared_exit_pooler:  # PABEE: one pooler before every off-ramp's classifier
                last = config.num_hidden_layers - 1
                for head in self.exits:
                    head.pooler = self.exits[last].pooler
                # declared, so save_pretrained writes the shared pooler once and from_pretrained ties it again
                self._tied_weights_keys = {
                    f"exits.{i}.pooler.{w}": f"exits.{last}.pooler.{w}"
                    for i in range(last)
                    for w in ("weight", "bias")
                }
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

    def exit_loss_settings(self):
        c = self.config
        return dict(
            loss=c.exit_loss or "romebert",
            gamma=c.exit_loss_gamma,
            temperature=c.exit_loss_temperature,
            gradient_equilibrium=c.exit_gradient_equilibrium,
            backend=c.backend,
        )

    def deebert_parts(self):
        if self.exits is None:
            raise ValueError("the model has no off-ramps: build it with config.multi_exit=True")
        return [self.bert], self.exits

    def multi_exit_encoder(self, pos_bias):
        """The layers and off-ramps as a ``MultiExitEncoder`` with ``pos_bias`` bound to every layer (built per call:
        it owns no parameters of its own)."""
        if self.exits is None:
            raise ValueError("the model has no off-ramps: build it with config.multi_exit=True")
        return MultiExitEncoder(
            [_ExitLayer(layer, pos_bias) for layer in self.bert.encoder.layers], self.exits
        )

    def _check_class_labels(self, labels, batch, device):
        _check_labels(labels, (batch,), device, "[B]")
        if self.config.num_labels == 1:
            if not labels.is_floating_point():
                raise TypeError(
                    f"labels must be float targets when num_labels == 1, got {labels.dtype}"
                )
        else:
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
    ):
        if labels is not None:
            self._check_class_labels(labels, input_ids.shape[0], input_ids.device)
        if self.exits is not None:
            out = self._forward_exits(
                input_ids,
                attention_mask,
                token_type_ids,
                labels,
                output_hidden_states,
                position_ids,
            )
            return _as_requested(out, return_dict)
        bert = self.bert
        hidden, packing = bert.embed_packed(input_ids, attention_mask, token_type_ids, position_ids)
        hidden, states = bert.encode(
            hidden, packing, output_hidden_states
        )  # no [B, N] scatter: the pooler
        states = (
            tuple(packing.pad(t) for t in states) if states is not None else None
        )  # reads one token a row
        pooled = bert.pooler(packing.first_tokens(hidden))
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=-100)
        return _as_requested(
            SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=states), return_dict
        )

    def _forward_exits(
        self,
        input_ids,
        attention_mask,
        token_type_ids,
        labels,
        output_hidden_states,
        position_ids=None,
    ):
        bert = self.bert
        hidden, packing = bert.embed_packed(input_ids, attention_mask, token_type_ids, position_ids)
        _, states = bert.encode(
            hidden, packing, output_hidden_states=True
        )  # every layer's output, packed
        # each off-ramp reads each row's first real token ([CLS]) of its layer's output
        exit_logits = torch.stack(
            [head(packing.first_tokens(t)[:, None]) for t, head in zip(states[1:], self.exits)]
        )
        states = tuple(packing.pad(t) for t in states) if output_hidden_states else None
        loss = None
        if labels is not None:
            # a host read, like the other value checks not made while torch.compile traces
            classes = self.config.num_labels > 1
            if classes and not torch.compiler.is_compiling() and bool((labels == -100).any()):
                raise ValueError(
                    "labels must not hold -100 with config.multi_exit (the exit "
                    "losses average over every sample)"
                )
            loss = self.compute_exit_loss(exit_logits, labels)
        return MultiExitSequenceClassifierOutput(
            loss=loss, logits=exit_logits[-1], exit_logits=exit_logits, hidden_states=states
        )

    @torch.no_grad()
    def early_exit(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        *,
        criterion,
        threshold=None,
        patience=None,
        position_ids=None,
    ):
        """Batched early-exit inference: ``(logits [B, C], exit_layer [B] int64, 1-based)``, each sample exactly
        what it gets alone through the layers (``MultiExitEncoder.early_exit``'s contract). The positional term is
        computed once and handed to every layer; the layers run on the packed real tokens (``unpad_inputs``), the
        off-ramps read each row's first real token, and samples that exit leave the batch (their tokens leave the
        packing). Every row needs a real token. Call in eval mode."""
        if self.exits is None:
            raise ValueError(
                "early_exit needs off-ramps: build the model with config.multi_exit=True"
            )
        bert = self.bert
        ee_ops.check_criterion(criterion, threshold, patience)
        token_type_ids, mask = bert.check_inputs(
            input_ids, attention_mask, token_type_ids, position_ids
        )
        if mask is not None and mask.numel() and not bool(mask.any(1).all()):
            bad = int((~mask.any(1)).nonzero()[0, 0])
            raise ValueError(
                f"attention_mask[{bad}] has no real token: an off-ramp reads the row's first real token"
            )
        batch = input_ids.shape[0]
        state = ee_ops.BatchedExit(
            batch,
            depth=len(self.exits),
            criterion=criterion,
            threshold=threshold,
            patience=patience,
            device=input_ids.device,
            backend=self.config.backend,
        )
        if batch == 0:
            return torch.zeros(0, self.config.num_labels, device=input_ids.device), torch.zeros(
                0, dtype=torch.int64, device=input_ids.device
            )
        hidden, packing = bert.embed_packed(input_ids, mask, token_type_ids, position_ids)
        pos_bias = bert.position_bias(
            input_ids.shape[1]
        )  # once, for every layer and every compaction
        for i, (layer, head) in enumerate(zip(bert.encoder.layers, self.exits)):
            hidden = bert.encoder.run_layer(layer, hidden, pos_bias, packing)
            keep = state.step(head(packing.first_tokens(hidden)[:, None]), i + 1)
            if state.active == 0:
                break
            if keep is not None:  # some rows left: their tokens only go on
                padded = packing.pad(hidden).index_select(0, keep)
                mask = (
                    mask if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
                ).index_select(0, keep)
                position_ids = None if position_ids is None else position_ids.index_select(0, keep)
                input_ids = input_ids.index_select(0, keep)
                packing = bert.packing(input_ids, mask, position_ids)
                hidden = packing.gather(padded)
        return state.logits, state.exit_layer.long()
