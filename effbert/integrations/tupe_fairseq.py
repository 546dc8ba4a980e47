"""Official TUPE checkpoints (fairseq) as effbert models.

TUPE's published code (guolinke/TUPE: ``fairseq/modules/transformer_sentence_encoder.py``,
``multihead_attention.py``, ``transformer_sentence_encoder_layer.py``, ``fairseq/models/bert/model.py``) lays its
weights out differently from effbert; ``tupe_fairseq_state_dict_to_effbert`` maps them:

- ``pos`` has ``max_seq_len + 1`` rows and token ``i`` uses row ``i + 1``: row 0 is reserved for [CLS]. The [CLS]
  scalars are TUPE's ``p_0 . p_0`` (CLS to others, effbert's ``cls_row``) and ``p_1 . p_1`` (others to CLS,
  ``cls_col``) of the LayerNormed, projected rows, times ``1/sqrt(2 * head_dim)``; under TUPE-R the relative rows
  ``num_buckets // 2`` (row 0) and ``num_buckets`` (column 0) that TUPE's ``rp_bucket`` assigns them are added, since
  effbert's [CLS] entries replace the relative term. The relative table keeps rows ``0..num_buckets-1``.
- ``pos_proj`` (``[2 * hidden, hidden]``) splits into the position query and key projections.
- ``self_attn.in_proj_weight`` / ``in_proj_bias`` are ``[q; k; v]`` stacked, effbert's fused ``qkv`` layout.
- fairseq's LayerNorm eps is 1e-5 everywhere; the encoder has no token-type embedding (``type_vocab_size=0``).

Only the published setting converts: post-LN layers with the embedding LayerNorm (``--embedding-normalize``, as
TUPE's BERT pretraining uses); a pre-LN checkpoint (``emb_out_layer_norm``) or one without ``emb_layer_norm`` is
refused. The MLM head (``lm_head``) converts; BERT-style classification heads (no pooler) do not. fairseq zeroes
padded tokens' embeddings and builds its padding mask from ``pad`` ids: pass ``attention_mask = input_ids != pad``
and read real tokens only.
"""

import argparse
import os
import pickle
import re

import torch

from ..models import TupeBertConfig, TupeBertForMaskedLM
from ..ops import t5_relative_buckets

__all__ = ["from_tupe_fairseq", "tupe_fairseq_state_dict_to_effbert", "config_from_tupe_fairseq"]

FAIRSEQ_LAYER_NORM_EPS = 1e-5
_ACTS = {"gelu": "gelu", "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh", "relu": "relu"}


def _prefix(state):
    keys = [k for k in state if k.endswith("sentence_encoder.embed_tokens.weight")]
    if len(keys) != 1:
        raise ValueError("state_dict must hold one TUPE fairseq encoder (a '...sentence_encoder.embed_tokens.weight' "
                         f"key), found {len(keys)}")
    return keys[0][: -len("embed_tokens.weight")]


