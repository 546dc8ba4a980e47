"""Reference for token-level early exit in sequence labeling (Li et al., "Accelerating BERT Inference for Sequence
Labeling via Early-Exit", ACL 2021; code: LeeSureman/Sequence-Labeling-Early-Exit): each token's normalised entropy,
its window maximum over the neighbouring tokens of its own sequence, and the per-token exit decision."""

import math

import torch
import torch.nn.functional as F

from .early_exit import exit_entropy

TOKEN_RULES = ("and", "or")


def token_uncertainty(logits):
    """Normalised entropy ``H(softmax(logits)) / log(C)`` per row, in [0, 1] (float64 for float64 logits, float32
    otherwise); NaN where the softmax is undefined (a NaN or +inf logit, or no finite logit). Needs ``C >= 2``."""
    return exit_entropy(logits) / math.log(logits.shape[-1])


def default_keep(cu_seqlens, total, device=None):
    """[CLS] and [SEP]: the first and the last token of each sequence (one mask over ``total`` packed tokens)."""
    keep = torch.zeros(total, dtype=torch.bool, device=device)
    cu = cu_seqlens.tolist()
    for start, end in zip(cu, cu[1:]):
        if end > start:
            keep[start] = True
            keep[end - 1] = True
    return keep


def window_max(u, cu_seqlens, takes_part, window):
    """``u_win [T]``: per token, the largest ``u`` over the tokens of its sequence within ``window // 2`` positions
    that take part (``takes_part [T]`` bool), a NaN ``u`` counting as +inf; -inf where none takes part, NaN for
    tokens outside every sequence."""
    value = torch.where(
        takes_part, torch.nan_to_num(u, nan=float("inf")), torch.full_like(u, float("-inf"))
    )
    u_win = torch.full_like(u, float("nan"))
    cu = cu_seqlens.tolist()
    for start, end in zip(cu, cu[1:]):
        if end > start:
            # max_pool1d pads with -inf: positions outside the sequence never contribute
            u_win[start:end] = F.max_pool1d(
                value[None, None, start:end], kernel_size=window, stride=1, padding=window // 2
            )[0, 0]
    return u_win


def token_exit_decision(
    logits,
    cu_seqlens,
    active,
    exit_layer,
    *,
    threshold,
    window=3,
    token_threshold=None,
    token_rule="or",
    layer,
    keep=None,
    exclude_exited=False,
):
    """One layer's token-level exit decision over packed tokens, written for clarity.

    ``logits [T, C]``, ``cu_seqlens [B + 1]`` (sequence b is tokens ``cu_seqlens[b]:cu_seqlens[b + 1]``),
    ``active [T]`` bool, ``exit_layer [T]`` int32, ``keep [T]`` bool or None (None: first and last token of each
    sequence). Returns ``(active [T], exit_layer [T], u [T])``, new tensors.

    u: normalised entropy. The window maximum of token i is the largest u over the tokens j of its sequence with
    ``|i - j| <= window // 2`` that take part in windows: not kept, and (``exclude_exited=True``) still active. A NaN
    u counts as +inf there (an undefined neighbour never lets a token exit). A token exits when it is active, not
    kept, in a sequence, and ``u_win < threshold``, combined with ``u < token_threshold`` by ``token_rule`` ("and":
    both; "or": either, as the published code's ``t_level_t``) when ``token_threshold`` is given.
    """
    total = logits.shape[0]
    u = token_uncertainty(logits)
    if keep is None:
        keep = default_keep(cu_seqlens, total, logits.device)
    in_seq = torch.zeros(total, dtype=torch.bool, device=logits.device)
    for start, end in zip(cu_seqlens.tolist(), cu_seqlens.tolist()[1:]):
        in_seq[start:end] = True
    takes_part = ~keep & (active if exclude_exited else torch.ones_like(active))
    u_win = window_max(u, cu_seqlens, takes_part, window)
    exits = u_win < threshold
    if token_threshold is not None:
        own = u < token_threshold
        exits = (exits & own) if token_rule == "and" else (exits | own)
    exits = exits & active & ~keep & in_seq
    new_layer = torch.where(exits, torch.full_like(exit_layer, layer), exit_layer)
    return active & ~exits, new_layer, u.float() if u.dtype != torch.float64 else u
