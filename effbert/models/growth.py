"""CompoundGrow's growth operators on ``TupeBertForMaskedLM`` (Gu et al., "On the Transformer Growth
for Progressive BERT Training", NAACL 2021; official code: google-research/google-research,
``grow_bert``).

Three dimensions grow, each as ``grow_bert`` runs it:

- **depth** (``grow_depth``): stacking. Layer ``i`` of the grown encoder is a copy of small layer
  ``i % L_small`` (``ProgressiveMaskedLM.transform_model``, the branch ``small_num_layers !=
  num_layers``); the embeddings, TUPE's positional parameters and the MLM head are kept. Not
  function-preserving (the paper says so).
- **FFN width** (``grow_ffn``): ``W_in`` tiled ``k`` times along the hidden units (bias too),
  ``W_out`` tiled ``k`` times along its inputs and divided by ``k``, ``b_out`` kept (``numpy.tile``
  in ``transform_model``'s net2net branch). Function-preserving: every tiled unit computes the same
  activation, and the ``k`` copies sum to the small layer's output. ``grow_bert`` can narrow only
  some layers (``net2net_layers``); a ``TupeBertConfig`` holds one ``intermediate_size``, so here
  every layer grows (a mixed model would not save or load).
- **input length** (``set_input_pooling`` / ``pooled_mlm_forward``): while ``pool_size > 1``, layer
  0's queries are [CLS] plus the mean of each group of ``pool_size`` following tokens, then the MLM
  targets appended as extra queries (the embedding rows at their positions), with keys and values
  over every token plus the targets; the later layers run on the pooled length (groups + targets)
  and the head reads the target rows (``lowcost/models/transformer_encoder.py``,
  ``EmbedPoolLayer('mean')``, ``MaskPoolLayer``). Pooling has no parameters, so growth just drops it
  (the full model uses the same weights).

Deliberate deviations: a group averages its real tokens only (the official inputs are fixed-length
rows with padding averaged in; here a row's result must not depend on the batch's padding); a target
query is the embedding row at its position (``grow_bert`` embeds the target ids a second time, which
gives the same values and only another dropout draw); TUPE's positional term is pooled as defined in
``pooled_position_bias`` (the official code has absolute position embeddings only); the pooled stage
runs one text per row (no ``position_ids`` packing) and its attention in eager PyTorch (a per-row
positional term is outside the fused ops' ``[H, N, N]`` form).

Each operator edits the model in place (the same ``nn.Module`` object, so a ``Trainer`` holding it
keeps working) and updates ``model.config``; ``grow_model`` returns, for every parameter of the
grown model, the ``ParamGrowth`` that made it from a parameter of the small one, so an optimizer's
state can follow (``grow_adam_state``).
"""

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Linear

from .tupe_bert import MaskedLMOutput, TupeBertForMaskedLM

__all__ = [
    "ParamGrowth",
    "grow_depth",
    "grow_ffn",
    "grow_model",
    "grow_adam_state",
    "set_input_pooling",
    "input_pooling",
    "pooled_mlm_forward",
    "pooled_position_bias",
    "pooling_matrices",
    "count_parameters",
    "mlm_flops_per_token",
]


@dataclass(frozen=True)
class ParamGrowth:
    """How one parameter of the grown model is made from ``source`` (a name in the small model):
    repeated ``tiles`` times along ``dim`` (1 = a copy), then multiplied by ``value_scale``.
    ``grad_scale`` is the factor by which the grown model's gradient of each copy relates to the
    small model's gradient of the source at the same function (1/k for the tiled ``W_in`` and its
    bias, 1 elsewhere): Adam's first moment scales by it and the second by its square."""

    source: str
    tiles: int = 1
    dim: int = 0
    value_scale: float = 1.0
    grad_scale: float = 1.0

    def apply(self, tensor, what="param"):
        """``tensor`` (the source's value or its Adam moment) made for the grown parameter; ``what``
        one of ``"param"``, ``"exp_avg"``, ``"exp_avg_sq"``, ``"copy"`` (repeat, no scaling: a step
        count)."""
        scales = {
            "param": self.value_scale,
            "exp_avg": self.grad_scale,
            "exp_avg_sq": self.grad_scale**2,
            "copy": 1.0,
        }
        if what not in scales:
            raise ValueError(f"what must be one of {sorted(scales)}, got {what!r}")
        if self.tiles > 1 and tensor.dim() > 0:
            reps = [1] * tensor.dim()
            reps[self.dim] = self.tiles
            tensor = tensor.repeat(*reps)
        else:
            tensor = tensor.clone()
        scale = scales[what]
        return tensor if scale == 1.0 else tensor * scale


