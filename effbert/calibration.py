"""Exit threshold calibration from held-out off-ramp logits: the speed-accuracy curve of a criterion, and the
threshold (or patience) that reaches a target average exit layer or a target accuracy drop."""

from dataclasses import dataclass

import torch

from . import reference
from .ops.early_exit import check_criterion, check_exit_logits, check_labels_in_range

__all__ = ["Calibration", "exit_layers", "speed_accuracy_curve", "calibrate_threshold", "exits_at_chance"]


@dataclass
class Calibration:
    criterion: str
    threshold: float  # for "patience": the patience (an int)
    avg_exit_layer: float
    accuracy: float  # NaN without labels
    full_depth_accuracy: float
    curve: dict  # "threshold", "avg_exit_layer", "accuracy", "speedup": float64 tensors, one entry per candidate


def _per_layer_scores(exit_logits, criterion):
    """What each criterion compares with its threshold, per exit and sample ([L, B], float64; NaN never exits)."""
    flat = exit_logits.reshape(-1, exit_logits.shape[-1])
    if criterion == "entropy":
        s = reference.exit_entropy(flat.double())
    else:
        s = reference.exit_max_prob(flat.double())
    return s.reshape(exit_logits.shape[:2])


def exit_layers(exit_logits, criterion, threshold=None, patience=None):
    """Each sample's exit layer (1-based, int64 [B]) under a criterion, from every exit's logits ``[L, B, C]``: the
    same decisions the batched early exit makes, replayed offline."""
    check_exit_logits(exit_logits, torch.zeros(exit_logits.shape[1], device=exit_logits.device))
    check_criterion(criterion, threshold, patience, classes=exit_logits.shape[-1])
    depth, batch = exit_logits.shape[:2]
    layer = torch.full((batch,), depth, dtype=torch.int64, device=exit_logits.device)
    done = torch.zeros(batch, dtype=torch.bool, device=exit_logits.device)
    prev = counter = None
    for i in range(depth):
        exits, prev, counter = reference.exit_decision(exit_logits[i], i + 1, criterion, threshold=threshold,
                                                       patience=patience, prev=prev, counter=counter,
                                                       last=i == depth - 1)
        new = exits & ~done
        layer[new] = i + 1
        done |= exits
    return layer


def _accuracy(exit_logits, layers, labels):
    if labels is None:
        return float("nan")
    chosen = exit_logits[layers - 1, torch.arange(exit_logits.shape[1], device=exit_logits.device)]
    pred = chosen.argmax(-1) if exit_logits.shape[-1] > 1 else chosen[:, 0]
    if exit_logits.shape[-1] == 1:  # regression: report the negative mean squared error as the "accuracy"
        return -float(((pred.double() - labels.double()) ** 2).mean())
    return float((pred == labels).double().mean())


def speed_accuracy_curve(exit_logits, labels=None, *, criterion, candidates=None, num=64):
    """For each candidate threshold (patience for "patience"): the average exit layer, the accuracy (with
    ``labels``) and the speed-up over full depth (``L / avg exit layer``, layers being the cost), for a plot."""
    depth = exit_logits.shape[0]
    if candidates is None:
        if criterion == "patience":
            candidates = list(range(1, depth))
        else:
            scores = _per_layer_scores(exit_logits, criterion)
            scores = scores[torch.isfinite(scores)]
            if scores.numel() == 0:
                raise ValueError("exit_logits has no finite criterion value to calibrate on (all NaN)")
            q = torch.linspace(0, 1, num, dtype=torch.float64, device=scores.device)
            cand = torch.quantile(scores, q).unique()
            if criterion == "entropy":  # exit when H < t: step just above each value so it counts
                cand = cand[cand > 0] * (1 + 1e-9)
                cand = cand if cand.numel() else torch.tensor([1e-9], dtype=torch.float64)
            else:
                cand = cand.clamp(1e-12, 1.0)
            candidates = cand.tolist()
    rows = {"threshold": [], "avg_exit_layer": [], "accuracy": [], "speedup": []}
    for c in candidates:
        kw = dict(patience=int(c)) if criterion == "patience" else dict(threshold=float(c))
        layers = exit_layers(exit_logits, criterion, **kw)
        avg = float(layers.double().mean())
        rows["threshold"].append(float(c))
        rows["avg_exit_layer"].append(avg)
        rows["accuracy"].append(_accuracy(exit_logits, layers, labels))
        rows["speedup"].append(depth / avg)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in rows.items()}


