"""``TupeBertConfig``: the sizes and switches of the reference model (BERT-base defaults)."""

import dataclasses
import json
from dataclasses import dataclass

POSITION_MODES = ("absolute", "tupe-a", "tupe-r")
HIDDEN_ACTS = ("gelu", "gelu_tanh", "relu")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _probability(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


@dataclass
class TupeBertConfig:
    """Sizes of a BERT encoder and how it encodes positions.

    ``position_mode``: ``"absolute"`` (plain BERT: learned positions added to the token embeddings; what pretrained
    checkpoints use), ``"tupe-a"`` (TUPE with untied absolute positions: a positional term added to every layer's
    attention logits) or ``"tupe-r"`` (TUPE-A plus T5 relative buckets, ``num_buckets`` / ``max_distance``).
    ``untie_cls`` gives [CLS] its own positional logits in the TUPE modes. ``multi_exit`` gives the classification
    model an off-ramp after every layer; ``shared_exit_pooler`` makes the off-ramps share one pooler, as PABEE does
    (by default each has its own, as in DeeBERT and RomeBERT). ``backend`` is passed to every effbert op.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    pad_token_id: int = 0
    position_mode: str = "tupe-r"
    num_buckets: int = 32
    max_distance: int = 128
    untie_cls: bool = True
    num_labels: int = 2
    backend: str = "auto"
    multi_exit: bool = False  # classification: an off-ramp after every layer (batched early exit at inference)
    shared_exit_pooler: bool = False  # multi_exit: one pooler for every off-ramp (PABEE) instead of one each

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "num_buckets", "max_distance", "num_labels"):
            _positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        _probability("hidden_dropout_prob", self.hidden_dropout_prob)
        _probability("attention_probs_dropout_prob", self.attention_probs_dropout_prob)
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)) \
                or not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be a float > 0, got {self.layer_norm_eps!r}")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        if not isinstance(self.untie_cls, bool):
            raise TypeError(f"untie_cls must be a bool, got {type(self.untie_cls).__name__}")
        for name in ("multi_exit", "shared_exit_pooler"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int) \
                or not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be an int in [0, vocab_size), got {self.pad_token_id!r}")
        from ..ops._dispatch import BACKENDS

        if self.backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {self.backend!r}")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """The config from ``to_dict()``'s output; an unknown key is an error (a typo must not pass silently)."""
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TupeBertConfig keys: {unknown}")
        return cls(**values)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))
