"""Official TUPE checkpoints (fairseq) as effbert models.

TUPE's published code (guolinke/TUPE: ``fairseq/modules/transformer_sentence_encoder.py``,
``multihead_attention.py``, ``transformer_sentence_encoder_layer.py``, ``fairseq/models/bert/model.py``) lays its
weights out differently from effbert; ``tupe_fairseq_state_dict_to_effbert`` maps them. Its ``BertModel`` keeps the
encoder as ``decoder`` (a ``FairseqLanguageModel``), so the keys read ``decoder.sentence_encoder.*`` and
``decoder.lm_head.*``; any ``...sentence_encoder.`` prefix is accepted.

- ``pos`` has ``max_seq_len + 1`` rows and token ``i`` uses row ``i + 1``: row 0 is reserved for [CLS]. The [CLS]
  scalars are TUPE's ``p_0 . p_0`` (CLS to others, effbert's ``cls_row``) and ``p_1 . p_1`` (others to CLS,
  ``cls_col``) of the LayerNormed (``pos_ln``), projected rows, times ``1/sqrt(2 * head_dim)``; under TUPE-R the
  relative rows ``num_buckets // 2`` (row 0) and ``num_buckets`` (column 0) that TUPE's ``rp_bucket`` assigns them are
  added, since effbert's [CLS] entries replace the relative term. The relative table
  (``relative_attention_bias.weight``, ``[num_buckets + 1, H]``) keeps rows ``0..num_buckets-1``.
- The position projections are TUPE's ``pos_q_linear`` and ``pos_k_linear`` (each ``[hidden, hidden]``, the layout
  of every published TUPE checkpoint). The single ``pos_proj`` (``[2 * hidden, hidden]``, query rows first) of the
  unmerged pull request guolinke/TUPE#20 is read too. TUPE recomputes ``rp_bucket`` in code (the merged code keeps
  it out of the state dict); where a checkpoint stores it (#20), it is checked against T5's buckets.
- ``self_attn.in_proj_weight`` / ``in_proj_bias`` are ``[q; k; v]`` stacked, effbert's fused ``qkv`` layout.
- fairseq's LayerNorm eps is 1e-5 everywhere; the encoder has no token-type embedding (``type_vocab_size=0``).

Only the published setting converts: post-LN layers with the embedding LayerNorm (``--embedding-normalize``, as
TUPE's BERT pretraining uses); a pre-LN checkpoint (``emb_out_layer_norm``) or one without ``emb_layer_norm`` is
refused. The MLM head (``lm_head``) converts; BERT-style classification heads (no pooler) do not. fairseq zeroes
padded tokens' embeddings and builds its padding mask from ``pad`` ids: pass ``attention_mask = input_ids != pad``
and read real tokens only. A state dict missing keys raises ``ValueError`` naming them.

Checkpoint files: fairseq's ``train.py`` pickles its ``args`` (``argparse.Namespace``) and training meters
(``fairseq.meters.AverageMeter`` ...) beside the weights, which ``torch.load(weights_only=True)`` refuses. They are
read with a restricted unpickler instead, which never imports or runs anything outside an allow-list: tensors and
their storages, ``OrderedDict``, ``argparse.Namespace``, torch's dtypes, devices and sizes, a few inert builtins;
names from ``fairseq``, ``fairseq_cli`` and ``numpy`` become inert placeholders (none is imported);
any other global (``os.system``, ``builtins.eval`` ...) is refused with a ``ValueError`` before it can run. Only the
``model`` and ``args`` entries are used.
"""

import _compat_pickle
import argparse
import collections
import os
import pickle
import re

import torch

from ..models import TupeBertConfig, TupeBertForMaskedLM
from ..ops import t5_relative_buckets

__all__ = [
    "from_tupe_fairseq",
    "tupe_fairseq_state_dict_to_effbert",
    "config_from_tupe_fairseq",
    "load_fairseq_checkpoint",
]

FAIRSEQ_LAYER_NORM_EPS = 1e-5
_ACTS = {"gelu": "gelu", "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh", "relu": "relu"}


