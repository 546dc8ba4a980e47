"""EarlyBERT: structured lottery tickets drawn early in training (Chen et al., "EarlyBERT: Efficient
BERT Training via Early-bird Lottery Tickets", ACL 2021; official code VITA-Group/EarlyBERT,
``finetune/``).

The method, as its code runs it:

1. **Search.** Every attention head gets a learnable coefficient (init 1.0) multiplying its
   attention probabilities after softmax and dropout, before ``@ V`` (``modeling_bert.py``,
   ``BertSelfAttention``: ``attention_probs *= self.slimming_coef``), and every FFN neuron one
   multiplying its activation after GELU (``BertLayer``: ``intermediate_output *=
   self.slimming_coef``). Each micro-batch's loss, after the division by the gradient accumulation
   steps, gets ``1e-4 * sum |head coefficients| + 1e-4 * sum |FFN coefficients|`` (``trainer.py``,
   ``_training_step``; launcher ``l1_loss_self_coef`` / ``l1_loss_inter_coef``).
2. **Draw.** ``threshold = np.quantile(coefs, ratio, axis=-1 if layerwise else None,
   keepdims=True)``, ``keep = coefs > threshold`` (``run_glue_earlybert_draw_and_train.py``): heads
   layerwise with ratio 0.333333, FFN neurons globally with ratio 0.4 (the launcher's values). The
   raw coefficients are compared, not their absolute values, as there.
3. **Prune and retrain.** The model saved before the search (``checkpoint-0``) is pruned
   (``prune_heads``, ``prune_inter_neurons``: smaller linear layers) and trained again.

Here a head's coefficient scales that head's slice of the attention output instead of its
probabilities: ``(c * P) @ V == c * (P @ V)``, so the fused attention runs once and the
coefficient's gradient is a reduction (``TupeSelfAttention._project_out``). The L1 term enters as
its gradient, ``l1 * sign(c)`` added to each coefficient's gradient on every backward pass (a hook):
the same gradient as the published loss term, whatever the trainer does to its loss (``l1_penalty``
gives the term's value). Deviation: the published retraining keeps the (pre-search, all 1.0)
coefficients as parameters when its config asks for slimming; the pruned model here has none (they
are 1.0, so the function is the same; ``prune_model`` drops them).

TUPE: all layers share one positional term ``P [H, N, N]``. A pruned layer reads only its kept
heads' rows of it (``TupeSelfAttention.pos_heads``), and the positional projections (and
relative-table and [CLS] columns) of heads no layer keeps are removed from ``TupePositionBias``.
"""

import warnings

import numpy as np
import torch
from torch import nn

from ..nn import Linear

__all__ = [
    "add_coefficients",
    "remove_coefficients",
    "coefficients",
    "l1_penalty",
    "draw_ticket",
    "mask_distance",
    "masked_coefficients",
    "prune_model",
    "apply_ticket_shapes",
    "count_parameters",
    "encoder_flops",
    "HEAD_RATIO",
    "FFN_RATIO",
    "L1_COEF",
]

HEAD_RATIO = 0.333333  # launch_earlybert_glue.sh: self_pruning_ratio, "layerwise"
FFN_RATIO = 0.4  # inter_pruning_ratio, "global"
L1_COEF = 1e-4  # l1_loss_self_coef and l1_loss_inter_coef
_METHODS = ("layerwise", "global")


def _encoder(model):
    """The ``TupeBertModel`` inside ``model`` (itself, or ``model.bert``)."""
    from .tupe_bert import TupeBertModel

    if isinstance(model, TupeBertModel):
        return model
    bert = getattr(model, "bert", None)
    if isinstance(bert, TupeBertModel):
        return bert
    raise TypeError(
        f"model must be a TupeBertModel or hold one as .bert, got {type(model).__name__}"
    )


def _layers(model):
    return list(_encoder(model).encoder.layers)


