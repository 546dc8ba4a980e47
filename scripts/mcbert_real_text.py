"""A short MC-BERT pretraining run on real text on the CPU, its held-out multi-choice test against chance, and a
fine-tuning run started from it.

    python scripts/mcbert_real_text.py --work /tmp/mcbert-run            # about 7 minutes on two CPU cores

The corpus is this machine's own prose: the paragraphs of the licence texts in /usr/share/common-licenses and of
the packages' /usr/share/doc/*/copyright files (distinct paragraphs of at least 8 words, shuffled with seed 0; 5%
held out). Steps:

1. ``effbert pretrain --objective mcbert`` on the training paragraphs (the command line is printed);
2. the multi-choice test on the held-out paragraphs with the run's last checkpoint (its controller draws the
   candidates, 15% of the word pieces masked with [MASK] as the published MC-BERT task does), next to the same
   test for the same model before training and to trivial rules: 1/K, always the reject option, always slot 1
   (where the original sits at a replaced token: a rule no content scorer can follow, given for scale) and a
   uniform pick among the distinct non-reject candidates (the chance level of the cloze part);
3. ``effbert finetune --init`` from the run on a two-class task made from the same texts (is a paragraph of
   /usr/share/common-licenses from a GNU licence or from another one), next to the dev set's majority class.

``--bert-masking`` trains with BERT's 80/10/10 instead of the published all-[MASK] masking (the held-out test stays
the published task), for comparison.
"""

import argparse
import glob
import json
import os
import random
import re
import subprocess
import sys

PRETRAIN = [
    "--vocab-size",
    "800",
    "--layers",
    "2",
    "--hidden",
    "96",
    "--heads",
    "6",
    "--max-seq-length",
    "64",
    "--max-steps",
    "1200",
    "--batch-size",
    "32",
    "--learning-rate",
    "1e-3",
    "--warmup-steps",
    "100",
    "--dropout",
    "0",
    "--objective",
    "mcbert",
    "--logging-steps",
    "100",
    "--save-steps",
    "400",
    "--device",
    "cpu",
    "--quiet",
]


def paragraphs():
    """Distinct paragraphs (>= 8 words, mostly letters) of the licence and copyright texts, in file order."""
    files = sorted(glob.glob("/usr/share/common-licenses/*")) + sorted(
        glob.glob("/usr/share/doc/*/copyright")
    )
    seen, out = set(), []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if (
                len(para.split()) >= 8
                and sum(c.isalpha() for c in para) > 0.6 * len(para)
                and para not in seen
            ):
                seen.add(para)
                out.append((path, para))
    return out


