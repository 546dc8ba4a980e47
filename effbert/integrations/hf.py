"""Hugging Face BERT interoperability (transformers and safetensors, installed with effbert).

- ``from_hf_bert(model_or_path)``: a pretrained HF BERT (a model object or a local folder holding ``config.json``
  and ``model.safetensors``) as an effbert model in ``position_mode="absolute"``, same outputs on real tokens.
- ``token_classifier_from_hf_bert(model_or_path, num_labels)``: the same encoder as a
  ``TupeBertForTokenClassification`` with a classifier per layer, for SENTEE / TOKEE early exit (Li et al., ACL 2021).
- ``patch_bert_attention(hf_model)``: replaces, in place, the self-attention of every layer of an HF BERT with a
  module running ``effbert.tupe_attention`` on the same ``query``/``key``/``value`` weights (the state dict, and so
  ``save_pretrained``, is unchanged).
- ``multi_exit_bert(hf_model, num_labels)``: an HF BERT's embeddings and layers (shared, not copied) with an
  off-ramp after every layer, for early-exit fine-tuning (RomeBERT / PABEE / DeeBERT losses) and batched
  early exit.
"""

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..losses import deebert_loss, multi_exit_distillation_loss, pabee_loss
from ..models import (TupeBertConfig, TupeBertForMaskedLM, TupeBertForSequenceClassification,
                      TupeBertForTokenClassification, TupeBertModel)
from ..models.tupe_bert import MultiExitSequenceClassifierOutput, _check_ids, _values_in_range, check_bert_inputs
from ..nn import BertLayerAdapter, ExitHead, MultiExitEncoder
from ..ops import tupe_attention
from ..ops._dispatch import BACKENDS

__all__ = ["from_hf_bert", "token_classifier_from_hf_bert", "patch_bert_attention", "EffbertBertSelfAttention",
           "hf_state_dict_to_effbert", "config_from_hf", "multi_exit_bert", "MultiExitBert"]

_INSTALL_HINT = ("transformers is needed for effbert.integrations.hf: pip install transformers safetensors "
                 "(both come with effbert: pip install -e . in its checkout)")
# HF activation names -> ours (the tanh approximations are one function under several names)
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
         "relu": "relu"}


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return transformers


def config_from_hf(hf_config, *, backend="auto"):
    """A ``TupeBertConfig`` (``position_mode="absolute"``) with the sizes of an HF ``BertConfig``."""
    if getattr(hf_config, "model_type", None) != "bert":
        raise ValueError(f"hf_config must be a BERT config (model_type 'bert'), got "
                         f"{getattr(hf_config, 'model_type', None)!r}")
    if getattr(hf_config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise ValueError("only absolute position embeddings convert, got position_embedding_type "
                         f"{hf_config.position_embedding_type!r}")
    if getattr(hf_config, "is_decoder", False):
        raise ValueError("a decoder (causal) BERT does not convert: effbert's encoder attends both ways")
    act = hf_config.hidden_act
    if not isinstance(act, str) or act not in _ACTS:
        raise ValueError(f"hidden_act {act!r} has no effbert equivalent (supported: {sorted(_ACTS)})")
    return TupeBertConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers, num_attention_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size, max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size, hidden_dropout_prob=float(hf_config.hidden_dropout_prob),
        attention_probs_dropout_prob=float(hf_config.attention_probs_dropout_prob),
        layer_norm_eps=float(hf_config.layer_norm_eps), hidden_act=_ACTS[act],
        initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
        position_mode="absolute", num_labels=int(getattr(hf_config, "num_labels", 2)), backend=backend)


_LAYER_NAMES = {
    "attention.output.dense": "attention.out",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
_TOP_NAMES = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.LayerNorm": "embeddings.layer_norm",
    "pooler.dense": "pooler.dense",
}
_IGNORED = re.compile(r"^(embeddings\.(position_ids|token_type_ids)|cls\.seq_relationship\..*)$")


