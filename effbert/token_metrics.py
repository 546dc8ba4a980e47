"""Sequence-labelling metrics of multi-exit token classifiers and the calibration of the TOKEE /
SENTEE threshold (Li et al., "Accelerating BERT Inference for Sequence Labeling via Early-Exit", ACL
2021): entity F1 with ``seqeval`` (the CoNLL-2003 ``conlleval`` chunk F1; an optional dependency,
``pip install effbert[tokens]``) per layer and at the early exit, and the threshold that reaches a
target average exit layer on held-out data.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "require_seqeval",
    "label_sequences",
    "entity_f1",
    "per_layer_entity_f1",
    "TokenExitPoint",
    "token_exit_curve",
    "calibrate_token_threshold",
]


def require_seqeval():
    """``seqeval.metrics``; ``ImportError`` with the install hint when ``seqeval`` is missing."""
    try:
        import seqeval.metrics
    except ImportError:
        raise ImportError(
            "entity F1 needs seqeval: pip install 'effbert[tokens]' (or seqeval==1.2.2)"
        ) from None
    return seqeval.metrics


def _check_pair(pred, labels):
    for name, t in (("pred", pred), ("labels", labels)):
        if (
            not isinstance(t, torch.Tensor)
            or t.dim() != 2
            or t.dtype not in (torch.int32, torch.int64)
        ):
            raise ValueError(f"{name} must be an int [B, N] tensor")
    if pred.shape != labels.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and labels {tuple(labels.shape)} must have one shape"
        )


def label_sequences(ids, labels, id2label):
    """The label names of each row's labelled tokens (``labels != -100``): a list of B lists of str,
    the input of ``seqeval``. ``ids``, ``labels``: int ``[B, N]``; ``id2label``: dict int -> str
    covering ``ids`` there. Raises ``ValueError`` naming the argument."""
    _check_pair(ids, labels)
    if not isinstance(id2label, dict):
        raise ValueError("id2label must be a dict int -> str")
    keep = labels != -100
    out = []
    for row, k in zip(ids.tolist(), keep.tolist()):
        names = []
        for i, on in zip(row, k):
            if on:
                if i not in id2label:
                    raise ValueError(f"id2label has no name for class {i}")
                names.append(id2label[i])
        out.append(names)
    return out


def entity_f1(pred, labels, id2label):
    """Micro entity F1 of ``seqeval.metrics.f1_score`` (default mode: ``conlleval``'s chunking) of
    the predicted classes ``pred`` against ``labels`` (int ``[B, N]``, -100: no label) over the
    labelled tokens. Returns a float in [0, 1] (0 when there is no entity at all). Raises
    ``ValueError`` naming the argument and ``ImportError`` without seqeval."""
    metrics = require_seqeval()
    y_true = label_sequences(labels.masked_fill(labels == -100, 0), labels, id2label)
    y_pred = label_sequences(pred.masked_fill(labels == -100, 0), labels, id2label)
    return float(metrics.f1_score(y_true, y_pred, zero_division=0))


def per_layer_entity_f1(exit_logits, labels, id2label):
    """``entity_f1`` of every layer's classifier: ``exit_logits`` float ``[L, B, N, C]`` (a
    multi-exit model's ``exit_logits``), ``labels`` int ``[B, N]``. Returns a list of L floats,
    first layer first."""
    if not isinstance(exit_logits, torch.Tensor) or exit_logits.dim() != 4:
        raise ValueError("exit_logits must be a float [L, B, N, C] tensor")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(exit_logits.shape[1:3]):
        raise ValueError(f"labels must be an int [B, N] = {list(exit_logits.shape[1:3])} tensor")
    return [entity_f1(z.argmax(-1), labels, id2label) for z in exit_logits]


@dataclass
class TokenExitPoint:
    """One threshold's result on held-out batches: ``threshold`` (the first half's;
    ``published_token_thresholds`` doubles it for the second half), ``f1`` (entity F1; NaN when not
    asked), ``avg_exit_layer`` (mean 1-based exit layer over the words), ``token_layers``
    (token-layers run) and ``full_token_layers`` (every real token through every layer): ``saved = 1
    - token_layers / full_token_layers``."""

    threshold: float
    f1: float
    avg_exit_layer: float
    token_layers: int
    full_token_layers: int

    @property
    def saved(self):
        return 1.0 - self.token_layers / max(self.full_token_layers, 1)


def _check_batches(batches):
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ValueError(
            "batches must be a non-empty list of dicts with input_ids, attention_mask, labels"
        )
    for b in batches:
        if not isinstance(b, Mapping) or not {"input_ids", "attention_mask", "labels"} <= set(b):
            raise ValueError("each batch must be a dict with input_ids, attention_mask and labels")


def token_exit_curve(model, batches, thresholds, *, mode="tokee", window=5, with_f1=True, **kwargs):
    """``model.early_exit_token_labels`` (a multi-exit ``TupeBertForTokenClassification`` in eval
    mode) over ``batches`` (a list of dicts ``input_ids``, ``attention_mask``, ``labels`` [B, N]
    each, ``labels`` -100 at tokens without a label) at each base threshold of ``thresholds``
    (per-layer thresholds: TOKEE the published schedule ``published_token_thresholds``, SENTEE the
    value at every layer). ``kwargs`` go to ``early_exit_token_labels`` (``pool``,
    ``copy_wordpieces``, ``token_thresholds``). Returns a list of ``TokenExitPoint``. Raises
    ``ValueError`` naming the argument."""
    from .models.token_classification import TOKEN_EXIT_MODES, published_token_thresholds

    _check_batches(batches)
    if mode not in TOKEN_EXIT_MODES:
        raise ValueError(f"mode must be one of {TOKEN_EXIT_MODES}, got {mode!r}")
    thresholds = [float(t) for t in thresholds]
    if not thresholds or not all(math.isfinite(t) for t in thresholds):
        raise ValueError("thresholds must be a non-empty list of finite floats")
    depth = model.config.num_hidden_layers
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    points = []
    for t in thresholds:
        per_layer = published_token_thresholds(t, depth) if mode == "tokee" else [t] * depth
        preds, golds, exits, used, full = [], [], [], 0, 0
        for b in batches:
            labels = b["labels"]
            out = model.early_exit_token_labels(
                b["input_ids"],
                b["attention_mask"],
                label_mask=labels != -100,
                mode=mode,
                thresholds=per_layer,
                window=window,
                **kwargs,
            )
            used += out.token_layers
            full += int(b["attention_mask"].sum()) * depth
            exits.append(out.exit_layer[labels != -100].double())
            preds.append(out.labels)
            golds.append(labels)
        f1 = _pooled_f1(preds, golds, id2label) if with_f1 else math.nan
        every = torch.cat(exits)
        points.append(
            TokenExitPoint(t, f1, float(every.mean()) if every.numel() else math.nan, used, full)
        )
    return points


def _pooled_f1(preds, golds, id2label):
    """Entity F1 over several batches pooled (the corpus-level score, not a mean of batch
    scores)."""
    metrics = require_seqeval()
    y_true, y_pred = [], []
    for p, g in zip(preds, golds):
        y_true += label_sequences(g.masked_fill(g == -100, 0), g, id2label)
        y_pred += label_sequences(p.masked_fill(g == -100, 0), g, id2label)
    return float(metrics.f1_score(y_true, y_pred, zero_division=0))


def calibrate_token_threshold(
    model, batches, target_avg_exit, *, candidates=None, mode="tokee", window=5, **kwargs
):
    """The largest candidate threshold whose average exit layer on ``batches`` is still at least
    ``target_avg_exit`` (so the target is an upper bound on the speed taken), as
    ``effbert.calibration.calibrate_threshold`` picks one for the sequence classifiers; the
    candidates are measured with ``token_exit_curve`` (no F1). ``candidates``: ascending floats
    (default 20 values, 0.005 to 0.5 on a log scale). Returns ``(point, curve)``: the chosen
    ``TokenExitPoint`` (the smallest candidate when none reaches the target) and every
    candidate's. Raises ``ValueError`` naming the argument."""
    depth = model.config.num_hidden_layers
    if (
        isinstance(target_avg_exit, bool)
        or not isinstance(target_avg_exit, (int, float))
        or not 1 <= target_avg_exit <= depth
    ):
        raise ValueError(
            f"target_avg_exit must be a number in [1, {depth}], got {target_avg_exit!r}"
        )
    if candidates is None:
        candidates = torch.logspace(math.log10(0.005), math.log10(0.5), 20).tolist()
    candidates = [float(c) for c in candidates]
    if candidates != sorted(candidates):
        raise ValueError("candidates must be ascending")
    curve = token_exit_curve(
        model, batches, candidates, mode=mode, window=window, with_f1=False, **kwargs
    )
    ok = [p for p in curve if p.avg_exit_layer >= target_avg_exit]
    return (ok[-1] if ok else curve[0]), curve