def _check_l1(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
        raise ValueError(f"{name} must be a float >= 0, got {value!r}")


def add_coefficients(model, head_l1=L1_COEF, ffn_l1=L1_COEF):
    """Give every layer of ``model`` (a ``TupeBertModel`` or a model holding one as ``.bert``)
    EarlyBERT's search coefficients: ``attention.head_coef [H]`` and ``ffn_coef [intermediate]``,
    parameters set to 1.0 with the layers' device and dtype, so the model's function is unchanged.
    ``head_l1`` / ``ffn_l1`` (default 1e-4 each, as published; 0 turns a term off) add the L1 term's
    gradient ``l1 * sign(c)`` on every backward pass, i.e. the gradient of the published ``l1 * sum
    |c|`` added to each micro-batch's loss after its division by the gradient accumulation steps.
    Returns the new parameters (heads' first). Raises ``ValueError`` if the model already has
    coefficients or for a negative ``l1``, ``TypeError`` for another model."""
    _check_l1("head_l1", head_l1)
    _check_l1("ffn_l1", ffn_l1)
    layers = _layers(model)
    if any(layer.attention.head_coef is not None or layer.ffn_coef is not None for layer in layers):
        raise ValueError("model already has EarlyBERT coefficients (remove_coefficients first)")
    heads, ffn = [], []
    for layer in layers:
        like = dict(device=layer.intermediate.weight.device, dtype=layer.intermediate.weight.dtype)
        layer.attention.head_coef = nn.Parameter(torch.ones(layer.attention.num_heads, **like))
        layer.ffn_coef = nn.Parameter(torch.ones(layer.intermediate.out_features, **like))
        heads.append(layer.attention.head_coef)
        ffn.append(layer.ffn_coef)
    for params, l1 in ((heads, head_l1), (ffn, ffn_l1)):
        if l1 > 0.0:
            for p in params:
                p.register_hook(_l1_gradient(p, float(l1)))
    return heads + ffn


def _l1_gradient(param, l1):
    def hook(grad):
        return grad + l1 * torch.sign(param.detach()).to(grad.dtype)

    return hook


def remove_coefficients(model):
    """Drop every layer's coefficients (and with them the L1 hooks): the model as it was before
    ``add_coefficients`` when the coefficients are all 1.0. Returns ``model``."""
    for layer in _layers(model):
        layer.attention.head_coef = None
        layer.ffn_coef = None
    return model


def coefficients(model):
    """The coefficients now: ``(heads [L, H], ffn [L, intermediate])`` float32 CPU copies (the
    draw's input). Raises ``ValueError`` when the model has none or its layers differ in size (a
    pruned model)."""
    layers = _layers(model)
    if any(layer.attention.head_coef is None or layer.ffn_coef is None for layer in layers):
        raise ValueError("model has no EarlyBERT coefficients (add_coefficients first)")
    try:
        heads = torch.stack([layer.attention.head_coef.detach().float().cpu() for layer in layers])
        ffn = torch.stack([layer.ffn_coef.detach().float().cpu() for layer in layers])
    except RuntimeError as exc:
        raise ValueError(
            f"the layers' coefficients differ in size (a pruned model?): {exc}"
        ) from None
    return heads, ffn


def l1_penalty(model, head_l1=L1_COEF, ffn_l1=L1_COEF):
    """The published L1 term, ``head_l1 * sum |head_coef| + ffn_l1 * sum |ffn_coef|`` over every
    layer (a scalar tensor with autograd; trainer.py ``_training_step``). ``add_coefficients``
    already adds its gradient: this is for logging it, or for a loop that adds the term to its loss
    instead (then pass ``head_l1=ffn_l1=0`` there)."""
    _check_l1("head_l1", head_l1)
    _check_l1("ffn_l1", ffn_l1)
    layers = _layers(model)
    if any(layer.attention.head_coef is None or layer.ffn_coef is None for layer in layers):
        raise ValueError("model has no EarlyBERT coefficients (add_coefficients first)")
    heads = sum(layer.attention.head_coef.abs().sum() for layer in layers)
    ffn = sum(layer.ffn_coef.abs().sum() for layer in layers)
    return head_l1 * heads + ffn_l1 * ffn


def _threshold_mask(coefs, ratio, method, name):
    if not isinstance(coefs, torch.Tensor) or coefs.dim() != 2 or not coefs.is_floating_point():
        raise ValueError(f"{name} must be a float [L, width] tensor")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name[:-6]}_ratio must be in [0, 1], got {ratio!r}")
    if method not in _METHODS:
        raise ValueError(f"{name[:-6]}_method must be one of {_METHODS}, got {method!r}")
    # the published call itself, on the coefficients as its records hold them (float32 numpy
    # arrays): numpy's linear interpolation in float32, so a threshold that rounds onto a
    # coefficient compares as it does there
    x = coefs.detach().to("cpu", torch.float32).numpy()
    threshold = np.quantile(x, ratio, axis=-1 if method == "layerwise" else None, keepdims=True)
    return torch.from_numpy(x > threshold)