def hf_state_dict_to_effbert(state):
    """An HF BERT state dict (with or without the ``bert.`` prefix, old ``gamma``/``beta`` LayerNorm names
    accepted) as ``(encoder_state, head_state)``: the first for ``TupeBertModel``, the second holding the
    classifier (``classifier.*``) or the MLM head (``mlm_head.*``) when present. Unknown keys are an error."""
    encoder, head, qkv = {}, {}, {}
    for raw_key, value in state.items():
        key = raw_key[len("bert."):] if raw_key.startswith("bert.") else raw_key
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        if _IGNORED.match(key):
            continue
        m = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m:
            index, name, kind = m.groups()
            proj = re.match(r"^attention\.self\.(query|key|value)$", name)
            if proj:  # separate q, k, v projections, fused into one qkv below
                qkv.setdefault((index, kind), {})[proj.group(1)] = value
                continue
            if name in _LAYER_NAMES:
                encoder[f"encoder.layers.{index}.{_LAYER_NAMES[name]}.{kind}"] = value
                continue
        m = re.match(r"^(.+)\.(weight|bias)$", key)
        if m and m.group(1) in _TOP_NAMES:
            encoder[f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"] = value
            continue
        if key in ("classifier.weight", "classifier.bias"):
            head[key] = value
            continue
        mlm = {"cls.predictions.transform.dense.weight": "mlm_head.dense.weight",
               "cls.predictions.transform.dense.bias": "mlm_head.dense.bias",
               "cls.predictions.transform.LayerNorm.weight": "mlm_head.layer_norm.weight",
               "cls.predictions.transform.LayerNorm.bias": "mlm_head.layer_norm.bias",
               "cls.predictions.bias": "mlm_head.bias", "cls.predictions.decoder.bias": "mlm_head.bias",
               "cls.predictions.decoder.weight": "mlm_head.decoder.weight"}
        if key in mlm:
            head[mlm[key]] = value
            continue
        raise ValueError(f"state dict key {raw_key!r} is not part of a BERT encoder, its pooler, an MLM head or a "
                         "sequence classifier")
    for (index, kind), parts in qkv.items():
        missing = sorted({"query", "key", "value"} - set(parts))
        if missing:
            raise ValueError(f"layer {index} lacks attention.self.{missing[0]}.{kind}")
        # our qkv Linear's outputs are [3, H, D]: q rows, then k, then v, each head-major like HF's
        encoder[f"encoder.layers.{index}.attention.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0)
    return encoder, head


def _load_path(path):
    transformers = _transformers()
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model_or_path must be an HF BERT model or a local folder, got {str(path)!r} "
                         "(not a folder)")
    hf_config = transformers.BertConfig.from_pretrained(str(path), local_files_only=True)
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").exists():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{str(path)!r} holds no model.safetensors (or pytorch_model.bin)")
    return hf_config, state


