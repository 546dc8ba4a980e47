"""Model-level rows of token-level early exit (op ``token_exit_inference``, family ``token_exit``):
batched SENTEE and TOKEE (Li et al., "Accelerating BERT Inference for Sequence Labeling via
Early-Exit", ACL 2021) against full depth and against the published per-sentence loop
(LeeSureman/Sequence-Labeling-Early-Exit), BERT-base sizes (12 layers, hidden 768, 12 heads, FFN
3072), fp32, one thread, B = 1, 8 and 32 at real sentence lengths.

Providers, per batch:
* ``effbert-full``: ``TupeBertModel`` on the packed real tokens, every token every layer, then the
  last layer's classifier (what a user without early exit runs): the baseline.
* ``effbert-sentee-2x``: ``early_exit_token_labels(mode="sentee")`` (max pooling), threshold
  calibrated for 2x fewer token-layers.
* ``effbert-tokee-2x`` / ``-3x`` / ``-4x``: ``early_exit_token_labels(mode="tokee", window=5)``
  with the published schedule (``published_token_thresholds``: t for layers 1-6, 2t for 7-12), t
  calibrated for 2x, 3x and 4x fewer token-layers (a token-layer: one token going through one layer
  as a query).
* ``official-loop`` (B = 1 and 32):
  ``effbert.reference.token_exit_loop.published_token_exit_loop``, one sentence at a time (batch
  size 1), every layer on the whole sentence with the masked copy rule and a Python loop over the
  words, at the TOKEE-3x threshold: the published code's way to run TOKEE, on the same layers.

Calibration: the threshold is bisected (on a log scale) on ``HELDOUT_ROWS`` real-length rows that no
timed batch holds, for a token-layer count of full depth's over 2, 3 or 4; each row's note gives the
threshold, the held-out reduction, the reduction the timed batch actually ran, and its FLOP ratio.

FLOP ratio (the paper's cost measure, ``inference_flops``): the run's FLOPs over full depth's,
counting the Q, output and FFN matmuls on each layer's query tokens, the K and V matmuls on every
token of the sentences still in the batch (exited tokens stay keys and values: each later layer
projects them), and attention's real query-key pairs (two matmuls, 4 * hidden FLOPs a pair); the
classifiers (hidden * labels a word a layer) are left out.

Checks: every row's labels and exit layers (``fn`` returns both, as float64) equal the published
loop's on the same model (0 mismatches; ``official-loop``'s against the batched TOKEE-3x), computed
once per batch and threshold.

The model: a random ``TupeBertForTokenClassification`` (TUPE-R, seed 0, 9 labels as CoNLL NER's
BIO), its classifiers' weights scaled by ``HEAD_SCALE`` so that the normalised entropies spread over
(0, 1) instead of sitting near 1. Its exits mean nothing (no F1 here:
``benchmarks/tokee_real_task.py`` gives F1 at each reduction on a trained model); what a row
measures is the time of a given token-layer reduction at these sizes. Words: each sentence's pieces
between [CLS] and [SEP] are cut into words of 1 (70%), 2 (20%) or 3 (10%) pieces with a fixed seed
(the labelled token is each word's first piece). The model is built when the first case runs.
"""

import math
import random
from functools import lru_cache

import torch

from .case import Case
from .cpu_inference import model_sizes, real_lengths  # the same sizes and sentences

DEPTH = 12
NUM_LABELS = 9
WINDOW = 5  # the published scripts' --win_size
HEAD_SCALE = 8.0
REDUCTIONS = (2, 3, 4)
HELDOUT_ROWS = {False: 48, True: 8}  # by quick
HELDOUT_SEED = 7919
BISECT_STEPS = 12
THREADS = 1


def make_batch(lengths, vocab, seed):
    """``(input_ids [B, N], attention_mask [B, N] bool, label_mask [B, N] bool)`` for real
    ``lengths`` (ints >= 1; N their max): random ids below ``vocab``, [CLS]/[SEP] at each row's
    ends, words of 1-3 pieces between them, drawn with ``seed``. Raises ``ValueError`` naming the
    argument."""
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of ints >= 1, got {lengths!r}")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 2:
        raise ValueError(f"vocab must be an int >= 2, got {vocab!r}")
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    b, n = len(lengths), max(lengths)
    ids = torch.randint(1, vocab, (b, n), generator=g)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    label_mask = torch.zeros(b, n, dtype=torch.bool)
    for r, length in enumerate(lengths):
        i = 1
        while i < length - 1:
            label_mask[r, i] = True
            i += rng.choices((1, 2, 3), weights=(7, 2, 1))[0]
    return ids.masked_fill(~mask, 0), mask, label_mask


