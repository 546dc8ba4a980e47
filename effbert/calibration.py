"""Exit threshold calibration from held-out off-ramp logits: the speed-accuracy curve of a
criterion, and the threshold (or patience) that reaches a target average exit layer or a target
accuracy drop; and the early-exit report of ``effbert finetune`` and ``effbert demo``: every exit's
score, then the batched early exit measured at a range of thresholds against a full-depth pass of
the same batched loop (``early_exit_rows``, ``report_lines``)."""

from dataclasses import dataclass

import torch

from . import reference
from .ops.early_exit import check_criterion, check_exit_logits, check_labels_in_range

__all__ = [
    "Calibration",
    "exit_layers",
    "speed_accuracy_curve",
    "calibrate_threshold",
    "exits_at_chance",
    "run_early_exit",
    "every_exit_logits",
    "threshold_candidates",
    "early_exit_rows",
    "report_lines",
    "threshold_texts",
    "score",
    "chance_warning",
    "speedup_note",
    "TIMING_ROUNDS",
    "NOISE_FOOTNOTE",
]


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
        exits, prev, counter = reference.exit_decision(
            exit_logits[i],
            i + 1,
            criterion,
            threshold=threshold,
            patience=patience,
            prev=prev,
            counter=counter,
            last=i == depth - 1,
        )
        new = exits & ~done
        layer[new] = i + 1
        done |= exits
    return layer


def _accuracy(exit_logits, layers, labels):
    if labels is None:
        return float("nan")
    chosen = exit_logits[layers - 1, torch.arange(exit_logits.shape[1], device=exit_logits.device)]
    pred = chosen.argmax(-1) if exit_logits.shape[-1] > 1 else chosen[:, 0]
    if (
        exit_logits.shape[-1] == 1
    ):  # regression: report the negative mean squared error as the "accuracy"
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
                raise ValueError(
                    "exit_logits has no finite criterion value to calibrate on (all NaN)"
                )
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


def calibrate_threshold(
    exit_logits, labels=None, *, criterion, target_avg_exit=None, max_accuracy_drop=None, num=64
):
    """The threshold (patience for "patience") to use with ``MultiExitEncoder.early_exit``.

    ``target_avg_exit``: the most accurate candidate whose average exit layer is at most the target (the least
    early one, when there are no labels). ``max_accuracy_drop``: the fastest candidate whose accuracy is within
    that drop of the full-depth accuracy (needs ``labels``). Exactly one target is given.
    """
    check_exit_logits(
        exit_logits,
        labels
        if labels is not None
        else torch.zeros(exit_logits.shape[1], device=exit_logits.device),
    )
    check_criterion(
        criterion, 0.5 if criterion != "patience" else None, 1 if criterion == "patience" else None
    )
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
    full = _accuracy(
        exit_logits, torch.full((exit_logits.shape[1],), depth, device=exit_logits.device), labels
    )
    avg, acc = curve["avg_exit_layer"], curve["accuracy"]
    if target_avg_exit is not None:
        ok = avg <= target_avg_exit + 1e-12
        if not ok.any():
            raise ValueError(
                f"no candidate reaches an average exit layer of {target_avg_exit} (the earliest is "
                f"{float(avg.min()):.3f})"
            )
        key = acc if labels is not None else avg
        idx = torch.nonzero(ok).flatten()
        best = idx[
            torch.argmax(key[idx])
        ]  # the most accurate (or, without labels, the latest) that is fast enough
    else:
        ok = acc >= full - max_accuracy_drop - 1e-12
        if not ok.any():
            raise ValueError(
                f"no candidate stays within {max_accuracy_drop} of the full-depth accuracy {full:.4f}"
            )
        idx = torch.nonzero(ok).flatten()
        best = idx[torch.argmin(avg[idx])]
    t = float(curve["threshold"][best])
    return Calibration(
        criterion=criterion,
        threshold=int(t) if criterion == "patience" else t,
        avg_exit_layer=float(avg[best]),
        accuracy=float(acc[best]),
        full_depth_accuracy=full,
        curve=curve,
    )


def exits_at_chance(exit_logits, labels, margin=0.01):
    """The off-ramps (1-based) whose accuracy on ``labels`` is at most the majority class's share plus ``margin``:
    a head that does no better than always answering the commonest class, whose exits are guesses.

    ``exit_logits [L, B, C]`` float, ``labels [B]`` int class indices. Returns ``(off-ramps, majority share)``.
    Raises ``ValueError`` on mismatched shapes, labels outside ``[0, C)`` or a negative ``margin``; ``TypeError``
    on non-integer labels."""
    check_exit_logits(exit_logits, labels)
    check_labels_in_range(
        labels.cpu(), exit_logits.shape[-1]
    )  # on the host: the range is checked on any device
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if labels.numel() == 0:
        return [], 0.0
    chance = float(torch.bincount(labels.long().flatten()).max()) / labels.numel()
    accuracy = (exit_logits.argmax(-1) == labels[None]).double().mean(1)
    return [i + 1 for i, acc in enumerate(accuracy.tolist()) if acc <= chance + margin], chance


