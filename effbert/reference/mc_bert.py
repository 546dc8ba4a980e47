"""Eager references of the MC-BERT ops (Xu, Gong, Ke, He et al., "MC-BERT: Efficient Language Pre-Training via a
Meta Controller", arXiv 2006.05744; code: github.com/MC-BERT/MC-BERT, fairseq/models/mcbert/model.py).

* ``mc_sample``: K draws with replacement per row from ``softmax(logits)``, as the published code draws them
  (``torch.multinomial(softmax(logits), K, replacement=True)``). A row holding NaN (or no logit above -inf) has
  no distribution: it gives ``-1`` in every slot instead of an error, so one bad row cannot stop a batch. A row
  holding +inf (and no NaN) draws uniformly among its +inf entries: the limit of the softmax as those logits grow
  together, and what Gumbel-max gives when each +inf entry scores its noise alone, ahead of every finite entry
  (``softmax`` itself gives NaN there, and ``torch.multinomial`` an error).
* ``mc_sample_gumbel``: the same distribution by Gumbel-max on counter-based Philox noise, bit for bit what the
  Triton kernel computes (its ground truth in the tests).
* ``mc_candidate_loss``: the main model's multi-choice head, ``GenLMHead``'s ``baddbmm`` of the published code:
  ``score[m, k] = <hidden[m], embedding[c[m, k]]> + bias[c[m, k]]``, cross-entropy over the K scores.
"""

import torch
import torch.nn.functional as F

__all__ = ["mc_sample", "mc_sample_gumbel", "mc_candidate_loss", "philox4x32", "philox_uniform"]

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _bad_rows(logits):
    """Rows with no distribution: any NaN, or no logit above -inf."""
    return torch.isnan(logits).any(-1) | ~(logits > float("-inf")).any(-1)


def _inf_rows(logits):
    """``(rows holding +inf, where the +inf entries are)``: such a row draws among its +inf entries only."""
    pinf = logits == float("inf")
    return pinf.any(-1), pinf


def mc_sample(logits, num_samples, *, generator=None):
    """``LongTensor[M, K]``: K draws per row of ``logits [M, V]`` from ``softmax(logits)`` (with replacement);
    ``-1`` in every slot of a row holding NaN or no logit above -inf; a row holding +inf (and no NaN) draws
    uniformly among its +inf entries."""
    x = logits.detach()
    inf_row, pinf = _inf_rows(x)
    probs = torch.softmax(x.float().masked_fill(inf_row[:, None], 0.0), dim=-1)
    probs = torch.where(inf_row[:, None], pinf.float(), probs)  # uniform over the +inf entries
    bad = _bad_rows(logits)
    probs = torch.where(
        bad[:, None], torch.ones_like(probs), probs
    )  # any valid row; overwritten below
    if probs.shape[0] == 0:
        return torch.empty(0, num_samples, dtype=torch.int64, device=logits.device)
    out = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    return out.masked_fill(bad[:, None], -1)


def philox4x32(seed, c0, c1, c2, c3, rounds=10):
    """Philox-4x32 (Salmon et al., SC'11) as ``triton.language.philox`` computes it: the key is the 64-bit
    ``seed`` (low word, high word), the counters are int64 tensors holding uint32 values. Returns four such
    tensors."""
    k0 = torch.full_like(c0, seed & _MASK32)
    k1 = torch.full_like(c0, (seed >> 32) & _MASK32)
    c = [t & _MASK32 for t in (c0, c1, c2, c3)]
    for _ in range(rounds):
        a, b = c[0], c[2]
        hi0, lo0 = _mulhilo(_M0, a)
        hi1, lo1 = _mulhilo(_M1, b)
        c = [(hi1 ^ c[1] ^ k0) & _MASK32, lo1, (hi0 ^ c[3] ^ k1) & _MASK32, lo0]
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c


def _mulhilo(m, x):
    """High and low 32-bit words of ``m * x`` for 32-bit ``m`` and ``x`` (int64 arithmetic without overflow)."""
    m_lo, m_hi = m & 0xFFFF, m >> 16
    x_lo, x_hi = x & 0xFFFF, x >> 16
    ll = m_lo * x_lo
    lh = m_lo * x_hi
    hl = m_hi * x_lo
    hh = m_hi * x_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    lo = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi & _MASK32, lo & _MASK32


def philox_uniform(bits):
    """uint32 words (in int64) to float32 uniforms in the open interval (0, 1): the top 23 bits, centred."""
    return (((bits >> 9).to(torch.float32) + 0.5) * (2.0**-23)).to(torch.float32)


def mc_sample_gumbel(logits, num_samples, seed):
    """The Triton kernel's draws, exactly: sample k of row m is ``argmax_v(logits[m, v] + g)`` with Gumbel noise
    ``g = -log(-log(u))``, ``u`` from word ``k % 4`` of ``philox(seed, v, m, k // 4, 0)``. Ties go to the lowest
    ``v``. ``-1`` for rows holding NaN or no logit above -inf; in a row holding +inf, each +inf entry scores its
    noise ``g`` alone and the other entries drop out. Memory ``O(M * K * V)``: small inputs only."""
    m_rows, vocab = logits.shape
    x = logits.detach().float()
    inf_row, pinf = _inf_rows(x)
    x = torch.where(pinf, 0.0, x.masked_fill(inf_row[:, None], float("-inf")))
    groups = (num_samples + 3) // 4
    v = torch.arange(vocab, dtype=torch.int64).view(1, 1, vocab).expand(m_rows, groups, vocab)
    m = torch.arange(m_rows, dtype=torch.int64).view(m_rows, 1, 1).expand_as(v)
    g = torch.arange(groups, dtype=torch.int64).view(1, groups, 1).expand_as(v)
    words = philox4x32(int(seed), v, m, g, torch.zeros_like(v))
    out = torch.empty(m_rows, num_samples, dtype=torch.int64)
    for k in range(num_samples):
        u = philox_uniform(words[k % 4][:, k // 4, :])
        gumbel = -torch.log(-torch.log(u))
        out[:, k] = torch.argmax(x.cpu() + gumbel, dim=-1)
    out = out.to(logits.device)
    return out.masked_fill(_bad_rows(logits)[:, None], -1)


def mc_candidate_loss(
    hidden, embedding, bias, candidates, labels, *, reduction="mean", padding_idx=None
):
    """Cross-entropy over the K candidate scores ``<hidden[m], embedding[c]> + bias[c]``.

    ``hidden [M, D]``, ``embedding [V, D]``, ``bias [V]``, ``candidates [M, K]`` int64, ``labels [M]`` int64 in
    ``[0, K)``. ``reduction``: ``"mean"`` over rows (0 for no rows), ``"sum"`` or ``"none"`` (``[M]``). Computed in
    float32 at least (float64 stays float64); differentiable in the three float inputs through autograd.
    ``padding_idx``: a token whose embedding row gets no gradient (its score still counts), as the published
    ``GenLMHead`` looks candidates up in the ``nn.Embedding(..., padding_idx=pad)`` of the input; its bias entry
    (an ``nn.Embedding(V, 1)`` without ``padding_idx`` there) keeps its gradient."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # F.embedding rather than indexing: its CPU backward sums repeated rows in a fixed order (reproducible runs)
    w = F.embedding(candidates, embedding.to(dtype), padding_idx=padding_idx)  # [M, K, D]
    b = F.embedding(candidates, bias.to(dtype)[:, None]).squeeze(-1)
    scores = torch.einsum("md,mkd->mk", hidden.to(dtype), w) + b
    rows = F.cross_entropy(scores, labels, reduction="none")
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / max(rows.shape[0], 1)
