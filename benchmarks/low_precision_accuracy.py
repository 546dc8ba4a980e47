"""What int8 and bf16 cost in accuracy on the CPU, on the real all-MiniLM-L6-v2 checkpoint: effbert
(``quantize_for_cpu``, ``model.to(torch.bfloat16)``) against ONNX Runtime's own int8 dynamic
quantisation, both measured against fp32.

1. Sentence embeddings: mean-pooled all-MiniLM-L6-v2 embeddings of ``--sentences`` quotations of
   Debian's ``fortunes`` (the real-task rows of ``early_bird_real_task.fortunes_task``). The fp32
   reference is effbert's ``SentenceEncoder`` on ``from_hf_bert``, checked against
   sentence-transformers' own ``encode`` (worst cosine >= 1 - 1e-5, else the run stops). Each
   variant (effbert bf16; effbert int8 with the default ``keep_float`` and with every linear in
   int8, ``keep_float=()``; ONNX Runtime fp32 and int8) gets the per-sentence cosine to the
   reference (mean, min) and the retrieval check: the share of sentences whose nearest neighbour
   among the others (by cosine) is the one fp32 finds, and the share where it is among fp32's
   three nearest.
2. Task accuracy: all-MiniLM-L6-v2 fine-tuned once on the four-category fortunes task exactly as
   ``early_bird_real_task`` runs its full fine-tune (its data builder, classifier and Trainer
   settings: AdamW 1e-4, 3 epochs, batch 16, max 64 pieces, fixed seed), then the dev accuracy of
   each variant and the share of its predictions equal to fp32's, on the dev rows and on all 720
   task rows (train and dev: more rows for the agreement; accuracy is the dev set's). One more
   int8 row there, ``effbert-int8-fp32-head``, keeps the pooler and classifier in fp32 as the
   ONNX Runtime rows do (below).

ONNX Runtime runs what the bench gives it (``effbert.bench.peers``): a transformers ``BertModel``
exported with dynamic batch and length, optimised by its BERT optimizer (fused Attention), quantised
with ``onnxruntime.quantization.quantize_dynamic`` at its defaults (int8 weights per tensor, every
linear and the embedding tables: MatMulInteger, QAttention, QEmbedLayerNormalization). For the
fine-tuned classifier the effbert encoder's weights are converted back to a transformers
``BertModel`` (``effbert_state_dict_to_hf``; its fp32 logits are checked against effbert's, else the
run stops) and exported; that export path ends at ``last_hidden_state``, so the pooler and the 4-way
classifier (0.15M of 22.7M parameters) run in torch fp32 on ONNX Runtime's output, where effbert's
int8 variants quantise them too.

One thread (torch and ONNX Runtime). Stage times are process CPU seconds (``time.process_time``)
beside wall seconds, with the load average: the machine is shared, so wall time is noisy.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/low_precision_accuracy.py

Writes ``benchmarks/results/<UTC>Z_CPU_<sha>_low_precision/``: ``low_precision.json``,
``low_precision.md`` (the two tables) and ``low_precision.png``; a folder that exists is never
written into.
"""

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import early_bird_real_task as real_task  # noqa: E402  (the fortunes task and its fine-tune)

REFERENCE_TOLERANCE = 1e-5  # effbert fp32 against sentence-transformers: 1 - worst cosine
# the variants, in table order; "fp32" is the reference the others are measured against
EFFBERT_VARIANTS = ("fp32", "effbert-bf16", "effbert-int8", "effbert-int8-all")
ONNX_VARIANTS = ("onnxruntime-fp32", "onnxruntime-int8")
VARIANTS = EFFBERT_VARIANTS + ONNX_VARIANTS
# the classifier only: effbert int8 with the pooler and classifier in fp32 too, as ONNX Runtime's
# rows get them (its export ends at last_hidden_state), so that the two int8 rows differ only in the
# encoder
HEAD_FP32 = "effbert-int8-fp32-head"
TASK_VARIANTS = VARIANTS + (HEAD_FP32,)
DESCRIPTIONS = {
    "fp32": "effbert from_hf_bert, fp32 (the reference)",
    "effbert-bf16": "model.to(torch.bfloat16)",
    "effbert-int8": "quantize_for_cpu(model): FFN down projection kept fp32 (default keep_float)",
    "effbert-int8-all": "quantize_for_cpu(model, keep_float=()): every linear int8",
    "onnxruntime-fp32": "ONNX Runtime, BERT-optimised graph, fp32",
    "onnxruntime-int8": "ONNX Runtime quantize_dynamic (defaults: QInt8 weights per tensor, every "
    "linear and the embedding tables)",
    HEAD_FP32: "classifier only: quantize_for_cpu(model, keep_float=KEEP_FLOAT + ('dense', "
    "'classifier')), the pooler and classifier fp32 as in the onnxruntime rows",
}


