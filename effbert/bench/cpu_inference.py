"""Benchmark cases of CPU inference (op ``cpu_inference``): effbert's TUPE-BERT and its batched early exit
against transformers' ``BertModel`` with SDPA attention, on the CPU, fp32, 2 threads.

Providers, per batch (BERT-base sizes, 128 tokens, random weights, real-length padding):
* ``hf-sdpa``: ``transformers.BertModel`` (``attn_implementation="sdpa"``), full depth: the baseline.
* ``effbert``: ``TupeBertModel`` (TUPE-R: the positional term computed once and added in every layer), full depth.
* ``effbert-early-exit``: the multi-exit ``TupeBertForSequenceClassification`` with batched early exit (entropy
  criterion, DeeBERT) at a threshold calibrated on the same batch to an average exit layer of 6 of 12;
  ``effbert-early-exit-3`` and ``-9`` at averages of 3 and 9 (batch 8 only: the whole family runs in about five
  minutes on two cores). Each row's note gives the threshold, the average exit
  layer and the layers saved. With random weights the exits mean nothing: the threshold only sets how many layers
  run, which is what the timing measures.

Padding: lengths drawn once per batch from 16..128 (the longest set to 128, so the batch is padded to 128), as a
tokenized corpus's sentences are; ``hf-sdpa`` computes the padded positions, effbert's CPU path runs every layer
on the real tokens only. effbert's models run with the positional term cached (``TupePositionBias(cache=True)``:
inference in eval mode, the term depends on no input), as a deployment would.

Plus ``patch_bert_attention`` on transformers' BERT at all-MiniLM-L6-v2's sizes (6 layers, hidden 384, 12 heads,
random weights; shape ``all-MiniLM-L6-v2,B=...``): ``hf-sdpa`` against ``hf-sdpa-patched``, the same model with
effbert's attention in every layer, checked against the unpatched model in float64.

Floors: the fewest FLOPs of the layers a row must run (linear layers and attention on the real tokens only; for
early exit only the layers each sample reaches) at the measured fp32 matrix rate, the same for every provider of a
shape; each provider's own work (``hf-sdpa``: the padded batch) gives its TFLOP/s. The models are built when the
first case runs, so listing the suite costs nothing.
"""

from functools import lru_cache

import torch

from .case import Case

SEQ = 128
DEPTH = 12
TARGETS = {"effbert-early-exit": 6.0, "effbert-early-exit-3": 3.0, "effbert-early-exit-9": 9.0}
THREADS = 2


def _sizes(quick):
    if quick:  # a small model: the --quick suite checks that every provider runs and agrees
        return dict(hidden=64, heads=4, inter=128, vocab=1000), (1, 4), 32
    return dict(hidden=768, heads=12, inter=3072, vocab=30522), (1, 8, 32), SEQ