# ---------------------------------------------------------------------------- the early-exit report

TIMING_ROUNDS = 3  # full-depth / early-exit pairs timed per threshold
NOISE_FOOTNOTE = (
    "* above the bound the layers set (full depth / average exit layer): timing "
    "noise on a busy machine, not a real speed-up"
)


def _batches(input_ids, lengths, batch, device):
    """``(input_ids [b, n], attention_mask [b, n] bool)`` on ``device``, ``batch`` rows at a time,
    each cut to its longest row."""
    from .data.tsv import batch_rows

    for s in range(0, input_ids.shape[0], batch):
        rows = torch.arange(s, min(s + batch, input_ids.shape[0]))
        yield batch_rows(input_ids, lengths, rows, device)


def run_early_exit(model, input_ids, lengths, batch, device, **criterion):
    """Batched early exit (``model.early_exit(ids, mask, **criterion)``) over every row of
    ``input_ids [n, N]`` (``lengths [n]`` real pieces each), ``batch`` rows at a time:
    ``(logits [n, C], exit layers [n] int64)``."""
    logits, layers = [], []
    for ids, mask in _batches(input_ids, lengths, batch, device):
        z, layer = model.early_exit(ids, mask, **criterion)
        logits.append(z)
        layers.append(layer)
    return torch.cat(logits), torch.cat(layers)


def every_exit_logits(model, input_ids, lengths, batch, device):
    """Every off-ramp's logits ``[L, n, C]`` of a multi-exit model's full forward, ``batch`` rows at
    a time."""
    with torch.no_grad():
        batches = _batches(input_ids, lengths, batch, device)
        return torch.cat([model(ids, mask).exit_logits for ids, mask in batches], 1)


def threshold_candidates(exit_logits, criterion, quantiles=(0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9)):
    """Thresholds at ``quantiles`` of the early off-ramps' scores (``exit_logits [L, B, C]``), so
    each lets a different share of samples out, the latest exits first; for "patience" every
    patience from ``L - 1`` to 1."""
    depth = exit_logits.shape[0]
    if criterion == "patience":
        return list(range(depth - 1, 0, -1))
    flat = exit_logits[:-1].reshape(-1, exit_logits.shape[-1]).double()
    if flat.numel() == 0:
        return []
    score_of = reference.exit_entropy if criterion == "entropy" else reference.exit_max_prob
    scores = score_of(flat)
    scores = scores[torch.isfinite(scores)]
    if scores.numel() == 0:
        return []
    q = torch.tensor(quantiles, dtype=torch.float64)
    values = torch.quantile(scores.cpu(), q).unique().tolist()
    if criterion == "entropy":  # exit when entropy < t: a zero threshold would exit nobody
        return sorted({v for v in values if v > 0})
    # max_prob: earliest exits last
    return sorted({min(1.0, v) for v in values if v > 0}, reverse=True)


def score(logits, y, regression=False):
    """Accuracy (classification) or mean squared error (a one-output regression head) of
    ``logits [B, C]``."""
    if regression:
        return float(((logits[:, 0].double() - y.double()) ** 2).mean())
    return float((logits.argmax(-1) == y).double().mean())


def speedup_note(speedup, avg_exit_layer, depth):
    """``"*"`` when a measured speed-up exceeds what the layers allow (``depth / avg_exit_layer``,
    by 5%): the figure is timing noise, not a speed-up; ``""`` otherwise."""
    return "*" if speedup > 1.05 * depth / avg_exit_layer else ""


