"""An ensemble of fine-tuned classifiers at inference: the mean of the members' class probabilities.

AT-BERT (the winning entry of the SDU@AAAI-21 acronym-disambiguation task) averages the predicted
probabilities of several fine-tuning runs of the same model (different seeds; with and without FGM).
``ProbabilityEnsemble`` does that for any classifiers whose output has ``logits [B, C]`` (effbert's
``TupeBertForSequenceClassification``, a ``MultiExitBert``, a transformers
``*ForSequenceClassification``); ``from_run_folders`` loads the folders ``effbert finetune``
writes::

    from effbert.models.ensemble import ProbabilityEnsemble
    ens = ProbabilityEnsemble.from_run_folders(["run-seed1", "run-seed2", "run-seed3"])
    probs = ens.predict_proba_texts(["the court ruled", "a byte of memory"])   # [2, C] float32
    names = [ens.labels[i] for i in probs.argmax(-1).tolist()]

The members run one after the other on the same batch (the memory of one model's activations at a
time). A one-output (regression) head is averaged as its raw output. The members' full-depth exits
are used (their ``logits``).
"""

import os

import torch

__all__ = ["ProbabilityEnsemble", "load_run", "check_runs_match"]


def load_run(path, device=None, backend="auto"):
    """One run folder of ``effbert finetune``: ``(model in eval mode, tokenizer, labels,
    settings)``, as ``effbert.models.loading.load_finetuned`` reads it (``FileNotFoundError`` for a
    folder that is not such a run, ``ValueError`` for unreadable weights or tokenizer)."""
    from .loading import load_finetuned

    return load_finetuned(path, device=device, backend=backend)


def check_runs_match(paths, labels, tokenizer, max_len, regression=False):
    """Raise ``ValueError`` unless every folder of ``paths`` (``effbert finetune`` run folders)
    holds the given ``labels`` (list of str, same order), a tokenizer equal to ``tokenizer``
    (vocabulary, lower-casing, special ids), the same ``max_len`` (int, pieces) and the same kind
    of head (``regression``: bool): what ``from_run_folders`` asks of its members, checked from
    each folder's ``config.json``, ``finetune.json`` and tokenizer files without reading its
    weights. The message names the folder and what differs; ``FileNotFoundError`` for a folder
    that is not a complete run."""
    import json

    from transformers import BertTokenizerFast

    from .config import TupeBertConfig
    from .loading import CONFIG_FILE, SETTINGS_FILE, WEIGHT_FILES

    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, (list, tuple)) or not paths:
        raise ValueError(f"paths must be a non-empty list of run folders, got {paths!r}")
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"labels must be a list of str, got {labels!r}")
    want = (list(labels), _tokenizer_key(tokenizer), max_len, bool(regression))
    for path in paths:
        for name in (CONFIG_FILE, SETTINGS_FILE, WEIGHT_FILES):
            names = name if isinstance(name, tuple) else (name,)
            if not any(os.path.isfile(os.path.join(path, n)) for n in names):
                raise FileNotFoundError(
                    f"paths: {os.fspath(path)!r} holds no {names[0]}: not "
                    "the folder of a complete effbert finetune run"
                )
        try:
            config = TupeBertConfig.from_pretrained(path)
            with open(os.path.join(path, SETTINGS_FILE), encoding="utf-8") as f:
                settings = json.load(f)
            other = BertTokenizerFast.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"paths: {os.fspath(path)!r} cannot be read ({exc})") from None
        got = (
            [config.id2label[i] for i in range(config.num_labels)],
            _tokenizer_key(other),
            settings.get("max_len"),
            bool(settings.get("regression")),
        )
        names = ("labels", "tokenizer", "max_len", "head (regression or not)")
        for what, a, b in zip(names, want, got):
            if a != b:
                shown = (
                    f"{b!r}, not {a!r}"
                    if what != "tokenizer"
                    else "a different vocabulary or casing"
                )
                raise ValueError(
                    f"paths: {os.fspath(path)!r} differs in its {what} ({shown}): "
                    "an ensemble needs the same"
                )


def _tokenizer_key(tokenizer):
    """What two tokenizers must share for one encoding to serve both members."""
    if tokenizer is None:
        return None
    return (
        type(tokenizer).__name__,
        tuple(sorted(tokenizer.get_vocab().items())),
        bool(getattr(tokenizer, "do_lower_case", False)),
        tokenizer.pad_token_id,
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
    )