def run(cmd, env):
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def load_run(run_dir):
    """``(trained, initial, tokenizer)``: the MC-BERT model of the run's last ``checkpoint-N`` folder (the controller
    included), the same model with the run's initial weights (its seed), and the run's ``BertTokenizerFast``."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from effbert.models import TupeBertForMultiChoicePretraining, load_pretrained
    from effbert.models.loading import CHECKPOINT_DIR, RUN_FILE
    from effbert.nn import NoteDictionary
    from effbert.training.run_folder import checkpoints

    transformers.utils.logging.disable_progress_bar()  # a printed table, no loading bars
    mlm, tokenizer, table = load_pretrained(
        run_dir, backend="eager"
    )  # config, tokenizer, rare words
    config = mlm.config
    with open(os.path.join(run_dir, RUN_FILE), encoding="utf-8") as f:
        settings = json.load(f)["settings"]
    ckpts = checkpoints(os.path.join(run_dir, CHECKPOINT_DIR))
    if not ckpts:
        raise FileNotFoundError(
            f"{run_dir!r} holds no checkpoints/checkpoint-N folder (run it with --save-steps > 0)"
        )

    def build():  # as effbert pretrain builds it: the run's initial weights
        torch.manual_seed(settings["seed"])
        notes = (
            NoteDictionary(
                len(table),
                config.hidden_size,
                window=settings["tnf_window"],
                gamma=settings["tnf_gamma"],
                lam=settings["tnf_lam"],
            )
            if table is not None
            else None
        )
        model = TupeBertForMultiChoicePretraining(
            config, note_dictionary=notes, mask_token_id=tokenizer.mask_token_id
        )
        return model.set_backend("eager")

    trained, initial = build(), build()
    trained.load_state_dict(load_file(os.path.join(ckpts[-1], "model.safetensors")))
    return trained.eval(), initial.eval(), tokenizer


KEYS = (
    "mc_accuracy",
    "mc_replaced_accuracy",
    "mc_choice_accuracy",
    "mc_choice_chance",
    "replaced_fraction",
    "mlm_loss",
    "mc_loss",
)


def held_out_test(run_dir, lines, seeds=(0, 1, 2, 3), batch=64):
    """The multi-choice test of the run's last checkpoint (and of its initial weights) on ``lines``: a dict
    ``{"trained": {metric: value}, "initial": {...}}``, each metric the mean over the tokens it is defined on."""
    import torch

    trained, initial, tokenizer = load_run(run_dir)
    enc = tokenizer(
        lines,
        truncation=True,
        max_length=trained.config.max_position_embeddings,
        padding=True,
        return_tensors="pt",
    )
    ids, attention = enc["input_ids"], enc["attention_mask"].bool()
    special = torch.zeros(len(tokenizer), dtype=torch.bool)
    special[tokenizer.all_special_ids] = True
    results = {}
    for name, model in (("trained", trained), ("initial", initial)):
        sums, weights = dict.fromkeys(KEYS, 0.0), dict.fromkeys(KEYS, 0.0)
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            for start in range(0, ids.shape[0], batch):
                x, real = ids[start : start + batch].clone(), attention[start : start + batch]
                target = real & ~special[x] & (torch.rand(x.shape, generator=gen) < 0.15)
                labels = torch.where(target, x, torch.full_like(x, -100))
                x[target] = (
                    tokenizer.mask_token_id
                )  # the published task masks every target with [MASK]
                torch.manual_seed(seed * 100003 + start)  # the controller's draws
                with torch.no_grad():
                    out = model(input_ids=x, attention_mask=real.long(), labels=labels)
                tokens = int(real.sum())
                replaced = float(out.replaced_fraction) * tokens
                for k in KEYS:  # each metric weighed by the tokens it is a mean over
                    w = (
                        replaced
                        if k in ("mc_replaced_accuracy", "mc_choice_accuracy", "mc_choice_chance")
                        else int(target.sum())
                        if k == "mlm_loss"
                        else tokens
                    )
                    sums[k] += float(getattr(out, k)) * w
                    weights[k] += w
        results[name] = {k: sums[k] / max(weights[k], 1e-9) for k in KEYS}
    return results


def read_log(run_dir):
    """The run's ``log.jsonl`` records, and the table of them as printed."""
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
        log = [json.loads(line) for line in f if line.strip()]
    rows = [" step   mlm loss  mc loss  mc acc  replaced acc  cloze acc  cloze chance  replaced"]
    rows += [
        f"{r['step']:5d}  {r['mlm_loss']:8.4f}  {r['mc_loss']:7.4f}  {r['mc_accuracy']:6.3f}  "
        f"{r['mc_replaced_accuracy']:12.3f}  {r['mc_choice_accuracy']:9.3f}  {r['mc_choice_chance']:12.3f}  "
        f"{r['replaced_fraction']:8.3f}"
        for r in log
    ]
    return log, "\n".join(rows)


def table(res, n_held, seeds=4, k=10):
    """The held-out test beside the trivial rules, as printed."""
    t, i = res["trained"], res["initial"]
    rep = t["replaced_fraction"]
    return "\n".join(
        [
            f"held-out multi-choice test ({n_held} paragraphs, {seeds} maskings; replaced: {100 * rep:.1f}% of tokens)",
            "                                    all tokens  replaced tokens  cloze part (original vs other draws)",
            f"  trained model                       {t['mc_accuracy']:.3f}        {t['mc_replaced_accuracy']:.3f}"
            f"            {t['mc_choice_accuracy']:.3f}",
            f"  the same model before training      {i['mc_accuracy']:.3f}        {i['mc_replaced_accuracy']:.3f}"
            f"            {i['mc_choice_accuracy']:.3f}",
            f"  1/K                                 {1 / k:.3f}        {1 / k:.3f}            {1 / (k - 1):.3f}",
            f"  always reject                       {1 - rep:.3f}        0.000            -",
            f"  always slot 1                       {rep:.3f}        1.000            1.000",
            f"  uniform among distinct candidates   -            -                {t['mc_choice_chance']:.3f}",
            f"  held-out losses: mlm {t['mlm_loss']:.4f} (before {i['mlm_loss']:.4f}), multi-choice "
            f"{t['mc_loss']:.4f} (before {i['mc_loss']:.4f})",
        ]
    )


