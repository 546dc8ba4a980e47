"""Text to BERT input ids: a WordPiece tokenizer written from BERT's definition, with no dependency beyond torch.

Two stages, as in BERT: the basic split (clean the text, put spaces around CJK characters, split on whitespace,
lowercase and strip accents when ``lowercase``, then make every punctuation character its own word), then greedy
longest-match-first WordPiece on each word, ``##`` marking a piece that continues a word and ``[UNK]`` for a word
no sequence of pieces covers (or one over 100 characters). It reads and writes the ``vocab.txt`` that Hugging Face
BERT checkpoints ship, and ``build`` makes a vocabulary from a corpus for pretraining from scratch.

    tok = WordPieceTokenizer.from_file("bert-base-uncased/")     # or WordPieceTokenizer.build(lines, 8000)
    ids, lengths = tok.encode_batch(["Hello, world!", "Un café"], max_len=128)   # [CLS] ... [SEP], padded

Special tokens written in the text (``[MASK]``) are ordinary text here: they are split like any other word.
"""

import collections
import numbers
import os
import unicodedata

import torch

__all__ = ["WordPieceTokenizer", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100  # BERT maps a longer word to [UNK] without trying to split it
_PREFIX = "##"


def _is_whitespace(ch):
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch):
    # tab and newlines are whitespace, not control characters, even though Unicode files them under "Cc"
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch):
    cp = ord(ch)
    # every non-alphanumeric ASCII character counts ($, ^, `, ...), as in BERT, though Unicode files some as symbols
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(ch):
    # the CJK Unified Ideographs blocks only: Hangul, hiragana and katakana are written with spaces or split by
    # WordPiece like any other script
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _strip_accents(word):
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


def _check_text(name, text):
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")


