"""The picture of a training run with early exit (matplotlib, imported only here): the loss curve,
and the speed-accuracy of the off-ramps (``calibration.speed_accuracy_curve`` offline, the measured
batched early exit, full depth)."""

__all__ = ["plot_run"]


def plot_run(
    path,
    losses,
    *,
    points,
    full_accuracy,
    depth,
    criterion,
    curve=None,
    loss_title="Training",
    loss_label="loss",
    smooth=False,
    metric="accuracy",
):
    """Write a two-panel PNG to ``path``; returns False (writing nothing) when matplotlib is not
    installed.

    ``losses``: one float per step. ``points``: ``(speed-up, accuracy)`` pairs of the measured early
    exit. ``full_accuracy``: the full-depth accuracy (a horizontal line). ``depth``: the number of
    layers. ``curve``: the offline curve (a dict with ``speedup`` and ``accuracy`` sequences) or
    None. ``smooth``: also draw the running mean of about a twentieth of the steps. ``metric``: the
    name of the score on the right panel's axis and title (token classification: entity F1).
    Raises ``ValueError`` for a ``metric`` that is not a str."""
    if not isinstance(metric, str):
        raise ValueError(f"metric must be a str, got {type(metric).__name__}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(losses, lw=0.6 if smooth else 0.8, alpha=0.5 if smooth else 1.0, label="per step")
    if smooth and len(losses):
        k = max(1, len(losses) // 20)
        mean = np.convolve(losses, np.ones(k) / k, mode="valid")
        left.plot(np.arange(k - 1, len(losses)), mean, lw=1.5, label=f"mean of {k}")
        left.legend()
    left.set_xlabel("step")
    left.set_ylabel(loss_label)
    left.set_title(loss_title)
    if curve is not None:
        right.plot(
            np.asarray(curve["speedup"]),
            np.asarray(curve["accuracy"]),
            ".-",
            lw=1,
            label="layer speed-up (offline)",
        )
    right.plot(
        [p[0] for p in points], [p[1] for p in points], "o", label="measured batched early exit"
    )
    right.axhline(full_accuracy, color="gray", ls="--", lw=1, label="full depth")
    right.set_xlabel(f"speed-up over {depth} layers")
    right.set_ylabel(metric)
    right.set_title(f"Early exit: speed vs {metric} ({criterion})")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