def draw_ticket(
    head_coefs,
    ffn_coefs,
    *,
    head_ratio=HEAD_RATIO,
    head_method="layerwise",
    ffn_ratio=FFN_RATIO,
    ffn_method="global",
):
    """EarlyBERT's ticket from the coefficients (``coefficients(model)``): ``(head_keep [L, H],
    ffn_keep [L, intermediate])`` bool CPU tensors, True = kept.

    As ``run_glue_earlybert_draw_and_train.py`` draws it: ``threshold = quantile(coefs, ratio)``
    with linear interpolation (numpy's default; computed by ``np.quantile`` on float32 as there)
    over each layer (``"layerwise"``) or all layers at once (``"global"``), and ``keep = coefs >
    threshold`` (strict, on the raw values). Defaults are the launcher's: heads 0.333333 layerwise,
    FFN 0.4 global. Raises ``ValueError`` for a non-float or non-2-D input, a ratio outside [0, 1]
    or an unknown method."""
    return (
        _threshold_mask(head_coefs, head_ratio, head_method, "head_coefs"),
        _threshold_mask(ffn_coefs, ffn_ratio, ffn_method, "ffn_coefs"),
    )


def mask_distance(ticket_a, ticket_b):
    """Normalised Hamming distance between two tickets ``(head_keep, ffn_keep)`` (from
    ``draw_ticket``): the fraction of all head and neuron entries whose keep bit differs, in [0, 1]
    (You et al., "Drawing Early-Bird Tickets", ICLR 2020, the mask distance EarlyBERT's paper uses).
    Raises ``ValueError`` on differing shapes."""
    for t in (ticket_a, ticket_b):
        if (
            not isinstance(t, (tuple, list))
            or len(t) != 2
            or not all(isinstance(m, torch.Tensor) for m in t)
        ):
            raise ValueError("each ticket must be a (head_keep, ffn_keep) pair of tensors")
    diff, total = 0, 0
    for a, b in zip(ticket_a, ticket_b):
        if a.shape != b.shape:
            raise ValueError(f"masks differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        diff += int((a.bool() != b.bool()).sum())
        total += a.numel()
    return diff / max(total, 1)


@torch.no_grad()
def masked_coefficients(model, head_keep, ffn_keep):
    """Set the coefficients of a model with coefficients to the ticket's 0/1 masks: the unpruned
    model computing what the pruned one computes (the reference ``prune_model`` is tested against).
    Returns ``model``."""
    layers = _layers(model)
    heads, ffn = coefficients(model)
    if tuple(head_keep.shape) != tuple(heads.shape) or tuple(ffn_keep.shape) != tuple(ffn.shape):
        raise ValueError(
            f"head_keep / ffn_keep must be {list(heads.shape)} / {list(ffn.shape)}, got "
            f"{list(head_keep.shape)} / {list(ffn_keep.shape)}"
        )
    for i, layer in enumerate(layers):
        layer.attention.head_coef.copy_(head_keep[i].to(layer.attention.head_coef))
        layer.ffn_coef.copy_(ffn_keep[i].to(layer.ffn_coef))
    return model


def _linear_rows(linear, rows, cols=None):
    """A new linear of ``linear``'s class (``nn.Linear`` or ``effbert.nn.Linear``) holding its
    weight rows ``rows`` (output features; None = all) and columns ``cols`` (input features; None =
    all)."""
    w = linear.weight
    if rows is not None:
        w = w.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    # a layer may lose every neuron: torch warns that initialising a 0-size weight is a no-op
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        new = torch.nn.utils.skip_init(
            type(linear),
            w.shape[1],
            w.shape[0],
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
            **({"backend": linear.backend} if isinstance(linear, Linear) else {}),
        )  # every value is copied in below
    new.weight.copy_(w)
    if linear.bias is not None:
        new.bias.copy_(linear.bias if rows is None else linear.bias.index_select(0, rows))
    return new


def _head_rows(keep, num_heads, head_dim, parts=1):
    """Row indices of heads ``keep`` in a ``[parts * num_heads * head_dim, ...]`` weight (q, k, v
    blocks)."""
    per = (keep[:, None] * head_dim + torch.arange(head_dim, device=keep.device)).flatten()
    return torch.cat([per + p * num_heads * head_dim for p in range(parts)])


@torch.no_grad()
def prune_model(model, head_keep, ffn_keep):
    """Physically prune ``model`` (in place) to the ticket ``head_keep [L, H]`` / ``ffn_keep [L,
    intermediate]`` (bool, True = kept; from ``draw_ticket``), as the published ``prune_heads`` /
    ``prune_inter_neurons`` do: each layer's fused QKV keeps its kept heads' rows and the output
    projection their columns, the FFN's ``intermediate`` its kept neurons' rows and ``output`` their
    columns. In TUPE modes the shared positional encoder keeps the heads some layer still uses (its
    U^Q / U^K rows, relative-table and [CLS] columns), and each layer reads its own rows of ``P``
    (``pos_heads``). Coefficients, if any, are dropped (see module notes). The ticket is recorded in
    ``config.early_bird_ticket`` (kept indices per layer), so ``save_pretrained`` /
    ``from_pretrained`` rebuild the pruned shapes (``apply_ticket_shapes``). Returns ``model``.

    Raises ``ValueError`` if the model was pruned already, the masks' shapes do not match the model,
    or a layer would keep no head (a layer without heads has no attention to run)."""
    bert = _encoder(model)
    layers = list(bert.encoder.layers)
    if getattr(bert.config, "early_bird_ticket", None):
        raise ValueError("model is pruned already (config.early_bird_ticket is set)")
    heads0 = bert.config.num_attention_heads
    for name, mask, width in (
        ("head_keep", head_keep, heads0),
        ("ffn_keep", ffn_keep, bert.config.intermediate_size),
    ):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor")
        if tuple(mask.shape) != (len(layers), width):
            raise ValueError(
                f"{name} must be [L, {width}] = {[len(layers), width]}, got {list(mask.shape)}"
            )
    if not bool(head_keep.any(1).all()):
        bad = int((~head_keep.any(1)).nonzero()[0, 0])
        raise ValueError(f"head_keep[{bad}] keeps no head: a layer needs at least one")
    kept_heads, kept_ffn = [], []
    for i, layer in enumerate(layers):
        attn = layer.attention
        device = attn.qkv.weight.device
        keep = head_keep[i].nonzero().squeeze(1).to(device)
        h, d = attn.num_heads, attn.head_dim
        attn.qkv = _linear_rows(attn.qkv, _head_rows(keep, h, d, parts=3))
        attn.out = _linear_rows(attn.out, None, _head_rows(keep, h, d))
        attn.num_heads = keep.numel()
        attn.head_coef = None
        attn.pos_heads = keep  # rows of the full positional term; renumbered below
        neurons = ffn_keep[i].nonzero().squeeze(1).to(device)
        layer.intermediate = _linear_rows(layer.intermediate, neurons)
        layer.output = _linear_rows(layer.output, None, neurons)
        layer.ffn_coef = None
        kept_heads.append(keep.tolist())
        kept_ffn.append(neurons.tolist())
    pos = bert.position_encoder
    if pos is None:
        for layer in layers:
            layer.attention.pos_heads = None
    else:
        union = torch.unique(torch.cat([layer.attention.pos_heads for layer in layers]))  # sorted
        rows = _head_rows(union, pos.num_heads, pos.head_dim)
        pos.query = _linear_rows(pos.query, rows)
        pos.key = _linear_rows(pos.key, rows)
        if pos.rel_table is not None:
            pos.rel_table = nn.Parameter(pos.rel_table.index_select(1, union).clone())
        if pos.cls_row is not None:
            pos.cls_row = nn.Parameter(pos.cls_row.index_select(0, union).clone())
            pos.cls_col = nn.Parameter(pos.cls_col.index_select(0, union).clone())
        pos.num_heads = union.numel()
        pos.clear_cache()
        for layer in layers:
            attn = layer.attention
            local = torch.searchsorted(union, attn.pos_heads)
            full = local.numel() == union.numel()  # then local is 0..n-1: the whole term, no gather
            attn.pos_heads = None if full else local
    bert.config.early_bird_ticket = {"heads": kept_heads, "ffn": kept_ffn}
    return model


def _check_ticket(ticket, num_layers, num_heads, intermediate):
    """The kept-index lists of ``config.early_bird_ticket``, checked against the unpruned sizes."""
    if not isinstance(ticket, dict) or set(ticket) != {"heads", "ffn"}:
        raise ValueError("config.early_bird_ticket must be a dict with keys 'heads' and 'ffn'")
    for key, width in (("heads", num_heads), ("ffn", intermediate)):
        rows = ticket[key]
        if not isinstance(rows, (list, tuple)) or len(rows) != num_layers:
            raise ValueError(
                f"config.early_bird_ticket[{key!r}] must hold {num_layers} index lists"
            )
        for row in rows:
            if list(row) != sorted(set(row)) or any(not 0 <= int(i) < width for i in row):
                raise ValueError(
                    f"config.early_bird_ticket[{key!r}] must hold sorted distinct indices "
                    f"in [0, {width})"
                )
    if any(len(row) == 0 for row in ticket["heads"]):
        raise ValueError("config.early_bird_ticket['heads'] has a layer with no head")
    return [list(map(int, r)) for r in ticket["heads"]], [list(map(int, r)) for r in ticket["ffn"]]


def _empty_linear(in_features, out_features, like):
    with warnings.catch_warnings():  # 0-size weights: torch warns that their init is a no-op
        warnings.simplefilter("ignore", UserWarning)
        return type(like)(
            in_features,
            out_features,
            bias=like.bias is not None,
            device=like.weight.device,
            dtype=like.weight.dtype,
            **({"backend": like.backend} if isinstance(like, Linear) else {}),
        )


@torch.no_grad()
def apply_ticket_shapes(bert):
    """Give a freshly built ``TupeBertModel`` the layer sizes of ``config.early_bird_ticket`` (what
    ``prune_model`` recorded), with freshly initialised values: ``TupeBertModel.__init__`` calls it,
    so ``from_pretrained`` of a pruned model's ``save_pretrained`` folder builds the pruned shapes
    and loads the weights into them. Raises ``ValueError`` for a ticket that does not fit the
    config."""
    cfg = bert.config
    heads, ffn = _check_ticket(
        cfg.early_bird_ticket, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    )
    layers = list(bert.encoder.layers)
    for layer, keep, neurons in zip(layers, heads, ffn):
        attn = layer.attention
        width = len(keep) * attn.head_dim
        attn.qkv = _empty_linear(attn.hidden_size, 3 * width, attn.qkv)
        attn.out = _empty_linear(width, attn.hidden_size, attn.out)
        attn.num_heads = len(keep)
        layer.intermediate = _empty_linear(cfg.hidden_size, len(neurons), layer.intermediate)
        layer.output = _empty_linear(len(neurons), cfg.hidden_size, layer.output)
    pos = bert.position_encoder
    if pos is None:
        return bert
    union = sorted(set().union(*heads))
    width = len(union) * pos.head_dim
    pos.query = _empty_linear(pos.query.in_features, width, pos.query)
    pos.key = _empty_linear(pos.key.in_features, width, pos.key)
    if pos.rel_table is not None:
        pos.rel_table = nn.Parameter(pos.rel_table.new_zeros(pos.rel_table.shape[0], len(union)))
    if pos.cls_row is not None:
        pos.cls_row = nn.Parameter(pos.cls_row.new_zeros(len(union)))
        pos.cls_col = nn.Parameter(pos.cls_col.new_zeros(len(union)))
    pos.num_heads = len(union)
    pos.clear_cache()
    for layer, keep in zip(layers, heads):
        if len(keep) != len(union):
            local = [union.index(h) for h in keep]
            layer.attention.pos_heads = torch.tensor(
                local, device=layer.attention.qkv.weight.device
            )
    return bert


def count_parameters(model):
    """Number of parameters of ``model`` (shared ones once)."""
    return sum(p.numel() for p in model.parameters())


def encoder_flops(model, seq_len):
    """Multiply-add FLOPs (2 per multiply-add) of one ``seq_len``-token sequence through the encoder
    layers: the QKV, output and FFN projections and the two attention products (the positional term
    once, if any). Embeddings and heads are left out (pruning does not change them)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    bert = _encoder(model)
    n, total = seq_len, 0
    for layer in bert.encoder.layers:
        attn = layer.attention
        width = attn.num_heads * attn.head_dim
        total += 2 * n * attn.hidden_size * 3 * width + 2 * n * width * attn.hidden_size
        total += 2 * 2 * n * n * width
        total += 2 * 2 * n * attn.hidden_size * layer.intermediate.out_features
    pos = bert.position_encoder
    if pos is not None:
        width = pos.num_heads * pos.head_dim
        total += 2 * 2 * n * pos.query.in_features * width + 2 * n * n * width
    return total
