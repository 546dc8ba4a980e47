"""Self-sampling fine-tuning of token-level early exit (stage 2 of Li et al., "Accelerating BERT
Inference for Sequence Labeling via Early-Exit", ACL 2021; LeeSureman/Sequence-Labeling-Early-Exit
``V0/further_train.py``): the stage-1 model's per-layer outputs on the training batches, computed
once in eval mode (the published ``get_pred``), and each step's extra model inputs drawn from them
(``Sample_Stop_Update_Callback``): the simulated exit layer of every token and, with flooding, the
stage-1 per-token losses. The loss itself is the model's (``TupeBertForTokenClassification.forward``
with ``token_exit_layer``)."""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..models.token_classification import draw_self_sampling, self_sampling_token_exit_layers

__all__ = ["stage1_outputs", "self_sampling_inputs"]


@torch.no_grad()
def stage1_outputs(model, batch):
    """The first-stage model's per-layer logits and per-token losses on one training batch, in eval
    mode with no gradient (the published ``get_pred``: ``model.eval()``,
    ``CrossEntropyLoss(reduction='none')``).

    ``model``: a multi-exit ``TupeBertForTokenClassification``; ``batch``: a dict with
    ``input_ids``, ``attention_mask`` and ``labels`` ``[B, N]`` (-100: no label). Returns
    ``(exit_logits [L, B, N, C] float32, token_loss [L, B, N] float32)``, the loss 0 at tokens
    without a label. The model's train/eval mode is
    restored. Raises ``ValueError`` naming what is missing."""
    if getattr(model, "exits", None) is None:
        raise ValueError("model must be a multi-exit token classifier (config.multi_exit=True)")
    if not isinstance(batch, Mapping) or not {"input_ids", "attention_mask", "labels"} <= set(
        batch
    ):
        raise ValueError("batch must be a dict with input_ids, attention_mask and labels")
    was_training = model.training
    model.eval()
    try:
        logits = model(
            batch["input_ids"], attention_mask=batch["attention_mask"]
        ).exit_logits.float()
    finally:
        model.train(was_training)
    labels = batch["labels"]
    depth, b, n, c = logits.shape
    loss = F.cross_entropy(
        logits.reshape(-1, c),
        labels.repeat(depth, 1, 1).reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(depth, b, n)
    return logits, loss


def self_sampling_inputs(
    batch,
    exit_logits,
    token_loss=None,
    *,
    flooding_bias=0.0,
    copy_wordpieces="all",
    max_threshold=1000.0,
    generator=None,
    **draw,
):
    """One stage-2 step's extra model inputs: a fresh ``draw_self_sampling`` for the batch's rows
    (``draw``: its keyword arguments: ``windows``, ``thresholds``, ``token_thresholds``,
    ``sandwich_small``, ``sandwich_full``), the simulated ``token_exit_layer [B, N]``
    (``self_sampling_token_exit_layers`` on the stage-1 ``exit_logits`` at the batch's labelled
    tokens) and, when ``token_loss`` is given (flooding, the published default of stage 2),
    ``flooding_bias = token_loss + flooding_bias`` ``[L, B, N]`` (the published ``--flooding_bias``
    constant; 0 in the README's run).

    ``batch``: a dict with ``attention_mask`` and ``labels`` ``[B, N]``; ``exit_logits``,
    ``token_loss``: as ``stage1_outputs`` gives them for this batch. Returns a dict to merge into
    the batch. Raises ``ValueError``
    naming the argument."""
    if not isinstance(batch, Mapping) or not {"attention_mask", "labels"} <= set(batch):
        raise ValueError("batch must be a dict with attention_mask and labels")
    labels = batch["labels"]
    if (
        not isinstance(exit_logits, torch.Tensor)
        or exit_logits.dim() != 4
        or tuple(exit_logits.shape[1:3]) != tuple(labels.shape)
    ):
        raise ValueError(
            f"exit_logits must be a [L, B, N, C] tensor with [B, N] = {list(labels.shape)}"
        )
    if token_loss is not None and (
        not isinstance(token_loss, torch.Tensor)
        or tuple(token_loss.shape) != tuple(exit_logits.shape[:3])
    ):
        raise ValueError(
            f"token_loss must be None or a [L, B, N] = {list(exit_logits.shape[:3])} tensor"
        )
    drawn = draw_self_sampling(labels.shape[0], generator=generator, **draw)
    out = {
        "token_exit_layer": self_sampling_token_exit_layers(
            exit_logits,
            labels != -100,
            batch["attention_mask"],
            drawn,
            copy_wordpieces=copy_wordpieces,
            max_threshold=max_threshold,
        )
    }
    if token_loss is not None:
        out["flooding_bias"] = token_loss + float(flooding_bias)
    return out
