"""CoNLL-style sequence-labelling data (effbert.data.conll) and the entity F1 / threshold
calibration of effbert.token_metrics (seqeval, optional: skipped with the reason where it is not
installed)."""

import math

import pytest
import torch

from effbert.data.conll import (
    check_bio,
    encode_conll,
    label_list,
    read_conll,
    token_classification_collator,
)

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O
BRUSSELS NNP B-NP B-LOC
"""


def write(tmp_path, text, name="train.txt", encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(p)


def test_read_conll_columns_docstart_blank_lines(tmp_path):
    words, tags = read_conll(write(tmp_path, CONLL))
    assert words == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert tags == [["B-ORG", "O", "B-MISC", "O", "O"], ["B-PER", "I-PER"], ["B-LOC"]]
    crlf, _ = read_conll(
        write(tmp_path, "a O\r\nb B-X\r\n\r\n\r\nc I-Y\r\n".replace("c I-Y", "c O"))
    )
    assert crlf == [["a", "b"], ["c"]]
    pos, pos_tags = read_conll(write(tmp_path, "The DT\ndog NN\n"), scheme=None)
    assert pos_tags == [["DT", "NN"]]
    assert label_list(tags) == ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER"]


@pytest.mark.parametrize(
    "text,match",
    [
        ("a O\nlonely\n", r"--train: line 2 of .*train.txt.* one column 'lonely'"),
        ("a O\nb I-PER\n", r"line 2 .*'I-PER' follows 'O'"),
        ("a B-LOC\nb I-PER\n", r"line 2 .*'I-PER' follows 'B-LOC'"),
        ("a O\n\nb X-PER\n", r"line 3 .*'X-PER' is not BIO"),
        ("a O\nb B-\n", r"line 2 .*'B-' is not BIO"),
        ("\n\n-DOCSTART- O\n", "holds no sentences"),
    ],
)
def test_read_conll_errors_name_file_and_line(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        read_conll(write(tmp_path, text))


def test_read_conll_file_errors(tmp_path):
    with pytest.raises(ValueError, match="--eval: no such file"):
        read_conll(str(tmp_path / "missing.txt"), flag="--eval")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_conll(write(tmp_path, b"a O\n\xff\xfe O\n"))
    with pytest.raises(ValueError, match="scheme"):
        read_conll(write(tmp_path, "a O\n"), scheme="iob1")
    check_bio(["B-X", "I-X", "O", "B-Y", "B-Y", "I-Y"])  # valid IOB2
    with pytest.raises(ValueError, match="lines"):
        check_bio(["O"], lines=[1, 2])


@pytest.fixture
def tokenizer():
    from transformers import BertTokenizerFast

    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "eu",
        "rejects",
        "german",
        "call",
        ".",
        "peter",
        "black",
        "##burn",
        "brus",
        "##sel",
        "##s",
    ]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def test_encode_conll_labels_first_pieces(tmp_path, tokenizer):
    words, tags = read_conll(write(tmp_path, CONLL))
    names = label_list(tags)
    label2id = {n: i for i, n in enumerate(names)}
    rows = encode_conll(tokenizer, words, tags, label2id, max_length=16)
    # Peter Blackburn -> [CLS] peter black ##burn [SEP]
    assert tokenizer.convert_ids_to_tokens(rows[1]["input_ids"]) == [
        "[CLS]",
        "peter",
        "black",
        "##burn",
        "[SEP]",
    ]
    assert rows[1]["labels"] == [-100, label2id["B-PER"], label2id["I-PER"], -100, -100]
    assert rows[2]["labels"] == [-100, label2id["B-LOC"], -100, -100, -100]  # brus ##sel ##s
    assert rows[0]["labels"][1:-1] == [label2id[t] for t in tags[0]]
    cut = encode_conll(
        tokenizer, words, tags, label2id, max_length=3
    )  # [CLS] peter [SEP]: Blackburn cut off
    assert cut[1]["labels"] == [-100, label2id["B-PER"], -100]
    batch = token_classification_collator(tokenizer)(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 7)
    assert batch["labels"][1, 5:].eq(-100).all() and batch["attention_mask"][1, 5:].eq(0).all()
    with pytest.raises(ValueError, match="label2id has no class"):
        encode_conll(tokenizer, words, tags, {"O": 0}, 16)
    with pytest.raises(ValueError, match="max_length"):
        encode_conll(tokenizer, words, tags, label2id, 1)
    with pytest.raises(ValueError, match="one tag per word"):
        encode_conll(tokenizer, words, [t[:-1] for t in tags], label2id, 16)


# ---- metrics (seqeval) ----


def test_entity_f1_and_per_layer():
    pytest.importorskip(
        "seqeval", reason="seqeval is not installed (pip install 'effbert[tokens]')"
    )
    from effbert.token_metrics import entity_f1, label_sequences, per_layer_entity_f1

    id2label = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC"}
    labels = torch.tensor([[-100, 1, 2, 0, 3, -100], [-100, 3, -100, 0, -100, -100]])
    # row 0: PER(1-2) right, LOC missed; row 1: LOC right, one spurious PER
    pred = torch.tensor([[3, 1, 2, 0, 0, 3], [0, 3, 1, 1, 0, 0]])
    assert label_sequences(pred, labels, id2label) == [
        ["B-PER", "I-PER", "O", "O"],
        ["B-LOC", "B-PER"],
    ]
    # gold 3 entities, predicted 3, correct 2: P = R = F1 = 2/3
    assert entity_f1(pred, labels, id2label) == pytest.approx(2 / 3)
    assert entity_f1(labels.clamp_min(0), labels, id2label) == 1.0
    logits = torch.nn.functional.one_hot(torch.stack([pred, labels.clamp_min(0)]), 4).double()
    assert per_layer_entity_f1(logits, labels, id2label) == pytest.approx([2 / 3, 1.0])
    with pytest.raises(ValueError, match="no name for class 9"):
        entity_f1(torch.full_like(labels, 9), labels, id2label)
    with pytest.raises(ValueError, match="labels"):
        per_layer_entity_f1(logits, labels[:1], id2label)


def test_token_exit_curve_and_calibration():
    pytest.importorskip(
        "seqeval", reason="seqeval is not installed (pip install 'effbert[tokens]')"
    )
    from effbert.models import published_token_thresholds
    from effbert.token_metrics import (
        calibrate_token_threshold,
        per_layer_entity_f1,
        token_exit_curve,
    )
    from test_token_classification import make_batch, make_model

    torch.manual_seed(0)
    model = make_model(id2label={0: "O", 1: "B-A", 2: "I-A", 3: "B-B", 4: "I-B"})
    ids, mask, label_mask = make_batch(model.config)
    with torch.no_grad():  # gold = layer 2's predictions: the layers' F1 differ
        labels = torch.where(
            label_mask, model(ids, attention_mask=mask).exit_logits[1].argmax(-1), -100
        )
    batches = [
        dict(input_ids=ids[:3], attention_mask=mask[:3], labels=labels[:3]),
        dict(input_ids=ids[3:], attention_mask=mask[3:], labels=labels[3:]),
    ]
    curve = token_exit_curve(model, batches, [-1.0, 0.05, 0.3, 2.0])
    depth = model.config.num_hidden_layers
    never, always = curve[0], curve[-1]
    lengths = mask.sum(1)
    worded = label_mask.any(1)  # a row without words leaves after layer 1
    assert never.avg_exit_layer == depth and never.full_token_layers == int(lengths.sum()) * depth
    assert never.token_layers == int(lengths[worded].sum()) * depth + int(lengths[~worded].sum())
    assert always.avg_exit_layer == 1 and always.saved > 0
    full = model(ids, attention_mask=mask).exit_logits
    f1s = per_layer_entity_f1(full, labels, {int(k): v for k, v in model.config.id2label.items()})
    assert never.f1 == pytest.approx(f1s[-1]) and always.f1 == pytest.approx(f1s[0])
    assert f1s[1] == 1.0 and len(set(f1s)) > 1
    # each point equals one direct call on the whole batch
    direct = model.early_exit_token_labels(
        ids,
        mask,
        label_mask=label_mask,
        mode="tokee",
        thresholds=published_token_thresholds(0.3, depth),
        window=5,
    )
    assert curve[2].avg_exit_layer == pytest.approx(
        float(direct.exit_layer[label_mask].double().mean())
    )
    point, every = calibrate_token_threshold(
        model, batches, 2.5, candidates=[0.01, 0.05, 0.1, 0.3, 1.0, 2.0]
    )
    assert point.avg_exit_layer >= 2.5
    later = [p for p in every if p.threshold > point.threshold]
    assert all(p.avg_exit_layer < 2.5 for p in later)
    with pytest.raises(ValueError, match="target_avg_exit"):
        calibrate_token_threshold(model, batches, depth + 1)
    with pytest.raises(ValueError, match="batches"):
        token_exit_curve(model, [], [0.1])
    assert math.isnan(token_exit_curve(model, batches, [0.1], with_f1=False)[0].f1)