def finetune_data(paras, work):
    """GNU licence paragraphs of /usr/share/common-licenses against the other licences' ones: ``ft_train.tsv`` and
    ``ft_dev.tsv`` in ``work`` (label<TAB>text); returns the dev labels."""
    rows = [
        ("gnu" if re.search(r"/L?GPL|/GFDL", path) else "other") + "\t" + para
        for path, para in paras
        if path.startswith("/usr/share/common-licenses/")
    ]
    random.Random(1).shuffle(rows)
    cut = len(rows) * 4 // 5
    for name, part in (("ft_train.tsv", rows[:cut]), ("ft_dev.tsv", rows[cut:])):
        with open(os.path.join(work, name), "w", encoding="utf-8") as f:
            f.write("".join(r + "\n" for r in part))
    return [r.split("\t", 1)[0] for r in rows[cut:]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="a folder for the corpus, the runs and their logs")
    p.add_argument("--steps", default=None, help="pretraining steps (default 1200)")
    p.add_argument(
        "--bert-masking",
        action="store_true",
        help="train with BERT's 80/10/10 masking instead of the "
        "published all-[MASK] (the run goes to WORK/mcbert-801010)",
    )
    a = p.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    env = dict(
        os.environ, OMP_NUM_THREADS="1"
    )  # tiny models: one thread a process is the fastest on shared cores

    paras = paragraphs()
    random.Random(0).shuffle(paras)
    n_held = len(paras) // 20
    held, train = paras[:n_held], paras[n_held:]
    corpus = os.path.join(a.work, "train.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("".join(p + "\n" for _, p in train))
    print(f"{len(paras)} paragraphs: {len(train)} to train on, {len(held)} held out")

    run_dir = os.path.join(a.work, "mcbert-801010" if a.bert_masking else "mcbert")
    args = list(PRETRAIN) + (
        ["--mask-replace-prob", "0.8", "--random-replace-prob", "0.1"] if a.bert_masking else []
    )
    if a.steps:
        args[args.index("--max-steps") + 1] = a.steps
    if not os.path.isfile(os.path.join(run_dir, "model.safetensors")):
        run(
            [
                sys.executable,
                "-m",
                "effbert.commands",
                "pretrain",
                "--data",
                corpus,
                "--out",
                run_dir,
                *args,
            ],
            env,
        )
    print("\ntraining log (means over each window of steps):")
    print(read_log(run_dir)[1])

    import torch

    torch.set_num_threads(1)
    print()
    print(table(held_out_test(run_dir, [p for _, p in held]), len(held)))

    # fine-tuning from the run: GNU licence paragraphs against the other licences' ones
    dev = finetune_data(paras, a.work)
    ft_dir = os.path.join(a.work, "finetune-801010" if a.bert_masking else "finetune")
    if not os.path.isdir(ft_dir):
        run(
            [
                sys.executable,
                "-m",
                "effbert.commands",
                "finetune",
                "--init",
                run_dir,
                "--train",
                os.path.join(a.work, "ft_train.tsv"),
                "--eval",
                os.path.join(a.work, "ft_dev.tsv"),
                "--out",
                ft_dir,
                "--num-train-epochs",
                "5",
                "--learning-rate",
                "1e-3",
                "--per-device-train-batch-size",
                "16",
                "--device",
                "cpu",
                "--quiet",
            ],
            env,
        )
    majority = max(dev.count(c) for c in set(dev)) / len(dev)
    print(f"(the majority class of the {len(dev)} dev paragraphs: {majority:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