def _check_texts(name, texts):
    if isinstance(texts, str) or not hasattr(texts, "__iter__"):
        raise TypeError(f"{name} must be a list of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}")
    return texts


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class WordPieceTokenizer:
    """BERT's WordPiece tokenizer over ``vocab`` (a list of pieces; index = id). ``vocab`` must hold the specials
    ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (anywhere) and no piece twice."""

    WORD_CACHE_SIZE = 100_000  # words whose pieces are remembered (each at most MAX_WORD_CHARS long)

    def __init__(self, vocab, *, lowercase=True):
        if isinstance(vocab, (str, bytes)) or not hasattr(vocab, "__iter__"):
            raise TypeError(f"vocab must be a list of str, got {type(vocab).__name__}")
        vocab = list(vocab)
        index = {}
        for i, piece in enumerate(vocab):
            if not isinstance(piece, str):
                raise TypeError(f"vocab[{i}] must be a str, got {type(piece).__name__}")
            if not piece or any(_is_whitespace(c) for c in piece):
                raise ValueError(f"vocab[{i}] must be a non-empty piece without whitespace, got {piece!r}")
            if piece in index:
                raise ValueError(f"vocab holds {piece!r} twice (ids {index[piece]} and {i})")
            index[piece] = i
        missing = [s for s in SPECIAL_TOKENS if s not in index]
        if missing:
            raise ValueError(f"vocab must hold the special tokens {list(SPECIAL_TOKENS)}; missing {missing}")
        if not isinstance(lowercase, bool):
            raise TypeError(f"lowercase must be a bool, got {type(lowercase).__name__}")
        self._vocab = vocab
        self._index = index
        self.lowercase = lowercase
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (index[s] for s in SPECIAL_TOKENS)
        self._pieces_cache = {}
        self._continuation = None

    # ----------------------------------------------------------------------------------------------- vocabulary

    @classmethod
    def from_file(cls, path, *, lowercase=True):
        """A ``vocab.txt`` (one piece a line, line number = id), or a folder holding one."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a path to vocab.txt or a folder holding one, got {type(path).__name__}")
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no vocabulary file at {path!r}")
        with open(path, encoding="utf-8") as f:
            vocab = [line.rstrip("\n").rstrip("\r") for line in f]
        if not vocab:
            raise ValueError(f"path: the vocabulary file {path!r} is empty")
        return cls(vocab, lowercase=lowercase)

    def save(self, path):
        """Writes the vocabulary as ``vocab.txt`` (``path`` a file, or a folder to write ``vocab.txt`` into);
        returns the file's path."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file or folder path, got {type(path).__name__}")
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.txt")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(p + "\n" for p in self._vocab))
        os.replace(tmp, path)  # a reader never sees half a vocabulary
        return path

    @classmethod
    def build(cls, texts, vocab_size, *, lowercase=True):
        """A vocabulary from a corpus: the specials, every character seen with its ``##`` form, then the most
        frequent whole words and ``##`` suffixes (a suffix counts once per occurrence of each longer word ending
        in it), taken in turn, up to ``vocab_size`` pieces. Words that miss the cut split into several pieces. ``vocab_size`` must
        leave room for the specials and characters (the error says how many that is)."""
        texts = _check_texts("texts", texts)
        vocab_size = _check_int("vocab_size", vocab_size, 1)
        if not isinstance(lowercase, bool):
            raise TypeError(f"lowercase must be a bool, got {type(lowercase).__name__}")
        splitter = cls(list(SPECIAL_TOKENS), lowercase=lowercase)
        words = collections.Counter()
        for t in texts:
            words.update(splitter.words(t))
        words = {w: c for w, c in words.items() if len(w) <= MAX_WORD_CHARS}
        chars = sorted({c for w in words for c in w})
        base = list(SPECIAL_TOKENS) + chars + [_PREFIX + c for c in chars]
        if vocab_size < len(base):
            raise ValueError(f"vocab_size must be >= {len(base)} for this corpus (5 specials and {len(chars)} "
                             f"characters, each also as a ## piece), got {vocab_size}")
        taken = set(base)
        suffixes = collections.Counter()
        for w, c in words.items():
            for i in range(1, len(w) - 1):  # suffixes of two characters or more; one-character ones are in base
                suffixes[_PREFIX + w[i:]] += c
        # whole words and suffixes alternate, each in count order (ties by the piece, so the result is stable):
        # suffix counts add up over many words and would crowd the words out of a single ranking. A larger
        # vocab_size extends a smaller one's list.
        by_count = lambda kv: (-kv[1], kv[0])  # noqa: E731
        ranked = [[p for p, _ in sorted(pool.items(), key=by_count) if p not in taken]
                  for pool in (words, suffixes)]
        extra = []
        for i in range(max(len(ranked[0]), len(ranked[1]))):
            extra.extend(r[i] for r in ranked if i < len(r))
        vocab = base + extra[: vocab_size - len(base)]
        return cls(vocab, lowercase=lowercase)

    @property
    def vocab(self):
        return list(self._vocab)

    def __len__(self):
        return len(self._vocab)

    @property
    def continuation(self):
        """Bool ``[V]``: True for the ``##`` pieces (what ``effbert.data.tnf.RareWordTable`` needs)."""
        if self._continuation is None:
            from .tnf import wordpiece_continuation

            self._continuation = wordpiece_continuation(self._vocab, _PREFIX)
        return self._continuation.clone()

    def convert_tokens_to_ids(self, tokens):
        """Ids of pieces; a piece not in the vocabulary maps to ``unk_id``."""
        return [self._index.get(t, self.unk_id) for t in tokens]

    # ------------------------------------------------------------------------------------------------ splitting

    def words(self, text):
        """BERT's basic split of ``text`` into words (before WordPiece)."""
        _check_text("text", text)
        cleaned = []
        for ch in text:
            if ch == "\x00" or ch == "\ufffd" or _is_control(ch):
                continue
            if _is_whitespace(ch):
                cleaned.append(" ")
            elif _is_cjk(ch):
                cleaned.append(f" {ch} ")
            else:
                cleaned.append(ch)
        # no Unicode normalisation (BERT has none): a letter typed as base + combining accent differs from its
        # precomposed form unless lowercase strips the accent
        out = []
        for word in "".join(cleaned).split():
            if self.lowercase:
                word = _strip_accents(word.lower())
            start = 0
            for i, ch in enumerate(word):
                if _is_punctuation(ch):
                    if i > start:
                        out.append(word[start:i])
                    out.append(ch)
                    start = i + 1
            if start < len(word):
                out.append(word[start:])
        return out

    def _word_pieces(self, word):
        cached = self._pieces_cache.get(word)
        if cached is not None:
            return cached
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]  # not cached: the cache's keys stay short
        pieces = []
        start = 0
        while start < len(word):
            # the longest piece from start that the vocabulary holds
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else _PREFIX + word[start:end]
                if piece in self._index:
                    break
            else:
                pieces = ["[UNK]"]  # one uncovered character makes the whole word unknown
                break
            pieces.append(piece)
            start = end
        # at most WORD_CACHE_SIZE words, oldest out first: memory stays bounded however much junk text goes through
        if len(self._pieces_cache) >= self.WORD_CACHE_SIZE:
            del self._pieces_cache[next(iter(self._pieces_cache))]
        self._pieces_cache[word] = pieces
        return pieces

    def tokenize(self, text):
        """The WordPiece pieces of ``text`` (no [CLS]/[SEP])."""
        return [p for w in self.words(text) for p in self._word_pieces(w)]

    def word_ids(self, word):
        """The piece ids of one word of the basic split (``[unk_id]`` when it cannot be covered)."""
        _check_text("word", word)
        return self.convert_tokens_to_ids(self._word_pieces(word))

    def encode(self, text):
        """The piece ids of ``text`` (no [CLS]/[SEP])."""
        return self.convert_tokens_to_ids(self.tokenize(text))

    def encode_batch(self, texts, max_len):
        """``[CLS] pieces [SEP]`` of each text, cut to ``max_len`` tokens (the pieces are cut, [SEP] stays), padded
        with ``pad_id`` to the longest row: ``(ids [S, L] int64, lengths [S] int64)`` with ``L <= max_len``."""
        texts = _check_texts("texts", texts)
        max_len = _check_int("max_len", max_len, 2)
        rows = [[self.cls_id] + self.encode(t)[: max_len - 2] + [self.sep_id] for t in texts]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        return ids, lengths

    def __repr__(self):
        return f"WordPieceTokenizer({len(self)} pieces, lowercase={self.lowercase})"