def _check_matrix(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float [n, d] tensor, got {x.dtype} {list(x.shape)}")


def _check_labels(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.is_floating_point() or x.is_complex():
        raise ValueError(f"{name} must be an integer [n] tensor, got {x.dtype} {list(x.shape)}")


def cosines(embeddings, reference):
    """Row-wise cosine similarity in float64: ``embeddings [n, d]``, ``reference [n, d]`` (any
    float dtype) -> ``[n]`` float64, row i the cosine of ``embeddings[i]`` and ``reference[i]``. A
    zero row gives 0. Raises ``TypeError`` / ``ValueError`` naming the argument for a non-tensor, a
    tensor that is not a float matrix, or shapes that differ."""
    _check_matrix("embeddings", embeddings)
    _check_matrix("reference", reference)
    if embeddings.shape != reference.shape:
        raise ValueError(
            f"embeddings {list(embeddings.shape)} and reference {list(reference.shape)} must have "
            "the same shape"
        )
    return torch.nn.functional.cosine_similarity(
        embeddings.double(), reference.double(), dim=1, eps=1e-300
    )


def nearest_neighbours(embeddings):
    """Each row's nearest neighbour among the other rows by cosine similarity (float64):
    ``embeddings [n, d]`` (n >= 2) -> ``[n]`` int64 row indices, never the row itself (ties: the
    lowest index). Raises ``TypeError`` / ``ValueError`` for a non-tensor, a non-float or non-2-D
    tensor, or fewer than two rows."""
    return _similarities(embeddings).argmax(1)


def _similarities(embeddings):
    """``[n, n]`` float64 cosine similarities of the rows, -inf on the diagonal."""
    _check_matrix("embeddings", embeddings)
    if embeddings.shape[0] < 2:
        raise ValueError(f"embeddings must have at least 2 rows, got {embeddings.shape[0]}")
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity


def agreement(values, reference):
    """The share of positions where ``values [n]`` equals ``reference [n]`` (both integer tensors:
    class predictions, or row indices), a float in [0, 1]. With the dev labels as ``reference`` it
    is the accuracy; with fp32's predictions, the prediction agreement. Raises ``TypeError`` /
    ``ValueError`` for non-tensors, non-integer or non-1-D tensors, different lengths or n = 0."""
    _check_labels("values", values)
    _check_labels("reference", reference)
    if values.shape != reference.shape or values.numel() == 0:
        raise ValueError(
            f"values {list(values.shape)} and reference {list(reference.shape)} must have the same "
            "non-zero length"
        )
    return float((values == reference).double().mean())


def neighbour_agreement(embeddings, reference):
    """The retrieval check: the share of rows whose nearest neighbour (``nearest_neighbours``) in
    ``embeddings [n, d]`` is the one it has in ``reference [n, d]``. Errors as ``cosines``."""
    cosines(embeddings, reference)  # the same checks
    return agreement(nearest_neighbours(embeddings), nearest_neighbours(reference))


def neighbour_in_top_k(embeddings, reference, k=3):
    """The share of rows whose nearest neighbour in ``embeddings [n, d]`` is among its ``k``
    nearest in ``reference [n, d]`` (cosine, float64; ``1 <= k < n``; ties in ``reference`` broken
    by ``torch.topk``). ``k = 1`` is ``neighbour_agreement`` up to ties. Errors as ``cosines``, and
    ``ValueError`` for ``k`` out of range."""
    cosines(embeddings, reference)  # the same checks
    n = embeddings.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k must be an int in [1, {n - 1}], got {k!r}")
    top = _similarities(reference).topk(k, dim=1).indices
    return float((top == nearest_neighbours(embeddings)[:, None]).any(1).double().mean())


def reference_neighbours(reference):
    """How far apart the reference's neighbours are: ``{"median_top1_cosine",
    "median_gap_to_second"}`` of ``reference [n, d]`` (n >= 3): the median over rows of the cosine
    to the nearest other row, and of its margin over the second nearest."""
    top = _similarities(reference).topk(2, dim=1).values
    return {
        "median_top1_cosine": float(top[:, 0].median()),
        "median_gap_to_second": float((top[:, 0] - top[:, 1]).median()),
    }


def embedding_row(embeddings, reference):
    """``{"mean_cosine", "min_cosine", "neighbour_agreement", "neighbour_in_fp32_top3"}`` of
    ``embeddings [n, d]`` against ``reference [n, d]`` (see ``cosines``, ``neighbour_agreement``,
    ``neighbour_in_top_k``)."""
    cos = cosines(embeddings, reference)
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "neighbour_agreement": neighbour_agreement(embeddings, reference),
        "neighbour_in_fp32_top3": neighbour_in_top_k(embeddings, reference, 3),
    }


def task_row(predictions, labels, reference_predictions):
    """``{"accuracy", "agreement_with_fp32", "changed"}`` of ``predictions [n]`` against the dev
    ``labels [n]`` and fp32's ``reference_predictions [n]`` (integer tensors)."""
    agree = agreement(predictions, reference_predictions)  # checks both
    return {
        "accuracy": agreement(predictions, labels),
        "agreement_with_fp32": agree,
        "changed": int((predictions != reference_predictions).sum()),
    }


@torch.no_grad()
def predictions(logits_of, batches):
    """The argmax class of every row: ``logits_of(input_ids, attention_mask) -> [B, C]`` run on
    each batch (a dict with ``input_ids`` and ``attention_mask`` ``[B, N]``) in order; returns
    ``[rows]`` int64."""
    if not callable(logits_of):
        raise TypeError(f"logits_of must be callable, got {type(logits_of).__name__}")
    out = [logits_of(b["input_ids"], b["attention_mask"]).float().argmax(-1) for b in batches]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def effbert_logits(model):
    """``fn(input_ids, attention_mask) -> logits [B, C]`` of an effbert sequence classifier."""
    model.eval()
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def hf_bert_of(encoder, folder):
    """A transformers ``BertModel`` holding ``encoder``'s weights (a ``TupeBertModel`` from
    ``from_hf_bert``, e.g. a fine-tuned classifier's ``.bert``), with the configuration of the
    checkpoint ``folder`` it was converted from; eval mode. Loaded strictly: every weight has its
    counterpart (``effbert_state_dict_to_hf``)."""
    import transformers

    from effbert.integrations.sentence import effbert_state_dict_to_hf
    from effbert.models import TupeBertModel

    if not isinstance(encoder, TupeBertModel):
        raise TypeError(f"encoder must be a TupeBertModel, got {type(encoder).__name__}")
    config = transformers.BertConfig.from_pretrained(str(folder), local_files_only=True)
    hf = transformers.BertModel(config, add_pooling_layer=encoder.pooler is not None)
    state = {k: v.detach().float() for k, v in encoder.state_dict().items()}
    hf.load_state_dict(effbert_state_dict_to_hf(state), strict=True)
    return hf.eval()


def onnx_encoders(hf_model, threads=1):
    """``{"onnxruntime-fp32": fn, "onnxruntime-int8": fn}``, each ``fn(input_ids, attention_mask)
    -> last_hidden_state [B, N, D]`` fp32, through the bench's export of ``hf_model`` (a
    transformers ``BertModel``): ``effbert.bench.peers.Exported`` (BERT optimizer, then
    ``quantize_dynamic`` for int8); plus ``"fused"``: the optimiser's fused-node note."""
    from effbert.bench import peers

    exported = peers.Exported(hf_model, threads)
    return {
        "onnxruntime-fp32": exported.onnxruntime(),
        "onnxruntime-int8": exported.onnxruntime_int8(),
        "fused": exported.fused_note(),
        "_keep": exported,  # the temporary folder lives as long as the runners
    }


def onnx_logits(encoder_fn, classifier):
    """``fn(input_ids, attention_mask) -> logits``: ONNX Runtime's ``last_hidden_state`` through
    ``classifier``'s own pooler and classifier (an effbert ``TupeBertForSequenceClassification``,
    fp32, eval: dropout is off), as its forward applies them to the [CLS] token."""

    def fn(ids, mask):
        hidden = encoder_fn(ids, mask)
        return classifier.classifier(classifier.bert.pooler(hidden[:, 0]))

    return fn


def lower_precision(model):
    """``{variant: model}`` for ``EFFBERT_VARIANTS``: ``model`` itself (fp32, eval), a bf16 copy and
    the two ``quantize_for_cpu`` copies (default ``keep_float``; ``keep_float=()``)."""
    from effbert.models import quantize_for_cpu

    model.eval()
    return {
        "fp32": model,
        "effbert-bf16": copy.deepcopy(model).to(torch.bfloat16).eval(),
        "effbert-int8": quantize_for_cpu(model),
        "effbert-int8-all": quantize_for_cpu(model, keep_float=()),
    }


@torch.no_grad()
def onnx_embeddings(encoder_fn, sentence_encoder, texts, batch_size=32):
    """Mean-pooled embeddings ``[n, D]`` fp32 of ``texts`` from an ONNX Runtime encoder, tokenised
    and batched as ``SentenceEncoder.encode`` does (longest first, ``batch_size`` a batch, cut at
    its ``max_seq_length``), rows in the order of ``texts``; no normalisation."""
    from effbert.integrations.sentence import mean_pooling

    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = torch.empty(len(texts), int(sentence_encoder.model.config.hidden_size))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = sentence_encoder.tokenize([texts[i] for i in rows])
        hidden = encoder_fn(batch["input_ids"], batch["attention_mask"])
        out[torch.tensor(rows)] = mean_pooling(hidden, batch["attention_mask"]).float()
    return out


class Stages:
    """Process CPU and wall seconds, and the load average after, of each named stage."""

    def __init__(self):
        self.rows = {}

    def __call__(self, name, fn):
        cpu, wall = time.process_time(), time.perf_counter()
        result = fn()
        self.rows[name] = {
            "cpu_s": time.process_time() - cpu,
            "wall_s": time.perf_counter() - wall,
            "load_average_after": list(os.getloadavg()),
        }
        print(
            f"{name}: {self.rows[name]['cpu_s']:.1f} s CPU, {self.rows[name]['wall_s']:.1f} s wall",
            flush=True,
        )
        return result


def sentence_embeddings(folder, texts, stages):
    """Part 1: ``{"reference_check", "rows", "cosines", "fused"}`` (see the module docstring)."""
    from effbert.integrations.sentence import SentenceEncoder

    reference_encoder = SentenceEncoder.from_pretrained(folder)
    reference_encoder.model.eval()
    reference = stages("embed fp32", lambda: reference_encoder.encode(texts))
    check = {"tolerance": REFERENCE_TOLERANCE}
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        check["skipped"] = f"sentence-transformers is not installed ({exc})"
    else:
        st = SentenceTransformer(str(folder), device="cpu")
        theirs = stages(
            "embed sentence-transformers",
            lambda: st.encode(texts, batch_size=32, convert_to_tensor=True),
        )
        cos = cosines(reference, theirs.float().cpu())
        check |= {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        if 1 - check["min_cosine"] > REFERENCE_TOLERANCE:
            raise SystemExit(
                f"effbert fp32 embeddings differ from sentence-transformers': worst cosine "
                f"{check['min_cosine']:.8f} (tolerance {REFERENCE_TOLERANCE})"
            )
    embeddings = {"fp32": reference}
    models = stages("quantise encoder", lambda: lower_precision(reference_encoder.model))
    for name in EFFBERT_VARIANTS[1:]:
        encoder = SentenceEncoder(
            models[name],
            reference_encoder.tokenizer,
            pooling=reference_encoder.pooling,
            max_seq_length=reference_encoder.max_seq_length,
        )
        embeddings[name] = stages(f"embed {name}", lambda e=encoder: e.encode(texts))
    import transformers

    hf = transformers.BertModel.from_pretrained(str(folder)).eval()
    ort = stages("export, optimise, quantise ONNX (encoder)", lambda: onnx_encoders(hf))
    for name in ONNX_VARIANTS:
        embeddings[name] = stages(
            f"embed {name}", lambda n=name: onnx_embeddings(ort[n], reference_encoder, texts)
        )
    return {
        "reference_check": check,
        "rows": {n: embedding_row(embeddings[n], reference) for n in VARIANTS},
        "reference_neighbours": reference_neighbours(reference),
        "cosines": {n: cosines(embeddings[n], reference).tolist() for n in VARIANTS},
        "fused": ort["fused"],
    }


def task_accuracy(folder, args, stages):
    """Part 2: the fortunes fine-tune and ``{"fine_tune", "rows", "onnx_fp32_max_abs_logit",
    "fused"}``."""
    from transformers import BertTokenizerFast, DataCollatorWithPadding

    tokenizer = BertTokenizerFast.from_pretrained(str(folder))
    train_rows, dev_rows = real_task.fortunes_task(seed=args.data_seed)
    train = real_task.Rows(tokenizer, train_rows, args.max_len)
    dev = real_task.Rows(tokenizer, dev_rows, args.max_len)
    collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    dev_batches = [collator(dev.items[i : i + 16]) for i in range(0, len(dev), 16)]
    train_batches = [collator(train.items[i : i + 16]) for i in range(0, len(train), 16)]
    labels = torch.tensor([y for y, _ in dev_rows])
    n_dev = len(dev_rows)

    model = real_task.classifier(folder, len(real_task.CATEGORIES), args.seed)
    with tempfile.TemporaryDirectory(prefix="effbert-lowp-trainer-") as scratch:
        trainer = real_task.trainer_for(
            model, train, collator, scratch, args.lr, args.epochs, args.seed
        )
        result = stages("fine-tune fp32", trainer.train)
    model = model.cpu().eval()
    from effbert.models import quantize_for_cpu
    from effbert.models.quantization import KEEP_FLOAT

    models = stages("quantise classifier", lambda: lower_precision(model))
    models[HEAD_FP32] = quantize_for_cpu(model, keep_float=KEEP_FLOAT + ("dense", "classifier"))
    # the dev rows, then the training rows: prediction agreement over all 720 (accuracy on dev)
    every = dev_batches + train_batches
    preds = {
        n: stages(f"predict {n}", lambda m=m: predictions(effbert_logits(m), every))
        for n, m in models.items()
    }
    hf = hf_bert_of(model.bert, folder)
    ort = stages("export, optimise, quantise ONNX (fine-tuned)", lambda: onnx_encoders(hf))
    for name in ONNX_VARIANTS:
        preds[name] = stages(
            f"predict {name}",
            lambda n=name: predictions(onnx_logits(ort[n], model), every),
        )
    # the conversion back is exact: ONNX Runtime fp32's logits against effbert's
    from effbert.bench.peers import ATOL

    with torch.no_grad():
        gap = max(
            float(
                (
                    onnx_logits(ort["onnxruntime-fp32"], model)(b["input_ids"], b["attention_mask"])
                    - model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                )
                .abs()
                .max()
            )
            for b in dev_batches
        )
    if gap > ATOL:
        raise SystemExit(f"ONNX Runtime fp32's logits differ from effbert's by {gap:.2e} > {ATOL}")
    return {
        "fine_tune": {"steps": result.global_step, "train": len(train_rows), "dev": len(dev_rows)},
        "rows": {
            n: task_row(preds[n][:n_dev], labels, preds["fp32"][:n_dev])
            | {"agreement_with_fp32_all_rows": agreement(preds[n], preds["fp32"])}
            for n in TASK_VARIANTS
        },
        "onnx_fp32_max_abs_logit_difference": gap,
        "fused": ort["fused"],
    }


def verdict(result):
    """Whether effbert's int8 (default ``keep_float``) loses no more than ONNX Runtime's int8:
    worst and mean embedding cosine, neighbour agreement, dev accuracy, prediction agreement (dev,
    and all task rows). A comparison, not a significance test: one dev row is 0.69 points."""
    emb, task = result["embeddings"]["rows"], result["task"]["rows"]
    ours, peer = "effbert-int8", "onnxruntime-int8"
    checks = {
        "min_cosine": emb[ours]["min_cosine"] >= emb[peer]["min_cosine"],
        "mean_cosine": emb[ours]["mean_cosine"] >= emb[peer]["mean_cosine"],
        "neighbour_agreement": emb[ours]["neighbour_agreement"] >= emb[peer]["neighbour_agreement"],
        "dev_accuracy": task[ours]["accuracy"] >= task[peer]["accuracy"],
        "agreement_with_fp32": task[ours]["agreement_with_fp32"]
        >= task[peer]["agreement_with_fp32"],
        "agreement_with_fp32_all_rows": task[ours]["agreement_with_fp32_all_rows"]
        >= task[peer]["agreement_with_fp32_all_rows"],
    }
    return {"effbert_int8_loses_no_more_than_onnxruntime_int8": checks, "all": all(checks.values())}


def markdown(result):
    """The two tables of ``result`` as Markdown."""
    emb, task = result["embeddings"], result["task"]
    n, check = result["settings"]["sentences"], emb["reference_check"]
    nb = emb["reference_neighbours"]
    ref = (
        f"worst cosine {check['min_cosine']:.8f}"
        if "min_cosine" in check
        else check.get("skipped", "")
    )
    lines = [
        f"all-MiniLM-L6-v2, CPU, one thread, commit {result['commit']}, "
        f"torch {result['versions']['torch']}, onnxruntime {result['versions']['onnxruntime']}.",
        "",
        f"Sentence embeddings (mean pooling) of {n} fortunes quotations against effbert fp32 "
        f"(effbert fp32 against sentence-transformers: {ref}; in fp32 a quotation's nearest "
        f"neighbour has median cosine {nb['median_top1_cosine']:.3f}, "
        f"{nb['median_gap_to_second']:.3f} above the second nearest):",
        "",
        "| variant | mean cosine | min cosine | nearest neighbour as fp32 | ... in fp32's top 3 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        r = emb["rows"][name]
        lines.append(
            f"| {name} | {r['mean_cosine']:.6f} | {r['min_cosine']:.6f} | "
            f"{100 * r['neighbour_agreement']:.1f}% | {100 * r['neighbour_in_fp32_top3']:.1f}% |"
        )
    f = task["fine_tune"]
    lines += [
        "",
        f"Fortunes task (4 classes, {f['train']} train / {f['dev']} dev, fine-tuned once in fp32, "
        f"{f['steps']} steps; ONNX Runtime fp32 logits within "
        f"{task['onnx_fp32_max_abs_logit_difference']:.1e} of effbert's; one dev row is "
        f"{100 / f['dev']:.2f} points):",
        "",
        "| variant | dev accuracy | change, points | dev predictions as fp32 | all "
        f"{f['train'] + f['dev']} rows as fp32 |",
        "|---|---:|---:|---:|---:|",
    ]
    base = task["rows"]["fp32"]["accuracy"]
    for name in TASK_VARIANTS:
        r = task["rows"][name]
        lines.append(
            f"| {name} | {100 * r['accuracy']:.2f}% | {100 * (r['accuracy'] - base):+.2f} | "
            f"{100 * r['agreement_with_fp32']:.1f}% ({r['changed']} changed) | "
            f"{100 * r['agreement_with_fp32_all_rows']:.1f}% |"
        )
    lines += ["", "Variants:", ""] + [f"- `{k}`: {v}" for k, v in DESCRIPTIONS.items()]
    return "\n".join(lines) + "\n"


def plot(result, path):
    """Left: 1 - cosine to fp32 of each sentence, sorted (log scale); right: dev accuracy and
    agreement with fp32 per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name in VARIANTS[1:]:
        gaps = sorted(max(1 - c, 1e-9) for c in result["embeddings"]["cosines"][name])
        left.plot(range(len(gaps)), gaps, label=name)
    left.set_yscale("log")
    left.set_xlabel("sentence (sorted)")
    left.set_ylabel("1 - cosine to effbert fp32 (floor 1e-9)")
    left.set_title("sentence embeddings, all-MiniLM-L6-v2")
    left.legend(fontsize=8)
    rows = result["task"]["rows"]
    names = TASK_VARIANTS
    x = range(len(names))
    right.bar(
        [i - 0.2 for i in x], [100 * rows[n]["accuracy"] for n in names], 0.4, label="dev accuracy"
    )
    right.bar(
        [i + 0.2 for i in x],
        [100 * rows[n]["agreement_with_fp32_all_rows"] for n in names],
        0.4,
        label="predictions as fp32 (all rows)",
    )
    right.set_xticks(list(x), names, rotation=20, fontsize=7)
    right.set_ylim(80, 100.5)
    right.set_ylabel("% of rows")
    right.set_title("fine-tuned fortunes classifier (144 dev rows, 720 in all)")
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=320, help="fortunes embedded in part 1")
    parser.add_argument("--seed", type=int, default=0, help="classifier init and data order")
    parser.add_argument("--data-seed", type=int, default=0, help="the train/dev split")
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tune learning rate")
    parser.add_argument("--epochs", type=float, default=3.0, help="fine-tune epochs")
    parser.add_argument("--max-len", type=int, default=64, help="longest task row in pieces")
    parser.add_argument(
        "--out", default=None, help="results folder (default: a new one under benchmarks/results)"
    )
    args = parser.parse_args()
    if args.sentences < 4:
        parser.error(f"--sentences must be >= 4, got {args.sentences}")
    if args.epochs <= 0 or args.lr <= 0 or args.max_len < 8:
        parser.error("--epochs and --lr must be > 0 and --max-len >= 8")
    from effbert.bench.peers import onnxruntime_int8_reason

    reason = onnxruntime_int8_reason()
    if reason:
        raise SystemExit(reason[0])
    torch.set_num_threads(1)
    import onnxruntime
    import transformers

    from effbert.bench.runner import new_result_folder, short_commit

    root = Path(__file__).resolve().parent.parent
    sha = short_commit(root)
    out = new_result_folder("low_precision", args.out, root=root)
    folder = real_task.minilm_folder()
    train_rows, dev_rows = real_task.fortunes_task(seed=args.data_seed)
    texts = [t for _, t in train_rows + dev_rows][: args.sentences]
    if len(texts) < args.sentences:
        raise SystemExit(f"--sentences: only {len(texts)} fortunes quotations")

    stages = Stages()
    cpu0, wall0, load0 = time.process_time(), time.perf_counter(), list(os.getloadavg())
    result = {
        "what": "accuracy of effbert bf16 / int8 and ONNX Runtime fp32 / int8 against fp32 on "
        "all-MiniLM-L6-v2: sentence embeddings of fortunes quotations, and dev accuracy of a "
        "fine-tuned fortunes classifier",
        "machine": {
            "device": "CPU",
            "threads": 1,
            "cpu": platform.processor() or platform.machine(),
            "quantized_engines": list(torch.backends.quantized.supported_engines),
            "note": "2 CPU cores shared with other jobs: process CPU seconds are the figure to "
            "compare, wall seconds are noisy",
            "load_average_start": load0,
        },
        "commit": sha,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "settings": vars(args),
        "variants": DESCRIPTIONS,
    }
    result["embeddings"] = sentence_embeddings(folder, texts, stages)
    result["task"] = task_accuracy(folder, args, stages)
    result["verdict"] = verdict(result)
    result["stages"] = stages.rows
    result["total"] = {
        "cpu_s": time.process_time() - cpu0,
        "wall_s": time.perf_counter() - wall0,
        "load_average_end": list(os.getloadavg()),
    }
    (out / "low_precision.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "low_precision.md").write_text(markdown(result))
    plot(result, out / "low_precision.png")
    print(markdown(result))
    print(json.dumps(result["verdict"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
