"""``effbert.data.corpus``: the documents format against a plain re-statement of DOC-SENTENCES, the pair formats'
structure and labels as BERT / ALBERT define them, word counts against the tokenizer's own pre-tokenizer, the cache,
and one-line errors naming the file with nothing written."""

import collections
import os
import random

import pytest

from effbert.data import corpus as corpus_mod
from effbert.data.corpus import (
    check_text_file,
    count_words,
    load_corpus,
    rare_word_table,
    rare_words,
)
from effbert.data.tokenization import train_wordpiece

pytestmark = pytest.mark.requires("datasets")

WORDS = (
    "the a of cat dog runs running house tree walked talking quietly because under over green blue "
    "unbelievable rarest zebra"
).split()


def _write_corpus(path, seed, docs=12):
    rng = random.Random(seed)
    text = []
    for d in range(docs):
        for _ in range(rng.randint(1, 8)):
            text.append(
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14))).capitalize() + "."
            )
        text.append("" if d % 3 else "   ")  # blank (or whitespace-only) line: a document boundary
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return train_wordpiece(
        [_write_corpus(d / "train.txt", 0, docs=60)], vocab_size=120, min_frequency=1
    )


def _documents(path, tok):
    """The documents of a file as lists of tokenized lines (reference: BERT's reading loop)."""
    docs = [[]]
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            docs.append([])
        else:
            docs[-1].append(tok.encode(line, add_special_tokens=False))
    return [d for d in docs if d]


def _doc_sentences(docs, max_length):
    """DOC-SENTENCES: whole lines into texts of at most max_length - 2 pieces, never across documents."""
    out = []
    for doc in docs:
        cur = []
        for ids in doc:
            assert len(ids) <= max_length - 2  # this corpus has no over-long line
            if cur and len(cur) + len(ids) > max_length - 2:
                out.append(cur)
                cur = []
            cur = cur + ids
        out.append(cur)
    return out


@pytest.mark.parametrize("max_length", [24, 64])
def test_documents_format(tmp_path, tok, max_length):
    path = _write_corpus(tmp_path / "c.txt", 1)
    ds = load_corpus(path, tok, max_length, cache_dir=tmp_path / "cache")
    assert ds.column_names == ["input_ids"]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    texts = list(ds["input_ids"])
    assert all(t[0] == cls and t[-1] == sep and len(t) <= max_length for t in texts)
    assert [t[1:-1] for t in texts] == _doc_sentences(_documents(path, tok), max_length)


def test_long_line_is_cut_at_word_starts(tmp_path, tok):
    path = tmp_path / "long.txt"
    path.write_text(" ".join(["unbelievable quietly"] * 40) + "\nthe cat.\n", encoding="utf-8")
    ds = load_corpus(path, tok, 16, cache_dir=tmp_path / "cache")
    cont = [p.startswith("##") for p in tok.convert_ids_to_tokens(list(range(len(tok))))]
    texts = list(ds["input_ids"])
    pieces = tok.encode(path.read_text().split("\n")[0], add_special_tokens=False)
    tail = tok.encode("the cat.", add_special_tokens=False)
    assert [i for t in texts for i in t[1:-1]] == pieces + tail  # nothing lost, nothing repeated
    for t in texts:
        assert len(t) <= 16 and not cont[t[1]]  # every text starts at a word start
    assert (
        len(texts) > 5 and texts[-1][-1 - len(tail) : -1] == tail
    )  # the next line fills the long line's last text


def test_cache_and_processes(tmp_path, tok):
    path = _write_corpus(tmp_path / "c.txt", 3)
    cache = tmp_path / "cache"
    ds = load_corpus([path], tok, 32, cache_dir=cache)
    assert ds.cache_files and all(
        str(cache) in f["filename"] for f in ds.cache_files
    )  # memory-mapped Arrow
    again = load_corpus([path], tok, 32, cache_dir=cache)
    assert again.cache_files == ds.cache_files and list(again["input_ids"]) == list(ds["input_ids"])
    two = load_corpus([path, path], tok, 32, cache_dir=cache, num_proc=2)
    assert sorted(list(two["input_ids"])) == sorted(list(ds["input_ids"]) * 2)


