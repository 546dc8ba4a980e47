"""References for the early-exit family."""

import torch


def exit_entropy(logits):
    """Shannon entropy (natural log) of softmax(logits) over the last dimension.

    Computed in float64 for float64 inputs and in float32 otherwise, as ``log1p(a) + u / (1 + a)`` with ``m`` the
    row maximum, ``a`` the sum of ``exp(z - m)`` over every class but the (first) argmax and ``u`` the sum of
    ``exp(z - m) * (m - z)``: every term is >= 0, so the result keeps its relative precision even where the
    entropy is tiny (large logits), where ``-sum p log p`` cancels. Zero-probability classes (-inf logits) add
    nothing; a row holding NaN or +inf, or with no finite logit, gives NaN.
    """
    x = logits if logits.dtype == torch.float64 else logits.float()
    undefined = torch.isnan(x).any(-1) | (x == float("inf")).any(-1) | (x == float("-inf")).all(-1)
    x = torch.where(
        undefined.unsqueeze(-1), torch.zeros_like(x), x
    )  # undefined rows are set to NaN below
    m, top = x.max(dim=-1, keepdim=True)
    d = m - x  # >= 0; +inf for a -inf logit
    e = torch.exp(-d)
    real = x > float("-inf")
    a = torch.where(real, e, torch.zeros_like(e)).scatter(-1, top, 0.0).sum(-1)
    u = torch.where(real, e * d, torch.zeros_like(e)).sum(-1)
    h = torch.log1p(a) + u / (1 + a)
    return torch.where(undefined, torch.full_like(h, float("nan")), h)


# ---- exit criteria (DESIGN.md, "Early exit") ----

CRITERIA = ("entropy", "max_prob", "patience")


