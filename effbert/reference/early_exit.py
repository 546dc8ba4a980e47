"""References for the early-exit family."""

import torch


def exit_entropy(logits):
    """Shannon entropy (natural log) of softmax(logits) over the last dimension.

    Computed in float64 for float64 inputs and in float32 otherwise. Zero-probability classes (-inf logits) add
    nothing; a row holding NaN or +inf, or with no finite logit, gives NaN.
    """
    x = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    terms = torch.where(p == 0, torch.zeros_like(p), p * logp)  # NaN stays NaN (NaN == 0 is False)
    h = -terms.sum(dim=-1)
    undefined = torch.isnan(x).any(-1) | (x == float("inf")).any(-1) | (x == float("-inf")).all(-1)
    return torch.where(undefined, torch.full_like(h, float("nan")), h.clamp_min(0))
