"""Eager PyTorch references: the ground truth of every test and the ``eager`` backend.

Written for clarity, not speed. They never import kernels.
"""

from .early_exit import (
    CRITERIA,
    deebert_loss,
    early_exit_loop,
    exit_decision,
    exit_entropy,
    exit_max_prob,
    multi_exit_distillation_loss,
    pabee_loss,
)
from .mc_bert import mc_candidate_loss, mc_sample, mc_sample_gumbel
from .notes import note_fold_, note_mix, note_mix_backward, note_update_, note_window_means
from .position_bias import t5_relative_buckets, tupe_position_bias
from .token_exit import token_exit_decision, token_uncertainty
from .tupe_attention import tupe_attention, tupe_attention_varlen, tupe_attention_varlen_subset

__all__ = [
    "exit_entropy",
    "CRITERIA",
    "early_exit_loop",
    "exit_decision",
    "exit_max_prob",
    "multi_exit_distillation_loss",
    "pabee_loss",
    "deebert_loss",
    "mc_sample",
    "mc_sample_gumbel",
    "mc_candidate_loss",
    "note_mix",
    "note_mix_backward",
    "note_update_",
    "note_window_means",
    "note_fold_",
    "token_exit_decision",
    "token_uncertainty",
    "t5_relative_buckets",
    "tupe_position_bias",
    "tupe_attention",
    "tupe_attention_varlen",
    "tupe_attention_varlen_subset",
]
