"""Public functional ops: argument checks, backend dispatch and torch.library registration."""

from ._dispatch import BACKENDS, BackendNotSupportedError, BackendStatus, backends, device_reasons
from .early_exit import exit_decision, exit_entropy, multi_exit_distillation_loss
from .mc_bert import mc_candidate_loss, mc_sample, mc_sample_fused
from .notes import note_fold_, note_mix, note_update_, note_window_means
from .position_bias import t5_relative_buckets, tupe_position_bias
from .token_exit import token_exit_decision
from .attention import tupe_attention, tupe_attention_varlen, tupe_attention_varlen_subset

__all__ = [
    "BACKENDS",
    "BackendNotSupportedError",
    "BackendStatus",
    "backends",
    "device_reasons",
    "exit_entropy",
    "exit_decision",
    "multi_exit_distillation_loss",
    "token_exit_decision",
    "mc_sample",
    "mc_sample_fused",
    "mc_candidate_loss",
    "note_mix",
    "note_update_",
    "note_window_means",
    "note_fold_",
    "t5_relative_buckets",
    "tupe_position_bias",
    "tupe_attention",
    "tupe_attention_varlen",
    "tupe_attention_varlen_subset",
]