def from_hf_bert(model_or_path, *, backend="auto"):
    """An effbert model with the weights of a pretrained HF BERT, in ``position_mode="absolute"``.

    ``model_or_path``: a transformers BERT model (``BertModel``, ``BertForSequenceClassification``,
    ``BertForMaskedLM``, ``BertForPreTraining``) or a local folder with its ``config.json`` and ``model.safetensors``.
    Returns ``TupeBertForSequenceClassification`` when the weights hold a classifier, ``TupeBertForMaskedLM`` when
    they hold an MLM head, else ``TupeBertModel`` (with a pooler when the weights have one). The result is in eval
    mode, in the dtype of the weights, on the CPU for a path and on the model's device for a model.
    """
    hf_config, state = _hf_weights(model_or_path)
    config = config_from_hf(hf_config, backend=backend)
    encoder, head = hf_state_dict_to_effbert(state)
    has_pooler = "pooler.dense.weight" in encoder
    if "classifier.weight" in head:
        config.num_labels = head["classifier.weight"].shape[0]
        if not has_pooler:
            raise ValueError("a sequence classifier needs the pooler weights, which the state dict lacks")
        model = TupeBertForSequenceClassification(config)
        target = {"bert." + k: v for k, v in encoder.items()} | head
    elif any(k.startswith("mlm_head.") for k in head):
        decoder = head.pop("mlm_head.decoder.weight", None)
        word = encoder.get("embeddings.word_embeddings.weight")
        if decoder is not None and word is not None and not torch.equal(decoder, word):
            raise ValueError("the MLM decoder is not tied to the word embeddings; effbert's MLM head always is")
        model = TupeBertForMaskedLM(config)
        encoder.pop("pooler.dense.weight", None), encoder.pop("pooler.dense.bias", None)
        target = {"bert." + k: v for k, v in encoder.items()} | head
    else:
        model = TupeBertModel(config, add_pooling_layer=has_pooler)
        target = encoder
    first = next(iter(target.values()))
    model.to(device=first.device, dtype=first.dtype)
    missing, unexpected = model.load_state_dict(target, strict=False)
    if missing or unexpected:
        raise ValueError(f"the HF weights do not fill the effbert model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return model.eval()


def _hf_weights(model_or_path):
    """``(hf_config, state_dict)`` of an HF BERT model object or a local folder."""
    if isinstance(model_or_path, (str, os.PathLike)):
        return _load_path(model_or_path)
    if isinstance(model_or_path, nn.Module) and hasattr(model_or_path, "config"):
        _transformers()
        return model_or_path.config, model_or_path.state_dict()
    raise TypeError(f"model_or_path must be an HF BERT model or a local folder path, got "
                    f"{type(model_or_path).__name__}")


def token_classifier_from_hf_bert(model_or_path, num_labels=None, *, multi_exit=True, backend="auto"):
    """A ``TupeBertForTokenClassification`` (``position_mode="absolute"``) on the encoder of a pretrained HF BERT,
    for sequence labeling with early exit (Li et al., ACL 2021, start from a pretrained BERT this way).

    ``model_or_path``: as ``from_hf_bert`` (``BertModel``, ``BertForTokenClassification``, ``BertForMaskedLM``, ... or
    a local folder). ``num_labels``: the classes (None: the HF classifier's, else the HF config's). With
    ``multi_exit`` (default) every layer gets a classifier, freshly initialised except the last one, which takes the
    HF token classifier's weights when there is one; ``multi_exit=False`` gives one classifier (the HF one when
    present). The pooler and an MLM head are dropped. ``id2label`` comes from the HF config when its size matches.
    Returns the model in eval mode, in the dtype of the weights, on their device.

    Raises ``ValueError`` when ``num_labels`` disagrees with the HF classifier, and the errors of ``from_hf_bert``.
    """
    hf_config, state = _hf_weights(model_or_path)
    config = config_from_hf(hf_config, backend=backend)
    encoder, head = hf_state_dict_to_effbert(state)
    for key in ("pooler.dense.weight", "pooler.dense.bias"):
        encoder.pop(key, None)
    classifier = {k: v for k, v in head.items() if k.startswith("classifier.")}
    if classifier:
        found = classifier["classifier.weight"].shape[0]
        if num_labels is not None and num_labels != found:
            raise ValueError(f"num_labels ({num_labels}) must match the HF classifier's {found} classes, or be None")
        num_labels = found
    config.num_labels = int(num_labels if num_labels is not None else config.num_labels)
    id2label = getattr(hf_config, "id2label", None)
    if id2label and len(id2label) == config.num_labels:
        config.id2label = {int(k): v for k, v in id2label.items()}
        config.label2id = {v: int(k) for k, v in id2label.items()}
    config.multi_exit = bool(multi_exit)
    model = TupeBertForTokenClassification(config)
    target = {"bert." + k: v for k, v in encoder.items()}
    prefix = f"exits.{config.num_hidden_layers - 1}." if multi_exit else "classifier."
    target |= {prefix + k[len("classifier."):]: v for k, v in classifier.items()}
    first = next(iter(target.values()))
    model.to(device=first.device, dtype=first.dtype)
    missing, unexpected = model.load_state_dict(target, strict=False)
    fresh = {k for k in model.state_dict() if k.startswith(("exits.", "classifier."))}
    if set(missing) - fresh or unexpected:
        raise ValueError(f"the HF weights do not fill the effbert encoder: missing {sorted(set(missing) - fresh)}, "
                         f"unexpected {sorted(unexpected)}")
    return model.eval()


class _MaskConverter:
    """HF's attention masks as effbert's key padding mask, converted once per forward for all layers.

    transformers 5 hands each layer ``None`` (no padding), a 4-D ``[B, 1, Q, K]`` mask (bool, True = attend, for
    sdpa; additive float for eager) that repeats one key padding row for every query, or the 2-D ``[B, K]``
    padding mask itself (flash attention). Anything that is not a key padding mask (a causal mask, a
    per-query pattern, a general additive bias) is refused rather than silently changed.
    """

    def __init__(self):
        self._mask, self._version, self._out = None, None, None

    def __call__(self, mask, batch, seq_len):
        if mask is None:
            return None
        if isinstance(mask, torch.Tensor) and mask.is_inference():
            # an inference tensor (torch.inference_mode) has no version counter to tell an in-place edit by
            return self._convert(mask, batch, seq_len)
        if self._mask is mask and self._version == mask._version:
            return self._out  # the same mask object is handed to every layer
        out = self._convert(mask, batch, seq_len)
        self._mask, self._version, self._out = mask, mask._version, out  # holding it keeps its id from reuse
        return out

    @staticmethod
    def _convert(mask, batch, seq_len):
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor or None, got {type(mask).__name__}")
        if mask.dtype == torch.bool:
            valid = mask
        elif mask.is_floating_point():
            valid = mask == 0
            if not torch.compiler.is_compiling() and not bool(((mask == 0) | (mask <= -1e4)).all()):
                raise ValueError("attention_mask holds an additive bias other than 0 / large negative; effbert's "
                                 "fused attention takes key padding masks only")
        else:
            valid = mask != 0
        if valid.dim() == 2:
            if tuple(valid.shape) != (batch, seq_len):
                raise ValueError(f"attention_mask must be [B, N] = [{batch}, {seq_len}], got {list(valid.shape)}")
            return valid
        if valid.dim() != 4 or valid.shape[0] not in (1, batch) or valid.shape[-1] != seq_len \
                or valid.shape[-2] not in (1, seq_len):
            raise ValueError(f"attention_mask must be [B, N] or [B, 1, N or 1, N] with B = {batch}, N = {seq_len}, "
                             f"got {list(mask.shape)}")
        if not torch.compiler.is_compiling() and not bool((valid == valid[:, :1, :1, :]).all()):
            raise ValueError("attention_mask differs between queries or heads (a causal or custom mask); effbert's "
                             "fused attention takes key padding masks only")
        return valid[:, 0, 0, :].expand(batch, seq_len).contiguous()


class EffbertBertSelfAttention(nn.Module):
    """Stands in for HF's ``BertSelfAttention``: the same ``query``/``key``/``value`` Linear modules (shared, not
    copied), the attention itself through ``effbert.tupe_attention``. Returns ``(context, None)`` as HF's does
    when attention weights are not recorded (the fused kernel never forms them). Outputs at padded query
    positions are 0 (HF fills them with an average over the real tokens); real tokens match HF.

    With ``output_attentions=True`` (the call's argument or the model config's) a call computes the attention
    probabilities ``[B, H, N, N]`` and returns ``(context, probabilities)`` from transformers' own eager attention,
    as transformers' sdpa attention falls back to eager for such a call; transformers records them in the output's
    ``attentions``. ``patch_bert_attention`` builds these modules as subclasses of HF's ``BertSelfAttention`` so
    that transformers' output recording finds them."""

    def __init__(self, hf_self_attention, masks, backend="auto"):
        nn.Module.__init__(self)  # not BertSelfAttention's: the projections are the patched module's own
        self.query, self.key, self.value = hf_self_attention.query, hf_self_attention.key, hf_self_attention.value
        self.num_attention_heads = hf_self_attention.num_attention_heads
        self.attention_head_size = hf_self_attention.attention_head_size
        self.scaling = float(getattr(hf_self_attention, "scaling", self.attention_head_size ** -0.5))
        self.dropout = hf_self_attention.dropout
        self.config = getattr(hf_self_attention, "config", None)
        self.is_decoder, self.is_causal = False, False
        self.layer_idx = getattr(hf_self_attention, "layer_idx", None)
        self.backend = backend
        self._masks = masks
        self.train(hf_self_attention.training)  # a model patched in eval mode must not start dropping out

    def _wants_attentions(self, kwargs):
        flag = kwargs.get("output_attentions")
        if flag is None:
            flag = getattr(self.config, "output_attentions", False)
        return bool(flag)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, encoder_hidden_states=None,
                **kwargs):
        if past_key_values is not None or encoder_hidden_states is not None or kwargs.get("cache") is not None:
            raise ValueError("effbert's patched BERT attention is encoder self-attention only (no cache, no cross "
                             "attention)")
        b, n, _ = hidden_states.shape
        shape = (b, n, self.num_attention_heads, self.attention_head_size)
        q = self.query(hidden_states).view(shape)
        k = self.key(hidden_states).view(shape)
        v = self.value(hidden_states).view(shape)
        mask = self._masks(attention_mask, b, n)
        if self._wants_attentions(kwargs):
            return self._eager_with_probabilities(q, k, v, mask)
        ctx = tupe_attention(q, k, v, attention_mask=mask, scale=self.scaling,
                             dropout_p=self.dropout.p if self.training else 0.0, backend=self.backend)
        return ctx.reshape(b, n, -1), None

    def _eager_with_probabilities(self, q, k, v, mask):
        """transformers' ``eager_attention_forward`` on the key padding mask: ``(context [B, N, H*D], probs)``."""
        from transformers.models.bert.modeling_bert import eager_attention_forward

        b, n = q.shape[:2]
        additive = None
        if mask is not None:  # HF's eager form of a padding mask: 0 to attend, the dtype's lowest to not
            additive = torch.zeros((b, 1, 1, n), dtype=q.dtype, device=q.device)
            additive = additive.masked_fill(~mask[:, None, None, :], torch.finfo(q.dtype).min)
        ctx, probs = eager_attention_forward(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), additive,
                                             scaling=self.scaling, dropout=self.dropout.p if self.training else 0.0)
        return ctx.reshape(b, n, -1), probs