def exit_max_prob(logits):
    """Largest probability of softmax(logits) per row (float64 for float64 inputs, else float32); NaN where the
    softmax is undefined (a NaN or +inf logit, or no finite logit)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    p = torch.softmax(x, dim=-1).amax(dim=-1)
    return torch.where(undefined_rows(x), torch.full_like(p, float("nan")), p)


def undefined_rows(logits):
    """Rows whose prediction is undefined: a NaN or +inf logit, or (with C > 1) no finite logit. Such a sample never
    exits early and breaks a patience streak. A one-column (regression) row is undefined when not finite."""
    if logits.shape[-1] == 1:
        return ~torch.isfinite(logits[..., 0])
    return (
        torch.isnan(logits).any(-1)
        | (logits == float("inf")).any(-1)
        | (logits == float("-inf")).all(-1)
    )


def predictions(logits):
    """What a patience streak compares between layers, as float64 with NaN where undefined: the argmax (first
    maximal class) for classification, the value itself for a one-column regression head."""
    x = logits.double()
    pred = x[..., 0] if x.shape[-1] == 1 else x.argmax(dim=-1).double()
    return torch.where(undefined_rows(logits), torch.full_like(pred, float("nan")), pred)


def exit_decision(
    logits, layer, criterion, *, threshold=None, patience=None, prev=None, counter=None, last=False
):
    """One layer's exit decision for a batch of rows, written for clarity.

    ``logits [R, C]``: this layer's off-ramp logits; ``layer``: 1-based layer number; ``prev [R]`` (float64, NaN
    where none) and ``counter [R]`` (int64): the patience state from the previous layer (ignored otherwise).
    Returns ``(exits [R] bool, prev [R], counter [R])``, the last two being the state after this layer.

    entropy: exit when H(softmax) < threshold (0: never early). max_prob: exit when max softmax >= threshold.
    patience (PABEE): the counter goes up by one when this layer's prediction equals the previous layer's
    (classification: argmax; a one-column regression head: |delta| < threshold), else resets to 0; exit when it
    reaches ``patience`` (0: never early, PABEE's full-depth setting).
    A row whose prediction is undefined (NaN) never exits early; ``last=True`` (the final layer) exits every row.
    """
    rows = logits.shape[0]
    bad = undefined_rows(logits)
    pred = predictions(logits)
    if prev is None:
        prev = torch.full((rows,), float("nan"), dtype=torch.float64, device=logits.device)
    if counter is None:
        counter = torch.zeros(rows, dtype=torch.int64, device=logits.device)
    if criterion == "entropy":
        exits = (
            exit_entropy(logits) < threshold
            if threshold > 0
            else torch.zeros(rows, dtype=torch.bool, device=logits.device)
        )
    elif criterion == "max_prob":
        exits = exit_max_prob(logits) >= threshold
    elif criterion == "patience":
        if logits.shape[-1] == 1:
            same = (pred - prev).abs() < threshold  # NaN on either side: not the same
        else:
            same = pred == prev
        same = same & (layer > 1)
        counter = torch.where(same, counter + 1, torch.zeros_like(counter))
        exits = (
            counter >= patience if patience > 0 else torch.zeros_like(same)
        )  # patience 0: full depth
    else:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    exits = (exits & ~bad) | last
    return exits, pred, counter


def early_exit_loop(
    layers, heads, hidden, attention_mask=None, *, criterion, threshold=None, patience=None
):
    """The ground truth for batched early exit: each sample alone through the layers, stopping at its first exit.

    ``layers[i](hidden [1, N, Dm], attention_mask [1, N] (True = real token) or None)`` and
    ``heads[i](hidden) -> [1, C]``. Returns
    ``(logits [B, C], exit_layer [B] int64, 1-based)``.
    """
    depth = len(layers)
    out_logits, out_layer = [], []
    for b in range(hidden.shape[0]):
        h = hidden[b : b + 1]
        m = None if attention_mask is None else attention_mask[b : b + 1]
        prev = counter = None
        for i in range(depth):
            h = layers[i](h, m)
            z = heads[i](h)
            exits, prev, counter = exit_decision(
                z,
                i + 1,
                criterion,
                threshold=threshold,
                patience=patience,
                prev=prev,
                counter=counter,
                last=i == depth - 1,
            )
            if bool(exits[0]):
                out_logits.append(z[0])
                out_layer.append(i + 1)
                break
    if not out_logits:
        return hidden.new_empty((0, 0)), torch.zeros(0, dtype=torch.int64, device=hidden.device)
    return torch.stack(out_logits), torch.tensor(out_layer, dtype=torch.int64, device=hidden.device)


# ---- multi-exit training losses ----


def multi_exit_distillation_loss(exit_logits, labels, gamma=0.9, temperature=3.0):
    """RomeBERT's joint loss over every exit ``exit_logits [L, B, C]`` with integer ``labels [B]``.

    The last exit is the teacher (detached): it is trained by cross-entropy alone. Every other exit i gets
    ``(1 - gamma) * CE(z_i, y) + gamma * T^2 * KL(softmax(z_L / T) || softmax(z_i / T))``, summed over exits. The
    cross-entropy is a batch mean; the KL term is ``torch.nn.KLDivLoss()`` with its default reduction, the mean over
    all ``B * C`` elements, as RomeBERT's ``KDLoss`` computes it (romebert/RomeBERT,
    ``transformers/new_modeling_highway_bert.py``). Computed in float64 for float64 inputs, else float32.
    """
    x = exit_logits if exit_logits.dtype == torch.float64 else exit_logits.float()
    t = float(temperature)
    loss = torch.nn.functional.cross_entropy(x[-1], labels)
    teacher = torch.log_softmax(x[-1].detach() / t, dim=-1)
    for i in range(x.shape[0] - 1):
        ce = torch.nn.functional.cross_entropy(x[i], labels)
        kd = torch.nn.functional.kl_div(
            torch.log_softmax(x[i] / t, dim=-1), teacher, log_target=True, reduction="mean"
        )
        loss = loss + (1 - gamma) * ce + gamma * t * t * kd
    return loss


def pabee_loss(exit_logits, labels):
    """PABEE's layer-weighted loss: ``sum_i i * loss_i / sum_i i`` over exits i = 1..L, where loss_i is the
    cross-entropy (integer labels) or, for a one-column regression head with float labels, the mean squared error."""
    x = exit_logits if exit_logits.dtype == torch.float64 else exit_logits.float()
    depth = x.shape[0]
    total = x.new_zeros(())
    for i in range(depth):
        if x.shape[-1] == 1 and labels.is_floating_point():
            li = torch.nn.functional.mse_loss(x[i, :, 0], labels.to(x.dtype))
        else:
            li = torch.nn.functional.cross_entropy(x[i], labels)
        total = total + (i + 1) * li
    return total / (depth * (depth + 1) / 2)


def _exit_loss(x, labels):
    """One exit's loss: mean squared error for a one-column head with float labels, else cross-entropy."""
    if x.shape[-1] == 1 and labels.is_floating_point():
        return torch.nn.functional.mse_loss(x[:, 0], labels.to(x.dtype))
    return torch.nn.functional.cross_entropy(x, labels)


def deebert_loss(exit_logits, labels, stage):
    """DeeBERT's two-stage training loss (castorini/DeeBERT, ``modeling_highway_bert.py``): stage 1 trains the
    backbone with the last exit's loss; stage 2 trains the off-ramps on the sum of the other exits' losses
    (``sum(highway_losses[:-1])``). Cross-entropy, or MSE for a one-column head with float labels."""
    x = exit_logits if exit_logits.dtype == torch.float64 else exit_logits.float()
    if stage == 1:
        return _exit_loss(x[-1], labels)
    total = x.new_zeros(())
    for i in range(x.shape[0] - 1):
        total = total + _exit_loss(x[i], labels)
    return total
