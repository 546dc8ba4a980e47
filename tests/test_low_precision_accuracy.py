"""benchmarks/low_precision_accuracy.py: its cosine, nearest-neighbour, accuracy and agreement
functions against float64 hand computations, the prediction agreement of a quantised classifier,
and the ONNX Runtime path (a fine-tuned effbert encoder converted back to transformers and exported
gives effbert's fp32 logits and embeddings) on a tiny random BERT."""

import importlib.util
import math
import os

import pytest
import torch

SCRIPT = os.path.join(
    os.path.dirname(__file__), os.pardir, "benchmarks", "low_precision_accuracy.py"
)


@pytest.fixture(scope="module")
def lowp():
    spec = importlib.util.spec_from_file_location("low_precision_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WORDS = "the cat dog sat on a mat ran far away quick brown fox jumps over lazy".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random transformers BERT checkpoint folder (weights, config, tokenizer)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    tokenizer.save_pretrained(str(folder))
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(folder))
    return folder, tokenizer


def _texts(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 12, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g)))
    return out


def _batches(tokenizer, texts, size):
    return [
        dict(tokenizer(texts[i : i + size], padding=True, return_tensors="pt"))
        for i in range(0, len(texts), size)
    ]


def test_cosines_and_nearest_neighbours_match_a_float64_hand_computation(lowp):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(9, 5, generator=g)
    b = a + 0.5 * torch.randn(9, 5, generator=g)
    a[4] = 0  # a zero row: cosine 0
    rows_a, rows_b = a.tolist(), b.tolist()

    def cos(x, y):
        dot = sum(p * q for p, q in zip(x, y))
        norm = math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in y))
        return dot / norm if norm else 0.0

    got = lowp.cosines(a, b)
    assert got.dtype == torch.float64 and got.shape == (9,)
    for i in range(9):
        assert got[i].item() == pytest.approx(cos(rows_a[i], rows_b[i]), abs=1e-12)

    def nearest(rows):
        return [
            max((j for j in range(len(rows)) if j != i), key=lambda j: (cos(rows[i], rows[j]), -j))
            for i in range(len(rows))
        ]

    na = nearest(rows_b)
    assert lowp.nearest_neighbours(b).tolist() == na
    c = torch.tensor(rows_b) + 0.8 * torch.randn(9, 5, generator=g)
    nc = nearest(c.tolist())
    share = sum(x == y for x, y in zip(nc, na)) / 9
    assert 0 < share < 1  # the case tests a partial agreement
    assert lowp.neighbour_agreement(c, b) == pytest.approx(share, abs=1e-15)
    assert lowp.neighbour_agreement(b, b) == 1.0

    def top(rows, i, k):  # row i's k nearest others, by cosine
        others = [j for j in range(len(rows)) if j != i]
        return sorted(others, key=lambda j: -cos(rows[i], rows[j]))[:k]

    for k in (1, 3):
        hand = sum(nc[i] in top(rows_b, i, k) for i in range(9)) / 9
        assert lowp.neighbour_in_top_k(c, b, k) == pytest.approx(hand, abs=1e-15)
    assert lowp.neighbour_in_top_k(c, b, 3) > share  # the case tests k > 1 widening it
    sims = [
        sorted((cos(rows_b[i], rows_b[j]) for j in range(9) if j != i), reverse=True)
        for i in range(9)
    ]
    spread = lowp.reference_neighbours(b)
    assert spread["median_top1_cosine"] == pytest.approx(sorted(x[0] for x in sims)[4], abs=1e-12)
    gaps = sorted(x[0] - x[1] for x in sims)
    assert spread["median_gap_to_second"] == pytest.approx(gaps[4], abs=1e-12)
    row = lowp.embedding_row(c, b)
    hand = [cos(x, y) for x, y in zip(c.tolist(), rows_b)]
    assert row["mean_cosine"] == pytest.approx(sum(hand) / 9, abs=1e-12)
    assert row["min_cosine"] == pytest.approx(min(hand), abs=1e-12)
    assert row["neighbour_agreement"] == pytest.approx(share, abs=1e-15)
    assert row["neighbour_in_fp32_top3"] == lowp.neighbour_in_top_k(c, b, 3)


def test_accuracy_and_agreement_are_shares_of_equal_entries(lowp):
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    fp32 = torch.tensor([0, 1, 2, 0, 0, 1, 1])
    low = torch.tensor([0, 1, 3, 0, 0, 2, 1])
    row = lowp.task_row(low, labels, fp32)
    assert row["accuracy"] == pytest.approx(3 / 7, abs=1e-15)  # rows 0, 1, 4
    assert row["agreement_with_fp32"] == pytest.approx(5 / 7, abs=1e-15)  # all but rows 2, 5
    assert row["changed"] == 2
    assert lowp.agreement(fp32, labels) == pytest.approx(5 / 7, abs=1e-15)


