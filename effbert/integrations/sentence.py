"""Sentence embeddings on ``from_hf_bert`` models (padding skipped), and a sentence-transformers
module around them.

- ``mean_pooling(hidden_states, attention_mask)`` / ``cls_pooling(hidden_states)``: the two poolings
  of Sentence-BERT (Reimers and Gurevych, EMNLP 2019; ``sentence_transformers.models.Pooling``,
  modes ``mean`` and ``cls``): the mean of the real tokens' last hidden states, or the [CLS]
  token's.
- ``SentenceEncoder.from_pretrained(folder)``: a BERT checkpoint folder (a sentence-transformers
  folder such as all-MiniLM-L6-v2's, or a plain transformers one) as ``from_hf_bert``'s
  ``TupeBertModel``, its tokenizer and its pooling; ``encode(texts, batch_size=32,
  normalize_embeddings=False, convert_to_numpy=False)`` embeds raw text as sentence-transformers'
  ``SentenceTransformer.encode`` does.
- ``EffbertTransformer``: a sentence-transformers input module
  (``sentence_transformers.base.modules.InputModule``) running effbert's model where
  ``sentence_transformers.models.Transformer`` runs transformers'; it saves the weights in
  transformers' BERT format, so a saved folder is an ordinary checkpoint too.
  ``sentence_transformer_from_hf_bert(folder)`` builds the whole ``SentenceTransformer`` (this
  module, the folder's pooling and normalisation). Loading a saved folder imports effbert's class,
  which sentence-transformers 6 allows only with ``SentenceTransformer(folder,
  trust_remote_code=True)`` (the class is effbert's installed code, nothing is downloaded).

sentence-transformers is optional (``pip install effbert[sentence]``): only ``EffbertTransformer``
and ``sentence_transformer_from_hf_bert`` need it.
"""

import json
import re
from pathlib import Path

import torch
from torch import nn

from .hf import _LAYER_NAMES, _TOP_NAMES, from_hf_bert, require_transformers

__all__ = [
    "mean_pooling",
    "cls_pooling",
    "POOLINGS",
    "SentenceEncoder",
    "EffbertTransformer",
    "sentence_transformer_from_hf_bert",
    "effbert_state_dict_to_hf",
]

POOLINGS = ("mean", "cls")
_ST_HINT = (
    "sentence-transformers is needed for this: pip install 'effbert[sentence]' "
    "(or pip install sentence-transformers)"
)


def _check_hidden(hidden_states):
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3 or not hidden_states.is_floating_point():
        raise ValueError(
            f"hidden_states must be a float [B, N, D] tensor, got "
            f"{hidden_states.dtype} "
            f"{list(hidden_states.shape)}"
        )


def mean_pooling(hidden_states, attention_mask):
    """The mean of each row's real tokens: ``hidden_states [B, N, D]`` (float), ``attention_mask [B,
    N]`` (bool or 0/1 integers, 1 = real token) -> ``[B, D]`` in the dtype of ``hidden_states``.
    Padded positions never enter the sum, whatever they hold. Follows
    ``sentence_transformers.models.Pooling`` (``pooling_mode_mean_tokens``): the masked sum divided
    by the number of real tokens, clamped at 1e-9 (a row without real tokens is zeros). Raises
    ``TypeError`` / ``ValueError`` naming the argument for a wrong type, shape or dtype."""
    _check_hidden(hidden_states)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(
            f"attention_mask must be [B, N] = {list(hidden_states.shape[:2])}, got "
            f"{list(attention_mask.shape)}"
        )
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(
            f"attention_mask must be bool or integer (1 = real token), got {attention_mask.dtype}"
        )
    weight = attention_mask.to(device=hidden_states.device, dtype=hidden_states.dtype).unsqueeze(-1)
    # where, not a product: whatever a padded slot holds (even inf/NaN) stays out of the sum
    total = torch.where(weight > 0, hidden_states, 0).sum(1)
    return total / weight.sum(1).clamp_min(1e-9)


def cls_pooling(hidden_states, attention_mask=None):
    """The first ([CLS]) token's hidden state: ``hidden_states [B, N, D]`` -> ``[B, D]``
    (``attention_mask`` is accepted and unused, so that both poolings take the same arguments). As
    ``pooling_mode_cls_token``."""
    _check_hidden(hidden_states)
    return hidden_states[:, 0]


_POOL_FNS = {"mean": mean_pooling, "cls": cls_pooling}


