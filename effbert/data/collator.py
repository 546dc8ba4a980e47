"""The masked-LM collator of TUPE / TNF pretraining: rows padded, BERT's masking, TNF's rare-word spans.

    collator = DataCollatorForTupeMLM(tok, rare_words=table, seed=0)
    Trainer(model=model, train_dataset=packed.dataset, data_collator=collator, ...)

A batch (the names and layout of transformers):

- ``input_ids [B, N]`` int64, right-padded with ``[PAD]``, after masking;
- ``attention_mask [B, N]`` int64, 1 = real token, 0 = padding;
- ``labels [B, N]`` int64, the original piece at masked positions, -100 elsewhere;
- ``position_ids [B, N]`` int64 when the rows are packed (the features have ``position_ids``): restarts at 0 at
  each text's first token, 0 on padding;
- with ``rare_words``: ``note_slots [B, N]`` int64 (the rare word's slot at each of its pieces, -1 elsewhere) and
  ``note_spans [M, 4]`` int64 rows ``(row, start, end_exclusive, slot)`` (``RareWordTable.find``).

Masking is BERT's (Devlin et al. 2019; google-research/bert ``create_masked_lm_predictions``) as transformers'
``DataCollatorForLanguageModeling.torch_mask_tokens`` implements it: each real piece that is not a special token
([CLS], [SEP], [PAD], [UNK], [MASK]) is a target with probability ``mlm_probability``; a target becomes [MASK] 80% of
the time, a random piece of the vocabulary 10%, stays 10%. (BERT picks exactly ``round(15% * len)`` targets per
sequence; transformers, RoBERTa and this collator draw each piece independently.) ``mask_replace_prob`` and
``random_replace_prob`` (transformers' names) change the 80% and 10%: MC-BERT's published task
(github.com/MC-BERT/MC-BERT, ``MaskTokensDataset2``) masks every target with [MASK], ``mask_replace_prob=1``.

TNF's spans are found on the masked ids, so a rare word with a masked piece gets no note (the model must not see its
target through the note; Wu et al. 2021, "Taking Notes on the Fly"); with ``position_ids`` a word never spans a text
boundary.

Randomness: every call draws from a ``torch.Generator`` seeded with ``(seed, rank, worker, step)``: ``rank`` the
data-parallel rank (``torch.distributed``'s when initialised, else 0, or as given), ``worker`` the DataLoader worker
(0 in the main process), ``step`` the count of batches this collator (in this worker) has made, which
``collator.step`` reads and sets (set it when resuming so the masks continue where they were). Under ``Trainer``
each rank gets its own batch from the distributed sampler, so ranks differ in data and in masking, and a run
repeats itself given the seed.
"""

import numbers

import numpy as np
import torch

from .tnf import RareWordTable
from .tokenization import check_tokenizer

__all__ = ["DataCollatorForTupeMLM"]


