"""``TupeBertConfig``: the sizes and switches of the reference model (BERT-base defaults), a ``transformers``
``PretrainedConfig`` of model type ``"tupe-bert"``."""

import json
import math

from transformers import PretrainedConfig

POSITION_MODES = ("absolute", "tupe-a", "tupe-r")
HIDDEN_ACTS = ("gelu", "gelu_tanh", "relu")

# the fields of TupeBertConfig itself (not PretrainedConfig's); from_dict refuses keys outside these and
# PretrainedConfig's own, so a typo does not pass silently
FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "layer_norm_eps",
    "position_layer_norm_eps",
    "hidden_act",
    "initializer_range",
    "pad_token_id",
    "position_mode",
    "num_buckets",
    "max_distance",
    "untie_cls",
    "num_labels",
    "backend",
    "multi_exit",
    "shared_exit_pooler",
    "unpad_inputs",
    "classifier_dropout",
    "exit_loss",
    "exit_loss_gamma",
    "exit_loss_temperature",
    "exit_gradient_equilibrium",
    "tnf_num_notes",
    "tnf_window",
    "tnf_gamma",
    "tnf_lam",
    "early_bird_ticket",
    "token_exit",
)


def _positive_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _probability(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _positive_float(name, value):
    # inf would pass `> 0` (an infinite init std or LayerNorm eps gives NaN or zeros everywhere): finite only
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")


class TupeBertConfig(PretrainedConfig):
    """Sizes of a BERT encoder and how it encodes positions.

    ``position_mode``: ``"absolute"`` (plain BERT: learned positions added to the token embeddings; what pretrained
    BERT checkpoints use), ``"tupe-a"`` (TUPE with untied absolute positions: a positional term added to every
    layer's attention logits) or ``"tupe-r"`` (TUPE-A plus T5 relative buckets, ``num_buckets`` / ``max_distance``).
    ``untie_cls`` gives [CLS] its own positional logits in the TUPE modes. ``position_layer_norm_eps`` is the eps of
    the LayerNorm over the TUPE position embeddings (None: ``layer_norm_eps``; TUPE's fairseq code uses 1e-5
    everywhere). ``type_vocab_size=0``: no token-type embedding (TUPE's encoder has none). ``multi_exit`` gives the
    classification model an off-ramp after every layer; ``shared_exit_pooler`` makes the off-ramps share one pooler,
    as PABEE does (by default each has its own, as in DeeBERT and RomeBERT). ``backend`` is passed to every effbert
    op. ``unpad_inputs`` (default True): the models gather the real tokens once after the embeddings and run every
    layer on the packed ``[total, hidden]`` tokens (``tupe_attention_varlen``), as MosaicBERT and ModernBERT do;
    False runs every layer on the padded ``[B, N, hidden]`` batch (the same results on the real tokens; for
    benchmarks and equality tests).

    TNF: ``tnf_num_notes`` (None: no note dictionary) and ``tnf_window`` / ``tnf_gamma`` / ``tnf_lam`` describe the
    masked-LM model's ``NoteDictionary``, so ``from_pretrained`` rebuilds it and loads the saved notes.

    Multi-exit training (``effbert.models.multi_exit``; the model owns its loss, as transformers
    models do): ``exit_loss`` names the loss ``model(..., labels=...)`` returns: ``"romebert"``
    (self-distillation with ``exit_loss_gamma`` 0.9 and ``exit_loss_temperature`` 3.0, RomeBERT's
    published values), ``"pabee"`` or ``"deebert"`` (of the model's stage, ``set_deebert_stage``);
    None (default) is each head's published loss: RomeBERT's for sequence classification, Li et
    al.'s joint loss (PABEE's layer weights) for token classification.
    ``exit_gradient_equilibrium``: RomeBERT's ``--ge``.

    ``classifier_dropout`` (transformers' name): the dropout before the token classifiers of
    ``TupeBertForTokenClassification`` (None: ``hidden_dropout_prob``; Li et al.'s published code uses 0.3).

    ``early_bird_ticket`` (None: unpruned): ``{"heads": [[kept head indices] per layer],
    "ffn": [[kept neuron indices] per layer]}``, written by ``models.early_bird.prune_model`` so
    that ``from_pretrained`` builds an EarlyBERT-pruned model's smaller layers.

    ``token_exit`` (None: not calibrated): the TOKEE setting ``effbert finetune --target-exit``
    calibrated on held-out data, ``{"mode", "threshold", "thresholds" (one per layer), "window",
    "copy_wordpieces", "target_exit", "avg_exit_layer", "token_layers_saved"}``: the arguments of
    ``TupeBertForTokenClassification.early_exit_token_labels`` and what they gave there.

    A bad value raises ``ValueError`` (``TypeError`` for a non-bool switch) naming the field; every float field
    must be finite (NaN and inf are refused): the probabilities in [0, 1) (``tnf_gamma`` / ``tnf_lam`` in [0, 1]),
    ``layer_norm_eps``, ``position_layer_norm_eps`` and ``initializer_range`` > 0.
    """

    model_type = "tupe-bert"

    def __init__(
        self,
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        type_vocab_size=2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        layer_norm_eps=1e-12,
        position_layer_norm_eps=None,
        hidden_act="gelu",
        initializer_range=0.02,
        pad_token_id=0,
        position_mode="tupe-r",
        num_buckets=32,
        max_distance=128,
        untie_cls=True,
        num_labels=None,
        backend="auto",
        multi_exit=False,
        shared_exit_pooler=False,
        unpad_inputs=True,
        tnf_num_notes=None,
        tnf_window=16,
        tnf_gamma=0.1,
        tnf_lam=0.5,
        classifier_dropout=None,
        exit_loss=None,
        exit_loss_gamma=0.9,
        exit_loss_temperature=3.0,
        exit_gradient_equilibrium=False,
        early_bird_ticket=None,
        token_exit=None,
        **kwargs,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("intermediate_size", intermediate_size),
            ("max_position_embeddings", max_position_embeddings),
            ("num_buckets", num_buckets),
            ("max_distance", max_distance),
        ):
            _positive_int(name, value)
        if num_labels is None:  # a saved config carries its labels (id2label); 2 otherwise
            num_labels = len(kwargs["id2label"]) if kwargs.get("id2label") else 2
        _positive_int("num_labels", num_labels)
        if kwargs.get("id2label") and len(kwargs["id2label"]) != num_labels:
            (
                kwargs.pop("id2label"),
                kwargs.pop("label2id", None),
            )  # an explicit num_labels replaces stale labels
        _positive_int("type_vocab_size", type_vocab_size, low=0)
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads "
                f"({num_attention_heads})"
            )
        _probability("hidden_dropout_prob", hidden_dropout_prob)
        _probability("attention_probs_dropout_prob", attention_probs_dropout_prob)
        if classifier_dropout is not None:
            _probability("classifier_dropout", classifier_dropout)
        _positive_float("layer_norm_eps", layer_norm_eps)
        if position_layer_norm_eps is None:
            position_layer_norm_eps = layer_norm_eps
        _positive_float("position_layer_norm_eps", position_layer_norm_eps)
        _positive_float("initializer_range", initializer_range)
        if position_mode not in POSITION_MODES:
            raise ValueError(
                f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}"
            )
        if hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act must be one of {HIDDEN_ACTS}, got {hidden_act!r}")
        if not isinstance(untie_cls, bool):
            raise TypeError(f"untie_cls must be a bool, got {type(untie_cls).__name__}")
        for name, value in (
            ("multi_exit", multi_exit),
            ("shared_exit_pooler", shared_exit_pooler),
            ("unpad_inputs", unpad_inputs),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        from .multi_exit import EXIT_LOSSES

        if exit_loss is not None and exit_loss not in EXIT_LOSSES:
            raise ValueError(f"exit_loss must be None or one of {EXIT_LOSSES}, got {exit_loss!r}")
        if (
            isinstance(exit_loss_gamma, bool)
            or not isinstance(exit_loss_gamma, (int, float))
            or not 0.0 <= exit_loss_gamma <= 1.0
        ):
            raise ValueError(
                f"exit_loss_gamma must be a real number in [0, 1], got {exit_loss_gamma!r}"
            )
        _positive_float("exit_loss_temperature", exit_loss_temperature)
        if not isinstance(exit_gradient_equilibrium, bool):
            raise TypeError(
                f"exit_gradient_equilibrium must be a bool, got "
                f"{type(exit_gradient_equilibrium).__name__}"
            )
        if (
            isinstance(pad_token_id, bool)
            or not isinstance(pad_token_id, int)
            or not 0 <= pad_token_id < vocab_size
        ):
            raise ValueError(
                f"pad_token_id must be an int in [0, vocab_size), got {pad_token_id!r}"
            )
        from ..ops import BACKENDS

        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        if tnf_num_notes is not None:
            _positive_int("tnf_num_notes", tnf_num_notes, low=0)
        _positive_int("tnf_window", tnf_window, low=0)
        for name, value in (("tnf_gamma", tnf_gamma), ("tnf_lam", tnf_lam)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0.0 <= value <= 1.0
            ):
                raise ValueError(f"{name} must be a real number in [0, 1], got {value!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.classifier_dropout = classifier_dropout
        self.layer_norm_eps = layer_norm_eps
        self.position_layer_norm_eps = position_layer_norm_eps
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.position_mode = position_mode
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.untie_cls = untie_cls
        self.backend = backend
        self.multi_exit = multi_exit
        self.shared_exit_pooler = shared_exit_pooler
        self.unpad_inputs = unpad_inputs
        self.exit_loss = exit_loss
        self.exit_loss_gamma = exit_loss_gamma
        self.exit_loss_temperature = exit_loss_temperature
        self.exit_gradient_equilibrium = exit_gradient_equilibrium
        self.tnf_num_notes = tnf_num_notes
        self.tnf_window = tnf_window
        self.tnf_gamma = tnf_gamma
        self.tnf_lam = tnf_lam
        if early_bird_ticket is not None and not isinstance(early_bird_ticket, dict):
            raise TypeError(
                f"early_bird_ticket must be a dict or None, got {type(early_bird_ticket).__name__}"
            )
        self.early_bird_ticket = early_bird_ticket
        if token_exit is not None and not isinstance(token_exit, dict):
            raise TypeError(f"token_exit must be a dict or None, got {type(token_exit).__name__}")
        self.token_exit = token_exit
        super().__init__(pad_token_id=pad_token_id, num_labels=num_labels, **kwargs)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def _known_keys(cls):
        base = set(PretrainedConfig().to_dict())
        # use_cache: transformers.Trainer sets it on every model's config, so every folder it saves holds it
        return (
            base
            | set(FIELDS)
            | {
                "id2label",
                "label2id",
                "architectures",
                "transformers_version",
                "model_type",
                "auto_map",
                "_name_or_path",
                "torch_dtype",
                "dtype",
                "use_cache",
            }
        )

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """The config from ``to_dict()``'s output (or a dict of the fields above); an unknown key is a
        ``ValueError`` (a typo must not pass silently). Keys that start with ``_`` are transformers' own bookkeeping
        (``_commit_hash``, ``_name_or_path``, ...; which ones it passes differs between versions): they go to
        ``PretrainedConfig`` as they came."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"config_dict must be a dict, got {type(config_dict).__name__}")
        unknown = sorted(
            k for k in set(config_dict) - cls._known_keys() if not str(k).startswith("_")
        )
        if unknown:
            raise ValueError(f"unknown TupeBertConfig keys: {unknown}")
        mt = config_dict.get("model_type", cls.model_type)
        if mt != cls.model_type:
            raise ValueError(f"model_type must be {cls.model_type!r}, got {mt!r}")
        return super().from_dict(config_dict, **kwargs)

    def replace(self, **changes):
        """A new config with ``changes`` applied (checked as on construction); this one is left unchanged."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_json(self):
        """``to_json_string`` with every field (``from_json`` reads it back)."""
        return self.to_json_string(use_diff=False)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))
