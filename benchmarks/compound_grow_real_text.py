"""CompoundGrow against the same model trained without growth, on real text, on this CPU.

Corpus: the distinct paragraphs (>= 8 words, mostly letters) of /usr/share/common-licenses/* and
/usr/share/doc/*/copyright; every 20th paragraph is held out (5%). A WordPiece vocabulary is trained
on the training paragraphs, which are tokenized and cut into rows of ``--seq`` pieces ([CLS] ...
[SEP]).

Both runs: the same final model (``TupeBertForMaskedLM``, TUPE-R), data order, masking seed, AdamW
and linear schedule, ``--steps`` optimizer steps under ``PretrainingTrainer``. The grown run starts
with the SPEC's first sizes and grows by ``effbert.training.growth.GrowthCallback`` (fresh optimizer
state at each growth, the published way). Every ``--eval-every`` steps the held-out MLM loss is
measured with the full (unpooled) model on one fixed masking; evaluation time is left out of both
clocks. Reported: the training wall-clock and process-CPU time each run takes to first reach the
baseline's final held-out loss, and their ratio (target >= 1.3x), the parameter and FLOP counts of
each stage, and a plot of held-out loss against time for both runs.

The machine is shared and loaded (2 cores, several other jobs): wall time is noisy, process CPU time
less so; one thread (``torch.set_num_threads(1)``). Writes
``benchmarks/results/<UTC>_CPU_<sha>_compound_grow/`` (a new folder) with ``compound_grow.json`` and
``loss_vs_time.png``.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/compound_grow_real_text.py
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def paragraphs():
    """Distinct paragraphs (>= 8 words, mostly letters) of the licence and copyright texts, in file
    order."""
    files = sorted(glob.glob("/usr/share/common-licenses/*"))
    files += sorted(glob.glob("/usr/share/doc/*/copyright"))
    seen, out = set(), []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            letters = sum(c.isalpha() for c in para)
            if len(para.split()) >= 8 and letters > 0.6 * len(para) and para not in seen:
                seen.add(para)
                out.append(para)
    return out


def rows(tokenizer, paras, seq):
    """The paragraphs' pieces, concatenated and cut into rows of ``seq - 2`` pieces plus [CLS] /
    [SEP]."""
    ids = []
    for enc in tokenizer(paras, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
    body = seq - 2
    return [[tokenizer.cls_token_id] + ids[i:i + body] + [tokenizer.sep_token_id]
            for i in range(0, len(ids) - body + 1, body)]


class Rows(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i]}


def build_config(args, vocab):
    from effbert.models import TupeBertConfig

    return TupeBertConfig(vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, intermediate_size=args.ffn,
                          max_position_embeddings=args.seq, type_vocab_size=0,
                          position_mode="tupe-r",
                          hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def run(name, args, config, train, eval_batches, collator, spec):
    from transformers import TrainerCallback, TrainingArguments

    from effbert.models import TupeBertForMaskedLM
    from effbert.models import growth as ops
    from effbert.training import PretrainingTrainer
    from effbert.training.growth import GrowthCallback, GrowthSchedule

    schedule = GrowthSchedule.parse(spec) if spec else None
    torch.manual_seed(args.seed)
    model = TupeBertForMaskedLM(schedule.initial_config(config) if schedule else config)
    curve = []
    stages = []

    def stage_record(step, model):
        pool = ops.input_pooling(model)
        return {"from_step": step, "layers": model.config.num_hidden_layers,
                "ffn": model.config.intermediate_size, "pool": pool,
                "parameters": ops.count_parameters(model),
                "forward_flops_per_token": round(ops.mlm_flops_per_token(model.config, args.seq,
                                                                         pool))}

    class Clock(TrainerCallback):
        """Training time only: the held-out evaluation's own time is taken off both clocks."""

        def __init__(self):
            self.wall0 = self.cpu0 = None
            self.eval_wall = self.eval_cpu = 0.0

        def on_train_begin(self, a, state, control, model=None, **kw):
            self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, model=None, **kw):
            step = state.global_step
            if stages and (ops.input_pooling(model), model.config.num_hidden_layers,
                           model.config.intermediate_size) != (stages[-1]["pool"],
                                                               stages[-1]["layers"],
                                                               stages[-1]["ffn"]):
                stages.append(stage_record(step, model))
            if step % args.eval_every and step != args.steps:
                return
            w, c = time.perf_counter(), time.process_time()
            loss = held_out_loss(model, eval_batches)
            wall = w - self.wall0 - self.eval_wall
            cpu = c - self.cpu0 - self.eval_cpu
            self.eval_wall += time.perf_counter() - w
            self.eval_cpu += time.process_time() - c
            curve.append({"step": step, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                          "held_out_loss": round(loss, 5)})
            print(f"[{name}] step {step:4d}  wall {wall:7.1f}s  cpu {cpu:7.1f}s  "
                  f"held-out {loss:.4f}", flush=True)

    callbacks = [Clock()]
    grow_cb = None
    if schedule:
        # the callbacks run in order: the growth first, so the clock records the new stage at the
        # growth step
        grow_cb = GrowthCallback(schedule, optimizer_state=args.optimizer_state)
        callbacks.insert(0, grow_cb)
    out = tempfile.mkdtemp(prefix=f"grow_{name}_")
    targs = TrainingArguments(output_dir=out, max_steps=args.steps,
                              per_device_train_batch_size=args.batch,
                              learning_rate=args.lr, warmup_steps=max(1, args.steps // 10),
                              weight_decay=0.01, save_strategy="no", logging_steps=50,
                              report_to=[], seed=args.seed, use_cpu=True, disable_tqdm=True,
                              dataloader_num_workers=0)
    trainer = PretrainingTrainer(model=model, args=targs, train_dataset=train,
                                 data_collator=collator,
                                 callbacks=callbacks)
    if schedule:
        ops.set_input_pooling(model, schedule.sizes_at(0).get("pool", 1))
    stages.append(stage_record(0, model))
    collator.step = 0
    trainer.train()
    return {"curve": curve, "stages": stages, "growth_events": grow_cb.events if grow_cb else []}


@torch.no_grad()
def held_out_loss(model, batches):
    """Mean MLM cross-entropy over every held-out target, the full model (its own forward, never
    pooled)."""
    from effbert.models import TupeBertForMaskedLM

    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        out = TupeBertForMaskedLM.forward(model, b["input_ids"], b["attention_mask"],
                                          labels=b["labels"])
        n = int(b["labels"].ne(-100).sum())
        total += float(out.loss) * n
        count += n
    model.train(was)
    return total / max(count, 1)


def time_to(curve, target, key):
    for point in curve:
        if point["held_out_loss"] <= target:
            return point[key], point["step"]
    return None, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-rows", type=int, default=256,
                   help="held-out rows evaluated (the first ones)")
    p.add_argument("--optimizer-state", default="fresh", choices=("fresh", "grow"))
    p.add_argument("--grow", default="pool=2->1@100,layers=2->4@200,ffn=256->512@200")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from effbert.data.collator import DataCollatorForTupeMLM
    from effbert.data.tokenization import train_wordpiece

    # the code that runs: read before training, so a commit made meanwhile does not rename the
    # result
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip() or "nogit"
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    paras = paragraphs()
    held = [x for i, x in enumerate(paras) if i % 20 == 19]
    train_paras = [x for i, x in enumerate(paras) if i % 20 != 19]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(train_paras) + "\n")
        tokenizer = train_wordpiece(path, vocab_size=args.vocab)
    train_rows, eval_rows = rows(tokenizer, train_paras, args.seq), rows(tokenizer, held, args.seq)
    eval_rows = eval_rows[:args.eval_rows]
    collator = DataCollatorForTupeMLM(tokenizer, seed=args.seed)
    eval_collator = DataCollatorForTupeMLM(tokenizer, seed=args.seed + 1)
    eval_batches = [eval_collator([{"input_ids": r} for r in eval_rows[i:i + 32]])
                    for i in range(0, len(eval_rows), 32)]
    config = build_config(args, len(tokenizer))
    print(f"{len(paras)} paragraphs, {len(train_rows)} training rows, "
          f"{len(eval_rows)} held-out rows of "
          f"{args.seq} pieces; vocabulary {len(tokenizer)}", flush=True)

    results = {}
    for name, spec in (("baseline", None), ("compound_grow", args.grow)):
        t0, c0 = time.perf_counter(), time.process_time()
        results[name] = run(name, args, config, Rows(train_rows), eval_batches, collator, spec)
        results[name]["total_wall_s"] = round(time.perf_counter() - t0, 2)
        results[name]["total_cpu_s"] = round(time.process_time() - c0, 2)

    target = results["baseline"]["curve"][-1]["held_out_loss"]
    summary = {"target_held_out_loss": target}
    for key in ("wall_s", "cpu_s"):
        base, base_step = time_to(results["baseline"]["curve"], target, key)
        grown, grown_step = time_to(results["compound_grow"]["curve"], target, key)
        summary[f"baseline_{key}_to_target"] = base
        summary["baseline_step_at_target"] = base_step
        summary[f"compound_grow_{key}_to_target"] = grown
        summary["compound_grow_step_at_target"] = grown_step
        summary[f"speedup_{key}"] = round(base / grown, 3) if grown else None
    grown_final = results["compound_grow"]["curve"][-1]["held_out_loss"]
    summary["compound_grow_final_held_out_loss"] = grown_final
    for key in ("wall_s", "cpu_s"):  # the whole budget: how much cheaper the same steps were
        summary[f"same_steps_time_ratio_{key}"] = round(
            results["baseline"]["curve"][-1][key] / results["compound_grow"]["curve"][-1][key], 3)
    summary["target_speedup"] = 1.3
    summary["met_target"] = bool(summary["speedup_cpu_s"] and summary["speedup_cpu_s"] >= 1.3
                                 and summary["speedup_wall_s"] and summary["speedup_wall_s"] >= 1.3)
    print(json.dumps(summary, indent=2))

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    folder = os.path.join(args.results, f"{stamp}_CPU_{sha}_compound_grow")
    os.makedirs(folder, exist_ok=False)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    record = {
        "what": "CompoundGrow (Gu et al., NAACL 2021) against the same model without growth: "
                "training time to "
                "the baseline's final held-out MLM loss",
        "machine": {"device": "CPU", "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "loadavg_at_end": load, "python": sys.version.split()[0],
                    "torch": torch.__version__,
                    "note": "shared, loaded machine (2 cores, other jobs running): wall time is "
                            "noisy; process CPU "
                            "time is reported beside it"},
        "git": {"sha": sha, "dirty": dirty},
        "corpus": {"source": "distinct paragraphs of /usr/share/common-licenses/* and "
                             "/usr/share/doc/*/copyright",
                   "paragraphs": len(paras), "held_out_every": 20, "train_rows": len(train_rows),
                   "held_out_rows": len(eval_rows), "seq": args.seq, "vocab": len(tokenizer)},
        "settings": vars(args) | {"results": None},
        "final_model": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers",
                                                        "num_attention_heads",
                                                         "intermediate_size", "position_mode")},
        "summary": summary,
        "runs": results,
    }
    with open(os.path.join(folder, "compound_grow.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "wall_s", "training wall-clock (s)"),
                           (axes[1], "cpu_s", "training process CPU time (s)")):
        for name in ("baseline", "compound_grow"):
            curve = results[name]["curve"]
            ax.plot([c[key] for c in curve], [c["held_out_loss"] for c in curve], ".-", label=name)
        for event in results["compound_grow"]["growth_events"]:
            at = [c[key] for c in results["compound_grow"]["curve"] if c["step"] >= event["step"]]
            if at:
                ax.axvline(at[0], color="grey", linestyle="--", linewidth=0.8)
                ax.annotate(event["growth"], (at[0], 1.0), xycoords=("data", "axes fraction"),
                            fontsize=7,
                            rotation=90, va="top", ha="right")
        ax.axhline(target, color="black", linewidth=0.6, linestyle=":")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out MLM loss")
        ax.legend()
    fig.suptitle(f"CompoundGrow vs baseline, {args.steps} steps, CPU (shared, loaded), {sha}")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "loss_vs_time.png"), dpi=100)
    plt.close(fig)
    print("wrote", folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