def _folder_settings(folder):
    """``(pooling, normalize, max_seq_length)`` that a sentence-transformers folder declares
    (modules.json, the pooling config, sentence_bert_config.json); ``(None, None, None)`` parts for
    a plain transformers folder."""
    pooling = normalize = max_len = None
    modules = folder / "modules.json"
    if modules.is_file():
        normalize = False
        for entry in json.loads(modules.read_text()):
            kind = entry.get("type", "")
            if kind.endswith(".Normalize"):
                normalize = True
            elif kind.endswith(".Pooling"):
                cfg = json.loads((folder / entry["path"] / "config.json").read_text())
                keys = {
                    "mean": "pooling_mode_mean_tokens",
                    "cls": "pooling_mode_cls_token",
                    "max": "pooling_mode_max_tokens",
                    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
                }
                modes = [m for m, key in keys.items() if cfg.get(key)]
                mode = cfg.get("pooling_mode")  # newer configs name the mode directly
                modes = [mode] if isinstance(mode, str) else modes
                if modes != ["mean"] and modes != ["cls"]:
                    raise ValueError(
                        f"{str(folder)!r} pools with {modes}; effbert's sentence "
                        "embeddings offer "
                        f"{POOLINGS} only"
                    )
                pooling = modes[0]
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        max_len = json.loads(st_config.read_text()).get("max_seq_length")
    return pooling, normalize, max_len


def _check_texts(texts):
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(
            f"texts must be a list of str; texts[{bad[0]}] is {type(texts[bad[0]]).__name__}"
        )


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class SentenceEncoder(nn.Module):
    """Sentence embeddings from a ``from_hf_bert`` model: tokenize, run the encoder (padding
    skipped), pool.

    Build it with ``SentenceEncoder.from_pretrained(folder)`` or ``SentenceEncoder(model, tokenizer,
    pooling=...)`` (``model``: a ``TupeBertModel`` from ``from_hf_bert``; ``tokenizer``: the
    checkpoint's transformers tokenizer). ``pooling``: ``"mean"`` (mean of the real tokens,
    Sentence-BERT's default) or ``"cls"``. ``max_seq_length``: longer texts are cut to this many
    pieces, [CLS]/[SEP] included (None: the tokenizer's ``model_max_length``, capped at the model's
    ``max_position_embeddings``). ``normalize_embeddings``: the default of ``encode``.
    """

    def __init__(
        self, model, tokenizer, *, pooling="mean", max_seq_length=None, normalize_embeddings=False
    ):
        super().__init__()
        from ..models import TupeBertModel

        if not isinstance(model, TupeBertModel):
            raise TypeError(
                "model must be a TupeBertModel (from_hf_bert of a BertModel "
                "checkpoint), got "
                f"{type(model).__name__}"
            )
        if not callable(tokenizer) or not hasattr(tokenizer, "pad_token_id"):
            raise TypeError(
                f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}"
            )
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        limit = int(model.config.max_position_embeddings)
        if max_seq_length is None:
            max_seq_length = min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)
        _check_int("max_seq_length", max_seq_length, 2)
        if max_seq_length > limit:
            raise ValueError(
                f"max_seq_length ({max_seq_length}) exceeds the model's "
                "max_position_embeddings "
                f"({limit})"
            )
        if not isinstance(normalize_embeddings, bool):
            raise TypeError(
                f"normalize_embeddings must be a bool, got {type(normalize_embeddings).__name__}"
            )
        self.model, self.tokenizer, self.pooling = model, tokenizer, pooling
        self.max_seq_length, self.normalize_embeddings = int(max_seq_length), normalize_embeddings

    @classmethod
    def from_pretrained(
        cls, folder, *, pooling=None, max_seq_length=None, normalize_embeddings=None, backend="auto"
    ):
        """A ``SentenceEncoder`` for a local checkpoint folder: a sentence-transformers folder (its
        pooling, ``Normalize`` module and ``max_seq_length`` are taken unless given here) or a
        transformers BERT folder (mean pooling, no normalisation by default). Raises ``ValueError``
        for a missing folder or a pooling effbert does not offer (max, mean_sqrt_len), and the
        errors of ``from_hf_bert``."""
        transformers = require_transformers()
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"folder must be a local checkpoint folder, got {str(folder)!r}")
        found_pool, found_norm, found_len = _folder_settings(folder)
        model = from_hf_bert(folder, backend=backend)
        from ..models import TupeBertModel

        if not isinstance(model, TupeBertModel):  # a checkpoint with a head: take its encoder
            model = model.bert
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return cls(
            model,
            tokenizer,
            pooling=pooling or found_pool or "mean",
            max_seq_length=max_seq_length if max_seq_length is not None else found_len,
            normalize_embeddings=(
                normalize_embeddings if normalize_embeddings is not None else bool(found_norm)
            ),
        )

    def tokenize(self, texts):
        """``texts`` (list of str) -> the tokenizer's ``input_ids``, ``attention_mask`` (and
        ``token_type_ids``), ``[B, N]`` int64 padded to the batch's longest, cut at
        ``max_seq_length``."""
        _check_texts(texts)
        return self.tokenizer(
            list(texts),
            padding=True,
            truncation="longest_first",
            max_length=self.max_seq_length,
            return_tensors="pt",
        )

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        """Pooled embeddings ``[B, D]`` (model dtype) of tokenized rows
        (``input_ids``/``attention_mask`` ``[B, N]``, 1 = real token)."""
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return _POOL_FNS[self.pooling](hidden, attention_mask)

    @torch.inference_mode()
    def encode(self, texts, batch_size=32, normalize_embeddings=None, convert_to_numpy=False):
        """Embed raw texts: ``texts`` (list of str, may be empty) -> float32 ``[n, hidden_size]``
        tensor on the CPU (a float32 numpy array with ``convert_to_numpy=True``), row i for
        ``texts[i]``.

        Texts are embedded ``batch_size`` at a time, longest first (as
        ``SentenceTransformer.encode`` sorts them, so that a batch holds similar lengths), then put
        back in order; padding is skipped inside the model, so the result does not depend on the
        batching. ``normalize_embeddings``: unit L2 norm per row (None: the encoder's default, True
        for a folder with a ``Normalize`` module). Raises ``TypeError`` for texts that are not a
        list of str, ``ValueError`` for ``batch_size < 1``."""
        _check_texts(texts)
        _check_int("batch_size", batch_size, 1)
        if normalize_embeddings is None:
            normalize_embeddings = self.normalize_embeddings
        if not isinstance(normalize_embeddings, bool):
            raise TypeError(
                f"normalize_embeddings must be a bool or None, got "
                f"{type(normalize_embeddings).__name__}"
            )
        if not isinstance(convert_to_numpy, bool):
            raise TypeError(
                f"convert_to_numpy must be a bool, got {type(convert_to_numpy).__name__}"
            )
        device = next(self.model.parameters()).device
        dim = int(self.model.config.hidden_size)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), dim, dtype=torch.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in self.tokenize([texts[i] for i in rows]).items()}
            emb = self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            if normalize_embeddings:
                emb = torch.nn.functional.normalize(emb, p=2, dim=1)
            out[torch.tensor(rows)] = emb.float().cpu()
        return out.numpy() if convert_to_numpy else out