def config_from_tupe_fairseq(state_dict, *, num_attention_heads=None, max_distance=128, activation_fn="gelu",
                             pad_token_id=1, dropout=0.1, attention_dropout=0.1, backend="auto"):
    """The ``TupeBertConfig`` of a TUPE fairseq state dict. ``num_attention_heads`` is read from the relative table
    under TUPE-R and must be given for TUPE-A. ``max_distance`` is TUPE's ``max_rel_pos`` (128 in its code)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    p = _prefix(state_dict)
    if p + "emb_out_layer_norm.weight" in state_dict:
        raise ValueError("state_dict is a pre-LN TUPE encoder (emb_out_layer_norm); only post-LN converts")
    if p + "emb_layer_norm.weight" not in state_dict:
        raise ValueError("state_dict has no emb_layer_norm (trained without --embedding-normalize); effbert's "
                         "encoder always normalises its embeddings")
    vocab, hidden = state_dict[p + "embed_tokens.weight"].shape
    layers = len({m.group(1) for k in state_dict if (m := re.match(re.escape(p) + r"layers\.(\d+)\.", k))})
    if layers == 0:
        raise ValueError("state_dict holds no encoder layers")
    rel = state_dict.get(p + "relative_attention_bias.weight")
    if rel is not None:
        if num_attention_heads is not None and num_attention_heads != rel.shape[1]:
            raise ValueError(f"num_attention_heads ({num_attention_heads}) disagrees with the relative table's "
                             f"{rel.shape[1]} heads")
        num_attention_heads = rel.shape[1]
    elif num_attention_heads is None:
        raise ValueError("num_attention_heads must be given for a TUPE-A checkpoint (no relative table)")
    if activation_fn not in _ACTS:
        raise ValueError(f"activation_fn must be one of {sorted(_ACTS)}, got {activation_fn!r}")
    return TupeBertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=num_attention_heads,
        intermediate_size=state_dict[p + "layers.0.fc1.weight"].shape[0],
        max_position_embeddings=state_dict[p + "pos.weight"].shape[0] - 1, type_vocab_size=0,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=attention_dropout,
        layer_norm_eps=FAIRSEQ_LAYER_NORM_EPS, position_layer_norm_eps=FAIRSEQ_LAYER_NORM_EPS,
        hidden_act=_ACTS[activation_fn], pad_token_id=pad_token_id,
        position_mode="tupe-r" if rel is not None else "tupe-a",
        num_buckets=rel.shape[0] - 1 if rel is not None else 32, max_distance=max_distance, untie_cls=True,
        backend=backend)


@torch.no_grad()
def tupe_fairseq_state_dict_to_effbert(state_dict, config):
    """A TUPE fairseq state dict as the state dict of ``TupeBertForMaskedLM(config)`` (see the module docstring)."""
    p = _prefix(state_dict)
    sd = state_dict
    h, heads, d = config.hidden_size, config.num_attention_heads, config.head_dim
    out = {"bert.embeddings.word_embeddings.weight": sd[p + "embed_tokens.weight"],
           "bert.embeddings.layer_norm.weight": sd[p + "emb_layer_norm.weight"],
           "bert.embeddings.layer_norm.bias": sd[p + "emb_layer_norm.bias"]}
    pos = sd[p + "pos.weight"]
    proj_w, proj_b = sd[p + "pos_proj.weight"], sd[p + "pos_proj.bias"]
    if tuple(proj_w.shape) != (2 * h, h):
        raise ValueError(f"pos_proj.weight must be [2 * hidden, hidden] = [{2 * h}, {h}], got {list(proj_w.shape)}")
    pe = "bert.position_encoder."
    out |= {pe + "position_embeddings.weight": pos[1:], pe + "layer_norm.weight": sd[p + "pos_ln.weight"],
            pe + "layer_norm.bias": sd[p + "pos_ln.bias"], pe + "query.weight": proj_w[:h],
            pe + "query.bias": proj_b[:h], pe + "key.weight": proj_w[h:], pe + "key.bias": proj_b[h:]}
    # TUPE's [CLS] scalars, worked out in float64 from rows 0 and 1 as its forward does
    rows = torch.nn.functional.layer_norm(pos[:2].double(), (h,), sd[p + "pos_ln.weight"].double(),
                                          sd[p + "pos_ln.bias"].double(), FAIRSEQ_LAYER_NORM_EPS)
    proj = (rows @ proj_w.double().T + proj_b.double()).view(2, 2, heads, d)  # [row, q/k, H, d]
    scale = (2 * d) ** -0.5
    cls_row = (proj[0, 0] * proj[0, 1]).sum(-1) * scale  # p_0 . p_0: [CLS] to others
    cls_col = (proj[1, 0] * proj[1, 1]).sum(-1) * scale  # p_1 . p_1: others to [CLS]
    rel = sd.get(p + "relative_attention_bias.weight")
    if config.position_mode == "tupe-r":
        nb = config.num_buckets
        if rel is None or tuple(rel.shape) != (nb + 1, heads):
            raise ValueError(f"relative_attention_bias.weight must be [num_buckets + 1, H] = [{nb + 1}, {heads}]")
        bucket = sd.get(p + "rp_bucket")
        if bucket is not None:  # TUPE stores its bucket table: it must be T5's with [CLS] row and column reserved
            n = bucket.shape[0]
            ours = t5_relative_buckets(n, nb, config.max_distance)
            if not torch.equal(bucket[1:, 1:].long().cpu(), ours[1:, 1:].cpu()):
                raise ValueError(f"rp_bucket disagrees with T5 buckets of max_distance={config.max_distance}; "
                                 "pass TUPE's --max-rel-pos as max_distance")
        cls_row = cls_row + rel[nb // 2].double()
        cls_col = cls_col + rel[nb].double()
        out[pe + "rel_table"] = rel[:nb]
    dtype = pos.dtype
    out[pe + "cls_row"], out[pe + "cls_col"] = cls_row.to(dtype), cls_col.to(dtype)
    for i in range(config.num_hidden_layers):
        src, dst = f"{p}layers.{i}.", f"bert.encoder.layers.{i}."
        out |= {dst + "attention.qkv.weight": sd[src + "self_attn.in_proj_weight"],
                dst + "attention.qkv.bias": sd[src + "self_attn.in_proj_bias"],
                dst + "attention.out.weight": sd[src + "self_attn.out_proj.weight"],
                dst + "attention.out.bias": sd[src + "self_attn.out_proj.bias"],
                dst + "attention_norm.weight": sd[src + "self_attn_layer_norm.weight"],
                dst + "attention_norm.bias": sd[src + "self_attn_layer_norm.bias"],
                dst + "intermediate.weight": sd[src + "fc1.weight"], dst + "intermediate.bias": sd[src + "fc1.bias"],
                dst + "output.weight": sd[src + "fc2.weight"], dst + "output.bias": sd[src + "fc2.bias"],
                dst + "output_norm.weight": sd[src + "final_layer_norm.weight"],
                dst + "output_norm.bias": sd[src + "final_layer_norm.bias"]}
    head = p[: -len("sentence_encoder.")] + "lm_head."
    if head + "dense.weight" not in sd:
        raise ValueError(f"state_dict holds no MLM head ({head}dense.weight)")
    tied = sd.get(head + "weight")
    if tied is not None and not torch.equal(tied, sd[p + "embed_tokens.weight"]):
        raise ValueError("the LM head's weight is not tied to embed_tokens; effbert's MLM head always is")
    out |= {"mlm_head.dense.weight": sd[head + "dense.weight"], "mlm_head.dense.bias": sd[head + "dense.bias"],
            "mlm_head.layer_norm.weight": sd[head + "layer_norm.weight"],
            "mlm_head.layer_norm.bias": sd[head + "layer_norm.bias"], "mlm_head.bias": sd[head + "bias"]}
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _read_checkpoint(path):
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"cannot read the TUPE checkpoint {path!r}: {exc}") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path!r} is not a fairseq checkpoint (a dict with a 'model' state dict)")
    args = ckpt.get("args")
    if args is None and isinstance(ckpt.get("cfg"), dict):
        args = ckpt["cfg"].get("model")
    opts = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
    return ckpt["model"], opts


def from_tupe_fairseq(checkpoint, *, num_attention_heads=None, backend="auto"):
    """An official TUPE checkpoint as ``TupeBertForMaskedLM`` in eval mode.

    ``checkpoint``: the path of a fairseq ``checkpoint*.pt`` (its ``args`` give the heads, activation and
    ``max_rel_pos``) or its ``model`` state dict (then ``num_attention_heads`` for TUPE-A). Raises ``ValueError``
    naming what does not fit."""
    opts = {}
    if isinstance(checkpoint, (str, os.PathLike)):
        state, opts = _read_checkpoint(checkpoint)
    elif isinstance(checkpoint, dict):
        state = checkpoint
    else:
        raise TypeError(f"checkpoint must be a path or a state dict, got {type(checkpoint).__name__}")
    config = config_from_tupe_fairseq(
        state, num_attention_heads=num_attention_heads or opts.get("encoder_attention_heads"),
        max_distance=opts.get("max_rel_pos", 128), activation_fn=opts.get("activation_fn", "gelu"),
        dropout=opts.get("dropout", 0.1), attention_dropout=opts.get("attention_dropout", 0.1), backend=backend)
    target = tupe_fairseq_state_dict_to_effbert(state, config)
    model = TupeBertForMaskedLM(config)
    first = target["bert.embeddings.word_embeddings.weight"]
    model.to(dtype=first.dtype)
    missing, unexpected = model.load_state_dict(target, strict=False)
    if missing or unexpected:
        raise ValueError(f"the TUPE weights do not fill the effbert model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return model.eval()