def calibrate_threshold(exit_logits, labels=None, *, criterion, target_avg_exit=None, max_accuracy_drop=None,
                        num=64):
    """The threshold (patience for "patience") to use with ``MultiExitEncoder.early_exit``.

    ``target_avg_exit``: the most accurate candidate whose average exit layer is at most the target (the least
    early one, when there are no labels). ``max_accuracy_drop``: the fastest candidate whose accuracy is within
    that drop of the full-depth accuracy (needs ``labels``). Exactly one target is given.
    """
    check_exit_logits(exit_logits, labels if labels is not None else
                      torch.zeros(exit_logits.shape[1], device=exit_logits.device))
    check_criterion(criterion, 0.5 if criterion != "patience" else None, 1 if criterion == "patience" else None)
    if (target_avg_exit is None) == (max_accuracy_drop is None):
        raise ValueError("give exactly one of target_avg_exit and max_accuracy_drop")
    depth = exit_logits.shape[0]
    if target_avg_exit is not None and not 1 <= target_avg_exit <= depth:
        raise ValueError(f"target_avg_exit must be in [1, L] = [1, {depth}], got {target_avg_exit}")
    if max_accuracy_drop is not None:
        if labels is None:
            raise ValueError("max_accuracy_drop needs labels")
        if not max_accuracy_drop >= 0:
            raise ValueError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}")
    curve = speed_accuracy_curve(exit_logits, labels, criterion=criterion, num=num)
    full = _accuracy(exit_logits, torch.full((exit_logits.shape[1],), depth, device=exit_logits.device), labels)
    avg, acc = curve["avg_exit_layer"], curve["accuracy"]
    if target_avg_exit is not None:
        ok = avg <= target_avg_exit + 1e-12
        if not ok.any():
            raise ValueError(f"no candidate reaches an average exit layer of {target_avg_exit} (the earliest is "
                             f"{float(avg.min()):.3f})")
        key = acc if labels is not None else avg
        idx = torch.nonzero(ok).flatten()
        best = idx[torch.argmax(key[idx])]  # the most accurate (or, without labels, the latest) that is fast enough
    else:
        ok = acc >= full - max_accuracy_drop - 1e-12
        if not ok.any():
            raise ValueError(f"no candidate stays within {max_accuracy_drop} of the full-depth accuracy {full:.4f}")
        idx = torch.nonzero(ok).flatten()
        best = idx[torch.argmin(avg[idx])]
    t = float(curve["threshold"][best])
    return Calibration(criterion=criterion, threshold=int(t) if criterion == "patience" else t,
                       avg_exit_layer=float(avg[best]), accuracy=float(acc[best]), full_depth_accuracy=full,
                       curve=curve)


def exits_at_chance(exit_logits, labels, margin=0.01):
    """The off-ramps (1-based) whose accuracy on ``labels`` is at most the majority class's share plus ``margin``:
    a head that does no better than always answering the commonest class, whose exits are guesses.

    ``exit_logits [L, B, C]`` float, ``labels [B]`` int class indices. Returns ``(off-ramps, majority share)``.
    Raises ``ValueError`` on mismatched shapes, labels outside ``[0, C)`` or a negative ``margin``; ``TypeError``
    on non-integer labels."""
    check_exit_logits(exit_logits, labels)
    check_labels_in_range(labels.cpu(), exit_logits.shape[-1])  # on the host: the range is checked on any device
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if labels.numel() == 0:
        return [], 0.0
    chance = float(torch.bincount(labels.long().flatten()).max()) / labels.numel()
    accuracy = (exit_logits.argmax(-1) == labels[None]).double().mean(1)
    return [i + 1 for i, acc in enumerate(accuracy.tolist()) if acc <= chance + margin], chance
