"""``DataCollatorForTupeMLM``: padding and the batch layout of the packed-batch contract, BERT's 80/10/10 masking
(never a special token) and other replacement shares (MC-BERT's all-[MASK]), reproducible draws per (seed, rank, step), TNF spans on the masked ids that never cross a
text boundary."""

import pytest
import torch

from effbert.data.collator import DataCollatorForTupeMLM
from effbert.data.corpus import rare_word_table
from effbert.data.tokenization import SPECIAL_TOKENS, load_tokenizer

PIECES = list(SPECIAL_TOKENS) + [
    "the",
    "a",
    "cat",
    "dog",
    "run",
    "##s",
    "##ing",
    "##ly",
    "un",
    "##kind",
    "rare",
    "##word",
    "x",
    "y",
    "z",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("".join(p + "\n" for p in PIECES), encoding="utf-8")
    return load_tokenizer(path)


def _ids(tok, *words):
    return tok.convert_tokens_to_ids(list(words))


def test_padding_and_layout(tok):
    cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    a = [cls] + _ids(tok, "the", "cat") + [sep]
    b = [cls] + _ids(tok, "a", "dog") + [sep] + [cls] + _ids(tok, "run", "##s") + [sep]
    col = DataCollatorForTupeMLM(tok, mlm_probability=0.01, seed=0, pad_to_multiple_of=8)
    batch = col(
        [
            {"input_ids": a, "position_ids": list(range(4))},
            {"input_ids": b, "position_ids": list(range(4)) + list(range(4))},
        ]
    )
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert all(v.dtype == torch.int64 and v.shape == (2, 8) for v in batch.values())
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 8]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 0, 0, 0], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["input_ids"][0, 4:].tolist() == [pad] * 4  # right-padded
    restored = torch.where(batch["labels"] >= 0, batch["labels"], batch["input_ids"])
    assert restored.tolist() == [a + [pad] * 4, b]


def test_masking_is_berts(tok):
    """Over many pieces: 15% targets among the maskable ones, of those 80% [MASK], 10% random, 10% unchanged; never
    a special token or padding."""
    g = torch.Generator().manual_seed(0)
    words = torch.tensor(_ids(tok, *PIECES[5:]))
    rows = []
    for _ in range(400):
        n = int(torch.randint(10, 120, (1,), generator=g))
        body = words[torch.randint(0, len(words), (n,), generator=g)].tolist()
        unk_at = int(torch.randint(0, n, (1,), generator=g))
        body[unk_at] = tok.unk_token_id
        rows.append({"input_ids": [tok.cls_token_id] + body + [tok.sep_token_id]})
    col = DataCollatorForTupeMLM(tok, seed=3)
    batch = col(rows)
    ids, labels, real = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    original = torch.full_like(ids, tok.pad_token_id)
    for i, r in enumerate(rows):
        original[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
    target = labels != -100
    special = torch.isin(original, torch.tensor(tok.all_special_ids))
    assert not (target & special).any() and not (target & ~real).any()
    assert torch.equal(labels[target], original[target])
    assert torch.equal(ids[~target], original[~target])  # only targets change
    maskable = real & ~special
    share = target.sum().item() / maskable.sum().item()
    n = target.sum().item()
    assert abs(share - 0.15) < 0.01, share
    to_mask = (ids[target] == tok.mask_token_id).sum().item() / n
    kept = (ids[target] == original[target]).sum().item() / n
    assert abs(to_mask - 0.8) < 0.03 and abs(kept - 0.1 - 1 / len(tok) * 0.1) < 0.02, (
        to_mask,
        kept,
    )


def _rows(tok, count, seed):
    g = torch.Generator().manual_seed(seed)
    words = torch.tensor(_ids(tok, *PIECES[5:]))
    return [
        {
            "input_ids": [tok.cls_token_id]
            + words[torch.randint(0, len(words), (60,), generator=g)].tolist()
            + [tok.sep_token_id]
        }
        for _ in range(count)
    ]


@pytest.mark.parametrize("mask_p,random_p", [(1.0, 0.0), (0.5, 0.3), (0.0, 0.0)])
def test_replace_probs(tok, mask_p, random_p):
    """``mask_replace_prob`` / ``random_replace_prob`` (transformers' names): MC-BERT's published task (1, 0) masks
    every target with [MASK]; other shares give [MASK] / a random piece / the piece kept in those proportions (a
    random draw may give the piece itself or [MASK]: 1/V of the random share each)."""
    rows = _rows(tok, 300, 1)
    col = DataCollatorForTupeMLM(
        tok, seed=5, mask_replace_prob=mask_p, random_replace_prob=random_p
    )
    batch = col(rows)
    ids, labels = batch["input_ids"], batch["labels"]
    original = torch.tensor([r["input_ids"] for r in rows])
    target = labels != -100
    n = target.sum().item()
    assert abs(n / (300 * 60) - 0.15) < 0.01
    assert torch.equal(ids[~target], original[~target]) and torch.equal(
        labels[target], original[target]
    )
    to_mask = (ids[target] == tok.mask_token_id).float().mean().item()
    kept = (ids[target] == original[target]).float().mean().item()
    if mask_p == 1.0:
        assert to_mask == 1.0
    elif mask_p == 0.0 and random_p == 0.0:
        assert kept == 1.0  # targets, none of them changed
    else:
        want_mask, want_kept = (
            mask_p + random_p / len(tok),
            1 - mask_p - random_p + random_p / len(tok),
        )
        assert abs(to_mask - want_mask) < 0.025 and abs(kept - want_kept) < 0.025, (to_mask, kept)


def test_draws_are_reproducible_per_seed_rank_step(tok):
    rows = [
        {
            "input_ids": [tok.cls_token_id]
            + _ids(tok, "the", "cat", "run", "##s") * 20
            + [tok.sep_token_id]
        }
    ] * 8

    def masks(**kw):
        col = DataCollatorForTupeMLM(tok, **kw)
        return [col(rows)["labels"] for _ in range(3)], col

    first, col = masks(seed=5, rank=0)
    again, _ = masks(seed=5, rank=0)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], first[1])  # each step draws anew
    other_rank, _ = masks(seed=5, rank=1)
    other_seed, _ = masks(seed=6, rank=0)
    assert not torch.equal(first[0], other_rank[0]) and not torch.equal(first[0], other_seed[0])
    assert col.step == 3
    resumed = DataCollatorForTupeMLM(tok, seed=5, rank=0)
    resumed.step = 2  # resuming at step 2 gives step 2's masks
    assert torch.equal(resumed(rows)["labels"], first[2])
    state = torch.random.get_rng_state()
    DataCollatorForTupeMLM(tok, seed=5)(rows)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone


def test_tnf_spans(tok):
    """Spans are RareWordTable.find's on the masked ids: a masked rare word gets no note; position_ids end words at a
    text boundary even without [CLS]/[SEP] between the texts."""
    table = rare_word_table(["rareword", "unkind", "runs"], tok)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    row = [cls] + _ids(tok, "the", "rare", "##word", "a", "un", "##kind") + [sep]
    col = DataCollatorForTupeMLM(tok, rare_words=table, mlm_probability=0.5, seed=0)
    for _ in range(20):
        batch = col([{"input_ids": row}, {"input_ids": row[:4]}])
        spans, slots = table.find(batch["input_ids"], batch["attention_mask"].sum(1))
        assert torch.equal(batch["note_spans"], spans) and torch.equal(batch["note_slots"], slots)
        hit = {(int(r), int(s)) for r, s, _, _ in spans}
        original = torch.tensor([row, row[:4] + [tok.pad_token_id] * 4])
        changed = batch["input_ids"] != original
        for r, start, end in ((0, 2, 4), (0, 5, 7), (1, 2, 4)):
            # unchanged pieces (not a target, or a target kept as it is): a note; a replaced piece: none
            assert ((r, start) in hit) == (not changed[r, start:end].any())
    # two packed texts "run" | "##s ..." with no special token between: without position_ids "run ##s" would be
    # one rare word spanning the boundary
    packed = _ids(tok, "the", "run") + _ids(tok, "##s", "cat")
    ids = torch.tensor([packed])
    assert table.find(ids)[0][:, 3].tolist() == [table.slot_of["runs"]]
    never = DataCollatorForTupeMLM(tok, rare_words=table, mlm_probability=1e-9, seed=0)
    batch = never([{"input_ids": packed, "position_ids": [0, 1, 0, 1]}])
    assert batch["note_spans"].shape == (0, 4) and (batch["note_slots"] == -1).all()


