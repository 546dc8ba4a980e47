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
tokenized corpus's sentences are; ``hf-sdpa`` computes the padded positions, effbert's CPU attention skips them
(its linear layers still run on the padded batch, as transformers' do).

Floors: the FLOPs of the layers run (the linear layers on the padded batch, attention on real tokens for effbert and
on the padded batch for transformers; for early exit only the layers each sample reaches) at the measured fp32
matrix rate. The models are built when the first case runs, so listing the suite costs nothing.
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


def layer_flops(lengths, hidden, inter, seq, padded_attention):
    """FLOPs of one encoder layer over the batch: the QKV, output and FFN matmuls on the padded batch, attention
    (two matmuls per query-key pair) on the padded batch or on real tokens only."""
    tokens = seq * len(lengths)
    pairs = seq * seq * len(lengths) if padded_attention else sum(int(n) ** 2 for n in lengths)
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
    return hf, model, multi


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


def _hf_case(shape, make_inputs, flops, tokens, quick):
    def fn(ids, mask):
        hf = _models(quick)[0]
        return hf(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]

    return Case(op="cpu_inference", shape=shape, dtype="float32", mode="forward", provider="hf-sdpa",
                fn=_threaded(fn), make_inputs=make_inputs, reference=None, bytes=0, flops=flops,
                skip_reasons=_transformers_reason(), baseline="hf-sdpa", check=False, tokens=tokens,
                note="transformers BertModel, full depth, padded batch")


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
                baseline="hf-sdpa", tokens=tokens, note="TupeBertModel (TUPE-R), full depth")


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
            per_layer = layer_flops(lengths, sizes["hidden"], sizes["inter"], seq, False) / len(lengths)
            case.flops = per_layer * float(layers.sum())  # each sample's share of a layer, times the layers it ran
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
        out.append(_hf_case(shape, make_inputs, padded, tokens, quick))
        out.append(_effbert_case(shape, make_inputs, real, tokens, quick))
        for name, target in TARGETS.items():
            if name != "effbert-early-exit" and (quick or batch != 8):  # the threshold sweep at one batch size
                continue
            out.append(_early_exit_case(name, target, shape, (ids, mask, lengths), sizes, seq, quick))
    return out