def query_layers(exit_layer, label_mask, attention_mask, mode, copy_wordpieces="all"):
    """How many layers each token runs as a query, and each sentence's layers in the batch, from an
    early-exit run's ``exit_layer [B, N]`` (1-based at labelled tokens, as
    ``early_exit_token_labels`` returns it).

    A sentence stays in the batch until its last word exits (a sentence without words: one layer, as
    the published loop returns after it). TOKEE: a word's pieces (its labelled token and the
    unlabelled tokens after it up to the next labelled token or the row's last real token;
    ``copy_wordpieces="first"``: the labelled token only) run to the word's exit layer, every other
    token ([CLS], [SEP]) to the sentence's last layer. SENTEE and full depth: every token to the
    sentence's last layer.

    Arguments: ``exit_layer`` int ``[B, N]``; ``label_mask``, ``attention_mask`` bool ``[B, N]``;
    ``mode`` ``"tokee"``, ``"sentee"`` or ``"full"``. Returns ``(tokens [B, N] int64, 0 at padding;
    sentences [B] int64)``.
    Raises ``ValueError`` naming the argument."""
    if mode not in ("tokee", "sentee", "full"):
        raise ValueError(f"mode must be 'tokee', 'sentee' or 'full', got {mode!r}")
    if copy_wordpieces not in ("all", "first"):
        raise ValueError(f"copy_wordpieces must be 'all' or 'first', got {copy_wordpieces!r}")
    if not isinstance(exit_layer, torch.Tensor) or exit_layer.dim() != 2:
        raise ValueError("exit_layer must be an int [B, N] tensor")
    for name, t in (("label_mask", label_mask), ("attention_mask", attention_mask)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.shape != exit_layer.shape:
            raise ValueError(f"{name} must be a bool [B, N] = {list(exit_layer.shape)} tensor")
    exit_layer = exit_layer.long()
    words = torch.where(label_mask, exit_layer, 0)
    sentences = words.max(1).values.clamp_min(1)
    tokens = torch.where(attention_mask, sentences[:, None], 0)
    if mode != "tokee":
        return tokens, sentences
    for r in range(exit_layer.shape[0]):
        real = int(attention_mask[r].sum())
        first = label_mask[r].nonzero().flatten().tolist()
        ends = first[1:] + [real - 1]
        for s, e in zip(first, ends):
            stop = s + 1 if copy_wordpieces == "first" else max(e, s + 1)
            tokens[r, s:stop] = exit_layer[r, s]
    return tokens, sentences


def inference_flops(tokens, sentences, attention_mask, hidden, inter):
    """FLOPs of an early-exit run from ``query_layers``' counts: per sentence of n tokens, ``Q`` its
    tokens' query layers summed and ``L`` its layers, ``2 * Q * (2 h^2 + 2 h f)`` (Q and output
    projections, FFN on the queries) ``+ 2 * n * L * 2 h^2`` (K and V on every token of each layer
    it is in) ``+ 4 * h * n * Q`` (attention: each query against the sentence's n keys, scores and
    weighted values), h = ``hidden``, f = ``inter``. Full depth is ``Q = n * L``, ``L`` = the
    depth. Returns a float. Raises ``ValueError`` naming the argument."""
    for name, v in (("hidden", hidden), ("inter", inter)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("tokens must be an int [B, N] tensor")
    if not isinstance(sentences, torch.Tensor) or tuple(sentences.shape) != (tokens.shape[0],):
        raise ValueError(f"sentences must be an int [B] = [{tokens.shape[0]}] tensor")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask must be a [B, N] = {list(tokens.shape)} tensor")
    q = tokens.double().sum(1)
    n = attention_mask.double().sum(1)
    per = (
        2 * q * (2 * hidden * hidden + 2 * hidden * inter)
        + 4 * hidden * hidden * n * sentences.double()
        + 4 * hidden * n * q
    )
    return float(per.sum())


def _threaded(fn):
    def run(*args):
        before = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            with torch.no_grad():
                return fn(*args)
        finally:
            torch.set_num_threads(before)

    return run


@lru_cache(maxsize=2)
def _model(quick, device="cpu"):
    """The random multi-exit token classifier (eval mode, fp32, ``backend="auto"``)."""
    from effbert.models import TupeBertConfig, TupeBertForTokenClassification

    sizes = model_sizes(quick)[0]
    torch.manual_seed(0)
    cfg = TupeBertConfig(
        vocab_size=sizes["vocab"],
        hidden_size=sizes["hidden"],
        num_hidden_layers=DEPTH,
        num_attention_heads=sizes["heads"],
        intermediate_size=sizes["inter"],
        max_position_embeddings=512,
        position_mode="tupe-r",
        num_labels=NUM_LABELS,
        multi_exit=True,
    )
    model = TupeBertForTokenClassification(cfg)
    with torch.no_grad():
        for head in model.exits:
            head.weight.mul_(HEAD_SCALE)
    return model.to(device).eval()


def _thresholds(mode, t):
    from effbert.models import published_token_thresholds

    return published_token_thresholds(t, DEPTH) if mode == "tokee" else [t] * DEPTH


def _run(quick, mode, t, ids, mask, label_mask):
    model = _model(quick, ids.device.type)
    with torch.no_grad():
        return model.early_exit_token_labels(
            ids,
            mask,
            label_mask=label_mask,
            mode=mode,
            thresholds=_thresholds(mode, t),
            window=WINDOW,
        )


@lru_cache(maxsize=2)
def _heldout(quick, device):
    rows = HELDOUT_ROWS[quick]
    lengths = real_lengths(rows, HELDOUT_SEED)
    batch = make_batch(lengths, model_sizes(quick)[0]["vocab"], HELDOUT_SEED)
    return tuple(t.to(device) for t in batch)


def bisect_threshold(token_layers_of, full, reduction, steps=None, lo=1e-4, hi=1.0):
    """The threshold whose run comes closest to ``full / reduction`` token-layers, bisected on a log
    scale in ``[lo, hi]`` (the token-layers fall as the threshold rises). ``token_layers_of(t)``:
    the token-layers of a run at threshold ``t`` (int); ``full``: full depth's token-layers;
    ``reduction`` > 0; ``steps``: bisection steps (default ``BISECT_STEPS``). Returns ``(t, the
    reduction full / token_layers it gave)``. Raises ``ValueError``
    naming the argument."""
    steps = BISECT_STEPS if steps is None else steps
    if not callable(token_layers_of):
        raise ValueError("token_layers_of must be callable: t -> token-layers")
    if isinstance(full, bool) or not isinstance(full, int) or full < 1:
        raise ValueError(f"full must be an int >= 1, got {full!r}")
    if not isinstance(reduction, (int, float)) or not reduction > 0:
        raise ValueError(f"reduction must be a number > 0, got {reduction!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not 0 < lo < hi:
        raise ValueError(f"lo and hi must satisfy 0 < lo < hi, got {lo!r}, {hi!r}")
    lo, hi = math.log(lo), math.log(hi)
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = full / max(1, int(token_layers_of(math.exp(mid))))
        if best is None or abs(got - reduction) < abs(best[1] - reduction):
            best = (math.exp(mid), got)
        if got < reduction:  # too few exits: raise the threshold
            lo = mid
        else:
            hi = mid
    return best


@lru_cache(maxsize=16)
def calibrate(quick, mode, reduction, device="cpu"):
    """``bisect_threshold`` for the bench model on the held-out rows: the threshold ``t`` (TOKEE:
    the published schedule's first half) for full depth's token-layers over ``reduction``; returns
    ``(t, held-out reduction)``. Raises ``ValueError`` for a ``mode`` other than "tokee" or
    "sentee"."""
    if mode not in ("tokee", "sentee"):
        raise ValueError(f"mode must be 'tokee' or 'sentee', got {mode!r}")
    ids, mask, label_mask = _heldout(quick, device)
    full = int(mask.sum()) * DEPTH
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return bisect_threshold(
            lambda t: _run(quick, mode, t, ids, mask, label_mask).token_layers, full, reduction
        )
    finally:
        torch.set_num_threads(before)


def _as_rows(labels, exit_layer, label_mask):
    return torch.cat([labels[label_mask], exit_layer[label_mask]]).double()


def _published_loop(model, ids, mask, label_mask, mode, thresholds):
    """The published per-sentence loop over the rows of a padded batch: ``(labels, exit layers)``,
    each ``[B, N]`` int64 at the labelled pieces (-100 and 0 elsewhere)."""
    from effbert.reference.token_exit_loop import published_token_exit_loop

    labels = torch.full(ids.shape, -100, dtype=torch.int64, device=ids.device)
    layers = torch.zeros(ids.shape, dtype=torch.int64, device=ids.device)
    for r in range(ids.shape[0]):
        real = mask[r]
        got, got_layers, _, _ = published_token_exit_loop(
            model,
            ids[r][real],
            label_mask[r][real],
            mode=mode,
            thresholds=thresholds,
            window=WINDOW,
        )
        where = label_mask[r].nonzero().flatten()
        labels[r, where] = torch.tensor(got, dtype=torch.int64, device=ids.device)
        layers[r, where] = torch.tensor(got_layers, dtype=torch.int64, device=ids.device)
    return labels, layers


@lru_cache(maxsize=32)
def _loop_rows(quick, device, batch, mode, t):
    """The published loop's labels and exit layers on the timed batch (``t`` None: full depth)."""
    ids, mask, label_mask = _batch(quick, device, batch)
    model = _model(quick, ids.device.type)
    thresholds = [0.0] * DEPTH if t is None else _thresholds(mode, t)
    return _as_rows(*_published_loop(model, ids, mask, label_mask, mode, thresholds), label_mask)


@lru_cache(maxsize=8)
def _batch(quick, device, batch):
    out = make_batch(real_lengths(batch, seed=batch), model_sizes(quick)[0]["vocab"], seed=batch)
    return tuple(t.to(device) for t in out)


def _full(quick):
    def fn(ids, mask, label_mask):
        model = _model(quick, ids.device.type)
        hidden = model.bert(ids, mask).last_hidden_state
        labels = model.exits[-1](hidden[label_mask]).argmax(-1)
        return torch.cat([labels, torch.full_like(labels, DEPTH)]).double()

    return fn


def _early(quick, mode, t):
    def fn(ids, mask, label_mask):
        out = _run(quick, mode, t, ids, mask, label_mask)
        return _as_rows(out.labels, out.exit_layer, label_mask)

    return fn


def _loop(quick, t):
    thresholds = _thresholds("tokee", t)

    def fn(ids, mask, label_mask):
        model = _model(quick, ids.device.type)
        loop = _published_loop(model, ids, mask, label_mask, "tokee", thresholds)
        return _as_rows(*loop, label_mask)

    return fn


def _provider_cases(batch, quick, device):
    sizes, _ = model_sizes(quick)
    h, f = sizes["hidden"], sizes["inter"]
    ids, mask, label_mask = _batch(quick, device, batch)
    lengths = mask.sum(1)
    seq = ids.shape[1]
    # full depth: every sentence DEPTH layers, every token a query in each
    full_sent = torch.full((ids.shape[0],), DEPTH, dtype=torch.int64, device=ids.device)
    full_flops = inference_flops(torch.where(mask, DEPTH, 0), full_sent, mask, h, f)
    params = {"B": batch, "Nmax": seq}
    shape = f"B={batch},real lengths,Nmax={seq},words={int(label_mask.sum())}"
    common = dict(
        op="token_exit_inference",
        shape=shape,
        params=params,
        dtype="float32",
        mode="forward",
        make_inputs=lambda: (ids, mask, label_mask),
        bytes=0,
        rtol=0.0,
        baseline="effbert-full",
        tokens=int(lengths.sum()),
    )
    out = [
        Case(
            provider="effbert-full",
            fn=_threaded(_full(quick)),
            reference=lambda *_: _loop_rows(quick, device, batch, "tokee", None),
            flops=full_flops,
            note=f"full depth: {int(lengths.sum()) * DEPTH} token-layers, every token every layer",
            **common,
        )
    ]
    wanted = [("sentee", 2)] + [("tokee", k) for k in REDUCTIONS]
    if quick:
        wanted = [("sentee", 2), ("tokee", 3)]
    for mode, k in wanted:
        out.append(_early_case(mode, k, batch, quick, device, common, full_flops))
    if batch in (1, 32) or quick:
        out.append(_loop_case(batch, quick, device, common, full_flops))
    return out


def _early_case(mode, k, batch, quick, device, common, full_flops):
    """Calibrates when first run (make_inputs), runs once on the timed batch for its token-layers
    and FLOPs."""
    sizes = model_sizes(quick)[0]
    ids, mask, label_mask = _batch(quick, device, batch)
    state = {}

    def make_inputs():
        if not state:
            t, heldout = calibrate(quick, mode, k, device)
            res = _threaded(lambda: _run(quick, mode, t, ids, mask, label_mask))()
            tokens, sentences = query_layers(res.exit_layer, label_mask, mask, mode)
            counted = int(tokens.sum())
            if counted != res.token_layers:
                raise AssertionError(
                    f"token-layers counted {counted} != the run's {res.token_layers}"
                )
            flops = inference_flops(tokens, sentences, mask, sizes["hidden"], sizes["inter"])
            full = int(mask.sum()) * DEPTH
            case.flops = flops
            schedule = " (published schedule: 2t in layers 7-12)" if mode == "tokee" else ""
            case.note = (
                f"t={t:.4g}{schedule}, "
                f"window {WINDOW}; held-out {heldout:.2f}x fewer token-layers (target {k}x); "
                f"this batch {full / res.token_layers:.2f}x ({res.token_layers}/{full}), "
                f"FLOP ratio {flops / full_flops:.3f}"
            )
            state.update(
                t=t, heldout=heldout, run=full / res.token_layers, flop_ratio=flops / full_flops
            )
        return ids, mask, label_mask

    def fn(*args):
        return _early(quick, mode, state["t"])(*args)

    case = Case(
        provider=f"effbert-{mode}-{k}x",
        fn=_threaded(fn),
        reference=lambda *_: _loop_rows(quick, device, batch, mode, state["t"]),
        flops=0,
        **{key: v for key, v in common.items() if key != "make_inputs"},
        make_inputs=make_inputs,
    )
    case.token_exit_state = state
    return case


def _loop_case(batch, quick, device, common, full_flops):
    ids, mask, label_mask = _batch(quick, device, batch)
    state = {}
    sizes = model_sizes(quick)[0]

    def make_inputs():
        if not state:
            t, _ = calibrate(quick, "tokee", 3, device)
            res = _threaded(lambda: _run(quick, "tokee", t, ids, mask, label_mask))()
            tokens, sentences = query_layers(res.exit_layer, label_mask, mask, "tokee")
            # the loop runs every layer a sentence is in on all its tokens
            flops = inference_flops(
                torch.where(mask, sentences[:, None], 0),
                sentences,
                mask,
                sizes["hidden"],
                sizes["inter"],
            )
            # the floor is what TOKEE-3x must compute for these labels; the loop's own work is more
            case.flops = inference_flops(tokens, sentences, mask, sizes["hidden"], sizes["inter"])
            case.work_flops = flops
            case.note = (
                f"the published per-sentence loop (batch size 1, whole layers, masked copy, "
                f"a Python "
                f"loop over words) at TOKEE-3x's t={t:.4g}; it computes FLOP ratio "
                f"{flops / full_flops:.3f}"
            )
            state.update(t=t, batched=_as_rows(res.labels, res.exit_layer, label_mask))
        return ids, mask, label_mask

    def fn(*args):
        return _loop(quick, state["t"])(*args)

    case = Case(
        provider="official-loop",
        fn=_threaded(fn),
        reference=lambda *_: state["batched"],
        flops=0,
        **{key: v for key, v in common.items() if key != "make_inputs"},
        make_inputs=make_inputs,
    )
    return case


def cases(device, quick):
    """The rows of every batch size on ``device`` (a ``torch.device``: the CPU run of ``effbert
    bench`` and the GPU suite list the same rows; on CUDA the model and batches live there and each
    call is timed between synchronisations by the runner). Raises ``ValueError`` for another
    ``device``."""
    if not isinstance(device, torch.device):
        raise ValueError(f"device must be a torch.device, got {device!r}")
    dev = device.type if device.index is None else str(device)
    out = []
    for batch in model_sizes(quick)[1]:
        out += _provider_cases(batch, quick, dev)
    return out
