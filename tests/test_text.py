"""``effbert.data.text.WordPieceTokenizer`` against transformers' ``BertTokenizer`` on the same vocab.txt (both casings,
punctuation, accents, CJK, unknown characters, very long words, empty strings), ``build``'s vocabulary, the batch
encoding, and errors that name the argument."""

import importlib.util
import random
import unicodedata

import pytest
import torch

from effbert.data.text import SPECIAL_TOKENS, WordPieceTokenizer

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")

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
    pieces += ["the", "quick", "brown", "fox", "jump", "##s", "##ing", "##er", "##ers", "over", "lazy", "dog",
               "hello", "world", "run", "##n", "##able", "un", "##aff", "re", "cafe", "zurich", "naive", "resume",
               "ecole", "strasse", "ich", "heiße", "straße", "αβγ", "привет", "##ed", "##ly", "mixed", "english"]
    pieces = list(dict.fromkeys(pieces))
    rng.shuffle(pieces)  # the specials anywhere in the file, not only at the front
    return pieces


def _write(tmp_path, vocab):
    path = tmp_path / "vocab.txt"
    path.write_text("".join(p + "\n" for p in vocab), encoding="utf-8")
    return path


def _bert_classes():
    """transformers' BertTokenizer, and its pure-Python form when the installed version has both (transformers 5
    made BertTokenizer the Rust-backed one and kept the Python one as BertTokenizerLegacy)."""
    import transformers

    return [getattr(transformers, n) for n in ("BertTokenizer", "BertTokenizerLegacy") if hasattr(transformers, n)]


def _bert(path, lowercase, cls=None):
    cls = cls or _bert_classes()[0]
    return cls(str(path), do_lower_case=lowercase)


def _basic(lowercase):
    from transformers.models.bert import BasicTokenizer

    return BasicTokenizer(do_lower_case=lowercase)


@needs_transformers
@pytest.mark.parametrize("cls", ["BertTokenizer", "BertTokenizerLegacy"])
@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_matches_transformers(tmp_path, lowercase, cls, seeded):
    import transformers

    if not hasattr(transformers, cls):
        pytest.skip(f"this transformers has no {cls}")
    vocab = _vocab(random.Random(seeded))
    path = _write(tmp_path, vocab)
    ours = WordPieceTokenizer.from_file(tmp_path, lowercase=lowercase)
    ref = _bert(path, lowercase, getattr(transformers, cls))
    basic = _basic(lowercase)
    assert ours.vocab == vocab and len(ours) == len(vocab)
    texts = SENTENCES
    if cls == "BertTokenizerLegacy" and not lowercase:
        # the Python form NFC-normalises first, which BERT itself (and the Rust form) does not
        texts = [t for t in SENTENCES if unicodedata.normalize("NFC", t) == t]
    for text in texts:
        if lowercase or unicodedata.normalize("NFC", text) == text:  # transformers' basic split normalises
            assert ours.words(text) == basic.tokenize(text), text
        assert ours.tokenize(text) == ref.tokenize(text), text
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
    # the batch: [CLS] ... [SEP], cut to max_len, padded to the longest row
    for max_len in (2, 5, 64):
        ids, lengths = ours.encode_batch(texts, max_len)
        enc = ref(texts, truncation=True, max_length=max_len, padding="longest")
        assert torch.equal(ids, torch.tensor(enc["input_ids"])), max_len
        assert torch.equal(lengths, torch.tensor(enc["attention_mask"]).sum(1)), max_len
        assert ids.dtype == lengths.dtype == torch.int64 and ids.shape[1] == int(lengths.max()) <= max_len


@needs_transformers
@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_random_text_matches_transformers(tmp_path, lowercase, seeded):
    """Random strings over letters, accents, punctuation, CJK, controls and spaces."""
    rng = random.Random(seeded)
    vocab = _vocab(rng)
    path = _write(tmp_path, vocab)
    ours = WordPieceTokenizer.from_file(path, lowercase=lowercase)
    refs = [_bert(path, lowercase, cls) for cls in _bert_classes()]
    alphabet = "abcdeFGHIJ xyz  éÉüÜçñ.,;!?'\"-–()中文字我\t\n\x01\u0301ß  runningjumps"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for ref in refs:
            if type(ref).__name__ == "BertTokenizerLegacy" and unicodedata.normalize("NFC", text) != text:
                continue  # see test_matches_transformers
            assert ours.tokenize(text) == ref.tokenize(text), (type(ref).__name__, repr(text))