_PATCHED_CLASS = None


def _patched_class():
    """``EffbertBertSelfAttention`` that is also a transformers ``BertSelfAttention`` (built once, on first use, so
    that importing effbert never imports transformers): transformers' ``output_attentions`` recording hooks
    modules by that class."""
    global _PATCHED_CLASS
    if _PATCHED_CLASS is None:
        from transformers.models.bert.modeling_bert import BertSelfAttention

        _PATCHED_CLASS = type("_PatchedBertSelfAttention", (EffbertBertSelfAttention, BertSelfAttention),
                              {"__module__": __name__, "__doc__": EffbertBertSelfAttention.__doc__})
    return _PATCHED_CLASS


def __getattr__(name):
    # pickle finds the patched class by name, also in a process that has not patched a model yet
    if name == "_PatchedBertSelfAttention":
        return _patched_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch_bert_attention(hf_model, *, backend="auto"):
    """Replace the self-attention of every layer of an HF BERT (``BertModel`` or any ``BertFor...``) with
    ``EffbertBertSelfAttention``, in place and keeping the weights; returns ``hf_model``. The number of layers
    patched is at least one, else this raises (the model is not a BERT encoder). The patched model runs under
    ``torch.no_grad()`` and ``torch.inference_mode()``, and ``output_attentions=True`` gives the attention
    probabilities of that call (computed eagerly, as transformers' sdpa path does)."""
    _transformers()
    from transformers.models.bert.modeling_bert import BertAttention, BertSelfAttention

    if not isinstance(hf_model, nn.Module):
        raise TypeError(f"hf_model must be an HF BERT model, got {type(hf_model).__name__}")
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if getattr(getattr(hf_model, "config", None), "is_decoder", False):
        raise ValueError("hf_model is a decoder (causal) BERT; effbert's patched attention is bidirectional")
    masks = _MaskConverter()  # one per model: every layer of a forward shares the conversion
    cls = _patched_class()
    patched = 0
    for module in hf_model.modules():
        if isinstance(module, BertAttention) and not getattr(module, "is_cross_attention", False):
            if isinstance(module.self, EffbertBertSelfAttention):  # patched before: the backend only
                module.self.backend = backend
                patched += 1
            elif isinstance(module.self, BertSelfAttention):
                module.self = cls(module.self, masks, backend=backend)
                patched += 1
    if not patched:
        raise ValueError(f"hf_model ({type(hf_model).__name__}) has no BERT self-attention to patch")
    return hf_model