def _check_model(model):
    if not isinstance(model, TupeBertForMaskedLM):
        raise TypeError(f"model must be a TupeBertForMaskedLM, got {type(model).__name__}")


def _check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _identity_map(model):
    return {n: ParamGrowth(n) for n, _ in model.named_parameters()}


_LAYERS = "bert.encoder.layers."


def grow_depth(model, num_layers):
    """Stacks ``model``'s encoder to ``num_layers`` layers in place: layer ``i`` := a copy of small
    layer ``i % L_small`` (the first ``L_small`` layers are the small model's own modules);
    ``num_layers`` any int >= L_small, as ``grow_bert`` allows. Returns ``{name: ParamGrowth}`` for
    every parameter of the grown model. Raises ``TypeError`` for another model class, ``ValueError``
    for ``num_layers`` < L_small."""
    _check_model(model)
    small = len(model.bert.encoder.layers)
    _check_int("num_layers", num_layers, small)
    mapping = _identity_map(model)
    layers = list(model.bert.encoder.layers)
    for i in range(small, num_layers):
        layers.append(copy.deepcopy(layers[i % small]))
    model.bert.encoder.layers = nn.ModuleList(layers)
    model.config.num_hidden_layers = num_layers
    for name, _ in model.named_parameters():
        if name.startswith(_LAYERS) and name not in mapping:
            index, rest = name[len(_LAYERS) :].split(".", 1)
            mapping[name] = ParamGrowth(f"{_LAYERS}{int(index) % small}.{rest}")
    return mapping


def grow_ffn(model, intermediate_size):
    """Widens every layer's FFN in place to ``intermediate_size`` (a multiple ``k`` of the current
    one): ``W_in [d, h]`` -> ``[k d, h]`` tiled, ``b_in`` tiled, ``W_out [h, d]`` -> ``[h, k d]``
    tiled and divided by ``k``, ``b_out`` kept (``grow_bert``'s net2net recovery).
    Function-preserving. Returns ``{name: ParamGrowth}``. Raises ``TypeError`` for another model
    class, ``ValueError`` if ``intermediate_size`` is not a multiple."""
    _check_model(model)
    d = model.config.intermediate_size
    _check_int("intermediate_size", intermediate_size, d)
    if intermediate_size % d:
        raise ValueError(
            f"intermediate_size must be a multiple of the current one ({d}), "
            f"got {intermediate_size}"
        )
    k = intermediate_size // d
    mapping = _identity_map(model)
    if k == 1:
        return mapping
    for i, layer in enumerate(model.bert.encoder.layers):
        old_in, old_out = layer.intermediate, layer.output
        new_in = Linear(
            old_in.in_features,
            intermediate_size,
            device=old_in.weight.device,
            dtype=old_in.weight.dtype,
            backend=getattr(old_in, "backend", "auto"),
        )
        new_out = Linear(
            intermediate_size,
            old_out.out_features,
            device=old_out.weight.device,
            dtype=old_out.weight.dtype,
            backend=getattr(old_out, "backend", "auto"),
        )
        prefix = f"{_LAYERS}{i}."
        w_in = ParamGrowth(prefix + "intermediate.weight", k, 0, 1.0, 1.0 / k)
        rules = {
            "intermediate.weight": w_in,
            "intermediate.bias": ParamGrowth(prefix + "intermediate.bias", k, 0, 1.0, 1.0 / k),
            "output.weight": ParamGrowth(prefix + "output.weight", k, 1, 1.0 / k, 1.0),
            "output.bias": ParamGrowth(prefix + "output.bias"),
        }
        with torch.no_grad():
            new_in.weight.copy_(rules["intermediate.weight"].apply(old_in.weight))
            new_in.bias.copy_(rules["intermediate.bias"].apply(old_in.bias))
            new_out.weight.copy_(rules["output.weight"].apply(old_out.weight))
            new_out.bias.copy_(old_out.bias)
        layer.intermediate, layer.output = new_in, new_out
        mapping.update({prefix + key: rule for key, rule in rules.items()})
    model.config.intermediate_size = intermediate_size
    return mapping


def _compose(first, second):
    """The map of ``second`` applied after ``first`` (names of the final model -> rules on the first
    model)."""
    out = {}
    for name, rule in second.items():
        base = first[rule.source]
        if base.tiles > 1 and rule.tiles > 1:
            raise ValueError(f"{name}: two tilings of one parameter in one growth are not composed")
        tiles, dim = (rule.tiles, rule.dim) if rule.tiles > 1 else (base.tiles, base.dim)
        out[name] = ParamGrowth(
            base.source,
            tiles,
            dim,
            base.value_scale * rule.value_scale,
            base.grad_scale * rule.grad_scale,
        )
    return out


