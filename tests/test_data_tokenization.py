"""``effbert.data.tokenization``: a vocabulary trained with ``tokenizers`` and one loaded from vocab.txt /
tokenizer.json / a folder tokenize as transformers' pure-Python ``BertTokenizer`` (BERT's own algorithm) does on the
same vocab.txt; errors name the file."""

import os
import random
import unicodedata

import pytest

from effbert.data.tokenization import (
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    train_wordpiece,
)

SENTENCES = [
    "",
    "   \t\n ",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Don't stop-believing... (really?) [yes] {no} <maybe> $5 ^caret `tick` ~tilde |pipe \\back",
    "Un café à Zürich coûte 5,50 CHF — naïve résumé, ÉCOLE Ångström",
    "e\u0301cole: a combining accent, and a precomposed \u00e9cole",
    "Ich heiße Straße; İstanbul ﬁne ligature",
    "中文字符测试：我爱北京天安门。",
    "mixed中文and english世界 with 日本語のテキスト and 한국어 문장",
    "emoji 🙂 and symbols ★ ⊕ ∑ are unknown here",
    "control\x00chars\x07dropped\u200b zero\ufffdwidth \u00ad soft hyphen",
    "tabs\tand\nnewlines\r\nand\u00a0no-break\u3000ideographic space",
    "a" * 99 + " " + "b" * 100 + " " + "c" * 101 + " " + "é" * 101,
    "unaffable running runners rerun unrunnable fox's foxes",
    "numbers 3.14159 and 1,000,000 and 2nd 3rd 42nd",
    "Greek αβγ Δέλτα, Cyrillic Привет мир",
    "rare zyxwvut qqqq jumpingly overfoxed",
]