def effbert_state_dict_to_hf(state):
    """The inverse of ``hf_state_dict_to_effbert`` for a ``TupeBertModel`` (absolute positions): its
    state dict as transformers' ``BertModel`` names it (qkv split into query, key, value). Raises
    ``ValueError`` for a key that has no BERT counterpart (TUPE's positional terms, notes,
    heads)."""
    layer_names = {v: k for k, v in _LAYER_NAMES.items()}
    top_names = {v: k for k, v in _TOP_NAMES.items()}
    out = {}
    for key, value in state.items():
        m = re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m and m.group(2) == "attention.qkv":
            index, kind = m.group(1), m.group(3)
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"encoder.layer.{index}.attention.self.{name}.{kind}"] = part.contiguous()
            continue
        if m and m.group(2) in layer_names:
            out[f"encoder.layer.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"] = value
            continue
        m = re.match(r"^(.+)\.(weight|bias)$", key)
        if m and m.group(1) in top_names:
            out[f"{top_names[m.group(1)]}.{m.group(2)}"] = value
            continue
        raise ValueError(f"state dict key {key!r} has no counterpart in a transformers BertModel")
    return out


def _input_module_base():
    try:
        from sentence_transformers.base.modules import InputModule
    except ImportError:
        # sentence-transformers missing (or older than 6): the class below says so when built
        return nn.Module, False
    return InputModule, True


_BASE, _HAS_ST = _input_module_base()