def make_batch(batch, seq, vocab, seed):
    """``input_ids [B, N]``, ``attention_mask [B, N]`` (int64, 1 = real token) and the lengths: lengths drawn from
    16..N (1..N below 32 tokens), the first set to N."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16 if seq >= 32 else 1, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, 0), mask.long(), lengths


def layer_flops(lengths, hidden, inter, seq, padded):
    """FLOPs of one encoder layer over the batch: the QKV, output and FFN matmuls and attention (two matmuls per
    query-key pair), on the padded batch (``padded``: every sequence ``seq`` tokens) or on the real tokens only."""
    if padded:
        tokens, pairs = seq * len(lengths), seq * seq * len(lengths)
    else:
        tokens, pairs = sum(int(n) for n in lengths), sum(int(n) ** 2 for n in lengths)
    return 2 * tokens * (4 * hidden * hidden + 2 * hidden * inter) + 4 * pairs * hidden


def _effbert_config(sizes, multi_exit):
    from effbert.models import TupeBertConfig

    return TupeBertConfig(vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], num_hidden_layers=DEPTH,
                          num_attention_heads=sizes["heads"], intermediate_size=sizes["inter"],
                          position_mode="tupe-r", multi_exit=multi_exit)


@lru_cache(maxsize=2)
def _models(quick):
    """transformers' BertModel (None without transformers), TupeBertModel and the multi-exit classifier, random
    weights, eval mode."""
    from effbert.models import TupeBertForSequenceClassification, TupeBertModel

    sizes = _sizes(quick)[0]
    torch.manual_seed(0)
    hf = None
    if not _transformers_reason():
        import transformers

        cfg = transformers.BertConfig(vocab_size=sizes["vocab"], hidden_size=sizes["hidden"],
                                      num_hidden_layers=DEPTH, num_attention_heads=sizes["heads"],
                                      intermediate_size=sizes["inter"], attn_implementation="sdpa")
        hf = transformers.BertModel(cfg).eval()
    model = TupeBertModel(_effbert_config(sizes, False)).eval()
    multi = TupeBertForSequenceClassification(_effbert_config(sizes, True)).eval()
    for m in (model, multi.bert):  # inference: the positional term depends on no input, computed once
        m.position_encoder.cache = True
    return hf, model, multi


MINILM = dict(hidden=384, heads=12, inter=1536, vocab=30522, layers=6)  # all-MiniLM-L6-v2's sizes


@lru_cache(maxsize=2)
def _minilm(quick):
    """transformers' BertModel at all-MiniLM-L6-v2's sizes (random weights, eval mode, SDPA) and a copy patched
    with ``patch_bert_attention``."""
    import transformers

    from effbert.integrations.hf import patch_bert_attention

    sizes = dict(MINILM, hidden=64, heads=4, inter=128, vocab=1000) if quick else MINILM
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=sizes["vocab"], hidden_size=sizes["hidden"],
                                  num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
                                  intermediate_size=sizes["inter"], attn_implementation="sdpa")
    hf = transformers.BertModel(cfg).eval()
    patched = transformers.BertModel(cfg).eval()
    patched.load_state_dict(hf.state_dict())
    return hf, patch_bert_attention(patched)


def _threaded(fn):
    """``fn`` under no_grad with the benchmark's thread count (restored afterwards)."""
    def run(*args):
        before = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            with torch.no_grad():
                return fn(*args)
        finally:
            torch.set_num_threads(before)

    return run


def _transformers_reason():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        return [f"transformers is not installed ({exc}); pip install effbert[bench]"]
    return []


def _hf_case(shape, make_inputs, flops, work_flops, tokens, quick):
    def fn(ids, mask):
        hf = _models(quick)[0]
        return hf(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]

    return Case(op="cpu_inference", shape=shape, dtype="float32", mode="forward", provider="hf-sdpa",
                fn=_threaded(fn), make_inputs=make_inputs, reference=None, bytes=0, flops=flops,
                work_flops=work_flops, skip_reasons=_transformers_reason(), baseline="hf-sdpa", check=False,
                tokens=tokens, note="transformers BertModel, full depth, padded batch")


def _effbert_case(shape, make_inputs, flops, tokens, quick):
    def fn(ids, mask):
        return _models(quick)[1](ids, mask).last_hidden_state[mask.bool()]

    def reference(ids, mask):  # the same weights through the eager reference ops, in float64
        model = _models(quick)[1]
        ref = type(model)(model.config).double().eval()
        ref.load_state_dict(model.state_dict())
        ref.set_backend("eager")
        with torch.no_grad():
            return ref(ids, mask).last_hidden_state[mask.bool()]

    return Case(op="cpu_inference", shape=shape, dtype="float32", mode="forward", provider="effbert",
                fn=_threaded(fn), make_inputs=make_inputs, reference=reference, bytes=0, flops=flops, rtol=1e-4,
                baseline="hf-sdpa", tokens=tokens, note="TupeBertModel (TUPE-R), full depth, real tokens only")


