"""Hugging Face BERT interoperability (transformers and safetensors, installed with effbert).

- ``from_hf_bert(model_or_path)``: a pretrained HF BERT (a model object or a local folder holding ``config.json``
  and ``model.safetensors``) as an effbert model in ``position_mode="absolute"``, same outputs on real tokens.
- ``token_classifier_from_hf_bert(model_or_path, num_labels)``: the same encoder as a
  ``TupeBertForTokenClassification`` with a classifier per layer, for SENTEE / TOKEE early exit (Li et al., ACL 2021).
- ``patch_bert_attention(hf_model)``: runs the self-attention of every layer of an HF BERT through
  ``effbert.tupe_attention``, registered as the ``"effbert"`` implementation of transformers'
  ``AttentionInterface`` (the modules and state dict, and so ``save_pretrained``, are unchanged).
- ``multi_exit_bert(hf_model, num_labels)``: an HF BERT's embeddings and layers (shared, not copied) with an
  off-ramp after every layer, for early-exit fine-tuning (RomeBERT / PABEE / DeeBERT losses) and batched
  early exit.
"""

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..models import (
    TupeBertConfig,
    TupeBertForMaskedLM,
    TupeBertForSequenceClassification,
    TupeBertForTokenClassification,
    TupeBertModel,
)
from ..models.multi_exit import MultiExitMixin, check_exit_loss_settings
from ..models.tupe_bert import (
    MultiExitSequenceClassifierOutput,
    _check_ids,
    _values_in_range,
    check_bert_inputs,
)
from ..nn import BertLayerAdapter, ExitHead, MultiExitEncoder
from ..ops import tupe_attention
from ..ops import BACKENDS

__all__ = [
    "from_hf_bert",
    "token_classifier_from_hf_bert",
    "patch_bert_attention",
    "effbert_attention_forward",
    "effbert_mask",
    "ATTN_IMPLEMENTATION",
    "hf_state_dict_to_effbert",
    "config_from_hf",
    "multi_exit_bert",
    "MultiExitBert",
]

_INSTALL_HINT = (
    "transformers is needed for effbert.integrations.hf: pip install transformers safetensors "
    "(both come with effbert: pip install -e . in its checkout)"
)
# HF activation names -> ours (the tanh approximations are one function under several names)
_ACTS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


def require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return transformers