def _vocab(rng):
    """A small vocabulary with whole words, ## suffixes, single characters (some only at word start) and CJK."""
    pieces = list(SPECIAL_TOKENS)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-()[]{}<>$^`~|\\:;—éüäöç中文字符我爱北京世界"
    pieces += list(chars)
    pieces += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [
        "the",
        "quick",
        "brown",
        "fox",
        "jump",
        "##s",
        "##ing",
        "##er",
        "##ers",
        "over",
        "lazy",
        "dog",
        "hello",
        "world",
        "run",
        "##n",
        "##able",
        "un",
        "##aff",
        "re",
        "cafe",
        "zurich",
        "naive",
        "resume",
        "ecole",
        "strasse",
        "ich",
        "heiße",
        "straße",
        "αβγ",
        "привет",
        "##ed",
        "##ly",
        "mixed",
        "english",
    ]
    pieces = list(dict.fromkeys(pieces))
    rng.shuffle(pieces)  # the specials anywhere in the file, not only at the front
    return pieces


def _write(tmp_path, vocab, name="vocab.txt"):
    path = tmp_path / name
    path.write_text("".join(p + "\n" for p in vocab), encoding="utf-8")
    return path


def _reference(path, lowercase):
    """BERT's algorithm in pure Python: BertTokenizerLegacy in transformers 5, BertTokenizer before."""
    import transformers

    cls = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer
    return cls(str(path), do_lower_case=lowercase)


def _texts_for(lowercase):
    # the pure-Python form NFC-normalises cased text first, which BERT's Rust form (and tokenizers) does not
    return (
        SENTENCES if lowercase else [t for t in SENTENCES if unicodedata.normalize("NFC", t) == t]
    )


@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
@pytest.mark.parametrize("how", ["vocab.txt", "folder", "tokenizer.json", "saved folder"])
def test_load_matches_bert(tmp_path, lowercase, how, seeded):
    vocab = _vocab(random.Random(seeded))
    path = _write(tmp_path, vocab)
    ref = _reference(path, lowercase)
    if how == "vocab.txt":
        tok = load_tokenizer(path, lowercase=lowercase)
    elif how == "folder":
        tok = load_tokenizer(tmp_path, lowercase=lowercase)
    else:
        saved = tmp_path / "saved"
        save_tokenizer(load_tokenizer(path, lowercase=lowercase), saved)
        assert (saved / "vocab.txt").read_text(encoding="utf-8").splitlines() == vocab
        tok = (
            load_tokenizer(saved / "tokenizer.json")
            if how == "tokenizer.json"
            else load_tokenizer(saved)
        )
    assert tok.get_vocab() == {p: i for i, p in enumerate(vocab)}
    for attr, token in zip(
        ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id", "mask_token_id"),
        SPECIAL_TOKENS,
    ):
        assert getattr(tok, attr) == vocab.index(token)
    texts = _texts_for(lowercase)
    for text in texts:
        assert tok.tokenize(text) == ref.tokenize(text), text
        assert tok.encode(text) == ref.encode(text), text  # [CLS] ... [SEP]
    pair = tok(
        "the quick fox", "jumps over"
    )  # BERT's pair: [CLS] A [SEP] B [SEP], token types 0 then 1
    a, b = (
        ref.encode("the quick fox", add_special_tokens=False),
        ref.encode("jumps over", add_special_tokens=False),
    )
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    assert pair["input_ids"] == [cls] + a + [sep] + b + [sep]
    assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    for max_len in (2, 5, 64):
        enc = tok(texts, truncation=True, max_length=max_len, padding="longest")
        assert (
            enc["input_ids"]
            == ref(texts, truncation=True, max_length=max_len, padding="longest")["input_ids"]
        )


@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_random_text_matches_bert(tmp_path, lowercase, seeded):
    """Random strings over letters, accents, punctuation, CJK, controls and spaces."""
    rng = random.Random(seeded)
    path = _write(tmp_path, _vocab(rng))
    tok, ref = load_tokenizer(path, lowercase=lowercase), _reference(path, lowercase)
    alphabet = "abcdeFGHIJ xyz  éÉüÜçñ.,;!?'\"-–()中文字我\t\n\x01\u0301ß  runningjumps"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        if not lowercase and unicodedata.normalize("NFC", text) != text:
            continue  # see _texts_for
        assert tok.tokenize(text) == ref.tokenize(text), repr(text)


def _corpus(seed, n=300):
    rng = random.Random(seed)
    frequent = ["the", "a", "of", "run", "jump", "walk", "talk", "house", "tree"]
    rare = ["unwalkable", "rejumping", "overtalked", "treehouses", "runnings", "housewalk"]
    lines = []
    for _ in range(n):
        words = [
            rng.choice(frequent) + rng.choice(["", "s", "ing", "ed"])
            for _ in range(rng.randint(3, 9))
        ]
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), rng.choice(rare))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
    return lines, rare


def test_train_wordpiece(tmp_path):
    lines, rare = _corpus(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = train_wordpiece([corpus], vocab_size=120, min_frequency=1)
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    assert len(vocab) == 120 and vocab[:5] == list(SPECIAL_TOKENS)  # [PAD] = 0
    assert (
        tok.pad_token_id,
        tok.unk_token_id,
        tok.cls_token_id,
        tok.sep_token_id,
        tok.mask_token_id,
    ) == (0, 1, 2, 3, 4)
    chars = sorted({c for line in lines for c in line.lower() if not c.isspace()})
    assert all(c in vocab for c in chars)  # every text is covered: no [UNK]
    for line in lines:
        assert tok.unk_token not in tok.tokenize(line)
    assert "the" in vocab and "run" in vocab  # frequent words are whole pieces
    for w in rare:  # any word: a word-start piece, then ## pieces
        pieces = tok.tokenize(w)
        assert not pieces[0].startswith("##") and all(p.startswith("##") for p in pieces[1:])
        assert "".join(p.removeprefix("##") for p in pieces) == w
    # the trained tokenizer is BERT's tokenizer over its own vocab.txt
    save_tokenizer(tok, tmp_path / "out")
    ref = _reference(tmp_path / "out" / "vocab.txt", True)
    for text in SENTENCES + lines[:20]:
        assert tok.encode(text) == ref.encode(text), text
    assert load_tokenizer(tmp_path / "out").get_vocab() == tok.get_vocab()
    assert train_wordpiece(corpus, vocab_size=120, min_frequency=1).get_vocab() == tok.get_vocab()
    big = train_wordpiece(
        corpus, vocab_size=100_000, min_frequency=1
    )  # stops at what the corpus offers
    assert len(big) < 100_000


def test_the_same_corpus_gives_the_same_vocabulary_in_every_process(tmp_path):
    """tokenizers' trainer walks a hash map whose order differs per process (and breaks ties between equally frequent
    merges by the order it met the pieces): two processes with other hash seeds must still write the same vocab.txt,
    byte for byte."""
    import subprocess
    import sys

    lines, _ = _corpus(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines * 3) + "\n", encoding="utf-8")
    code = (
        "import sys; from effbert.data.tokenization import save_tokenizer, train_wordpiece; "
        "save_tokenizer(train_wordpiece([sys.argv[1]], vocab_size=200), sys.argv[2])"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=repo)
        proc = subprocess.run(
            [sys.executable, "-c", code, str(corpus), str(tmp_path / seed)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    first = (tmp_path / "1" / "vocab.txt").read_bytes()
    assert (tmp_path / "2" / "vocab.txt").read_bytes() == first
    assert (tmp_path / "3" / "vocab.txt").read_bytes() == first


def test_train_cased_keeps_case(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Hello hello HELLO Café\n" * 3, encoding="utf-8")
    tok = train_wordpiece(corpus, vocab_size=60, lowercase=False, min_frequency=1)
    assert "Hello" in tok.get_vocab() and "HELLO" in tok.get_vocab() and "é" in tok.get_vocab()
    low = train_wordpiece(corpus, vocab_size=60, min_frequency=1)
    assert low.tokenize("HELLO Café") == ["hello", "cafe"]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="nope.txt"):
        load_tokenizer(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt.*does not load"):
        load_tokenizer(empty)
    no_mask = _write(tmp_path, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"], "nomask.txt")
    with pytest.raises(ValueError, match=r"nomask.txt.*lacks \[MASK\]"):
        load_tokenizer(no_mask)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"[PAD]\n\x00\x01\x02")
    with pytest.raises(ValueError, match="bin.txt.*binary"):
        load_tokenizer(binary)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("[PAD]\n[UNK]\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt"):
        load_tokenizer(latin1)
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"model": {"type": "WordPiece", "vocab": ')
    with pytest.raises(ValueError, match=r"tokenizer.json.*does not load") as info:
        load_tokenizer(broken)
    assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="path"):
        load_tokenizer(3)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n")
    with pytest.raises(ValueError, match="vocab_size"):
        train_wordpiece(corpus, vocab_size=3)
    with pytest.raises(ValueError, match="min_frequency"):
        train_wordpiece(corpus, min_frequency=-1)
    with pytest.raises(ValueError, match="missing.txt"):
        train_wordpiece([corpus, tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="bin.txt.*binary"):
        train_wordpiece([binary])
    with pytest.raises(ValueError, match=r"files: no such file .*missing.txt"):
        train_wordpiece([corpus, tmp_path / "missing.txt"])
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"folder.txt' is a directory"):  # there, but not a file
        train_wordpiece([corpus, folder])
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo.txt"
        os.mkfifo(fifo)
        with pytest.raises(ValueError, match=r"fifo.txt' is not a regular file"):
            train_wordpiece(
                [corpus, fifo], check=False
            )  # refused before the trainer opens (and blocks on) it
    with pytest.raises(TypeError, match="lowercase"):
        train_wordpiece(corpus, lowercase="yes")
    with pytest.raises(TypeError, match="tokenizer"):
        save_tokenizer(object(), tmp_path / "x")