class EffbertTransformer(_BASE):
    """A sentence-transformers input module running ``from_hf_bert``'s model (padding skipped), the
    counterpart of ``sentence_transformers.models.Transformer`` for a BERT checkpoint.

    ``EffbertTransformer(model_name_or_path, max_seq_length=None, backend="auto")``: a local BERT
    folder (``config.json``, ``model.safetensors``, tokenizer files). ``preprocess(texts)``
    tokenizes (padding to the batch's longest, cut at ``max_seq_length``); ``forward(features)``
    adds ``token_embeddings [B, N, D]`` (padded rows hold whatever the model leaves there; the
    ``Pooling`` module masks them). ``save(path)`` writes transformers' BERT files (config,
    safetensors weights, tokenizer) and ``sentence_bert_config.json``. Requires
    sentence-transformers 6 (``ImportError`` naming the install otherwise)."""

    CLASS_REF = "effbert.integrations.sentence.EffbertTransformer"
    config_file_name = "sentence_bert_config.json"
    config_keys = ["max_seq_length", "backend"]
    save_in_root = True

    def __init__(self, model_name_or_path, max_seq_length=None, backend="auto", **kwargs):
        if not _HAS_ST:
            raise ImportError(_ST_HINT)
        super().__init__()
        transformers = require_transformers()
        folder = Path(model_name_or_path)
        if not folder.is_dir():
            raise ValueError(
                f"model_name_or_path must be a local BERT folder, got {str(model_name_or_path)!r}"
            )
        model = from_hf_bert(folder, backend=backend)
        from ..models import TupeBertModel

        self.auto_model = model if isinstance(model, TupeBertModel) else model.bert
        self.hf_config = transformers.BertConfig.from_pretrained(str(folder), local_files_only=True)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True
        )
        self.backend = backend
        limit = int(self.hf_config.max_position_embeddings)
        if max_seq_length is None:
            max_seq_length = min(
                int(getattr(self.tokenizer, "model_max_length", limit) or limit), limit
            )
        _check_int("max_seq_length", max_seq_length, 2)
        self.max_seq_length = int(max_seq_length)

    def preprocess(self, inputs, prompt=None, **kwargs):
        texts = list(inputs)
        if prompt:
            texts = [prompt + t for t in texts]
        _check_texts(texts)
        return dict(
            self.tokenizer(
                texts,
                padding=True,
                truncation="longest_first",
                max_length=self.max_seq_length,
                return_tensors="pt",
            )
        )

    def forward(self, features, **kwargs):
        out = self.auto_model(
            input_ids=features["input_ids"],
            attention_mask=features["attention_mask"],
            token_type_ids=features.get("token_type_ids"),
        )
        features["token_embeddings"] = out.last_hidden_state
        return features

    def get_embedding_dimension(self):
        return int(self.hf_config.hidden_size)

    get_sentence_embedding_dimension = get_embedding_dimension
    get_word_embedding_dimension = get_embedding_dimension

    def save(self, output_path, *args, safe_serialization=True, **kwargs):
        from safetensors.torch import save_file

        Path(output_path).mkdir(parents=True, exist_ok=True)
        self.hf_config.save_pretrained(output_path)
        state = effbert_state_dict_to_hf(
            {k: v.detach().cpu().contiguous() for k, v in self.auto_model.state_dict().items()}
        )
        save_file(state, str(Path(output_path) / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path,
        subfolder="",
        token=None,
        cache_folder=None,
        revision=None,
        local_files_only=False,
        init_defaults=None,
        **kwargs,
    ):
        folder = Path(model_name_or_path) / subfolder
        config = cls.load_config(
            str(model_name_or_path), subfolder=subfolder, local_files_only=True
        )
        return cls(
            str(folder),
            max_seq_length=config.get("max_seq_length"),
            backend=config.get("backend", "auto"),
        )


def sentence_transformer_from_hf_bert(folder, *, backend="auto", device="cpu"):
    """A ``sentence_transformers.SentenceTransformer`` whose input module is an
    ``EffbertTransformer`` on ``folder``, followed by the folder's pooling (``Pooling``, mean or
    CLS) and, when the folder has one, its ``Normalize`` module; ``encode``, ``save`` and the rest
    are sentence-transformers' own. A plain transformers folder gets mean pooling. Raises
    ``ImportError`` without sentence-transformers, ``ValueError`` for a missing folder or an
    unsupported pooling."""
    if not _HAS_ST:
        raise ImportError(_ST_HINT)
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder must be a local checkpoint folder, got {str(folder)!r}")
    pooling, normalize, max_len = _folder_settings(folder)
    first = EffbertTransformer(str(folder), max_seq_length=max_len, backend=backend)
    modules = [first, Pooling(first.get_embedding_dimension(), pooling_mode=pooling or "mean")]
    if normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device=device)