class DataCollatorForTupeMLM:
    """See the module docstring.

    ``tokenizer``: a ``BertTokenizerFast`` with BERT's five specials; ``mlm_probability``: the share of targets, in
    (0, 1); ``mask_replace_prob`` (default 0.8) / ``random_replace_prob`` (default 0.1): the share of targets that
    become [MASK] / a random piece (each in [0, 1], their sum <= 1; the rest keep their piece); ``rare_words``: a ``RareWordTable`` (TNF) or None; ``pad_to_multiple_of``: pad ``N`` up to a multiple of
    it (None = the longest row); ``seed``: int >= 0; ``rank``: None (``torch.distributed``'s rank) or an int >= 0.
    ``__call__(features)``: ``features`` a non-empty list of mappings with ``input_ids`` (a list, numpy array or 1-D
    tensor of integer ids) and optionally ``position_ids`` (the same); every feature is read, and
    ``position_ids`` must be in every feature or in none. Returns a dict of tensors. Raises
    ``ValueError`` naming the feature and key for a missing key (``position_ids`` that some
    features have and others lack included), an empty row, ids outside the vocabulary or
    ``position_ids`` of another length; ``TypeError`` naming them for floating-point ids (never
    truncated).
    """

    def __init__(
        self,
        tokenizer,
        mlm_probability=0.15,
        rare_words=None,
        pad_to_multiple_of=None,
        seed=0,
        rank=None,
        mask_replace_prob=0.8,
        random_replace_prob=0.1,
    ):
        from transformers import DataCollatorForLanguageModeling

        check_tokenizer(tokenizer)
        if (
            isinstance(mlm_probability, bool)
            or not isinstance(mlm_probability, numbers.Real)
            or not 0 < mlm_probability < 1
        ):
            raise ValueError(f"mlm_probability must be a number in (0, 1), got {mlm_probability!r}")
        for name, value in (
            ("mask_replace_prob", mask_replace_prob),
            ("random_replace_prob", random_replace_prob),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not 0 <= value <= 1
            ):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if mask_replace_prob + random_replace_prob > 1:
            raise ValueError(
                f"mask_replace_prob + random_replace_prob must be <= 1, got {mask_replace_prob!r} + "
                f"{random_replace_prob!r}"
            )
        if rare_words is not None and not isinstance(rare_words, RareWordTable):
            raise TypeError(
                f"rare_words must be None or a RareWordTable, got {type(rare_words).__name__}"
            )
        for name, value in (("pad_to_multiple_of", pad_to_multiple_of), ("rank", rank)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, numbers.Integral)
                or value < (1 if name == "pad_to_multiple_of" else 0)
            ):
                raise ValueError(
                    f"{name} must be None or an int >= {1 if name == 'pad_to_multiple_of' else 0}, got "
                    f"{value!r}"
                )
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if rare_words is not None and rare_words.continuation.shape[0] < len(tokenizer):
            raise ValueError(
                f"rare_words covers a vocabulary of {rare_words.continuation.shape[0]} pieces, the "
                f"tokenizer has {len(tokenizer)}"
            )
        self.tokenizer = tokenizer
        self.mlm_probability = float(mlm_probability)
        self.rare_words = rare_words
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = int(seed)
        self.rank = rank
        self.step = 0
        self.mask_replace_prob = float(mask_replace_prob)
        self.random_replace_prob = float(random_replace_prob)
        self._mlm = DataCollatorForLanguageModeling(
            tokenizer,
            mlm=True,
            mlm_probability=self.mlm_probability,
            mask_replace_prob=self.mask_replace_prob,
            random_replace_prob=self.random_replace_prob,
        )
        special = torch.zeros(len(tokenizer), dtype=torch.bool)
        special[[i for i in tokenizer.all_special_ids if 0 <= i < len(tokenizer)]] = True
        self._special = special

    def _generator(self):
        rank = self.rank
        if rank is None:
            rank = (
                torch.distributed.get_rank()
                if (torch.distributed.is_available() and torch.distributed.is_initialized())
                else 0
            )
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        key = np.random.SeedSequence([self.seed, rank, worker, self.step]).generate_state(
            2, np.uint32
        )
        return torch.Generator().manual_seed(int(key[0]) << 31 | int(key[1]) >> 1)

    @staticmethod
    def _row(feature, key, i):
        if key not in feature:
            raise ValueError(f"features[{i}] has no {key!r}")
        value = feature[key]
        # floating-point ids would be truncated to ints without a word (2.7 -> 2): refused, whatever holds them
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                raise TypeError(
                    f"features[{i}][{key!r}] must hold integer ids, got a {value.dtype} tensor"
                )
            t = value.to(torch.int64)
        else:
            try:
                arr = np.asarray(value)
                floating = (
                    arr.dtype.kind in "fc" and arr.size > 0
                )  # ([] is float64 to numpy: no id, no harm)
                t = None if floating else torch.as_tensor(np.asarray(value, np.int64))
            except (TypeError, ValueError, OverflowError):
                raise ValueError(
                    f"features[{i}][{key!r}] must be a list of ints, got {type(value).__name__}"
                ) from None
            if floating:
                raise TypeError(
                    f"features[{i}][{key!r}] must hold integer ids, got {arr.dtype} values"
                )
        if t.dim() != 1:
            raise ValueError(f"features[{i}][{key!r}] must be 1-D, got shape {tuple(t.shape)}")
        return t

    @staticmethod
    def _present(features, keys):
        """The optional ``keys`` the batch has: each one in every feature or in none (``ValueError`` naming the key
        and a feature without it otherwise: rows read as texts of another layout must not pass silently)."""
        present = []
        for key in keys:
            have = [key in f for f in features]
            if all(have):
                present.append(key)
            elif any(have):
                raise ValueError(
                    f"features[{have.index(False)}] has no {key!r} while features[{have.index(True)}] "
                    f"has one: {key!r} must be in every feature of a batch or in none"
                )
        return present

    def __call__(self, features):
        if not isinstance(features, (list, tuple)) or not features:
            raise ValueError("features must be a non-empty list of mappings")
        for i, f in enumerate(features):
            if not hasattr(f, "keys"):
                raise ValueError(
                    f"features[{i}] must be a mapping with input_ids, got {type(f).__name__}"
                )
        V = len(self.tokenizer)
        ids = [self._row(f, "input_ids", i) for i, f in enumerate(features)]
        for i, t in enumerate(ids):
            if t.numel() == 0:
                raise ValueError(f"features[{i}]['input_ids'] is empty")
            if int(t.min()) < 0 or int(t.max()) >= V:
                raise ValueError(
                    f"features[{i}]['input_ids'] must be in [0, {V}) (the tokenizer's vocabulary)"
                )
        optional = self._present(features, ("position_ids",))
        extra = {k: [self._row(f, k, i) for i, f in enumerate(features)] for k in optional}
        for k, rows in extra.items():
            for i, (t, r) in enumerate(zip(ids, rows)):
                if r.shape != t.shape:
                    raise ValueError(
                        f"features[{i}][{k!r}] has {r.numel()} entries, input_ids {t.numel()}"
                    )
        if "position_ids" in extra:
            for i, r in enumerate(extra["position_ids"]):
                step_ok = (r[1:] == 0) | (r[1:] == r[:-1] + 1)
                if int(r[0]) != 0 or not bool(step_ok.all()):
                    raise ValueError(
                        f"features[{i}]['position_ids'] must be 0, 1, 2, ... restarting at 0 at each "
                        "text's first token"
                    )
        lengths = torch.tensor([t.numel() for t in ids], dtype=torch.int64)
        N = int(lengths.max())
        if self.pad_to_multiple_of:
            N = -(-N // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((B, N), pad, dtype=torch.int64)
        real = torch.arange(N)[None, :] < lengths[:, None]
        input_ids[real] = torch.cat(ids)
        batch = {}
        for k, rows in extra.items():
            t = torch.zeros(B, N, dtype=torch.int64)
            t[real] = torch.cat(rows)
            batch[k] = t

        self._mlm.generator = self._generator()
        self.step += 1
        special = self._special.index_select(0, input_ids.view(-1)).view(B, N) | ~real
        masked, labels = self._mlm.torch_mask_tokens(input_ids, special_tokens_mask=special)
        batch["input_ids"] = masked
        batch["attention_mask"] = real.to(torch.int64)
        batch["labels"] = labels
        if self.rare_words is not None:
            spans, slots = self.rare_words.find(
                masked, lengths, position_ids=batch.get("position_ids")
            )
            batch["note_spans"] = spans
            batch["note_slots"] = slots
        return batch