def _prefix(state):
    keys = [k for k in state if k.endswith("sentence_encoder.embed_tokens.weight")]
    if len(keys) != 1:
        raise ValueError(
            "state_dict must hold one TUPE fairseq encoder (a '...sentence_encoder.embed_tokens.weight' "
            f"key), found {len(keys)}"
        )
    return keys[0][: -len("embed_tokens.weight")]


def _require(state, keys, what):
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"state_dict lacks {what}: missing {missing}")


_LAYER_KEYS = [
    f"self_attn.{n}" for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
] + [
    f"{m}.{n}"
    for m in ("self_attn_layer_norm", "fc1", "fc2", "final_layer_norm")
    for n in ("weight", "bias")
]
_POS_QK = ["pos_q_linear.weight", "pos_q_linear.bias", "pos_k_linear.weight", "pos_k_linear.bias"]
_POS_PROJ = ["pos_proj.weight", "pos_proj.bias"]


def _position_projections(sd, p, h):
    """TUPE's position query and key projections, ``(wq, bq, wk, bk)``, from either layout."""
    if all(p + k in sd for k in _POS_QK):  # guolinke/TUPE as merged and released
        wq, bq, wk, bk = (sd[p + k] for k in _POS_QK)
    elif all(
        p + k in sd for k in _POS_PROJ
    ):  # the unmerged pull request guolinke/TUPE#20: one [2h, h] linear
        w, b = sd[p + "pos_proj.weight"], sd[p + "pos_proj.bias"]
        if tuple(w.shape) != (2 * h, h) or tuple(b.shape) != (2 * h,):
            raise ValueError(
                f"pos_proj must be [2 * hidden, hidden] = [{2 * h}, {h}] with a [{2 * h}] bias, got "
                f"{list(w.shape)} and {list(b.shape)}"
            )
        wq, bq, wk, bk = w[:h], b[:h], w[h:], b[h:]
    else:
        raise ValueError(
            "state_dict holds no TUPE position projections: missing "
            f"{[p + k for k in _POS_QK if p + k not in sd]} (TUPE's layout), nor "
            f"{[p + k for k in _POS_PROJ if p + k not in sd]} (pull request #20's)"
        )
    for name, t, shape in (
        ("pos_q_linear.weight", wq, (h, h)),
        ("pos_q_linear.bias", bq, (h,)),
        ("pos_k_linear.weight", wk, (h, h)),
        ("pos_k_linear.bias", bk, (h,)),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
    return wq, bq, wk, bk


def config_from_tupe_fairseq(
    state_dict,
    *,
    num_attention_heads=None,
    max_distance=128,
    activation_fn="gelu",
    pad_token_id=1,
    dropout=0.1,
    attention_dropout=0.1,
    backend="auto",
):
    """The ``TupeBertConfig`` of a TUPE fairseq state dict. ``num_attention_heads`` is read from the relative table
    under TUPE-R and must be given for TUPE-A. ``max_distance`` is TUPE's ``max_rel_pos`` (128 in its code)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    p = _prefix(state_dict)
    if p + "emb_out_layer_norm.weight" in state_dict:
        raise ValueError(
            "state_dict is a pre-LN TUPE encoder (emb_out_layer_norm); only post-LN converts"
        )
    if p + "emb_layer_norm.weight" not in state_dict:
        raise ValueError(
            "state_dict has no emb_layer_norm (trained without --embedding-normalize); effbert's "
            "encoder always normalises its embeddings"
        )
    _require(
        state_dict,
        [p + k for k in ("pos.weight", "pos_ln.weight", "pos_ln.bias", "emb_layer_norm.bias")],
        "TUPE's position embedding and LayerNorms",
    )
    vocab, hidden = state_dict[p + "embed_tokens.weight"].shape
    layers = len(
        {m.group(1) for k in state_dict if (m := re.match(re.escape(p) + r"layers\.(\d+)\.", k))}
    )
    if layers == 0:
        raise ValueError("state_dict holds no encoder layers")
    _require(
        state_dict,
        [f"{p}layers.{i}.{k}" for i in range(layers) for k in _LAYER_KEYS],
        "encoder layer weights",
    )
    rel = state_dict.get(p + "relative_attention_bias.weight")
    if rel is not None:
        if num_attention_heads is not None and num_attention_heads != rel.shape[1]:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) disagrees with the relative table's "
                f"{rel.shape[1]} heads"
            )
        num_attention_heads = rel.shape[1]
    elif num_attention_heads is None:
        raise ValueError(
            "num_attention_heads must be given for a TUPE-A checkpoint (no relative table)"
        )
    if activation_fn not in _ACTS:
        raise ValueError(f"activation_fn must be one of {sorted(_ACTS)}, got {activation_fn!r}")
    return TupeBertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=state_dict[p + "layers.0.fc1.weight"].shape[0],
        max_position_embeddings=state_dict[p + "pos.weight"].shape[0] - 1,
        type_vocab_size=0,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=attention_dropout,
        layer_norm_eps=FAIRSEQ_LAYER_NORM_EPS,
        position_layer_norm_eps=FAIRSEQ_LAYER_NORM_EPS,
        hidden_act=_ACTS[activation_fn],
        pad_token_id=pad_token_id,
        position_mode="tupe-r" if rel is not None else "tupe-a",
        num_buckets=rel.shape[0] - 1 if rel is not None else 32,
        max_distance=max_distance,
        untie_cls=True,
        backend=backend,
    )


@torch.no_grad()
def tupe_fairseq_state_dict_to_effbert(state_dict, config):
    """A TUPE fairseq state dict as the state dict of ``TupeBertForMaskedLM(config)`` (see the module docstring)."""
    p = _prefix(state_dict)
    sd = state_dict
    h, heads, d = config.hidden_size, config.num_attention_heads, config.head_dim
    out = {
        "bert.embeddings.word_embeddings.weight": sd[p + "embed_tokens.weight"],
        "bert.embeddings.layer_norm.weight": sd[p + "emb_layer_norm.weight"],
        "bert.embeddings.layer_norm.bias": sd[p + "emb_layer_norm.bias"],
    }
    pos = sd[p + "pos.weight"]
    wq, bq, wk, bk = _position_projections(sd, p, h)
    pe = "bert.position_encoder."
    out |= {
        pe + "position_embeddings.weight": pos[1:],
        pe + "layer_norm.weight": sd[p + "pos_ln.weight"],
        pe + "layer_norm.bias": sd[p + "pos_ln.bias"],
        pe + "query.weight": wq,
        pe + "query.bias": bq,
        pe + "key.weight": wk,
        pe + "key.bias": bk,
    }
    # TUPE's [CLS] scalars, worked out in float64 from rows 0 and 1 as its forward does
    rows = torch.nn.functional.layer_norm(
        pos[:2].double(),
        (h,),
        sd[p + "pos_ln.weight"].double(),
        sd[p + "pos_ln.bias"].double(),
        FAIRSEQ_LAYER_NORM_EPS,
    )
    q = (rows @ wq.double().T + bq.double()).view(2, heads, d)  # [row, H, d]
    k = (rows @ wk.double().T + bk.double()).view(2, heads, d)
    scale = (2 * d) ** -0.5
    cls_row = (q[0] * k[0]).sum(-1) * scale  # p_0 . p_0: [CLS] to others
    cls_col = (q[1] * k[1]).sum(-1) * scale  # p_1 . p_1: others to [CLS]
    rel = sd.get(p + "relative_attention_bias.weight")
    if config.position_mode == "tupe-r":
        nb = config.num_buckets
        if rel is None or tuple(rel.shape) != (nb + 1, heads):
            raise ValueError(
                f"relative_attention_bias.weight must be [num_buckets + 1, H] = [{nb + 1}, {heads}]"
            )
        bucket = sd.get(p + "rp_bucket")
        if (
            bucket is not None
        ):  # TUPE stores its bucket table: it must be T5's with [CLS] row and column reserved
            n = bucket.shape[0]
            ours = t5_relative_buckets(n, nb, config.max_distance)
            if not torch.equal(bucket[1:, 1:].long().cpu(), ours[1:, 1:].cpu()):
                raise ValueError(
                    f"rp_bucket disagrees with T5 buckets of max_distance={config.max_distance}; "
                    "pass TUPE's --max-rel-pos as max_distance"
                )
        cls_row = cls_row + rel[nb // 2].double()
        cls_col = cls_col + rel[nb].double()
        out[pe + "rel_table"] = rel[:nb]
    dtype = pos.dtype
    out[pe + "cls_row"], out[pe + "cls_col"] = cls_row.to(dtype), cls_col.to(dtype)
    for i in range(config.num_hidden_layers):
        src, dst = f"{p}layers.{i}.", f"bert.encoder.layers.{i}."
        out |= {
            dst + "attention.qkv.weight": sd[src + "self_attn.in_proj_weight"],
            dst + "attention.qkv.bias": sd[src + "self_attn.in_proj_bias"],
            dst + "attention.out.weight": sd[src + "self_attn.out_proj.weight"],
            dst + "attention.out.bias": sd[src + "self_attn.out_proj.bias"],
            dst + "attention_norm.weight": sd[src + "self_attn_layer_norm.weight"],
            dst + "attention_norm.bias": sd[src + "self_attn_layer_norm.bias"],
            dst + "intermediate.weight": sd[src + "fc1.weight"],
            dst + "intermediate.bias": sd[src + "fc1.bias"],
            dst + "output.weight": sd[src + "fc2.weight"],
            dst + "output.bias": sd[src + "fc2.bias"],
            dst + "output_norm.weight": sd[src + "final_layer_norm.weight"],
            dst + "output_norm.bias": sd[src + "final_layer_norm.bias"],
        }
    head = p[: -len("sentence_encoder.")] + "lm_head."
    if head + "dense.weight" not in sd:
        raise ValueError(f"state_dict holds no MLM head ({head}dense.weight)")
    _require(
        sd,
        [head + k for k in ("dense.bias", "layer_norm.weight", "layer_norm.bias", "bias")],
        "MLM head weights",
    )
    tied = sd.get(head + "weight")
    if tied is not None and not torch.equal(tied, sd[p + "embed_tokens.weight"]):
        raise ValueError(
            "the LM head's weight is not tied to embed_tokens; effbert's MLM head always is"
        )
    out |= {
        "mlm_head.dense.weight": sd[head + "dense.weight"],
        "mlm_head.dense.bias": sd[head + "dense.bias"],
        "mlm_head.layer_norm.weight": sd[head + "layer_norm.weight"],
        "mlm_head.layer_norm.bias": sd[head + "layer_norm.bias"],
        "mlm_head.bias": sd[head + "bias"],
    }
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


class _Inert:
    """What an object of a placeholder module (fairseq's meters, numpy scalars) unpickles as: it keeps the arguments
    and state it was given and does nothing else."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.__dict__.update(pickled_args=args, pickled_kwargs=kwargs, pickled_state=None)
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["pickled_state"] = state

    def __repr__(self):
        return f"<inert {type(self).__module__}.{type(self).__qualname__}>"


_PLACEHOLDER_MODULES = ("fairseq", "fairseq_cli", "numpy")


def _allowed_globals():
    u = torch._utils
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("argparse", "Namespace"): argparse.Namespace,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("_codecs", "encode"): __import__("_codecs").encode,  # how protocol 2 writes bytes
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
    }
    for name in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
    ):
        if hasattr(u, name):
            allowed["torch._utils", name] = getattr(u, name)
    if hasattr(torch._tensor, "_rebuild_from_type_v2"):
        allowed["torch._tensor", "_rebuild_from_type_v2"] = torch._tensor._rebuild_from_type_v2
    allowed |= {("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
    return allowed


class _RefusedGlobal(pickle.UnpicklingError):
    """A checkpoint's pickle names a global outside the allow-list: refused before anything ran."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals (torch hands it storages itself); placeholders for fairseq's own classes."""

    _allowed = None

    def find_class(self, module, name):
        # protocol 2 (torch.save's) writes Python 2 names (__builtin__.set); map them as pickle's own find_class does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        if module.split(".")[0] in _PLACEHOLDER_MODULES:
            cache = self.__dict__.setdefault("_placeholders", {})
            if (module, name) not in cache:
                cache[module, name] = type(
                    name, (_Inert,), {"__module__": module, "__qualname__": name}
                )
            return cache[module, name]
        raise _RefusedGlobal(
            f"refusing to unpickle the global {module}.{name}: only tensors, argparse.Namespace and inert "
            f"placeholders for {', '.join(_PLACEHOLDER_MODULES)} classes load (a checkpoint naming anything else "
            "may run code; nothing was executed)"
        )


class _RestrictedPickleModule:
    """The ``pickle_module`` handed to ``torch.load``: its ``Unpickler`` and ``load`` resolve globals as above."""

    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def load_fairseq_checkpoint(path):
    """A fairseq ``checkpoint*.pt`` as the dict ``torch.save`` wrote, read by the restricted unpickler (see the
    module docstring): fairseq's and numpy's objects come back as inert placeholders, tensors as tensors. Raises
    ``ValueError`` for an unreadable file or one whose pickle names any other global."""
    path = os.fspath(path)
    try:
        return torch.load(
            path, map_location="cpu", pickle_module=_RestrictedPickleModule, weights_only=False
        )
    except _RefusedGlobal as exc:
        raise ValueError(f"refusing the TUPE checkpoint {path!r}: {exc}") from None
    except (
        OSError,
        RuntimeError,
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
    ) as exc:
        raise ValueError(
            f"cannot read the TUPE checkpoint {path!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _read_checkpoint(path):
    ckpt = load_fairseq_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(
            f"{os.fspath(path)!r} is not a fairseq checkpoint (a dict with a 'model' state dict)"
        )
    args = ckpt.get("args")
    if args is None and isinstance(ckpt.get("cfg"), dict):
        args = ckpt["cfg"].get("model")
    opts = (
        vars(args)
        if isinstance(args, argparse.Namespace)
        else (args if isinstance(args, dict) else {})
    )
    state = {k: v for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}
    return state, opts


def from_tupe_fairseq(checkpoint, *, num_attention_heads=None, backend="auto"):
    """An official TUPE checkpoint as ``TupeBertForMaskedLM`` in eval mode.

    ``checkpoint``: the path of a fairseq ``checkpoint*.pt`` as ``train.py`` writes it (its ``args`` give the heads,
    activation and ``max_rel_pos``; read without running its pickles, see ``load_fairseq_checkpoint``) or its
    ``model`` state dict (then ``num_attention_heads`` for TUPE-A). Either key layout converts: TUPE's
    ``pos_q_linear`` / ``pos_k_linear`` or pull request #20's ``pos_proj``. Raises ``ValueError`` naming what does
    not fit: missing keys, wrong shapes, a refused pickle global."""
    opts = {}
    if isinstance(checkpoint, (str, os.PathLike)):
        state, opts = _read_checkpoint(checkpoint)
    elif isinstance(checkpoint, dict):
        state = checkpoint
    else:
        raise TypeError(
            f"checkpoint must be a path or a state dict, got {type(checkpoint).__name__}"
        )
    config = config_from_tupe_fairseq(
        state,
        num_attention_heads=num_attention_heads or opts.get("encoder_attention_heads"),
        max_distance=opts.get("max_rel_pos", 128),
        activation_fn=opts.get("activation_fn", "gelu"),
        dropout=opts.get("dropout", 0.1),
        attention_dropout=opts.get("attention_dropout", 0.1),
        backend=backend,
    )
    target = tupe_fairseq_state_dict_to_effbert(state, config)
    model = TupeBertForMaskedLM(config)
    first = target["bert.embeddings.word_embeddings.weight"]
    model.to(dtype=first.dtype)
    missing, unexpected = model.load_state_dict(target, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the TUPE weights do not fill the effbert model: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return model.eval()
