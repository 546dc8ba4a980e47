"""WordPiece through the ``tokenizers`` library, handed to users as ``transformers.BertTokenizerFast``.

    tok = train_wordpiece(["corpus.txt"], vocab_size=30522)        # BERT's normalizer, pre-tokenizer and specials
    save_tokenizer(tok, "out/")                                    # tokenizer.json, vocab.txt, tokenizer_config.json
    tok = load_tokenizer("out/")                                   # or a tokenizer.json / vocab.txt file

The pipeline is BERT's (Devlin et al. 2019, google-research/bert ``tokenization.py``) as ``tokenizers`` implements
it: ``BertNormalizer`` (clean control characters, spaces around CJK ideographs, lowercase and strip accents when
``lowercase``), ``BertPreTokenizer`` (split on whitespace and punctuation), greedy longest-match-first WordPiece with
``##`` continuation pieces, and ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` around the pieces.
"""

import codecs
import numbers
import os
import stat

__all__ = [
    "SPECIAL_TOKENS",
    "train_wordpiece",
    "load_tokenizer",
    "save_tokenizer",
    "check_tokenizer",
]

# [PAD] first, so a trained vocabulary has pad id 0 as BERT's vocab.txt does.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_ATTRS = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


def path_problem(path):
    """Why ``path`` cannot be read as a text file, in a few words (``"no such file"``, ``"is a directory"``, ``"is
    not a regular file (a fifo, socket or device)"``, ``"cannot be read (...)"``), or None when it is a regular
    file. A fifo or a device is refused: reading one blocks or never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:  # a permission, a loop of links, a name too long: what the system says
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "is a directory"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a fifo, socket or device)"
    return None


def _check_files(files):
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not hasattr(files, "__iter__"):
        raise TypeError(f"files must be a path or a list of paths, got {type(files).__name__}")
    files = [os.fspath(f) for f in files]
    if not files:
        raise ValueError("files must name at least one text file")
    for f in files:
        problem = path_problem(f)
        if problem is not None:
            raise ValueError(
                f"files: {f!r} {problem}"
                if problem != "no such file"
                else f"files: no such file {f!r}"
            )
    return files


def train_wordpiece(
    files, vocab_size=30522, lowercase=True, min_frequency=2, *, limit_alphabet=1000, check=True
):
    """Train a WordPiece vocabulary on text files with ``tokenizers``' ``WordPieceTrainer``.

    ``files``: a path or a list of paths to UTF-8 text; ``vocab_size``: the most pieces (specials included; a small
    corpus gives fewer); ``lowercase``: BERT's uncased normalisation (lowercase and strip accents);
    ``min_frequency``: a merge must occur at least this often; ``limit_alphabet``: the most single characters kept
    (1000, ``BertWordPieceTokenizer``'s default). ``check``: first check every file as ``load_corpus`` does (UTF-8,
    not binary, not empty, lines under ``corpus.MAX_LINE_BYTES``). Returns a ``BertTokenizerFast`` with ids
    ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``. Raises ``ValueError`` (one line naming the file) for a missing or
    bad file and ``ValueError`` for bad sizes.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertTokenizerFast

    files = _check_files(files)
    for name, value, low in (
        ("vocab_size", vocab_size, len(SPECIAL_TOKENS) + 1),
        ("min_frequency", min_frequency, 0),
        ("limit_alphabet", limit_alphabet, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(lowercase, bool):
        raise TypeError(f"lowercase must be a bool, got {type(lowercase).__name__}")
    if check:
        from .corpus import check_text_file

        for f in files:
            check_text_file(f)

    def bert(vocab=None):  # BERT's pipeline around a WordPiece model
        tok = Tokenizer(
            models.WordPiece(
                vocab=vocab,
                unk_token="[UNK]",
                continuing_subword_prefix="##",
                max_input_chars_per_word=100,
            )
        )
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        return tok

    def trained(specials):
        tok = bert()
        trainer = trainers.WordPieceTrainer(
            vocab_size=int(vocab_size),
            min_frequency=int(min_frequency),
            special_tokens=specials,
            limit_alphabet=int(limit_alphabet),
            continuing_subword_prefix="##",
            show_progress=False,
        )
        tok.train(files, trainer)
        return tok

    # The trainer numbers the ``##x`` pieces in the order it walks its hash map of words, which differs from process
    # to process, and breaks ties between equally frequent merges by those numbers: the same corpus gave different
    # vocabularies. So a first pass finds the ``##x`` pieces, and the second numbers them first, sorted (as
    # "special" tokens, which the trainer numbers in the order given), so every tie breaks the same way.
    continuing = sorted(
        p
        for p in trained(list(SPECIAL_TOKENS)).get_vocab(with_added_tokens=False)
        if p.startswith("##") and len(p) == 3
    )
    vocab = trained(list(SPECIAL_TOKENS) + continuing).get_vocab(with_added_tokens=True)
    # the same pieces in a tokenizer where only BERT's five are special (a "##x" in a text is no added token)
    tok = bert(vocab)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizerFast(
        tokenizer_object=tok,
        do_lower_case=lowercase,
        strip_accents=None,
        tokenize_chinese_chars=True,
        **dict(zip(_ATTRS, SPECIAL_TOKENS)),
    )


def check_tokenizer(tokenizer, name="tokenizer"):
    """``ValueError`` unless ``tokenizer`` is a fast tokenizer with all five BERT special tokens in its vocabulary."""
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(
            f"{name} must be a transformers fast tokenizer (BertTokenizerFast), got "
            f"{type(tokenizer).__name__}"
        )
    vocab = tokenizer.get_vocab()
    for attr in _ATTRS:
        token = getattr(tokenizer, attr, None)
        if token is None or str(token) not in vocab:
            raise ValueError(
                f"{name} has no {attr} in its vocabulary (BERT's five specials {SPECIAL_TOKENS} are "
                "needed)"
            )
    return tokenizer


def _one_line(exc):
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


def _from_vocab_txt(path, lowercase):
    """BERT's tokenizer over a vocab.txt, built with ``tokenizers`` (``BertTokenizerFast(vocab_file=...)`` is not
    read by every transformers version: 5.x takes ``vocab=`` and ignores the file)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    with open(path, encoding="utf-8") as f:
        pieces = [line.strip() for line in f]
    vocab = {}
    for i, piece in enumerate(pieces):
        if piece:
            vocab.setdefault(piece, i)
    if not vocab:
        raise ValueError("no pieces")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"the vocabulary lacks {' '.join(missing)}")
    wp = BertWordPieceTokenizer(
        vocab=vocab,
        lowercase=lowercase,
        strip_accents=None,
        clean_text=True,
        handle_chinese_chars=True,
        wordpieces_prefix="##",
    )
    return BertTokenizerFast(
        tokenizer_object=wp._tokenizer,
        do_lower_case=lowercase,
        strip_accents=None,
        tokenize_chinese_chars=True,
        **dict(zip(_ATTRS, SPECIAL_TOKENS)),
    )


def load_tokenizer(path, lowercase=True):
    """A ``BertTokenizerFast`` from ``path``: a folder (``save_pretrained``'s, or one holding ``tokenizer.json`` or
    ``vocab.txt``), a ``tokenizer.json`` file, or a ``vocab.txt`` file (one piece a line, as BERT checkpoints ship
    it). ``lowercase`` applies to a bare ``vocab.txt`` only (a ``tokenizer.json`` or a saved config carries its own
    normalisation). Raises ``ValueError`` with one line naming the file when nothing loads or the vocabulary lacks
    one of ``[PAD] [UNK] [CLS] [SEP] [MASK]``.
    """
    from transformers import BertTokenizerFast

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        candidates = [os.path.join(path, n) for n in ("tokenizer.json", "vocab.txt")]
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            raise ValueError(f"{path!r}: the folder holds neither tokenizer.json nor vocab.txt")
        where = found[0]
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            load = lambda: BertTokenizerFast.from_pretrained(path)  # noqa: E731
        elif where.endswith(".json"):
            load = lambda: BertTokenizerFast(tokenizer_file=where)  # noqa: E731
        else:
            load = lambda: _from_vocab_txt(where, lowercase)  # noqa: E731
    elif os.path.isfile(path):
        where = path
        if path.endswith(".json"):
            load = lambda: BertTokenizerFast(tokenizer_file=path)  # noqa: E731
        else:
            load = lambda: _from_vocab_txt(path, lowercase)  # noqa: E731
    else:
        raise ValueError(f"{path!r}: no such file or folder")
    try:
        with open(where, "rb") as f:
            head = f.read(1 << 16)
        if b"\0" in head:
            raise ValueError("binary file")
        codecs.getincrementaldecoder("utf-8")("strict").decode(head, final=len(head) < (1 << 16))
        tok = load()
    except Exception as exc:  # tokenizers raises its own Exception types on a malformed file
        raise ValueError(f"{where!r} does not load as a tokenizer: {_one_line(exc)}") from None
    try:
        check_tokenizer(tok)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where!r}: {exc}") from None
    return tok


def save_tokenizer(tokenizer, folder):
    """Write ``tokenizer`` to ``folder`` (created if missing): ``save_pretrained``'s ``tokenizer.json`` and
    ``tokenizer_config.json``, and ``vocab.txt`` (the pieces one a line in id order, as BERT checkpoints ship it, so
    tools without ``tokenizers`` read it too). Returns the list of files written."""
    check_tokenizer(tokenizer)
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a str or os.PathLike, got {type(folder).__name__}")
    folder = os.fspath(folder)
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError("tokenizer's ids are not 0..V-1 without gaps: no vocab.txt can hold them")
    os.makedirs(folder, exist_ok=True)
    written = list(tokenizer.save_pretrained(folder))
    path = os.path.join(folder, "vocab.txt")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(piece + "\n" for piece, _ in by_id)
    os.replace(tmp, path)
    return [w for w in written if os.path.isfile(w)] + [path]