# ---- multi-exit fine-tuning of an HF BERT ----

MULTI_EXIT_LOSSES = ("romebert", "pabee", "deebert")
EXIT_POOLERS = ("copy", "shared")


class MultiExitBert(nn.Module):
    """An HF BERT with an off-ramp after every layer; build it with ``multi_exit_bert``.

    ``embeddings`` is the HF model's ``BertEmbeddings`` and ``encoder.layers[i].layer`` its ``encoder.layer[i]``
    (the same modules: training this trains the HF model, and ``hf_model.save_pretrained`` saves the encoder);
    ``encoder.heads[i]`` is an ``ExitHead``. Inputs follow HF's conventions (``attention_mask`` 1 = real token).

    - ``forward(input_ids, attention_mask=None, token_type_ids=None, labels=None)`` ->
      ``MultiExitSequenceClassifierOutput(loss, logits [B, C] (the last exit's), exit_logits
      [L, B, C])``. With integer ``labels [B]`` the loss is RomeBERT's
      self-distillation loss (``loss="romebert"``, ``gamma``, ``temperature``), PABEE's layer-weighted
      cross-entropy (``loss="pabee"``) or DeeBERT's loss of the current ``stage`` (``loss="deebert"``, see
      ``set_stage``). A one-output head (``num_labels=1``) is a regression head: float ``labels``, mean squared
      error as HF does for ``num_labels == 1`` (PABEE's layer-weighted MSE for "romebert" and "pabee", DeeBERT's
      per-stage MSE for "deebert"). ``gradient_equilibrium=True``: RomeBERT's ``--ge`` on the exits' logits.
    - ``early_exit(input_ids, attention_mask=None, token_type_ids=None, *, criterion, threshold=None,
      patience=None)`` -> ``(logits [B, C], exit_layer [B] int64, 1-based)``: batched early exit, each sample
      exactly what it gets alone. ``threshold=0`` (entropy) / ``patience=0``: full depth.
    """

    def __init__(self, embeddings, layers, heads, *, hf_config, backend="auto", loss="romebert", gamma=0.9,
                 temperature=3.0, gradient_equilibrium=False):
        super().__init__()
        self.embeddings = embeddings
        self.encoder = MultiExitEncoder([BertLayerAdapter(layer) for layer in layers], heads)
        self.hf_config = hf_config
        self.backend = backend
        _check_loss_args(loss, gamma, temperature)
        self.loss_type, self.gamma, self.temperature = loss, gamma, temperature
        self.gradient_equilibrium = bool(gradient_equilibrium)
        self.stage = 1

    @property
    def depth(self):
        return self.encoder.depth

    @property
    def num_labels(self):
        return self.encoder.heads[-1].classifier.out_features

    def set_stage(self, stage):
        """DeeBERT's training stage: 1 trains everything on the last exit's loss; 2 freezes the embeddings, the
        layers and the last off-ramp (``requires_grad_(False)``) and trains the other off-ramps on the sum of their
        losses. Returns ``self``. Raises ``ValueError`` for a stage other than 1 or 2."""
        if isinstance(stage, bool) or stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        frozen = stage == 2
        last = self.encoder.heads[-1]
        for mod in (self.embeddings, self.encoder.layers, last):
            mod.requires_grad_(not frozen)
        for head in list(self.encoder.heads)[:-1]:
            for name, p in head.named_parameters():
                shared = any(p is q for q in last.parameters())  # a pooler shared with the last exit stays frozen
                p.requires_grad_(not (frozen and shared))
        self.stage = stage
        return self

    def _inputs(self, input_ids, attention_mask, token_type_ids):
        """Checks HF-style inputs; returns ``(hidden [B, N, Dm], attention mask [B, N] bool, True = real token, or
        None)``."""
        token_type_ids, real = check_bert_inputs(self.hf_config, input_ids, attention_mask, token_type_ids)
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return hidden, real

    def _check_labels(self, labels, batch, device):
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
        if tuple(labels.shape) != (batch,):
            raise ValueError(f"labels must be [B] = [{batch}], got {list(labels.shape)}")
        if labels.device != device:
            raise ValueError(f"labels must be on {device}, got {labels.device}")
        if self.num_labels == 1:
            if not labels.is_floating_point():
                raise TypeError(f"labels must be float targets for a one-output (regression) head, got "
                                f"{str(labels.dtype).replace('torch.', '')}")
            return
        _check_ids("labels", labels, None)
        _values_in_range("labels", labels, 0, self.num_labels)

    def compute_loss(self, exit_logits, labels):
        """The training loss over every exit's logits ``[L, B, C]`` (float32 or wider)."""
        x = exit_logits if exit_logits.dtype == torch.float64 else exit_logits.float()
        ge = self.gradient_equilibrium
        y = labels.to(x.dtype) if self.num_labels == 1 else labels.long()
        if self.loss_type == "deebert":
            return deebert_loss(x, y, self.stage, gradient_equilibrium=ge)
        if self.loss_type == "pabee" or self.num_labels == 1:
            return pabee_loss(x, y, gradient_equilibrium=ge)
        return multi_exit_distillation_loss(x, y, gamma=self.gamma, temperature=self.temperature,
                                            gradient_equilibrium=ge, backend=self.backend)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        hidden, real = self._inputs(input_ids, attention_mask, token_type_ids)
        if labels is not None:
            self._check_labels(labels, input_ids.shape[0], input_ids.device)
        exit_logits = self.encoder(hidden, real)
        loss = self.compute_loss(exit_logits, labels) if labels is not None else None
        return MultiExitSequenceClassifierOutput(loss=loss, logits=exit_logits[-1], exit_logits=exit_logits)

    @torch.no_grad()
    def early_exit(self, input_ids, attention_mask=None, token_type_ids=None, *, criterion, threshold=None,
                   patience=None):
        """Batched early-exit inference (``MultiExitEncoder.early_exit``): ``(logits [B, C], exit_layer [B])``.
        Call in eval mode."""
        hidden, real = self._inputs(input_ids, attention_mask, token_type_ids)
        return self.encoder.early_exit(hidden, real, criterion=criterion, threshold=threshold,
                                       patience=patience, backend=self.backend)


