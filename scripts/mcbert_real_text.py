"""A short MC-BERT pretraining run on real text on the CPU, its held-out multi-choice test against chance, and a
fine-tuning run started from it.

    python scripts/mcbert_real_text.py --work /tmp/mcbert-run            # about 15 minutes on two CPU cores

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
"""

import argparse
import glob
import json
import os
import random
import re
import subprocess
import sys

PRETRAIN = ["--vocab-size", "800", "--layers", "2", "--hidden", "96", "--heads", "6", "--max-len", "64",
            "--steps", "1200", "--batch-size", "32", "--lr", "1e-3", "--warmup", "100", "--dropout", "0",
            "--objective", "mcbert", "--log-every", "100", "--save-every", "400", "--device", "cpu", "--quiet"]


def paragraphs():
    """Distinct paragraphs (>= 8 words, mostly letters) of the licence and copyright texts, in file order."""
    files = sorted(glob.glob("/usr/share/common-licenses/*")) + sorted(glob.glob("/usr/share/doc/*/copyright"))
    seen, out = set(), []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para.split()) >= 8 and sum(c.isalpha() for c in para) > 0.6 * len(para) and para not in seen:
                seen.add(para)
                out.append((path, para))
    return out


def run(cmd, env):
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def held_out_test(run_dir, lines, seeds=(0, 1, 2, 3), batch=64):
    """The multi-choice test of the run's last checkpoint (and of its initial weights) on ``lines``."""
    import torch

    from effbert.commands import pretrain
    from effbert.models import TupeBertForMultiChoicePretraining
    from effbert.nn import NoteDictionary

    mlm, tokenizer, table = pretrain.load_pretrained(run_dir, backend="eager")
    config = mlm.config
    state = pretrain.read_weights(pretrain.checkpoints(run_dir)[-1], "model")
    with open(os.path.join(run_dir, pretrain.RUN_FILE), encoding="utf-8") as f:
        settings = json.load(f)["settings"]

    def build():
        notes = (NoteDictionary(len(table), config.hidden_size, window=settings["tnf_window"],
                                gamma=settings["tnf_gamma"], lam=settings["tnf_lam"]) if table is not None else None)
        torch.manual_seed(settings["seed"])  # the run's initial weights
        return TupeBertForMultiChoicePretraining(config, note_dictionary=notes, mask_token_id=tokenizer.mask_id)

    trained, initial = build(), build()
    trained.load_state_dict(state)
    ids, lengths = tokenizer.encode_batch(lines, config.max_position_embeddings)
    special = torch.zeros(len(tokenizer), dtype=torch.bool)
    special[[tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id]] = True
    keys = ("mc_accuracy", "mc_replaced_accuracy", "mc_choice_accuracy", "mc_choice_chance", "replaced_fraction",
            "mlm_loss", "mc_loss")
    results = {}
    for name, model in (("trained", trained), ("initial", initial)):
        model.eval()
        sums, weights = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0.0)
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            for start in range(0, ids.shape[0], batch):
                x, n = ids[start:start + batch].clone(), lengths[start:start + batch]
                real = torch.arange(x.shape[1])[None] < n[:, None]
                target = real & ~special[x] & (torch.rand(x.shape, generator=gen) < 0.15)
                labels = torch.where(target, x, torch.full_like(x, -100))
                x[target] = tokenizer.mask_id  # the published task masks every target with [MASK]
                torch.manual_seed(seed * 100003 + start)  # the controller's draws
                with torch.no_grad():
                    out = model(x, real, labels=labels)
                tokens = int(real.sum())
                replaced = float(out.replaced_fraction) * tokens
                for k in keys:  # each metric weighed by the tokens it is a mean over
                    w = (replaced if k in ("mc_replaced_accuracy", "mc_choice_accuracy", "mc_choice_chance") else
                         int(target.sum()) if k == "mlm_loss" else tokens)
                    sums[k] += float(getattr(out, k)) * w
                    weights[k] += w
        results[name] = {k: sums[k] / max(weights[k], 1e-9) for k in keys}
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="a folder for the corpus, the runs and their logs")
    p.add_argument("--steps", default=None, help="pretraining steps (default 1200)")
    a = p.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: one thread a process is the fastest on shared cores

    paras = paragraphs()
    random.Random(0).shuffle(paras)
    n_held = len(paras) // 20
    held, train = paras[:n_held], paras[n_held:]
    corpus = os.path.join(a.work, "train.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("".join(p + "\n" for _, p in train))
    print(f"{len(paras)} paragraphs: {len(train)} to train on, {len(held)} held out")

    run_dir = os.path.join(a.work, "mcbert")
    args = list(PRETRAIN)
    if a.steps:
        args[args.index("--steps") + 1] = a.steps
    if not os.path.isfile(os.path.join(run_dir, "model.pt")):
        run([sys.executable, "-m", "effbert.commands", "pretrain", "--data", corpus, "--out", run_dir, *args], env)
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
        log = [json.loads(line) for line in f]
    print("\ntraining log (means over each window of steps):")
    print(" step   mlm loss  mc loss  mc acc  replaced acc  replaced")
    for r in log:
        print(f"{r['step']:5d}  {r['mlm_loss']:8.4f}  {r['mc_loss']:7.4f}  {r['mc_accuracy']:6.3f}  "
              f"{r['mc_replaced_accuracy']:12.3f}  {r['replaced_fraction']:8.3f}")

    import torch

    torch.set_num_threads(1)
    res = held_out_test(run_dir, [p for _, p in held])
    t, i = res["trained"], res["initial"]
    k = 10
    rep = t["replaced_fraction"]
    print(f"\nheld-out multi-choice test ({len(held)} paragraphs, 4 maskings; replaced: {100 * rep:.1f}% of tokens)")
    print("                                    all tokens  replaced tokens  cloze part (original vs other draws)")
    print(f"  trained model                       {t['mc_accuracy']:.3f}        {t['mc_replaced_accuracy']:.3f}"
          f"            {t['mc_choice_accuracy']:.3f}")
    print(f"  the same model before training      {i['mc_accuracy']:.3f}        {i['mc_replaced_accuracy']:.3f}"
          f"            {i['mc_choice_accuracy']:.3f}")
    print(f"  1/K                                 {1 / k:.3f}        {1 / k:.3f}            {1 / (k - 1):.3f}")
    print(f"  always reject                       {1 - rep:.3f}        0.000            -")
    print(f"  always slot 1                       {rep:.3f}        1.000            1.000")
    print(f"  uniform among distinct candidates   -            -                {t['mc_choice_chance']:.3f}")
    print(f"  held-out losses: mlm {t['mlm_loss']:.4f} (before {i['mlm_loss']:.4f}), multi-choice "
          f"{t['mc_loss']:.4f} (before {i['mc_loss']:.4f})")

    # fine-tuning from the run: GNU licence paragraphs against the other licences' ones
    rows = [("gnu" if re.search(r"/L?GPL|/GFDL", path) else "other") + "\t" + para
            for path, para in paras if path.startswith("/usr/share/common-licenses/")]
    random.Random(1).shuffle(rows)
    cut = len(rows) * 4 // 5
    for name, part in (("ft_train.tsv", rows[:cut]), ("ft_dev.tsv", rows[cut:])):
        with open(os.path.join(a.work, name), "w", encoding="utf-8") as f:
            f.write("".join(r + "\n" for r in part))
    ft_dir = os.path.join(a.work, "finetune")
    if not os.path.isdir(ft_dir):
        run([sys.executable, "-m", "effbert.commands", "finetune", "--init", run_dir,
             "--train", os.path.join(a.work, "ft_train.tsv"), "--eval", os.path.join(a.work, "ft_dev.tsv"),
             "--out", ft_dir, "--epochs", "5", "--lr", "1e-3", "--batch-size", "16", "--device", "cpu", "--quiet"], env)
    dev = [r.split("\t", 1)[0] for r in rows[cut:]]
    majority = max(dev.count(c) for c in set(dev)) / len(dev)
    print(f"(the majority class of the {len(dev)} dev paragraphs: {majority:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