@needs_transformers
def test_build_vocab_loads_in_transformers(tmp_path):
    """A built vocabulary written with save() tokenizes the same in transformers."""
    texts = SENTENCES[2:] * 3
    tok = WordPieceTokenizer.build(texts, 300)
    path = tok.save(tmp_path)
    for cls in _bert_classes():
        ref = _bert(path, True, cls)
        for text in SENTENCES:
            assert tok.tokenize(text) == ref.tokenize(text), (cls.__name__, text)


def _corpus(seed, n=300):
    rng = random.Random(seed)
    frequent = ["the", "a", "of", "run", "jump", "walk", "talk", "house", "tree"]
    rare = ["unwalkable", "rejumping", "overtalked", "treehouses", "runnings", "housewalk"]
    lines = []
    for _ in range(n):
        words = [rng.choice(frequent) + rng.choice(["", "s", "ing", "ed"]) for _ in range(rng.randint(3, 9))]
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), rng.choice(rare))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
    return lines, rare


def test_build_vocab(tmp_path):
    lines, rare = _corpus(0)
    tok = WordPieceTokenizer.build(lines, 120)
    vocab = tok.vocab
    assert len(vocab) == 120 and vocab[:5] == list(SPECIAL_TOKENS)
    chars = sorted({c for line in lines for w in tok.words(line) for c in w})
    assert all(c in vocab and "##" + c in vocab for c in chars)  # every text can be covered: no [UNK]
    for line in lines:
        assert "[UNK]" not in tok.tokenize(line)
    # the most frequent words are whole pieces; rare words split into several pieces
    assert "the" in vocab and "run" in vocab
    for w in rare:
        pieces = tok.tokenize(w)
        assert len(pieces) >= 2 and pieces[0] == pieces[0].lstrip("#") and all(p.startswith("##") for p in pieces[1:])
        assert "".join(p.lstrip("#") for p in pieces) == w
    # round trip through vocab.txt; a bigger budget keeps the smaller one's pieces (one ranking)
    path = tok.save(tmp_path / "v.txt")
    back = WordPieceTokenizer.from_file(path)
    assert back.vocab == vocab and back.lowercase
    assert WordPieceTokenizer.build(lines, 160).vocab[:120] == vocab
    assert WordPieceTokenizer.build(lines, 120).vocab == vocab  # deterministic
    # a budget larger than what the corpus offers stops at what it offers
    big = WordPieceTokenizer.build(lines, 100_000)
    assert len(big) < 100_000 and len(set(big.vocab)) == len(big)


def test_build_cased_keeps_case():
    tok = WordPieceTokenizer.build(["Hello hello HELLO Café"], 40, lowercase=False)
    assert "Hello" in tok.vocab and "HELLO" in tok.vocab and "é" in tok.vocab
    assert tok.tokenize("Café") == ["Café"] or tok.tokenize("Café")[0] == "C"
    low = WordPieceTokenizer.build(["Hello hello HELLO Café"], 40)
    assert low.tokenize("HELLO Café") == ["hello", "cafe"]


def test_ids_and_continuation():
    vocab = ["[UNK]", "x", "##y", "[PAD]", "[SEP]", "##", "[CLS]", "[MASK]", "xy"]
    tok = WordPieceTokenizer(vocab)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (3, 0, 6, 4, 7)
    assert tok.continuation.tolist() == [False, False, True, False, False, False, False, False, False]
    assert tok.tokenize("xy xyy xyz x-y z") == ["xy", "xy", "##y", "[UNK]", "x", "[UNK]", "[UNK]", "[UNK]"]
    assert tok.word_ids("xyy") == [8, 2] and tok.word_ids("y") == [0]
    ids, lengths = tok.encode_batch(["xy xyy", "", "z"], 4)
    assert ids.tolist() == [[6, 8, 8, 4], [6, 4, 3, 3], [6, 0, 4, 3]]
    assert lengths.tolist() == [4, 2, 3]
    ids, lengths = tok.encode_batch([], 8)
    assert ids.shape == (0, 0) and lengths.shape == (0,)


