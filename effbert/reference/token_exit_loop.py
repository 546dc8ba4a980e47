"""The per-sentence loop of token- and sentence-level early exit as the published code runs it (Li
et al., "Accelerating BERT Inference for Sequence Labeling via Early-Exit", ACL 2021;
LeeSureman/Sequence-Labeling-Early-Exit, ``V0/modeling_bert_ee.py`` at commit 9717770,
``BertModel_EE.forward`` with ``test_mode='t_level_win_ee_copy'`` (TOKEE) or ``'s_level_ee'``
(SENTEE), batch size 1).

One sentence at a time: every layer runs on the whole ``[1, n, hidden]`` state, then ``h =
where(running, layer(h), h)`` (an exited word's pieces keep their state and still give keys and
values); after layer i the words' normalised entropy from classifier i, then a window max
(``max_pool1d``) and a Python loop over the words (TOKEE) or the sentence's pooled value (SENTEE)
against ``thresholds[i]``. It is the ground truth the batched
``TupeBertForTokenClassification.early_exit_token_labels`` is tested against, and the
``official-loop`` provider of the ``token_exit_inference`` bench rows. It runs the layers of the
model it is given (on that model's backend), so unlike the op references beside it it is not
exported by ``effbert.reference``: import it from this module.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["uncertainty", "published_token_exit_loop"]


def uncertainty(logits):
    """``get_uncertainty`` of ``V0/utils.py``: ``H(softmax(logits)) / log(C)`` over the last dim,
    in float64. ``logits [..., C]`` float, C >= 2; returns float64 ``[...]``. Raises
    ``ValueError`` for other inputs."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError("logits must be a float tensor [..., C]")
    if logits.shape[-1] < 2:
        raise ValueError(f"logits must have C >= 2 classes, got {logits.shape[-1]}")
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def published_token_exit_loop(
    model,
    ids,
    label_mask,
    *,
    mode,
    thresholds,
    window=3,
    pool="max",
    copy_wordpieces="all",
    freeze=True,
    hf=None,
    token_thresholds=None,
):
    """One sentence as the published ``BertModel_EE.forward`` runs it with batch size 1.

    Arguments:
        model: a multi-exit ``TupeBertForTokenClassification`` (its ``exits`` are the classifiers;
        its encoder
            runs the sentence unless ``hf`` is given), in eval mode.
        ids: int ``[n]``, the sentence's real tokens ([CLS] first, [SEP] last).
        label_mask: bool ``[n]``, each word's first piece (a word's pieces run from it up to the
        next labelled
            token or the last token, exclusive).
        mode: ``"tokee"`` or ``"sentee"``; thresholds: one float per layer; window: odd int (TOKEE);
        pool: ``"max"`` or ``"mean"`` (SENTEE); copy_wordpieces: ``"all"`` or ``"first"`` (TOKEE).
        freeze: False lets exited pieces run on (not the method: it shows that tests see the copy
        rule). hf: a transformers ``BertModel`` whose own embeddings and ``BertLayer``s run the
        sentence (the published
            code's encoder), with ``model.exits`` as the classifiers; None: ``model.bert``.
        token_thresholds: None or one float per layer, the published ``--t_level_t`` (a word also
        exits on its
            own ``u``).

    Returns ``(labels, exit_layers, token_layers, exit_logits)``: per word its label (int) and
    1-based exit layer (lists), the token-layers run (TOKEE: the running tokens of each layer;
    SENTEE: the whole sentence each layer), and ``exit_logits [words, C]`` each word's logits at its
    exit layer.

    Raises ``ValueError`` naming the argument."""
    if getattr(model, "exits", None) is None:
        raise ValueError("model must be a multi-exit token classifier (config.multi_exit=True)")
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dim() != 1
        or ids.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError("ids must be an int [n] tensor")
    if (
        not isinstance(label_mask, torch.Tensor)
        or label_mask.dtype != torch.bool
        or tuple(label_mask.shape) != tuple(ids.shape)
    ):
        raise ValueError(f"label_mask must be a bool [n] = [{ids.shape[0]}] tensor")
    if mode not in ("tokee", "sentee"):
        raise ValueError(f"mode must be 'tokee' or 'sentee', got {mode!r}")
    if pool not in ("max", "mean"):
        raise ValueError(f"pool must be 'max' or 'mean', got {pool!r}")
    if copy_wordpieces not in ("all", "first"):
        raise ValueError(f"copy_wordpieces must be 'all' or 'first', got {copy_wordpieces!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 1, got {window!r}")
    depth = len(model.exits)
    for name, values in (("thresholds", thresholds), ("token_thresholds", token_thresholds)):
        if values is None and name == "token_thresholds":
            continue
        if not isinstance(values, (list, tuple)) or len(values) != depth:
            raise ValueError(f"{name} must be a list of {depth} floats, got {values!r}")
    bert = model.bert
    n = ids.shape[0]
    if hf is None:
        h = bert.embed(ids[None], torch.zeros_like(ids)[None])
        pos_bias = bert.position_bias(n)
        full = torch.ones(1, n, dtype=torch.bool, device=ids.device)
        layers = [lambda x, layer=layer: layer(x, pos_bias, full) for layer in bert.encoder.layers]
    else:
        h = hf.embeddings(input_ids=ids[None])
        layers = [lambda x, layer=layer: _first(layer(x)) for layer in hf.encoder.layer]
    first = label_mask.nonzero().flatten().tolist()
    # word pieces: from the labelled token up to the next one or the last token ([SEP]), exclusive
    ends = first[1:] + [n - 1]
    pieces = [list(range(s, max(e, s + 1))) for s, e in zip(first, ends)]
    if copy_wordpieces == "first":
        pieces = [[s] for s in first]
    running = torch.ones(n, dtype=torch.bool, device=ids.device)
    pred, exit_layer = [None] * len(first), [0] * len(first)
    exit_logits = [None] * len(first)
    token_layers = 0
    for i, (layer, head) in enumerate(zip(layers, model.exits)):
        out = layer(h)
        token_layers += int(running.sum()) if mode == "tokee" else n
        h = torch.where(running[None, :, None], out, h)
        if not first:
            break
        logits = head(h[0, first])
        labels = logits.argmax(-1).tolist()
        if i + 1 == depth:
            for j in range(len(first)):
                if pred[j] is None:
                    pred[j], exit_layer[j], exit_logits[j] = labels[j], i + 1, logits[j]
            break
        u = uncertainty(logits)
        if mode == "sentee":
            pooled = u.max() if pool == "max" else u.mean()
            if pooled < thresholds[i]:
                pred, exit_layer, exit_logits = labels, [i + 1] * len(first), list(logits)
                break
            continue
        win = F.max_pool1d(u[None, None], kernel_size=window, stride=1, padding=window // 2)[0, 0]
        for j in range(len(first)):
            own = token_thresholds is not None and u[j] < token_thresholds[i]  # --t_level_t
            if pred[j] is None and (win[j] < thresholds[i] or own):
                pred[j], exit_layer[j], exit_logits[j] = labels[j], i + 1, logits[j]
                running[pieces[j]] = not freeze
        if all(p is not None for p in pred):
            break
    num_labels = model.config.num_labels
    exit_logits = torch.stack(exit_logits) if first else torch.zeros(0, num_labels)
    return pred, exit_layer, token_layers, exit_logits