def _check_loss_args(loss, gamma, temperature):
    if loss not in MULTI_EXIT_LOSSES:
        raise ValueError(f"loss must be one of {MULTI_EXIT_LOSSES}, got {loss!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be a float in [0, 1], got {gamma!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or not temperature < float("inf"):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")


def multi_exit_bert(hf_model, num_labels=None, *, dropout=None, backend="auto", loss="romebert", gamma=0.9,
                    temperature=3.0, gradient_equilibrium=False, exit_pooler="copy"):
    """Wrap an HF ``BertModel`` or ``BertForSequenceClassification`` for early-exit fine-tuning and inference.

    Returns a ``MultiExitBert`` holding the model's embeddings and layers (shared, not copied; works whether or not
    ``patch_bert_attention`` was applied) and an ``ExitHead`` (pooler, dropout, classifier) after every layer. The
    last off-ramp *is* the model's pooler and classifier when it has them (so the full-depth exit starts as the
    HF model's prediction); the other classifiers, and any missing part, get BERT's initialisation.

    ``exit_pooler``: ``"copy"`` (default) starts every off-ramp's pooler as a copy of the checkpoint's pooler, as
    DeeBERT and RomeBERT do (``init_highway_pooler``); ``"shared"`` makes every off-ramp use the one pooler, as
    PABEE does (``self.pooler`` before every layer's classifier). ``num_labels``: classes per exit (default: the
    classifier's outputs, else ``config.num_labels``); it must match a classifier the model already has; 1 is a
    regression head (float labels, MSE). ``dropout``: the off-ramps' dropout (default HF's ``classifier_dropout``,
    else ``hidden_dropout_prob``). ``loss``: ``"romebert"`` (gamma 0.9, temperature 3.0: RomeBERT's published
    values), ``"pabee"`` or ``"deebert"`` (two stages, ``MultiExitBert.set_stage``). ``gradient_equilibrium``:
    RomeBERT's ``--ge``. ``backend``: for the exit decisions and the loss. The result is in the model's train/eval
    mode, device and dtype. Errors name the argument (``ValueError``/``TypeError``).
    """
    _transformers()
    from transformers.models.bert.modeling_bert import BertForSequenceClassification, BertModel

    if isinstance(hf_model, BertForSequenceClassification):
        bert, classifier = hf_model.bert, hf_model.classifier
    elif isinstance(hf_model, BertModel):
        bert, classifier = hf_model, None
    else:
        raise TypeError(f"hf_model must be a transformers BertModel or BertForSequenceClassification, got "
                        f"{type(hf_model).__name__}")
    cfg = hf_model.config
    if getattr(cfg, "is_decoder", False):
        raise ValueError("hf_model is a decoder (causal) BERT; off-ramps need a bidirectional encoder")
    if num_labels is None:
        num_labels = classifier.out_features if classifier is not None else int(cfg.num_labels)
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be an int >= 1, got {num_labels!r}")
    if classifier is not None and classifier.out_features != num_labels:
        raise ValueError(f"num_labels ({num_labels}) differs from hf_model's classifier ({classifier.out_features} "
                         "outputs); wrap its .bert for a new label set")
    if dropout is None:
        dropout = getattr(cfg, "classifier_dropout", None)
        dropout = cfg.hidden_dropout_prob if dropout is None else dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if exit_pooler not in EXIT_POOLERS:
        raise ValueError(f"exit_pooler must be one of {EXIT_POOLERS}, got {exit_pooler!r}")
    _check_loss_args(loss, gamma, temperature)
    layers = list(bert.encoder.layer)
    ref = next(bert.parameters())
    std = float(getattr(cfg, "initializer_range", 0.02))
    heads = []
    for _ in layers:
        head = ExitHead(cfg.hidden_size, num_labels, float(dropout))
        for lin in (head.pooler, head.classifier):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        heads.append(head.to(device=ref.device, dtype=ref.dtype))
    pooler = getattr(bert, "pooler", None)
    pooler = pooler.dense if pooler is not None else heads[-1].pooler
    for head in heads:
        if exit_pooler == "shared" or head is heads[-1]:
            head.pooler = pooler  # the same Linear: tanh(dense(h[:, 0])) is HF's pooler
        else:
            with torch.no_grad():
                head.pooler.load_state_dict(pooler.state_dict())
    if classifier is not None:
        heads[-1].classifier = classifier
    model = MultiExitBert(bert.embeddings, layers, heads, hf_config=cfg, backend=backend, loss=loss, gamma=gamma,
                          temperature=temperature, gradient_equilibrium=gradient_equilibrium)
    return model.train(hf_model.training)
