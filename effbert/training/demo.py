"""``effbert demo``: pretrain a tiny TUPE-R BERT with TNF, fine-tune multi-exit off-ramps, run
batched early exit.

Everything it needs is generated here (no download): a toy grammar over a Zipfian vocabulary (so
rare words exist), a WordPiece-like tokenisation (frequent words are one piece; tail words are a
stem piece plus a ``##`` suffix piece), masked-LM pretraining with the TNF note dictionary, then a
topic classification task for the off-ramps. It prints the loss as it falls, then layers saved,
speed-up and accuracy at a few exit thresholds against the full-depth model, and writes a plot (loss
curve, speed-accuracy curve) to ``--out``.

On a CUDA device it runs the fused kernels at larger sizes; on the CPU it runs a tiny model
(README.md, Demo, gives its time and results). The command line is ``effbert.commands.demo``; this
module is the run, each step a function.
"""

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..calibration import TIMING_ROUNDS
from .run_folder import default_backend

SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]
PAD, CLS, SEP, MASK = range(4)
SUFFIXES = ["##a", "##e", "##o", "##s"]


def mask_tokens(ids, lengths, gen, *, mask_id, maskable, prob=0.15):
    """BERT's masking (Devlin et al. 2019): ``prob`` of the real maskable pieces become targets; 80%
    of those become ``mask_id``, 10% a random maskable piece, 10% stay. ``maskable``: bool ``[V]``
    (False for the special tokens). Returns ``(masked ids, labels (-100 = no target), real-token
    mask)``."""
    n = ids.shape[1]
    real = torch.arange(n)[None] < lengths[:, None]
    words = real & maskable[ids]
    target = words & (torch.rand(ids.shape, generator=gen) < prob)
    labels = torch.where(target, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=gen)
    masked = ids.clone()
    masked[target & (r < 0.8)] = mask_id
    rand = target & (r >= 0.8) & (r < 0.9)
    choices = torch.nonzero(maskable).squeeze(1)
    masked[rand] = choices[torch.randint(0, choices.numel(), (int(rand.sum()),), generator=gen)]
    return masked, labels, real


def _progress(total, desc, show):
    """A tqdm bar on stderr when ``show`` (a person watches), else None: callers print periodic
    lines instead (a log file gets lines, never a bar's carriage returns)."""
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)


@dataclass
class Sizes:
    function_words: int
    content_words: int
    topics: int
    sentences: int
    max_len: int
    hidden: int
    layers: int
    heads: int
    pretrain_steps: int
    finetune_steps: int
    batch: int
    eval_sentences: int


def sizes_for(device, quick):
    if quick:
        return Sizes(12, 160, 3, 400, 24, 32, 3, 2, 20, 20, 16, 64)
    if device.type == "cuda":
        return Sizes(40, 4000, 4, 40000, 64, 256, 6, 4, 1500, 600, 64, 2048)
    return Sizes(24, 600, 4, 4000, 32, 64, 6, 4, 600, 500, 32, 512)