def config_from_hf(hf_config, *, backend="auto"):
    """A ``TupeBertConfig`` (``position_mode="absolute"``) with the sizes of an HF ``BertConfig``."""
    if getattr(hf_config, "model_type", None) != "bert":
        raise ValueError(
            f"hf_config must be a BERT config (model_type 'bert'), got "
            f"{getattr(hf_config, 'model_type', None)!r}"
        )
    if getattr(hf_config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise ValueError(
            "only absolute position embeddings convert, got position_embedding_type "
            f"{hf_config.position_embedding_type!r}"
        )
    if getattr(hf_config, "is_decoder", False):
        raise ValueError(
            "a decoder (causal) BERT does not convert: effbert's encoder attends both ways"
        )
    act = hf_config.hidden_act
    if not isinstance(act, str) or act not in _ACTS:
        raise ValueError(
            f"hidden_act {act!r} has no effbert equivalent (supported: {sorted(_ACTS)})"
        )
    return TupeBertConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        hidden_dropout_prob=float(hf_config.hidden_dropout_prob),
        attention_probs_dropout_prob=float(hf_config.attention_probs_dropout_prob),
        layer_norm_eps=float(hf_config.layer_norm_eps),
        hidden_act=_ACTS[act],
        initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
        position_mode="absolute",
        num_labels=int(getattr(hf_config, "num_labels", 2)),
        backend=backend,
    )


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
        key = raw_key[len("bert.") :] if raw_key.startswith("bert.") else raw_key
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
        mlm = {
            "cls.predictions.transform.dense.weight": "mlm_head.dense.weight",
            "cls.predictions.transform.dense.bias": "mlm_head.dense.bias",
            "cls.predictions.transform.LayerNorm.weight": "mlm_head.layer_norm.weight",
            "cls.predictions.transform.LayerNorm.bias": "mlm_head.layer_norm.bias",
            "cls.predictions.bias": "mlm_head.bias",
            "cls.predictions.decoder.bias": "mlm_head.bias",
            "cls.predictions.decoder.weight": "mlm_head.decoder.weight",
        }
        if key in mlm:
            head[mlm[key]] = value
            continue
        raise ValueError(
            f"state dict key {raw_key!r} is not part of a BERT encoder, its pooler, an MLM head or a "
            "sequence classifier"
        )
    for (index, kind), parts in qkv.items():
        missing = sorted({"query", "key", "value"} - set(parts))
        if missing:
            raise ValueError(f"layer {index} lacks attention.self.{missing[0]}.{kind}")
        # our qkv Linear's outputs are [3, H, D]: q rows, then k, then v, each head-major like HF's
        encoder[f"encoder.layers.{index}.attention.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    return encoder, head


def _load_path(path):
    transformers = require_transformers()
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"model_or_path must be an HF BERT model or a local folder, got {str(path)!r} "
            "(not a folder)"
        )
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
            raise ValueError(
                "a sequence classifier needs the pooler weights, which the state dict lacks"
            )
        model = TupeBertForSequenceClassification(config)
        target = {"bert." + k: v for k, v in encoder.items()} | head
    elif any(k.startswith("mlm_head.") for k in head):
        decoder = head.pop("mlm_head.decoder.weight", None)
        word = encoder.get("embeddings.word_embeddings.weight")
        if decoder is not None and word is not None and not torch.equal(decoder, word):
            raise ValueError(
                "the MLM decoder is not tied to the word embeddings; effbert's MLM head always is"
            )
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
        raise ValueError(
            f"the HF weights do not fill the effbert model: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return model.eval()


def _hf_weights(model_or_path):
    """``(hf_config, state_dict)`` of an HF BERT model object or a local folder."""
    if isinstance(model_or_path, (str, os.PathLike)):
        return _load_path(model_or_path)
    if isinstance(model_or_path, nn.Module) and hasattr(model_or_path, "config"):
        require_transformers()
        return model_or_path.config, model_or_path.state_dict()
    raise TypeError(
        f"model_or_path must be an HF BERT model or a local folder path, got "
        f"{type(model_or_path).__name__}"
    )


def token_classifier_from_hf_bert(
    model_or_path, num_labels=None, *, multi_exit=True, backend="auto"
):
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
            raise ValueError(
                f"num_labels ({num_labels}) must match the HF classifier's {found} classes, or be None"
            )
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
    target |= {prefix + k[len("classifier.") :]: v for k, v in classifier.items()}
    first = next(iter(target.values()))
    model.to(device=first.device, dtype=first.dtype)
    missing, unexpected = model.load_state_dict(target, strict=False)
    fresh = {k for k in model.state_dict() if k.startswith(("exits.", "classifier."))}
    if set(missing) - fresh or unexpected:
        raise ValueError(
            f"the HF weights do not fill the effbert encoder: missing {sorted(set(missing) - fresh)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return model.eval()


# ---- effbert's attention inside an HF BERT, through transformers' AttentionInterface ----

ATTN_IMPLEMENTATION = "effbert"


class _Backend(str):
    """The backend a patched layer runs (a ``str``): its class lives here, so unpickling a patched
    model imports this module, which registers the ``"effbert"`` attention implementation."""


def _key_padding_mask(mask, batch, seq_len):
    """A mask as transformers hands it to a layer as effbert's key padding mask ``[B, N]`` bool
    (True = real token) or None: ``None``; the ``[B, N]`` mask itself (``effbert_mask``'s output, as
    flash attention's); or a prepared ``[B, 1, N or 1, N]`` mask (bool, True = attend, or additive
    float) that repeats one key padding row for every query. Anything else (a causal or per-query
    pattern, a general additive bias) is refused, never changed."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        valid = mask
    elif mask.is_floating_point():
        valid = mask == 0
        if not torch.compiler.is_compiling() and not bool(((mask == 0) | (mask <= -1e4)).all()):
            raise ValueError(
                "attention_mask holds an additive bias other than 0 / large negative; "
                "effbert's fused attention takes key padding masks only"
            )
    else:
        valid = mask != 0
    if valid.dim() == 2:
        if tuple(valid.shape) != (batch, seq_len):
            raise ValueError(
                f"attention_mask must be [B, N] = [{batch}, {seq_len}], got {list(valid.shape)}"
            )
        return valid
    if (
        valid.dim() != 4
        or valid.shape[0] not in (1, batch)
        or valid.shape[-1] != seq_len
        or valid.shape[-2] not in (1, seq_len)
    ):
        raise ValueError(
            f"attention_mask must be [B, N] or [B, 1, N or 1, N] with B = {batch}, "
            f"N = {seq_len}, got {list(mask.shape)}"
        )
    if not torch.compiler.is_compiling() and not bool((valid == valid[:, :1, :1, :]).all()):
        raise ValueError(
            "attention_mask differs between queries or heads (a causal or custom "
            "mask); effbert's fused attention takes key padding masks only"
        )
    return valid[:, 0, 0, :].expand(batch, seq_len).contiguous()


def effbert_mask(
    batch_size,
    q_length,
    kv_length,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask=None,
    **kwargs,
):
    """transformers' ``AttentionMaskInterface`` function of the ``"effbert"`` implementation: the
    key padding mask ``attention_mask [B, K]`` bool (True = real token), built once per forward for
    every layer, or None when no key is padding. Only BERT's plain bidirectional pattern is served:
    a causal, packed-sequence or overlaid ``mask_function`` raises ``ValueError`` (the patch refuses
    decoders beforehand)."""
    from transformers.masking_utils import bidirectional_mask_function

    if mask_function is not bidirectional_mask_function or q_offset or kv_offset:
        raise ValueError(
            "effbert's patched BERT attention takes key padding masks only "
            "(bidirectional, no packed sequences through position_ids, no cache "
            "offsets)"
        )
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None  # no padding: as transformers' sdpa mask skips it
    return mask


def effbert_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """transformers' ``AttentionInterface`` function of the ``"effbert"`` implementation: ``query``,
    ``key``, ``value`` ``[B, H, N, D]`` (transformers' layout) -> ``(output [B, N, H, D], None)``
    through ``effbert.tupe_attention`` (absolute positions: plain softmax attention, no positional
    term) on the key padding mask, ``scaling`` the logit scale, ``dropout`` the attention dropout
    (transformers passes 0 in eval mode). Outputs at padded queries are 0 (eager BERT gives them an
    average over the real tokens); real tokens match.

    ``output_attentions`` (the call's keyword or ``module.config``'s): that call runs transformers'
    own ``eager_attention_forward`` and returns ``(output, probabilities [B, H, N, N])``, as
    transformers' sdpa path does for eager. The backend is the layer's ``effbert_backend`` (set by
    ``patch_bert_attention``; ``"auto"``). Raises ``ValueError`` for cross-attention, a causal layer
    or a mask that is not a key padding mask."""
    if (
        kwargs.get("encoder_hidden_states") is not None
        or getattr(module, "is_causal", False)
        or key.shape[2] != query.shape[2]
    ):
        raise ValueError(
            "effbert's patched BERT attention is encoder self-attention only "
            "(no cache, no cross attention, not causal)"
        )
    b, _, n, _ = query.shape
    mask = _key_padding_mask(attention_mask, b, n)
    wants = kwargs.get("output_attentions")
    if wants is None:
        wants = getattr(getattr(module, "config", None), "output_attentions", False)
    if wants:
        from transformers.models.bert.modeling_bert import eager_attention_forward

        additive = None
        if (
            mask is not None
        ):  # HF's eager form of a padding mask: 0 to attend, the dtype's lowest to not
            additive = torch.zeros((b, 1, 1, n), dtype=query.dtype, device=query.device)
            additive = additive.masked_fill(~mask[:, None, None, :], torch.finfo(query.dtype).min)
        return eager_attention_forward(
            module, query, key, value, additive, scaling=scaling, dropout=dropout
        )
    # [B, H, N, D] -> [B, N, H, D]: the projections' own layout, no copy
    backend = str(getattr(module, "effbert_backend", "auto"))
    out = tupe_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attention_mask=mask,
        scale=scaling,
        dropout_p=dropout,
        backend=backend,
    )
    return out, None


def _register():
    """Registers the ``"effbert"`` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, effbert_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, effbert_mask)


# at import: unpickling a patched model imports this module (``_Backend``) before its first forward
try:
    _register()
except ImportError:  # transformers missing: patch_bert_attention says how to install it
    pass


def patch_bert_attention(hf_model, *, backend="auto"):
    """Run the self-attention of every layer of an HF BERT (``BertModel``, any ``BertFor...``, or a
    module holding one) through ``effbert.tupe_attention``, in place; returns ``hf_model``.

    Registers ``effbert_attention_forward`` and ``effbert_mask`` with transformers'
    ``AttentionInterface`` and ``AttentionMaskInterface`` as the ``"effbert"`` implementation and
    sets ``config._attn_implementation`` to it (as ModernBERT and every transformers 5 model
    dispatch attention); the modules and weights are untouched, so ``save_pretrained`` writes the
    same files (the saved config does not carry the implementation) and the model pickles.
    ``backend``: effbert's backend for these layers (``"auto"``, or one of ``effbert.ops``
    backends); patching again changes only the backend. ``output_attentions=True`` on a call gives
    that call's attention probabilities from transformers' eager attention (transformers refuses
    ``config.output_attentions = True`` on a model whose implementation is not eager; a config that
    already has it is honoured). Raises ``TypeError`` for a non-module, ``ValueError`` for an
    unknown backend, a decoder BERT or a module without BERT self-attention. transformers 5.17 and
    later (effbert's range) have both interfaces."""
    require_transformers()
    from transformers.models.bert.modeling_bert import BertSelfAttention

    if not isinstance(hf_model, nn.Module):
        raise TypeError(f"hf_model must be an HF BERT model, got {type(hf_model).__name__}")
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if getattr(getattr(hf_model, "config", None), "is_decoder", False):
        raise ValueError(
            "hf_model is a decoder (causal) BERT; effbert's patched attention is bidirectional"
        )
    layers = [m for m in hf_model.modules() if isinstance(m, BertSelfAttention)]
    if not layers:
        raise ValueError(
            f"hf_model ({type(hf_model).__name__}) has no BERT self-attention to patch"
        )
    if any(getattr(m.config, "is_decoder", False) for m in layers):
        raise ValueError(
            "hf_model holds a decoder (causal) BERT; effbert's patched attention is bidirectional"
        )
    _register()
    for module in layers:
        module.effbert_backend = _Backend(backend)
        module.config._attn_implementation = ATTN_IMPLEMENTATION  # the model's own config object
    return hf_model


# ---- multi-exit fine-tuning of an HF BERT ----

EXIT_POOLERS = ("copy", "shared")


class MultiExitBert(MultiExitMixin, nn.Module):
    """An HF BERT with an off-ramp after every layer; build it with ``multi_exit_bert``.

    ``embeddings`` is the HF model's ``BertEmbeddings`` and ``encoder.layers[i].layer`` its ``encoder.layer[i]``
    (the same modules: training this trains the HF model, and ``hf_model.save_pretrained`` saves the encoder);
    ``encoder.heads[i]`` is an ``ExitHead``. Inputs follow HF's conventions (``attention_mask`` 1 = real token).

    - ``forward(input_ids, attention_mask=None, token_type_ids=None, labels=None)`` ->
      ``MultiExitSequenceClassifierOutput(loss, logits [B, C] (the last exit's), exit_logits
      [L, B, C])``. With integer ``labels [B]`` the loss (``effbert.models.multi_exit.exit_loss``,
      settings from the constructor) is RomeBERT's self-distillation loss (``loss="romebert"``,
      ``gamma``, ``temperature``), PABEE's layer-weighted cross-entropy (``loss="pabee"``) or
      DeeBERT's loss of the current stage (``loss="deebert"``, see ``set_deebert_stage``). A
      one-output head (``num_labels=1``) is a regression head: float ``labels``, mean squared error
      as HF does for ``num_labels == 1`` (PABEE's layer-weighted MSE for "romebert" and "pabee",
      DeeBERT's per-stage MSE for "deebert"). ``gradient_equilibrium=True``: RomeBERT's ``--ge`` on
      the exits' logits.
    - ``early_exit(input_ids, attention_mask=None, token_type_ids=None, *, criterion, threshold=None,
      patience=None)`` -> ``(logits [B, C], exit_layer [B] int64, 1-based)``: batched early exit, each sample
      exactly what it gets alone. ``threshold=0`` (entropy) / ``patience=0``: full depth.
    """

    def __init__(
        self,
        embeddings,
        layers,
        heads,
        *,
        hf_config,
        backend="auto",
        loss="romebert",
        gamma=0.9,
        temperature=3.0,
        gradient_equilibrium=False,
    ):
        super().__init__()
        self.embeddings = embeddings
        self.encoder = MultiExitEncoder([BertLayerAdapter(layer) for layer in layers], heads)
        self.hf_config = hf_config
        self.backend = backend
        check_exit_loss_settings(loss, gamma, temperature, bool(gradient_equilibrium))
        self.loss_type, self.gamma, self.temperature = loss, gamma, temperature
        self.gradient_equilibrium = bool(gradient_equilibrium)

    @property
    def depth(self):
        return self.encoder.depth

    @property
    def num_labels(self):
        return self.encoder.heads[-1].classifier.out_features

    def exit_loss_settings(self):
        return dict(
            loss=self.loss_type,
            gamma=self.gamma,
            temperature=self.temperature,
            gradient_equilibrium=self.gradient_equilibrium,
            backend=self.backend,
        )

    def deebert_parts(self):
        return [self.embeddings, self.encoder.layers], self.encoder.heads

    @property
    def stage(self):
        """DeeBERT's current stage (``deebert_stage``)."""
        return self.deebert_stage

    def set_stage(self, stage):
        """``set_deebert_stage`` under its earlier name."""
        return self.set_deebert_stage(stage)

    def _inputs(self, input_ids, attention_mask, token_type_ids):
        """Checks HF-style inputs; returns ``(hidden [B, N, Dm], attention mask [B, N] bool, True = real token, or
        None)``."""
        token_type_ids, real = check_bert_inputs(
            self.hf_config, input_ids, attention_mask, token_type_ids
        )
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
                raise TypeError(
                    f"labels must be float targets for a one-output (regression) head, got "
                    f"{str(labels.dtype).replace('torch.', '')}"
                )
            return
        _check_ids("labels", labels, None)
        _values_in_range("labels", labels, 0, self.num_labels)

    def compute_loss(self, exit_logits, labels):
        """The training loss over every exit's logits ``[L, B, C]`` (``compute_exit_loss``)."""
        return self.compute_exit_loss(exit_logits, labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        hidden, real = self._inputs(input_ids, attention_mask, token_type_ids)
        if labels is not None:
            self._check_labels(labels, input_ids.shape[0], input_ids.device)
        exit_logits = self.encoder(hidden, real)
        loss = self.compute_loss(exit_logits, labels) if labels is not None else None
        return MultiExitSequenceClassifierOutput(
            loss=loss, logits=exit_logits[-1], exit_logits=exit_logits
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
    ):
        """Batched early-exit inference (``MultiExitEncoder.early_exit``): ``(logits [B, C], exit_layer [B])``.
        Call in eval mode."""
        hidden, real = self._inputs(input_ids, attention_mask, token_type_ids)
        return self.encoder.early_exit(
            hidden,
            real,
            criterion=criterion,
            threshold=threshold,
            patience=patience,
            backend=self.backend,
        )


def multi_exit_bert(
    hf_model,
    num_labels=None,
    *,
    dropout=None,
    backend="auto",
    loss="romebert",
    gamma=0.9,
    temperature=3.0,
    gradient_equilibrium=False,
    exit_pooler="copy",
):
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
    values), ``"pabee"`` or ``"deebert"`` (two stages, ``MultiExitBert.set_deebert_stage``).
    ``gradient_equilibrium``: RomeBERT's ``--ge``. ``backend``: for the exit decisions and the loss.
    The result is in the model's train/eval mode, device and dtype. Errors name the argument
    (``ValueError``/``TypeError``).
    """
    require_transformers()
    from transformers.models.bert.modeling_bert import BertForSequenceClassification, BertModel

    if isinstance(hf_model, BertForSequenceClassification):
        bert, classifier = hf_model.bert, hf_model.classifier
    elif isinstance(hf_model, BertModel):
        bert, classifier = hf_model, None
    else:
        raise TypeError(
            f"hf_model must be a transformers BertModel or BertForSequenceClassification, got "
            f"{type(hf_model).__name__}"
        )
    cfg = hf_model.config
    if getattr(cfg, "is_decoder", False):
        raise ValueError(
            "hf_model is a decoder (causal) BERT; off-ramps need a bidirectional encoder"
        )
    if num_labels is None:
        num_labels = classifier.out_features if classifier is not None else int(cfg.num_labels)
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be an int >= 1, got {num_labels!r}")
    if classifier is not None and classifier.out_features != num_labels:
        raise ValueError(
            f"num_labels ({num_labels}) differs from hf_model's classifier ({classifier.out_features} "
            "outputs); wrap its .bert for a new label set"
        )
    if dropout is None:
        dropout = getattr(cfg, "classifier_dropout", None)
        dropout = cfg.hidden_dropout_prob if dropout is None else dropout
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not 0.0 <= dropout < 1.0
    ):
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if exit_pooler not in EXIT_POOLERS:
        raise ValueError(f"exit_pooler must be one of {EXIT_POOLERS}, got {exit_pooler!r}")
    if not isinstance(gradient_equilibrium, bool):
        raise TypeError(
            f"gradient_equilibrium must be a bool, got {type(gradient_equilibrium).__name__}"
        )
    check_exit_loss_settings(loss, gamma, temperature, gradient_equilibrium)
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
    model = MultiExitBert(
        bert.embeddings,
        layers,
        heads,
        hf_config=cfg,
        backend=backend,
        loss=loss,
        gamma=gamma,
        temperature=temperature,
        gradient_equilibrium=gradient_equilibrium,
    )
    return model.train(hf_model.training)