def test_count_words(tmp_path, tok):
    path = _write_corpus(tmp_path / "c.txt", 4)
    ref = collections.Counter()
    for line in path.read_text(encoding="utf-8").split("\n"):
        norm = tok.backend_tokenizer.normalizer.normalize_str(line)
        for word, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(norm):
            if tok.unk_token not in tok.tokenize(word):
                ref[word] += 1
    ds = load_corpus(path, tok, 24, cache_dir=tmp_path / "cache")
    assert count_words(ds, tok, batch_size=7) == ref
    assert count_words([path], tok, cache_dir=tmp_path / "cache") == ref
    from effbert.data.packing import pack

    assert count_words(pack(ds, 64).dataset, tok) == ref
    words = rare_words(ref, tok, 1, 10**9)
    assert "." not in words and all(any(c.isalnum() for c in w) for w in words)
    assert words == sorted(words, key=lambda w: (-ref[w], w))
    table = rare_word_table(words, tok)
    assert table.words == words


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "blank",
        "latin1",
        "binary",
        "long line",
        "truncated utf-8",
        "missing",
        "directory",
        "fifo",
    ],
)
def test_bad_files(tmp_path, tok, case, monkeypatch):
    path = tmp_path / "bad.txt"
    good = _write_corpus(tmp_path / "good.txt", 5)
    if case == "empty":
        path.write_bytes(b"")
        match = "holds no text"
    elif case == "blank":
        path.write_bytes(b"\n   \n\t\n")
        match = "holds no text"
    elif case == "latin1":
        path.write_bytes("a line\ncaf\xe9 au lait\n".encode("latin-1"))
        match = "not UTF-8.*at byte 10"
    elif case == "binary":
        path.write_bytes(b"text\n" + bytes(range(256)))
        match = "binary.*NUL byte at byte 5"
    elif case == "long line":
        monkeypatch.setattr(corpus_mod, "_CHUNK", 1000)  # the long line spans several chunks
        monkeypatch.setattr(corpus_mod, "MAX_LINE_BYTES", 4096)
        path.write_text("short\n" + "word " * 1000 + "\nshort\n", encoding="utf-8")
        match = "a line over 4096 bytes"
    elif case == "truncated utf-8":
        path.write_bytes("caf\u00e9".encode()[:-1])
        match = "not UTF-8.*end of the file"
    elif case == "directory":  # not "no such file": it is there, and it is a directory
        path.mkdir()
        match = "bad.txt' is a directory"
    elif case == "fifo":  # reading one would block: refused before it is opened
        if not hasattr(os, "mkfifo"):
            pytest.skip("no fifos on this system")
        os.mkfifo(path)
        match = "bad.txt' is not a regular file"
    else:
        match = "no such file"
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=match) as info:
        load_corpus([good, path], tok, 32, cache_dir=cache)
    assert "bad.txt" in str(info.value) and "\n" not in str(info.value)
    assert not cache.exists() or not any(os.scandir(cache))  # nothing half-written


def test_line_cap_at_the_default(tmp_path):
    """A single line of just over MAX_LINE_BYTES (1 MiB), the case of a 100 MB line at a size a test can write."""
    path = tmp_path / "one_line.txt"
    path.write_bytes(b"x" * (corpus_mod.MAX_LINE_BYTES + 1))
    with pytest.raises(ValueError, match="one_line.txt.*line over 1048576 bytes"):
        check_text_file(path)
    path.write_bytes(b"x" * corpus_mod.MAX_LINE_BYTES + b"\n" + b"y" * corpus_mod.MAX_LINE_BYTES)
    check_text_file(path)  # exactly at the cap: fine


def test_argument_errors(tmp_path, tok):
    path = _write_corpus(tmp_path / "c.txt", 6)
    with pytest.raises(ValueError, match="format"):
        load_corpus(path, tok, 32, format="sentences")
    with pytest.raises(ValueError, match="max_length"):
        load_corpus(path, tok, 2)
    for fmt in ("nsp", "sop"):  # sentence pairs: no model has their head
        with pytest.raises(ValueError, match="format must be one of"):
            load_corpus(path, tok, 32, format=fmt)
    with pytest.raises(ValueError, match="num_proc"):
        load_corpus(path, tok, 32, num_proc=0)
    with pytest.raises(TypeError, match="tokenizer"):
        load_corpus(path, object(), 32)
    with pytest.raises(ValueError, match="paths"):
        load_corpus([], tok, 32)


def test_tokenizer_state_does_not_leak(tmp_path, tok):
    """A fast tokenizer keeps the truncation of its last call in its backend; load_corpus must not inherit it."""
    path = _write_corpus(tmp_path / "c.txt", 7)
    tok(["a long enough line of words here"], truncation=True, max_length=3)
    ds = load_corpus(path, tok, 64, cache_dir=tmp_path / "cache")
    assert [t[1:-1] for t in ds["input_ids"]] == _doc_sentences(_documents(path, tok), 64)


def test_lines_format(tmp_path, tok):
    path = _write_corpus(tmp_path / "c.txt", 8)
    with open(path, "a", encoding="utf-8") as f:
        f.write(" ".join(["unbelievable quietly"] * 30) + "\n")
    ds = load_corpus(path, tok, 16, format="lines", cache_dir=tmp_path / "cache")
    cls, sep = tok.cls_token_id, tok.sep_token_id
    cont = [p.startswith("##") for p in tok.convert_ids_to_tokens(list(range(len(tok))))]
    lines = [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]
    texts = list(ds["input_ids"])
    assert all(t[0] == cls and t[-1] == sep and 3 <= len(t) <= 16 and not cont[t[1]] for t in texts)
    assert [i for t in texts for i in t[1:-1]] == [
        i for ln in lines for i in tok.encode(ln, add_special_tokens=False)
    ]
    expected = []  # a text per line; a long line cut before the last word start that fits
    for ln in lines:
        ids = tok.encode(ln, add_special_tokens=False)
        while len(ids) > 14:
            cut = max(k for k in range(1, 15) if not cont[ids[k]])
            expected.append(ids[:cut])
            ids = ids[cut:]
        expected.append(ids)
    assert [t[1:-1] for t in texts] == expected and len(expected) > len(lines)


def test_a_100mb_line(tmp_path, tok):
    """The case of the issue: one line of 100 MB. It is refused from its first chunk, before the cache is touched."""
    path = tmp_path / "huge_line.txt"
    block = b"word " * 200_000  # 1 MB, no newline
    with open(path, "wb") as f:
        for _ in range(100):
            f.write(block)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"huge_line.txt.*line over 1048576 bytes \(near byte 0\)"):
        load_corpus(path, tok, 64, cache_dir=cache)
    assert not cache.exists()