def grow_model(model, num_layers=None, intermediate_size=None):
    """Grows ``model`` in place: depth first (stacking), then FFN width (tiling), as one compound
    growth. None leaves a dimension as it is. Returns ``{name: ParamGrowth}`` (grown name -> how it
    was made from the small model's parameters). Errors as ``grow_depth`` / ``grow_ffn``, raised
    before the model changes."""
    _check_model(model)
    if num_layers is not None:
        _check_int("num_layers", num_layers, len(model.bert.encoder.layers))
    if intermediate_size is not None:
        d = model.config.intermediate_size
        _check_int("intermediate_size", intermediate_size, d)
        if intermediate_size % d:
            raise ValueError(
                f"intermediate_size must be a multiple of the current one ({d}), "
                f"got {intermediate_size}"
            )
    mapping = _identity_map(model)
    if num_layers is not None:
        mapping = _compose(mapping, grow_depth(model, num_layers))
    if intermediate_size is not None:
        mapping = _compose(mapping, grow_ffn(model, intermediate_size))
    return mapping


@torch.no_grad()
def grow_adam_state(old_state, old_names, new_params, mapping):
    """Adam's (or AdamW's) per-parameter state for the grown model, made with the same operators as
    the weights: ``exp_avg`` scaled by ``grad_scale``, ``exp_avg_sq`` by its square, ``step`` copied
    (as allenai/staged-training's ``growth_operator.py`` does for its width doubling: moments
    divided by 2 and 4). For FFN tiling these are exactly the moments the grown model's own
    gradients would have accumulated along the small model's trajectory (the grown model computes
    the same function, its gradients are the small ones tiled and scaled); for stacked layers the
    copied moments are a heuristic (stacking is not function-preserving).

    ``old_state``: ``{param: state dict}`` (``optimizer.state``); ``old_names``: ``{name: old
    param}``; ``new_params``: ``{name: new param}``; ``mapping``: from ``grow_model``. Returns
    ``{new param: state dict}``; parameters whose source has no state get none. Raises ``KeyError``
    naming a source missing in ``old_names``."""
    out = {}
    for name, param in new_params.items():
        rule = mapping[name]
        if rule.source not in old_names:
            raise KeyError(
                f"mapping names source {rule.source!r} for {name!r}: not a parameter of "
                f"the small model"
            )
        state = old_state.get(old_names[rule.source])
        if not state:
            continue
        new = {}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                new[key] = value
            elif key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                new[key] = rule.apply(value, "exp_avg_sq" if key != "exp_avg" else "exp_avg")
                if tuple(new[key].shape) != tuple(param.shape):
                    raise ValueError(
                        f"{name}: state {key!r} grew to {tuple(new[key].shape)}, "
                        f"the parameter is "
                        f"{tuple(param.shape)}"
                    )
            else:
                new[key] = value.clone()  # step
        out[param] = new
    return out


# --------------------------------------------------------------------------------- input length


def input_pooling(model):
    """The input pooling size in force on ``model`` (1: none)."""
    _check_model(model)
    return getattr(model, "_growth_pool_size", 1)


def set_input_pooling(model, pool_size):
    """Runs ``model``'s forward pooled (``pooled_mlm_forward``) while ``pool_size > 1``;
    ``pool_size=1`` restores the model's own forward (the growth step of the length dimension). The
    pooled forward is bound to the instance, so ``save_pretrained`` / ``from_pretrained`` and the
    state dict are untouched (pooling has no parameters). Raises ``TypeError`` / ``ValueError`` for
    a bad model or ``pool_size``."""
    _check_model(model)
    _check_int("pool_size", pool_size)
    if pool_size == 1:
        model.__dict__.pop("forward", None)
        model.__dict__.pop("_growth_pool_size", None)
        return model
    model.forward = functools.partial(pooled_mlm_forward, model, pool_size=pool_size)
    model._growth_pool_size = pool_size
    return model