def early_exit_rows(
    model,
    input_ids,
    lengths,
    y,
    device,
    *,
    criterion,
    thresholds,
    batch,
    full,
    regression_delta=None,
    depth=None,
    rounds=TIMING_ROUNDS,
):
    """The batched early exit measured at each of ``thresholds`` (patiences for "patience") against
    ``full`` (the keyword arguments of a full-depth pass of the same loop: patience 0 or entropy
    threshold 0), one dict a row, the full-depth row first: threshold, avg_exit_layer, layers_saved,
    speedup (``bench.timing.paired_speedup``: the median of ``rounds`` interleaved pairs),
    speedup_bound, above_bound, accuracy (the mean squared error with ``regression_delta``, PABEE's
    rule for a regression head), delta, seconds. ``depth``: the number of layers (None:
    ``model.config.num_hidden_layers``). Raises ``ValueError`` when ``full`` lets a sample out
    early."""
    from .bench.timing import paired_speedup

    depth = model.config.num_hidden_layers if depth is None else depth
    regression = regression_delta is not None
    run_early_exit(model, input_ids[:batch], lengths[:batch], batch, device, **full)  # warm-up
    z_full, l_full = run_early_exit(model, input_ids, lengths, batch, device, **full)
    if not bool((l_full == depth).all()):
        raise ValueError(f"full={full} let samples exit early: not a full-depth pass")
    acc_full = score(z_full, y, regression)
    rows = [
        dict(
            threshold=None,
            avg_exit_layer=float(depth),
            layers_saved=0.0,
            speedup=1.0,
            speedup_bound=1.0,
            above_bound=False,
            accuracy=acc_full,
            delta=0.0,
            seconds=None,
        )
    ]
    for t in thresholds:
        kw = dict(patience=int(t)) if criterion == "patience" else dict(threshold=float(t))
        if regression:
            # a prediction is unchanged when it moves by less than this
            kw["threshold"] = regression_delta
        out = {}

        def early():
            out["z"], out["layer"] = run_early_exit(
                model, input_ids, lengths, batch, device, criterion=criterion, **kw
            )

        def full_depth():
            run_early_exit(model, input_ids, lengths, batch, device, **full)

        speed, t_full = paired_speedup(full_depth, early, device, rounds)
        acc, avg = score(out["z"], y, regression), float(out["layer"].double().mean())
        marked = bool(speedup_note(speed, avg, depth))
        rows.append(
            dict(
                threshold=t,
                avg_exit_layer=avg,
                layers_saved=1 - avg / depth,
                speedup=speed,
                speedup_bound=depth / avg,
                above_bound=marked,
                accuracy=acc,
                delta=acc - acc_full,
                seconds=t_full / speed,
            )
        )
        rows[0]["seconds"] = t_full
    return rows


def threshold_texts(thresholds, criterion, digits=5):
    """Each threshold as printed: patiences as integers; other thresholds with ``digits``
    significant digits, or as many more as it takes for distinct values to print distinct (at most
    17)."""
    if criterion == "patience":
        return [f"{int(t):d}" for t in thresholds]
    for d in range(digits, 18):
        texts = [f"{float(t):.{d}g}" for t in thresholds]
        if len(set(texts)) == len(set(float(t) for t in thresholds)):
            return texts
    return texts


def report_lines(rows, *, criterion, metric, device, rounds=TIMING_ROUNDS):
    """The early-exit table of ``early_exit_rows``' rows as lines: threshold, average exit layer,
    layers saved, speed-up (``*`` when above the layers' bound), ``metric`` and its change from full
    depth, then how the speed-up was measured and, when a row is marked, the footnote saying why."""
    lines = [
        f"  {'threshold':>9} {'avg exit':>9} {'layers saved':>13} {'speed-up':>9} {metric:>9} "
        f"{'vs full':>8}"
    ]
    texts = ["full"] + threshold_texts([r["threshold"] for r in rows[1:]], criterion)
    for t, r in zip(texts, rows):
        lines.append(
            f"  {t:>9} {r['avg_exit_layer']:9.2f} {r['layers_saved']:12.1%} "
            f"{r['speedup']:8.2f}x "
            f"{r['accuracy']:9.4f} {r['delta']:+8.4f}{'  *' if r['above_bound'] else ''}"
        )
    full_s = rows[0]["seconds"]
    lines.append(
        f"  (speed-up: {'wall' if device.type == 'cuda' else 'CPU'} time of the batched "
        "full-depth pass "
        f"over the early-exit pass, the median of {rounds} interleaved pairs"
        + (f"; {full_s:.2f} s full)" if full_s is not None else ")")
    )
    if any(r["above_bound"] for r in rows):
        lines.append("  " + NOISE_FOOTNOTE)
    return lines


def chance_warning(exit_logits, labels):
    """The report's line naming the off-ramps at chance (``exits_at_chance``), or None."""
    at_chance, chance = exits_at_chance(exit_logits, labels)
    if not at_chance:
        return None
    many = len(at_chance) > 1
    return (
        f"warning: off-ramp{'s' if many else ''} {', '.join(map(str, at_chance))} "
        f"{'are' if many else 'is'} at "
        f"chance (accuracy at most the majority class's share, {chance:.4f}): "
        f"{'their' if many else 'its'} exits are guesses"
    )