def test_bad_inputs_are_refused_naming_the_argument(lowp):
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="embeddings"):
        lowp.cosines([[1.0]], x)
    with pytest.raises(ValueError, match="reference"):
        lowp.cosines(x, torch.randn(4))
    with pytest.raises(ValueError, match="same shape"):
        lowp.cosines(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2 rows"):
        lowp.nearest_neighbours(torch.randn(1, 3))
    with pytest.raises(ValueError, match="k must be"):
        lowp.neighbour_in_top_k(x, x, 4)
    with pytest.raises(ValueError, match="values"):
        lowp.agreement(torch.tensor([0.5, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same non-zero length"):
        lowp.agreement(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="logits_of"):
        lowp.predictions(None, [])
    with pytest.raises(TypeError, match="encoder"):
        lowp.hf_bert_of(torch.nn.Linear(2, 2), "unused")


def test_a_quantised_classifiers_prediction_agreement_is_what_the_function_says(lowp, tiny):
    folder, tokenizer = tiny
    model = lowp.real_task.classifier(folder, 2, seed=1).eval()
    texts = _texts(96, seed=2)
    labels = torch.randint(2, (96,), generator=torch.Generator().manual_seed(4))
    batches = _batches(tokenizer, texts, 16)
    with torch.no_grad():  # the decision boundary through the middle of the rows' logit gaps, so
        # that int8 rounding flips some rows and leaves others
        gap = torch.cat([model(**b).logits.diff(dim=-1)[:, 0] for b in batches]).sort().values
        model.classifier.bias[1] -= (gap[47] + gap[48]) / 2
    models = lowp.lower_precision(model)
    assert list(models) == list(lowp.EFFBERT_VARIANTS) and models["fp32"] is model
    preds = {n: lowp.predictions(lowp.effbert_logits(m), batches) for n, m in models.items()}
    by_hand = {}  # the same batches, each row's class picked by comparing its two logits
    with torch.no_grad():
        for name, m in models.items():
            by_hand[name] = []
            for b in batches:
                for z0, z1 in m(**b).logits.float().tolist():
                    by_hand[name].append(1 if z1 > z0 else 0)
    assert preds["fp32"].tolist() == by_hand["fp32"]
    assert 30 < sum(by_hand["fp32"]) < 66  # both classes predicted
    partial = 0
    for name in lowp.EFFBERT_VARIANTS:
        row = lowp.task_row(preds[name], labels, preds["fp32"])
        same = sum(p == q for p, q in zip(by_hand[name], by_hand["fp32"]))
        right = sum(p == y for p, y in zip(by_hand[name], labels.tolist()))
        assert row["agreement_with_fp32"] == pytest.approx(same / 96, abs=1e-15), name
        assert row["accuracy"] == pytest.approx(right / 96, abs=1e-15), name
        assert row["changed"] == 96 - same, name
        partial += name.startswith("effbert-int8") and 0 < same < 96
    assert partial  # the case tests a partial agreement, not only 0% or 100%


def test_the_onnxruntime_path_gives_effberts_fp32_logits_and_embeddings(lowp, tiny):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxruntime.transformers.optimizer")
    from effbert.integrations.sentence import SentenceEncoder

    folder, tokenizer = tiny
    model = lowp.real_task.classifier(folder, 3, seed=1).eval()
    with torch.no_grad():  # as a fine-tune would: the encoder's weights move off the checkpoint's
        for p in model.bert.parameters():
            p.add_(0.01 * torch.randn_like(p))
    hf = lowp.hf_bert_of(model.bert, folder)
    texts = _texts(24, seed=5)
    whole = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = whole["input_ids"], whole["attention_mask"]
    with torch.no_grad():
        reference = hf.double()(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        hf.float()
        real = mask.bool()
        assert (ours[real].double() - reference[real]).abs().max() < 1e-5
        ort = lowp.onnx_encoders(hf)
        assert ort["fused"].startswith("fused:")
        logits = lowp.onnx_logits(ort["onnxruntime-fp32"], model)(ids, mask)
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert (logits - expected).abs().max() < 1e-4
        int8 = lowp.onnx_logits(ort["onnxruntime-int8"], model)(ids, mask)
        assert int8.shape == expected.shape and torch.isfinite(int8).all()
    encoder = SentenceEncoder(model.bert, tokenizer)
    emb = lowp.onnx_embeddings(ort["onnxruntime-fp32"], encoder, texts, batch_size=5)
    assert lowp.cosines(emb, encoder.encode(texts, batch_size=7)).min() > 1 - 1e-6