def test_continuation_finds_rare_words():
    """The tokenizer feeds TNF's rare-word table: a rare word's pieces are one word-start piece then ## pieces."""
    from effbert.data.tnf import RareWordTable

    lines, rare = _corpus(1)
    tok = WordPieceTokenizer.build(lines, 80)
    table = RareWordTable.build(rare, tok.word_ids, tok.continuation)
    ids, lengths = tok.encode_batch(["the " + rare[0] + " of " + rare[3]], 32)
    spans, slots = table.find(ids, lengths)
    assert spans[:, 3].tolist() == [table.slot_of[rare[0]], table.slot_of[rare[3]]]
    assert int((slots >= 0).sum()) == len(tok.tokenize(rare[0])) + len(tok.tokenize(rare[3]))


def test_errors(tmp_path):
    with pytest.raises(TypeError, match="vocab"):
        WordPieceTokenizer("abc")
    with pytest.raises(ValueError, match=r"vocab must hold the special tokens.*\[MASK\]"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"])
    with pytest.raises(ValueError, match="vocab holds 'a' twice"):
        WordPieceTokenizer(list(SPECIAL_TOKENS) + ["a", "a"])
    with pytest.raises(ValueError, match=r"vocab\[5\]"):
        WordPieceTokenizer(list(SPECIAL_TOKENS) + ["a b"])
    with pytest.raises(TypeError, match=r"vocab\[5\]"):
        WordPieceTokenizer(list(SPECIAL_TOKENS) + [3])
    with pytest.raises(TypeError, match="lowercase"):
        WordPieceTokenizer(list(SPECIAL_TOKENS), lowercase="yes")
    with pytest.raises(FileNotFoundError, match="path"):
        WordPieceTokenizer.from_file(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="path"):
        WordPieceTokenizer.from_file(tmp_path)  # a folder without vocab.txt
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="path.*empty"):
        WordPieceTokenizer.from_file(tmp_path / "empty.txt")
    tok = WordPieceTokenizer(list(SPECIAL_TOKENS) + ["a"])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.tokenize(None)
    with pytest.raises(TypeError, match="text must be a str"):
        tok.words(b"bytes")
    with pytest.raises(TypeError, match=r"texts must be a list of str"):
        tok.encode_batch("a single string", 8)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok.encode_batch(["a", 2], 8)
    with pytest.raises(ValueError, match="max_len must be an int >= 2"):
        tok.encode_batch(["a"], 1)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch(["a"], 2.5)
    with pytest.raises(ValueError, match=r"vocab_size must be >= 9"):
        WordPieceTokenizer.build(["ab"], 8)
    with pytest.raises(ValueError, match="vocab_size"):
        WordPieceTokenizer.build(["ab"], 0)
    with pytest.raises(TypeError, match="texts"):
        WordPieceTokenizer.build(None, 100)


def test_word_cache_is_bounded(monkeypatch):
    """Junk text (many distinct words, very long words) keeps the word cache at WORD_CACHE_SIZE short entries,
    and a word tokenized after its entry was evicted gets the same pieces."""
    from effbert.data.text import MAX_WORD_CHARS

    tok = WordPieceTokenizer(list(SPECIAL_TOKENS) + ["a", "b", "##a", "##b"])
    monkeypatch.setattr(WordPieceTokenizer, "WORD_CACHE_SIZE", 8)
    first = tok.tokenize("ab")
    assert first == ["a", "##b"]
    junk = " ".join("ab" * (i % 40 + 1) + "a" * (i // 40) for i in range(200))
    tok.tokenize(junk)
    long_word = "a" * (MAX_WORD_CHARS + 1)
    assert tok.tokenize(long_word) == ["[UNK]"]
    assert len(tok._pieces_cache) <= 8
    assert all(len(w) <= MAX_WORD_CHARS for w in tok._pieces_cache)
    assert "ab" not in tok._pieces_cache and tok.tokenize("ab") == first