def test_errors(tok):
    col = DataCollatorForTupeMLM(tok)
    with pytest.raises(ValueError, match="features must be a non-empty list"):
        col([])
    with pytest.raises(ValueError, match=r"features\[1\] has no 'input_ids'"):
        col([{"input_ids": [2, 3]}, {"ids": [2, 3]}])
    with pytest.raises(ValueError, match=r"features\[0\]\['input_ids'\] must be in \[0, 20\)"):
        col([{"input_ids": [2, 99]}])
    with pytest.raises(ValueError, match=r"features\[0\]\['input_ids'\] is empty"):
        col([{"input_ids": []}])
    with pytest.raises(ValueError, match=r"features\[0\]\['position_ids'\] has 1 entries"):
        col([{"input_ids": [2, 3], "position_ids": [0]}])
    with pytest.raises(ValueError, match="position_ids.*restarting at 0"):
        col([{"input_ids": [2, 3], "position_ids": [1, 2]}])
    with pytest.raises(ValueError, match=r"features\[1\]\['position_ids'\].*restarting at 0"):
        col(
            [
                {"input_ids": [2, 3, 4], "position_ids": [0, 1, 0]},
                {"input_ids": [2, 3, 4], "position_ids": [0, 2, 3]},
            ]
        )
    with pytest.raises(ValueError, match=r"features\[0\]\['input_ids'\] must be a list of ints"):
        col([{"input_ids": [[2, 3], [4]]}])
    with pytest.raises(ValueError, match="mlm_probability"):
        DataCollatorForTupeMLM(tok, mlm_probability=0)
    with pytest.raises(ValueError, match="seed"):
        DataCollatorForTupeMLM(tok, seed=-1)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        DataCollatorForTupeMLM(tok, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="mask_replace_prob must be a number in \\[0, 1\\]"):
        DataCollatorForTupeMLM(tok, mask_replace_prob=1.5)
    with pytest.raises(ValueError, match="random_replace_prob must be a number"):
        DataCollatorForTupeMLM(tok, random_replace_prob=-0.1)
    with pytest.raises(ValueError, match="mask_replace_prob \\+ random_replace_prob must be <= 1"):
        DataCollatorForTupeMLM(tok, mask_replace_prob=0.9, random_replace_prob=0.2)
    with pytest.raises(TypeError, match="rare_words"):
        DataCollatorForTupeMLM(tok, rare_words=["word"])
    assert col.step == 0  # nothing drawn by a call that raised


def test_dataloader_workers_draw_apart_and_repeat(tok):
    """In DataLoader workers each worker seeds with its id: the same rows in two workers get different masks, and a
    second run repeats the first."""
    row = {
        "input_ids": [tok.cls_token_id]
        + _ids(tok, "the", "cat", "run", "##s") * 30
        + [tok.sep_token_id]
    }
    data = [row] * 16

    def run():
        col = DataCollatorForTupeMLM(tok, seed=7, rank=0)
        loader = torch.utils.data.DataLoader(
            data, batch_size=4, num_workers=2, collate_fn=col, multiprocessing_context="fork"
        )
        return [b["labels"] for b in loader]

    first, second = run(), run()
    assert len(first) == 4 and all(torch.equal(x, y) for x, y in zip(first, second))
    # batches 0 and 1 are the first batch of workers 0 and 1: same rows, same step, different worker
    assert not torch.equal(first[0], first[1])


def test_optional_keys_are_read_from_every_feature(tok):
    """position_ids come from every feature, not the first one only: a packed row after an unpacked
    one would be read as one text (its attention crossing its texts). A key some rows have and
    others lack is refused by name, in either order."""
    col = DataCollatorForTupeMLM(tok, seed=0)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    one = {"input_ids": [cls] + _ids(tok, "the", "cat") + [sep]}
    packed = {"input_ids": [cls, 5, sep, cls, 6, sep], "position_ids": [0, 1, 2, 0, 1, 2]}
    for features in ([one, packed], [packed, one]):
        with pytest.raises(
            ValueError, match=r"features\[\d\] has no 'position_ids'.*must be in every feature"
        ):
            col(features)
    assert col.step == 0  # nothing drawn by a call that raised


def test_floating_ids_are_refused_not_truncated(tok):
    """Float ids (2.7 would silently become 2) are a TypeError naming the feature and key, whatever holds them;
    integer ids of any integer type (numpy, int32 tensors) are taken."""
    import numpy as np

    col = DataCollatorForTupeMLM(tok, seed=0)
    for bad in (
        [2.0, 3.7],
        torch.tensor([2.0, 3.0]),
        np.array([2.0, 3.5]),
        torch.tensor([2, 3], dtype=torch.float16),
    ):
        with pytest.raises(TypeError, match=r"features\[1\]\['input_ids'\] must hold integer ids"):
            col([{"input_ids": [2, 3]}, {"input_ids": bad}])
    with pytest.raises(TypeError, match=r"features\[0\]\['position_ids'\] must hold integer ids"):
        col([{"input_ids": [2, 3], "position_ids": [0.0, 1.0]}])
    assert col.step == 0
    batch = col(
        [
            {"input_ids": np.array([2, 3], dtype=np.int16)},
            {"input_ids": torch.tensor([4, 5, 6], dtype=torch.int32)},
        ]
    )
    restored = torch.where(batch["labels"] >= 0, batch["labels"], batch["input_ids"])
    assert restored.tolist() == [[2, 3, tok.pad_token_id], [4, 5, 6]]