class ToyCorpus:
    """Sentences of phrases "function word, one or two content words"; each sentence has a topic
    (its label) that tilts its content words towards the topic's own Zipfian ranking by a
    per-sentence strength, so some sentences are easy to classify and some are not."""

    def __init__(self, sizes, seed=0):
        self.s = sizes
        rng = np.random.default_rng(seed)
        self.rng = rng
        ranks = np.arange(sizes.content_words)
        zipf = 1.0 / (ranks + 1.0) ** 1.1
        self.global_p = zipf / zipf.sum()
        # each topic ranks the content words in its own order
        self.topic_p = []
        for _ in range(sizes.topics):
            perm = rng.permutation(sizes.content_words)
            p = np.empty_like(zipf)
            p[perm] = zipf
            self.topic_p.append(p / p.sum())
        fz = 1.0 / (np.arange(sizes.function_words) + 1.0)
        self.function_p = fz / fz.sum()
        # tokenisation: the 60% most frequent content words are single pieces, the tail stem +
        # suffix
        self.head = int(sizes.content_words * 0.6)
        tail = sizes.content_words - self.head
        self.stems = (tail + len(SUFFIXES) - 1) // len(SUFFIXES)
        self.first_function = len(SPECIALS)
        self.first_content = self.first_function + sizes.function_words
        self.first_stem = self.first_content + self.head
        self.first_suffix = self.first_stem + self.stems
        self.vocab_size = self.first_suffix + len(SUFFIXES)

    def continuation(self):
        cont = torch.zeros(self.vocab_size, dtype=torch.bool)
        cont[self.first_suffix :] = True
        return cont

    def pieces(self, word):
        """Piece ids of a word: ``("f", i)`` a function word, ``("c", i)`` a content word."""
        kind, i = word
        if kind == "f":
            return [self.first_function + i]
        if i < self.head:
            return [self.first_content + i]
        t = i - self.head
        return [self.first_stem + t // len(SUFFIXES), self.first_suffix + t % len(SUFFIXES)]

    def sentence(self, topic):
        rng, s = self.rng, self.s
        strength = rng.uniform(0.1, 0.9)
        p = strength * self.topic_p[topic] + (1 - strength) * self.global_p
        words = []
        target = rng.integers(s.max_len // 3, s.max_len // 2 + 1)
        while len(words) < target:
            words.append(("f", int(rng.choice(s.function_words, p=self.function_p))))
            for _ in range(rng.integers(1, 3)):
                words.append(("c", int(rng.choice(s.content_words, p=p))))
        return words

    def build(self, n):
        topics = self.rng.integers(0, self.s.topics, n)
        return [self.sentence(int(t)) for t in topics], torch.from_numpy(topics).long()

    def encode(self, sentences):
        """``[CLS] pieces [SEP]`` padded to ``max_len``: ``(ids [S, N], lengths [S])``."""
        n = self.s.max_len
        ids = torch.full((len(sentences), n), PAD, dtype=torch.int64)
        lengths = torch.zeros(len(sentences), dtype=torch.int64)
        for r, words in enumerate(sentences):
            toks = [CLS]
            for w in words:
                p = self.pieces(w)
                if len(toks) + len(p) > n - 1:
                    break
                toks.extend(p)
            toks.append(SEP)
            ids[r, : len(toks)] = torch.tensor(toks)
            lengths[r] = len(toks)
        return ids, lengths


def mlm_step(model, opt, sched, table, ids, lengths, maskable, device, gen):
    """One masked-LM optimizer step on the rows ``ids [b, N]`` (``lengths [b]`` real pieces), then
    TNF's note update; returns the step's loss."""
    n = int(lengths.max())
    masked, labels, real = mask_tokens(ids[:, :n], lengths, gen, mask_id=MASK, maskable=maskable)
    spans, slots = table.find(masked, lengths)  # masked rare words get no note: no peeking
    masked, labels, real = masked.to(device), labels.to(device), real.to(device)
    out = model(masked, real, labels=labels, note_slots=slots.to(device), return_logits=False)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    model.update_notes(out.last_hidden_state, spans.to(device), lengths.to(device))
    return out.loss.item()


def pretrain(corpus, ids, lengths, sizes, device, backend, gen, log):
    from ..models import TupeBertConfig, TupeBertForMaskedLM
    from ..nn import NoteDictionary
    from ..data.tnf import RareWordTable, build_rare_vocab

    # rare words: seen a few times, but well below the typical count (TNF's band)
    counts = {}
    for (kind, i), c in corpus.word_counts.items():
        if kind == "c":
            counts[f"w{i}"] = c
    vals = np.array(sorted(counts.values()))
    max_count = max(3, int(np.percentile(vals, 50)))
    rare = build_rare_vocab(counts, min_count=3, max_count=max_count)
    table = RareWordTable.build(
        rare, lambda w: corpus.pieces(("c", int(w[1:]))), corpus.continuation()
    )
    cfg = TupeBertConfig(
        vocab_size=corpus.vocab_size,
        hidden_size=sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        intermediate_size=4 * sizes.hidden,
        max_position_embeddings=sizes.max_len,
        position_mode="tupe-r",
        num_buckets=32,
        max_distance=128,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
        backend=backend,
    )
    notes = NoteDictionary(len(table), sizes.hidden, window=4, gamma=0.1, lam=0.5)
    model = TupeBertForMaskedLM(cfg, note_dictionary=notes).to(device).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=2e-3 if sizes.hidden <= 64 else 5e-4, weight_decay=0.01
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=opt.param_groups[0]["lr"], total_steps=sizes.pretrain_steps, pct_start=0.1
    )
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    log(
        f"pretraining a {sizes.layers}-layer TUPE-R BERT (hidden {sizes.hidden}, {sizes.heads} "
        f"heads, {millions:.2f}M parameters) with TNF notes for "
        f"{len(table)} rare words, {sizes.pretrain_steps} steps of {sizes.batch} sentences, "
        f"backend {backend}"
    )
    losses = []
    # every piece but the specials
    maskable = torch.arange(corpus.vocab_size) >= corpus.first_function
    bar = _progress(sizes.pretrain_steps, "MLM", log.progress)
    every = max(1, sizes.pretrain_steps // 10)
    t0 = time.perf_counter()
    for step in range(sizes.pretrain_steps):
        rows = torch.randint(0, ids.shape[0], (sizes.batch,), generator=gen)
        losses.append(
            mlm_step(model, opt, sched, table, ids[rows], lengths[rows], maskable, device, gen)
        )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        elif (step + 1) % every == 0:
            log(f"  step {step + 1:5d}  loss {np.mean(losses[-every:]):.3f}")
    if bar is not None:
        bar.close()
    k = max(1, len(losses) // 10)
    log(
        f"MLM loss {np.mean(losses[:k]):.3f} -> {np.mean(losses[-k:]):.3f} (first / last {k} "
        f"steps), {int((model.notes.counts > 0).sum())} of {len(table)} notes taken, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return model, losses


FINETUNE_GAMMA, FINETUNE_TEMPERATURE = 0.9, 3.0  # RomeBERT's published values


def finetune(mlm, ids, lengths, labels, sizes, device, gen, log):
    from ..losses import multi_exit_distillation_loss
    from ..models import TupeBertConfig, TupeBertForSequenceClassification

    values = mlm.config.to_dict()
    values.update(multi_exit=True, num_labels=sizes.topics)
    model = TupeBertForSequenceClassification(TupeBertConfig.from_dict(values))
    model.bert.load_state_dict(mlm.bert.state_dict())
    model = model.to(device).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-3 if sizes.hidden <= 64 else 2e-4, weight_decay=0.01
    )
    log(
        f"fine-tuning {sizes.layers} off-ramps on {sizes.topics}-way topic classification with "
        f"RomeBERT's loss (gamma {FINETUNE_GAMMA}, temperature {FINETUNE_TEMPERATURE}), "
        f"{sizes.finetune_steps} steps"
    )
    bar = _progress(sizes.finetune_steps, "multi-exit", log.progress)
    every = max(1, sizes.finetune_steps // 5)
    losses = []
    for step in range(sizes.finetune_steps):
        rows = torch.randint(0, ids.shape[0], (sizes.batch,), generator=gen)
        b_len = lengths[rows]
        n = int(b_len.max())
        b_ids = ids[rows, :n].to(device)
        mask = (torch.arange(n)[None] < b_len[:, None]).to(device)
        out = model(b_ids, mask)
        # RomeBERT's loss at its published values, with its KL averaged over B * C as its KDLoss
        # does
        loss = multi_exit_distillation_loss(
            out.exit_logits,
            labels[rows].to(device),
            gamma=FINETUNE_GAMMA,
            temperature=FINETUNE_TEMPERATURE,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        elif (step + 1) % every == 0:
            log(f"  step {step + 1:5d}  loss {np.mean(losses[-every:]):.3f}")
    if bar is not None:
        bar.close()
    return model.eval()


def evaluate(model, ids, lengths, labels, sizes, device, log):
    """The offline speed-accuracy curve of every exit's logits, then the batched early exit measured
    at entropy thresholds (quantiles of the early exits' entropies) against full depth:
    ``(full-depth accuracy, points (threshold, avg exit layer, speed-up, accuracy), curve)``."""
    from .. import calibration as cal

    labels_d = labels.to(device)
    depth, batch = sizes.layers, 128
    all_exits = cal.every_exit_logits(model, ids, lengths, batch, device)
    curve = cal.speed_accuracy_curve(all_exits, labels_d, criterion="entropy")
    thresholds = cal.threshold_candidates(
        all_exits, "entropy", quantiles=(0.1, 0.25, 0.4, 0.55, 0.7)
    )
    # full depth: the same batched loop with threshold 0, which no sample passes (DeeBERT's
    # full-depth row)
    full = dict(criterion="entropy", threshold=0.0)
    rows = cal.early_exit_rows(
        model,
        ids,
        lengths,
        labels_d,
        device,
        criterion="entropy",
        thresholds=thresholds,
        batch=batch,
        full=full,
        depth=depth,
        rounds=TIMING_ROUNDS,
    )
    log(
        f"\nbatched early exit on {ids.shape[0]} held-out sentences (entropy criterion, "
        f"{depth} layers):"
    )
    for line in cal.report_lines(
        rows, criterion="entropy", metric="accuracy", device=device, rounds=TIMING_ROUNDS
    ):
        log(line)
    warning = cal.chance_warning(all_exits, labels_d)
    if warning:
        log("  " + warning)
    points = [(r["threshold"], r["avg_exit_layer"], r["speedup"], r["accuracy"]) for r in rows[1:]]
    return rows[0]["accuracy"], points, curve


def plot(path, losses, acc_full, points, curve, depth):
    """The loss curve and the speed-accuracy of early exit, as a PNG at ``path`` (False: no
    matplotlib)."""
    from ..calibration_plot import plot_run

    return plot_run(
        path,
        losses,
        points=[(p[2], p[3]) for p in points],
        full_accuracy=acc_full,
        depth=depth,
        criterion="entropy",
        curve={k: curve[k].numpy() for k in ("speedup", "accuracy")},
        loss_title="Pretraining (TUPE-R + TNF)",
        loss_label="MLM loss",
        smooth=True,
    )


class _Log:
    def __init__(self, progress):
        self.progress = progress

    def __call__(self, msg):
        print(msg, flush=True)


def run(
    out_dir="effbert-demo",
    quick=False,
    device=None,
    seed=0,
    quiet=False,
    backend=None,
    progress=False,
):
    """Runs the whole demo; returns a dict with the losses, the early-exit points and the plot path
    (or None). ``progress``: tqdm bars on stderr (the command passes whether a person watches);
    ``quiet`` turns them off. ``backend`` None: ``auto`` (``eager`` under the Triton
    interpreter)."""
    device = torch.device(
        device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = sizes_for(device, quick)
    backend = backend if backend is not None else default_backend(device)
    log = _Log(progress and not quiet)
    t0 = time.perf_counter()
    corpus = ToyCorpus(sizes, seed)
    sentences, _ = corpus.build(sizes.sentences)
    corpus.word_counts = {}
    for words in sentences:
        for w in words:
            corpus.word_counts[w] = corpus.word_counts.get(w, 0) + 1
    ids, lengths = corpus.encode(sentences)
    log(
        f"effbert demo on {device}{' (quick)' if quick else ''}: {len(sentences)} generated "
        "sentences, "
        f"{corpus.vocab_size} pieces ({sizes.content_words} Zipfian content words, the rarer ones "
        "split into "
        f"stem + ##suffix)"
    )
    mlm, losses = pretrain(corpus, ids, lengths, sizes, device, backend, gen, log)
    train_s, train_y = corpus.build(sizes.sentences // 2)
    eval_s, eval_y = corpus.build(sizes.eval_sentences)
    tr_ids, tr_len = corpus.encode(train_s)
    ev_ids, ev_len = corpus.encode(eval_s)
    clf = finetune(mlm, tr_ids, tr_len, train_y, sizes, device, gen, log)
    acc_full, points, curve = evaluate(clf, ev_ids, ev_len, eval_y, sizes, device, log)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(out_dir, "effbert-demo.png"))
    if plot(path, losses, acc_full, points, curve, sizes.layers):
        log(f"\nplot (loss curve, speed-accuracy curve): {path}")
    else:
        path = None
        log("\nmatplotlib is not installed: no plot written (pip install matplotlib)")
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return {"losses": losses, "full_accuracy": acc_full, "points": points, "plot": path}