def _minilm_cases(batch, quick):
    """``hf-sdpa`` and ``hf-sdpa-patched`` (``patch_bert_attention``) at all-MiniLM-L6-v2's sizes."""
    sizes = dict(MINILM, hidden=64, heads=4, inter=128, vocab=1000) if quick else MINILM
    seq = 32 if quick else SEQ
    ids, mask, lengths = make_batch(batch, seq, sizes["vocab"], seed=100 + batch)
    shape = f"all-MiniLM-L6-v2,B={batch},N={seq}"
    per_layer = layer_flops(lengths, sizes["hidden"], sizes["inter"], seq, False)
    padded = layer_flops(lengths, sizes["hidden"], sizes["inter"], seq, True)
    real_attention = 4 * sum(int(n) ** 2 for n in lengths) * sizes["hidden"]
    # patched: the linear layers still on the padded batch (only attention is replaced), attention on real tokens
    patched_work = padded - 4 * seq * seq * batch * sizes["hidden"] + real_attention

    def run(which):
        def fn(ids, mask):
            model = _minilm(quick)[which]
            return model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
        return fn

    def reference(ids, mask):  # the unpatched model's weights in float64
        hf = _minilm(quick)[0]
        ref = type(hf)(hf.config).double().eval()
        ref.load_state_dict(hf.state_dict())
        with torch.no_grad():
            return ref(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]

    common = dict(op="cpu_inference", shape=shape, dtype="float32", mode="forward", make_inputs=lambda: (ids, mask),
                  reference=reference, bytes=0, flops=per_layer * sizes["layers"], rtol=1e-4,
                  skip_reasons=_transformers_reason(), baseline="hf-sdpa", tokens=int(lengths.sum()))
    return [Case(provider="hf-sdpa", fn=_threaded(run(0)), work_flops=padded * sizes["layers"], check=False,
                 note="transformers BertModel, SDPA, padded batch", **common),
            Case(provider="hf-sdpa-patched", fn=_threaded(run(1)), work_flops=patched_work * sizes["layers"],
                 note="the same model after patch_bert_attention", **common)]


def _early_exit_case(name, target, shape, batch_inputs, sizes, seq, quick):
    """Calibrates its threshold on the batch when it first runs (make_inputs), then sets its FLOPs and note."""
    ids, mask, lengths = batch_inputs
    state = {}

    def make_inputs():
        if not state:
            multi = _models(quick)[2]
            from effbert.calibration import calibrate_threshold, exit_layers

            with torch.no_grad():
                all_exits = multi(ids, mask).exit_logits.float()  # [L, B, C]
            threshold = calibrate_threshold(all_exits, criterion="entropy", target_avg_exit=target).threshold
            layers = exit_layers(all_exits, "entropy", threshold=threshold)
            avg = float(layers.double().mean())
            # each sample's layer on its real tokens, times the layers it ran
            case.flops = float(sum(layer_flops([int(n)], sizes["hidden"], sizes["inter"], seq, False) * int(l)
                                   for n, l in zip(lengths, layers)))
            case.note = (f"entropy < {threshold:.6g}: average exit {avg:.2f} of {DEPTH}, "
                         f"{100 * (1 - avg / DEPTH):.0f}% of layer runs saved")
            state.update(threshold=threshold, expected=all_exits[layers - 1, torch.arange(len(layers))])
        return ids, mask

    def fn(ids, mask):
        return _models(quick)[2].early_exit(ids, mask, criterion="entropy", threshold=state["threshold"])[0]

    def reference(ids, mask):  # each sample's logits at its exit layer, from the full-depth forward
        return state["expected"]

    case = Case(op="cpu_inference", shape=shape, dtype="float32", mode="forward", provider=name,
                fn=_threaded(fn), make_inputs=make_inputs, reference=reference, bytes=0, flops=0, rtol=1e-4,
                baseline="hf-sdpa", tokens=int(lengths.sum()))
    return case


def cases(device, quick):
    if device.type != "cpu":
        return []
    sizes, batches, seq = _sizes(quick)
    out = []
    for batch in batches:
        ids, mask, lengths = make_batch(batch, seq, sizes["vocab"], seed=batch)
        shape = f"B={batch},N={seq}"
        tokens = int(lengths.sum())

        def make_inputs(ids=ids, mask=mask):
            return ids, mask

        padded = layer_flops(lengths, sizes["hidden"], sizes["inter"], seq, True) * DEPTH
        real = layer_flops(lengths, sizes["hidden"], sizes["inter"], seq, False) * DEPTH
        out.append(_hf_case(shape, make_inputs, real, padded, tokens, quick))
        out.append(_effbert_case(shape, make_inputs, real, tokens, quick))
        for name, target in TARGETS.items():
            if name != "effbert-early-exit" and (quick or batch != 8):  # the threshold sweep at one batch size
                continue
            out.append(_early_exit_case(name, target, shape, (ids, mask, lengths), sizes, seq, quick))
    for batch in batches:
        out += _minilm_cases(batch, quick)
    return out