def pooling_matrices(attention_mask, labels, pool_size):
    """The averaging matrices of the pooled sequence (float, the mask's device).

    ``attention_mask [B, N]`` bool (True = real token, right padding or not), ``labels [B, N]``
    (-100 = no target). With ``G = ceil((N - 1) / pool_size)`` groups and ``T`` = the most targets
    in a row, returns ``(queries [B, 1 + G + T, N], keys0 [B, N + T, N], query_mask [B, 1 + G + T],
    key_mask0 [B, N + T], target_positions [B, T], target_mask [B, T])``: row 0 of ``queries`` picks
    [CLS]; row ``1 + g`` averages group ``g`` (tokens ``1 + g k .. 1 + g k + k - 1``), over its real
    tokens only (a group with none is masked); the last ``T`` rows pick each row's target positions
    in order (padded targets masked). ``keys0`` picks every token, then the targets: layer 0's keys
    and values (``grow_bert``'s ``merged_embeddings``)."""
    b, n = attention_mask.shape
    mask = attention_mask.bool()
    k = pool_size
    groups = -(-(n - 1) // k)
    dev = attention_mask.device
    member = torch.zeros(groups, n, device=dev)
    for g in range(groups):
        member[g, 1 + g * k : min(1 + (g + 1) * k, n)] = 1.0
    real = mask.float()
    counts = real @ member.T  # [B, G]
    pooled = member[None] * real[:, None, :] / counts.clamp_min(1.0)[..., None]  # [B, G, N]
    targets = labels.ne(-100) & mask
    t = int(targets.sum(1).max()) if targets.numel() else 0
    # the target positions of each row, in order (a stable sort puts the targets first)
    order = torch.sort(targets.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :t]
    target_mask = torch.arange(t, device=dev)[None] < targets.sum(1, keepdim=True)
    pick = F.one_hot(order, n).float() * target_mask[..., None]  # [B, T, N]
    cls = F.one_hot(torch.zeros(b, dtype=torch.long, device=dev), n).float()[:, None]  # [B, 1, N]
    queries = torch.cat([cls, pooled, pick], 1)
    keys0 = torch.cat([torch.eye(n, device=dev).expand(b, n, n), pick], 1)
    query_mask = torch.cat([mask[:, :1], counts > 0, target_mask], 1)
    key_mask0 = torch.cat([mask, target_mask], 1)
    return queries, keys0, query_mask, key_mask0, order, target_mask


def pooled_position_bias(pos_bias, queries, keys):
    """TUPE's positional term for pooled rows: ``P' = A P K^T`` per row, with ``A`` the queries' and
    ``K`` the keys' averaging matrices from ``pooling_matrices`` (``[B, M, N]``, ``[B, M', N]``) and
    ``P [H, N, N]`` the full model's term (relative buckets and the [CLS] scalars included). A
    pooled query's logit to a key is the mean of its tokens' logits to it (the positional half of
    the logit follows the pooled query exactly as the content half does: ``q`` and ``k`` are linear
    in the embeddings, and the mean embedding's positional logit is taken as the mean of the
    positional logits); a target row picks its own position's row, [CLS] keeps its own.
    ``pool_size=1`` without targets gives ``P`` itself. Returns ``[B, H, M, M']`` in ``P``'s
    dtype."""
    if pos_bias is None:
        return None
    a = queries.to(pos_bias.dtype)
    kk = keys.to(pos_bias.dtype)
    return torch.einsum("bmi,hij,bnj->bhmn", a, pos_bias, kk)


def _attend(layer, hq, hkv, bias, key_mask):
    """One ``TupeBertLayer`` with queries ``hq [B, M, h]`` and keys / values ``hkv [B, M', h]``
    (eager: the pooled stage's per-row positional term ``bias [B, H, M, M']`` is outside the fused
    ops' ``[H, N, N]`` form)."""
    att = layer.attention
    b, m, width = hq.shape
    w, bb = att.qkv.weight.chunk(3), att.qkv.bias.chunk(3)
    heads, d = att.num_heads, att.head_dim
    q = F.linear(hq, w[0], bb[0]).view(b, m, heads, d).transpose(1, 2)
    k = F.linear(hkv, w[1], bb[1]).view(b, -1, heads, d).transpose(1, 2)
    v = F.linear(hkv, w[2], bb[2]).view(b, -1, heads, d).transpose(1, 2)
    scale = (
        att.scale if att.scale is not None else 1.0 / math.sqrt((2 if bias is not None else 1) * d)
    )
    logits = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = F.dropout(torch.softmax(logits, -1), att.dropout, att.training)
    ctx = (probs @ v).transpose(1, 2).reshape(b, m, width)
    hidden = layer.attention_norm(hq + layer.attention_dropout(att.out(ctx)))
    ffn = layer.output(layer.act(layer.intermediate(hidden)))
    return layer.output_norm(hidden + layer.output_dropout(ffn))


def pooled_mlm_forward(
    model,
    input_ids,
    attention_mask=None,
    token_type_ids=None,
    labels=None,
    pool_size=2,
    return_logits=True,
    return_dict=None,
    **unused,
):
    """``TupeBertForMaskedLM`` on pooled inputs (CompoundGrow's short-length stage; see the module
    docstring).

    ``input_ids [B, N]`` int, ``attention_mask [B, N]`` (bool or 0/1; None = all real), ``labels [B,
    N]`` int (-100 = no target; required: the targets are the extra queries), ``pool_size`` int >=
    1. Returns ``MaskedLMOutput(loss, logits [B, T, vocab] at the targets in position order (None
    with return_logits=False))``: the loss is the mean cross-entropy over the targets (float32 at
    least). ``position_ids`` (packed rows), notes and hidden states are refused (``ValueError``):
    the pooled stage runs one text per row. Raises ``ValueError`` / ``TypeError`` for bad inputs, as
    the model's own forward."""
    _check_model(model)
    _check_int("pool_size", pool_size)
    for key, value in unused.items():
        if value is not None and value is not False:
            raise ValueError(
                f"{key} is not supported while the input is pooled (one text per row, no notes)"
            )
    if labels is None:
        raise ValueError(
            "labels are required while the input is pooled: the targets are the extra queries"
        )
    bert = model.bert
    token_type_ids, mask = bert.check_inputs(input_ids, attention_mask, token_type_ids, None)
    if tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"labels must be [B, N] = {list(input_ids.shape)}, got {list(labels.shape)}"
        )
    n = input_ids.shape[1]
    emb = bert.embed(input_ids, token_type_ids)  # [B, N, h]
    queries, keys0, qmask, kmask0, order, tmask = pooling_matrices(mask, labels, pool_size)
    a, kk = queries.to(emb.dtype), keys0.to(emb.dtype)
    pos = bert.position_bias(n)
    hidden_kv = kk @ emb
    hidden = a @ emb
    layers = bert.encoder.layers
    hidden = _attend(layers[0], hidden, hidden_kv, pooled_position_bias(pos, a, kk), kmask0)
    bias = pooled_position_bias(pos, a, a)
    for layer in layers[1:]:
        hidden = _attend(layer, hidden, hidden, bias, qmask)
    t = order.shape[1]
    target_hidden = hidden[:, hidden.shape[1] - t :]
    target_labels = labels.gather(1, order).masked_fill(~tmask, -100).long()
    logits = model.mlm_head(target_hidden, bert.embeddings.word_embeddings.weight)
    if tmask.any():
        picked = logits[tmask]
        if picked.dtype in (torch.float16, torch.bfloat16):
            picked = picked.float()  # the loss in float32 at least, as the model's own forward
        loss = F.cross_entropy(picked, target_labels[tmask])
    else:
        loss = logits.sum() * 0.0
    out = MaskedLMOutput(loss=loss, logits=logits if return_logits else None)
    return out.to_tuple() if return_dict is False else out


