"""CompoundGrow against the same model trained without growth, on real text, on this CPU: the
training time each needs to reach the baseline's final held-out MLM loss (issue 25's measure).

Corpus: the distinct paragraphs (>= 8 words, mostly letters) of /usr/share/common-licenses/* and
/usr/share/doc/*/copyright; every 20th paragraph is held out (5%). A WordPiece vocabulary is trained
on the training paragraphs, which are tokenized and cut into rows of ``--seq`` pieces ([CLS] ...
[SEP]).

The baseline trains the final model (``TupeBertForMaskedLM``, TUPE-R) for ``--steps`` optimizer
steps; its final held-out loss is the target. Each grown run starts with the schedule's first sizes
and grows by ``effbert.training.growth.GrowthCallback``; it is given a longer budget of its own
(``--grown-steps``: factors of ``--steps``, one run each), with the growth at the fraction
``--grow-at`` of that budget, and stops early once its training CPU time passes ``--cap`` times the
baseline's. All runs share the data order, masking seed, AdamW, and a linear schedule (10%
warm-up) over their own budget under ``PretrainingTrainer``. Every ``--eval-every`` steps (and at
the end) the held-out MLM loss is measured with the full (unpooled) model on one fixed masking;
evaluation time is left out of both clocks. Reported: the training process-CPU and wall-clock time
at which each run first reaches the target (the baseline: its end), the speed-up (baseline time /
grown time), the final losses, the parameter and FLOP counts of each stage, and a plot of held-out
loss against time with the growths marked.

The growth schedule (``SCHEDULE_CHOICE`` says why) is fixed before any run: it is not tuned on the
held-out loss reported; every grown budget tried is reported.

The machine is shared and loaded (2 cores, several other jobs): wall time is noisy, process CPU time
less so; one thread (``torch.set_num_threads(1)``); the load average is recorded. Writes
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
    return [
        [tokenizer.cls_token_id] + ids[i : i + body] + [tokenizer.sep_token_id]
        for i in range(0, len(ids) - body + 1, body)
    ]


class Rows(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i]}


def build_config(args, vocab):
    from effbert.models import TupeBertConfig

    return TupeBertConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.ffn,
        max_position_embeddings=args.seq,
        type_vocab_size=0,
        position_mode="tupe-r",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )


def run(name, args, config, train, eval_batches, collator, spec, steps, cap_cpu=None):
    """One training run of ``steps`` optimizer steps (stopped at the first evaluation whose
    training CPU time is past ``cap_cpu`` seconds, if given); returns its curve, stages and
    growths."""
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
    stopped = []

    def stage_record(step, model):
        pool = ops.input_pooling(model)
        return {
            "from_step": step,
            "layers": model.config.num_hidden_layers,
            "ffn": model.config.intermediate_size,
            "pool": pool,
            "parameters": ops.count_parameters(model),
            "forward_flops_per_token": round(ops.mlm_flops_per_token(model.config, args.seq, pool)),
        }

    class Clock(TrainerCallback):
        """Training time only: the held-out evaluation's own time is taken off both clocks."""

        def __init__(self):
            self.wall0 = self.cpu0 = None
            self.eval_wall = self.eval_cpu = 0.0

        def on_train_begin(self, a, state, control, model=None, **kw):
            self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, model=None, **kw):
            step = state.global_step
            if stages and (
                ops.input_pooling(model),
                model.config.num_hidden_layers,
                model.config.intermediate_size,
            ) != (stages[-1]["pool"], stages[-1]["layers"], stages[-1]["ffn"]):
                stages.append(stage_record(step, model))
            if step % args.eval_every and step != steps:
                return
            w, c = time.perf_counter(), time.process_time()
            loss = held_out_loss(model, eval_batches)
            wall = w - self.wall0 - self.eval_wall
            cpu = c - self.cpu0 - self.eval_cpu
            self.eval_wall += time.perf_counter() - w
            self.eval_cpu += time.process_time() - c
            curve.append(
                {
                    "step": step,
                    "wall_s": round(wall, 3),
                    "cpu_s": round(cpu, 3),
                    "held_out_loss": round(loss, 5),
                }
            )
            print(
                f"[{name}] step {step:4d}  wall {wall:7.1f}s  cpu {cpu:7.1f}s  held-out {loss:.4f}",
                flush=True,
            )
            if cap_cpu is not None and cpu >= cap_cpu and step != steps:
                control.should_training_stop = True
                stopped.append(step)

    callbacks = [Clock()]
    grow_cb = None
    if schedule:
        # the callbacks run in order: the growth first, so the clock records the new stage at the
        # growth step
        grow_cb = GrowthCallback(schedule, optimizer_state=args.optimizer_state)
        callbacks.insert(0, grow_cb)
    out = tempfile.mkdtemp(prefix=f"grow_{name}_")
    targs = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        warmup_steps=max(1, steps // 10),
        weight_decay=0.01,
        save_strategy="no",
        logging_steps=50,
        report_to=[],
        seed=args.seed,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = PretrainingTrainer(
        model=model, args=targs, train_dataset=train, data_collator=collator, callbacks=callbacks
    )
    if schedule:
        ops.set_input_pooling(model, schedule.sizes_at(0).get("pool", 1))
    stages.append(stage_record(0, model))
    collator.step = 0
    trainer.train()
    return {
        "spec": spec,
        "max_steps": steps,
        "cap_cpu_s": cap_cpu,
        "stopped_by_cap_at_step": stopped[0] if stopped else None,
        "curve": curve,
        "stages": stages,
        "growth_events": grow_cb.events if grow_cb else [],
    }


@torch.no_grad()
def held_out_loss(model, batches):
    """Mean MLM cross-entropy over every held-out target, the full model (its own forward, never
    pooled)."""
    from effbert.models import TupeBertForMaskedLM

    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        out = TupeBertForMaskedLM.forward(
            model, b["input_ids"], b["attention_mask"], labels=b["labels"]
        )
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


SCHEDULE_CHOICE = (
    "Two stages, all grown dimensions growing together at one step (the compound growth), at "
    "--grow-at = 1/2 of each grown run's budget: the stage list that grow_bert/progressive "
    "ships as its default (ProgStackingConfig: two StackingStageConfig of 3000 steps each) splits "
    "the run into two equal stages; the paper's own base/large stage lengths are not in the "
    "released code (no configs ship with it). Depth and FFN width are halved in the first stage "
    "(layers L/2 -> L by stacking, ffn F/2 -> F by tiling), the halving the paper's compound "
    "schedule uses per dimension. Input pooling is left out of the schedule: on this CPU the "
    "pooled stage was slower per step than the unpooled small model despite ~25% fewer FLOPs "
    "(11.0 s against 10.7 s per 100 steps in the earlier runs), because its layer-0 attention "
    "(pooled queries against full-length keys) runs outside the fused effbert.tupe_attention "
    "op; routing it through that op is not done yet. Adam's state restarts at the growth "
    "(--optimizer-state fresh, the published code's new optimizer per stage, and `effbert "
    "pretrain --grow`'s default). The grown runs get longer budgets than the baseline (they "
    "must, to reach its final loss: the earlier same-step runs ended above it); several budgets "
    "are run and all are reported, none picked on the held-out loss."
)


def grow_spec(dims, config, at_step):
    """The SPEC growing ``dims`` (a subset of layers, ffn, pool) together at ``at_step``: layers
    and ffn from half the final size, pool from 2."""
    items = []
    for dim in dims:
        if dim == "layers":
            items.append(
                f"layers={config.num_hidden_layers // 2}->{config.num_hidden_layers}@{at_step}"
            )
        elif dim == "ffn":
            items.append(
                f"ffn={config.intermediate_size // 2}->{config.intermediate_size}@{at_step}"
            )
        elif dim == "pool":
            items.append(f"pool=2->1@{at_step}")
        else:
            raise ValueError(f"grow_dims: unknown dimension {dim!r} (layers, ffn, pool)")
    return ",".join(items)


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
    p.add_argument(
        "--eval-rows", type=int, default=256, help="held-out rows evaluated (the first ones)"
    )
    p.add_argument("--optimizer-state", default="fresh", choices=("fresh", "grow"))
    p.add_argument(
        "--grow-dims",
        default="layers,ffn",
        help="dimensions grown (together, at one step): layers (half -> full), ffn "
        "(half -> full), pool (2 -> 1); see SCHEDULE_CHOICE",
    )
    p.add_argument(
        "--grow-at",
        type=float,
        default=0.5,
        help="the growth at this fraction of each grown run's budget",
    )
    p.add_argument(
        "--grown-steps",
        default="1.25,1.5",
        help="each grown run's budget, as factors of --steps (one run each)",
    )
    p.add_argument(
        "--cap",
        type=float,
        default=2.0,
        help="a grown run stops once its training CPU time passes CAP x the baseline's",
    )
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from effbert.data.collator import DataCollatorForTupeMLM
    from effbert.data.tokenization import train_wordpiece

    # the code that runs: read before training, so a commit made meanwhile does not rename the
    # result
    sha = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        or "nogit"
    )
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    paras = paragraphs()
    held = [x for i, x in enumerate(paras) if i % 20 == 19]
    train_paras = [x for i, x in enumerate(paras) if i % 20 != 19]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(train_paras) + "\n")
        tokenizer = train_wordpiece(path, vocab_size=args.vocab)
    train_rows, eval_rows = rows(tokenizer, train_paras, args.seq), rows(tokenizer, held, args.seq)
    eval_rows = eval_rows[: args.eval_rows]
    collator = DataCollatorForTupeMLM(tokenizer, seed=args.seed)
    eval_collator = DataCollatorForTupeMLM(tokenizer, seed=args.seed + 1)
    eval_batches = [
        eval_collator([{"input_ids": r} for r in eval_rows[i : i + 32]])
        for i in range(0, len(eval_rows), 32)
    ]
    config = build_config(args, len(tokenizer))
    print(
        f"{len(paras)} paragraphs, {len(train_rows)} training rows, "
        f"{len(eval_rows)} held-out rows of "
        f"{args.seq} pieces; vocabulary {len(tokenizer)}",
        flush=True,
    )

    factors = [float(x) for x in args.grown_steps.split(",") if x.strip()]
    dims = [d.strip() for d in args.grow_dims.split(",") if d.strip()]
    if not factors or min(factors) <= 0:
        raise ValueError(f"grown_steps: positive factors wanted, got {args.grown_steps!r}")
    if not 0 < args.grow_at < 1:
        raise ValueError(f"grow_at must be in (0, 1), got {args.grow_at}")
    results = {}
    plan = [("baseline", None, args.steps)]
    for factor in factors:
        steps = int(round(factor * args.steps))
        plan.append(
            (
                f"compound_grow_x{factor:g}",
                grow_spec(dims, config, int(round(args.grow_at * steps))),
                steps,
            )
        )
    for name, spec, steps in plan:
        cap = None
        if spec:
            cap = args.cap * results["baseline"]["curve"][-1]["cpu_s"]
        t0, c0 = time.perf_counter(), time.process_time()
        results[name] = run(
            name, args, config, Rows(train_rows), eval_batches, collator, spec, steps, cap
        )
        results[name]["total_wall_s"] = round(time.perf_counter() - t0, 2)
        results[name]["total_cpu_s"] = round(time.process_time() - c0, 2)
        results[name]["loadavg_after"] = os.getloadavg()

    base_curve = results["baseline"]["curve"]
    target = base_curve[-1]["held_out_loss"]
    summary = {
        "target_held_out_loss": target,
        "baseline_final_held_out_loss": target,
        "baseline_steps": args.steps,
        "baseline_cpu_s_to_target": base_curve[-1]["cpu_s"],
        "baseline_wall_s_to_target": base_curve[-1]["wall_s"],
        # when the baseline's own curve first reached its final loss (at best its end)
        "baseline_first_reached_target": dict(
            zip(("cpu_s", "step"), time_to(base_curve, target, "cpu_s"))
        ),
        "grown_runs": {},
    }
    for name, spec, steps in plan[1:]:
        curve = results[name]["curve"]
        cpu, step = time_to(curve, target, "cpu_s")
        wall, _ = time_to(curve, target, "wall_s")
        summary["grown_runs"][name] = {
            "spec": spec,
            "max_steps": steps,
            "reached_target": cpu is not None,
            "step_at_target": step,
            "cpu_s_to_target": cpu,
            "wall_s_to_target": wall,
            "speedup_cpu_s": round(base_curve[-1]["cpu_s"] / cpu, 3) if cpu else None,
            "speedup_wall_s": round(base_curve[-1]["wall_s"] / wall, 3) if wall else None,
            "final_step": curve[-1]["step"],
            "final_cpu_s": curve[-1]["cpu_s"],
            "final_wall_s": curve[-1]["wall_s"],
            "final_held_out_loss": curve[-1]["held_out_loss"],
            "stopped_by_cap": results[name]["stopped_by_cap_at_step"] is not None,
            "cap_cpu_s": round(results[name]["cap_cpu_s"], 3),
        }
        if cpu is None:
            summary["grown_runs"][name]["note"] = (
                f"not reached within the cap (final held-out {curve[-1]['held_out_loss']})"
            )
    summary["target_speedup"] = 1.3
    summary["met_target_cpu_s"] = any(
        (g["speedup_cpu_s"] or 0) >= 1.3 for g in summary["grown_runs"].values()
    )
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
        "machine": {
            "device": "CPU",
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_at_end": load,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "note": "shared, loaded machine (2 cores, other jobs running): wall time is "
            "noisy; process CPU "
            "time is reported beside it",
        },
        "git": {"sha": sha, "dirty": dirty},
        "corpus": {
            "source": "distinct paragraphs of /usr/share/common-licenses/* and "
            "/usr/share/doc/*/copyright",
            "paragraphs": len(paras),
            "held_out_every": 20,
            "train_rows": len(train_rows),
            "held_out_rows": len(eval_rows),
            "seq": args.seq,
            "vocab": len(tokenizer),
        },
        "settings": vars(args) | {"results": None},
        "schedule_choice": SCHEDULE_CHOICE,
        "final_model": {
            k: getattr(config, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "position_mode",
            )
        },
        "summary": summary,
        "runs": results,
    }
    with open(os.path.join(folder, "compound_grow.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in (
        (axes[0], "cpu_s", "training process CPU time (s)"),
        (axes[1], "wall_s", "training wall-clock (s)"),
    ):
        for name, _, _ in plan:
            curve = results[name]["curve"]
            (line,) = ax.plot(
                [c[key] for c in curve],
                [c["held_out_loss"] for c in curve],
                ".-",
                markersize=3,
                label=name,
            )
            for event in results[name]["growth_events"]:
                at = [c[key] for c in curve if c["step"] >= event["step"]]
                if at:
                    ax.axvline(at[0], color=line.get_color(), linestyle="--", linewidth=0.8)
                    ax.annotate(
                        f"{name}: {event['growth']}",
                        (at[0], 1.0),
                        xycoords=("data", "axes fraction"),
                        fontsize=6,
                        rotation=90,
                        va="top",
                        ha="right",
                    )
        ax.axhline(
            target, color="black", linewidth=0.6, linestyle=":", label="baseline final held-out"
        )
        ax.set_xlabel(label)
        ax.set_ylabel("held-out MLM loss")
        ax.set_ylim(
            top=min(8.5, max(c["held_out_loss"] for r in results.values() for c in r["curve"]))
        )
        ax.legend(fontsize=7)
    fig.suptitle(f"CompoundGrow vs baseline ({args.steps} steps), CPU (shared, loaded), {sha}")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "loss_vs_time.png"), dpi=100)
    plt.close(fig)
    print("wrote", folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