class ProbabilityEnsemble:
    """The mean over ``models`` of ``softmax(logits.float(), -1)`` (class probabilities ``[B, C]``
    float32; float64 for float64 members).

    ``models``: a non-empty list of ``torch.nn.Module`` classifiers returning an output with
    ``logits [B, C]`` and the same ``C``. ``labels``: the class names (list of str, index = class
    id) or None. ``tokenizer``: one tokenizer for every member (``predict_proba_texts``), or None.
    ``max_len``: the longest encoding in pieces for ``predict_proba_texts`` (None: the tokenizer's
    own limit). ``regression``: a one-output head, averaged raw. Raises ``ValueError`` naming the
    argument for an empty or mixed list.
    """

    def __init__(self, models, labels=None, tokenizer=None, max_len=None, regression=False):
        if not isinstance(models, (list, tuple)) or not models:
            raise ValueError(f"models must be a non-empty list of classifiers, got {models!r}")
        for i, m in enumerate(models):
            if not isinstance(m, torch.nn.Module):
                raise ValueError(f"models[{i}] must be a torch.nn.Module, got {type(m).__name__}")
        if labels is not None and (
            not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels)
        ):
            raise ValueError(f"labels must be a list of str or None, got {labels!r}")
        if max_len is not None and (
            isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2
        ):
            raise ValueError(f"max_len must be an int >= 2 or None, got {max_len!r}")
        if not isinstance(regression, bool):
            raise ValueError(f"regression must be a bool, got {regression!r}")
        self.models = list(models)
        self.labels = list(labels) if labels is not None else None
        self.tokenizer, self.max_len, self.regression = tokenizer, max_len, regression

    @classmethod
    def from_run_folders(cls, paths, device=None, backend="auto"):
        """Loads ``effbert finetune`` run folders (``load_run``) as one ensemble. Every folder must
        hold the same labels (same names, same order), the same tokenizer (vocabulary, lower-casing,
        special ids), the same ``max_len`` and the same kind of head (classification or regression);
        otherwise ``ValueError`` names the folder and what differs.
        ``FileNotFoundError``/``ValueError`` of a folder that is not a run pass through."""
        if (
            isinstance(paths, (str, os.PathLike))
            or not isinstance(paths, (list, tuple))
            or not paths
        ):
            raise ValueError(f"paths must be a non-empty list of run folders, got {paths!r}")
        models, first = [], None
        for path in paths:
            model, tokenizer, labels, settings = load_run(path, device=device, backend=backend)
            key = (
                labels,
                _tokenizer_key(tokenizer),
                settings.get("max_len"),
                bool(settings.get("regression")),
            )
            if first is None:
                first = (path, key, tokenizer, labels, settings)
            else:
                names = ("labels", "tokenizer", "max_len", "head (regression or not)")
                for what, a, b in zip(names, first[1], key):
                    if a != b:
                        shown = (
                            f"{a!r} and {b!r}"
                            if what != "tokenizer"
                            else "different vocabularies or casing"
                        )
                        raise ValueError(
                            f"paths: {os.fspath(path)!r} differs from "
                            f"{os.fspath(first[0])!r} in its {what} ({shown}): an "
                            "ensemble needs the same"
                        )
            models.append(model)
        _, _, tokenizer, labels, settings = first
        return cls(
            models,
            labels=labels,
            tokenizer=tokenizer,
            max_len=settings.get("max_len"),
            regression=bool(settings.get("regression")),
        )

    def __len__(self):
        return len(self.models)

    @torch.no_grad()
    def predict_proba(self, input_ids, attention_mask=None, **kwargs):
        """The mean of the members' probabilities for one batch: ``input_ids [B, N]`` int64,
        ``attention_mask [B, N]`` (1/True = real token), other keyword inputs as the members take
        them. Returns ``[B, C]`` (``[B]`` for regression). Raises ``ValueError`` when the members
        disagree on ``C`` or give no ``logits``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
            raise ValueError(f"input_ids must be a [B, N] tensor, got {got!r}")
        total = None
        for i, model in enumerate(self.models):
            out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            logits = out["logits"] if isinstance(out, dict) else getattr(out, "logits", None)
            batch = input_ids.shape[0]
            if (
                not isinstance(logits, torch.Tensor)
                or logits.dim() != 2
                or logits.shape[0] != batch
            ):
                raise ValueError(f"models[{i}] gave no logits [B, C] for a batch of {batch}")
            x = logits if logits.dtype == torch.float64 else logits.float()
            p = x[:, 0] if self.regression else x.softmax(-1)
            if total is not None and p.shape != total.shape:
                raise ValueError(
                    f"models[{i}] gives {list(p.shape)} where models[0] gave {list(total.shape)}"
                )
            total = p if total is None else total + p.to(total.device)
        return total / len(self.models)

    def predict_proba_texts(self, texts, batch_size=32):
        """``predict_proba`` of raw ``texts`` (a list of str) encoded with the ensemble's tokenizer
        (cut to ``max_len``), ``batch_size`` texts a batch, on the first member's device."""
        if self.tokenizer is None:
            raise ValueError(
                "the ensemble has no tokenizer: build it with tokenizer=... or from_run_folders"
            )
        if (
            isinstance(texts, str)
            or not isinstance(texts, (list, tuple))
            or not all(isinstance(t, str) for t in texts)
        ):
            raise ValueError("texts must be a list of str")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        device = next(self.models[0].parameters()).device
        parts = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[start : start + batch_size]),
                truncation=True,
                padding=True,
                max_length=self.max_len,
                return_tensors="pt",
                return_token_type_ids=False,
            )
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            parts.append(self.predict_proba(ids, mask))
        return torch.cat(parts) if parts else torch.zeros(0, len(self.labels or ()))