# ------------------------------------------------------------------------------------- counting


def count_parameters(model):
    """Trainable parameters of ``model`` (the tied decoder counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def mlm_flops_per_token(config, seq_len, pool_size=1, target_share=0.15):
    """Forward multiply-adds x 2 per input token of a ``TupeBertConfig`` encoder with its MLM head
    (matmuls only: the projections, FFN, attention's two products and the head at the targets;
    LayerNorm, softmax and GELU left out), at ``seq_len`` tokens per row. ``pool_size > 1`` counts
    the pooled stage: layer 0 with ``M`` queries over ``N + T`` keys, the later layers on ``M`` rows
    (``M = 1 + ceil((N-1)/k) + T``, ``T = target_share * N``). Training costs about 3x this. Raises
    ``ValueError`` for a bad ``seq_len`` or ``pool_size``."""
    _check_int("seq_len", seq_len)
    _check_int("pool_size", pool_size)
    h, d, layers, v = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.vocab_size,
    )
    n = seq_len
    t = target_share * n

    def layer(rows, keys):
        return 2 * (rows * h * h * 2 + keys * h * h * 2 + 2 * rows * keys * h + 2 * rows * h * d)

    if pool_size == 1:
        body = layers * layer(n, n)
    else:
        m = 1 + -(-(n - 1) // pool_size) + t
        body = layer(m, n + t) + (layers - 1) * layer(m, m)
    head = 2 * t * (h * h + h * v)
    return (body + head) / n
