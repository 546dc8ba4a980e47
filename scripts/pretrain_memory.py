"""Peak memory of the real ``effbert pretrain`` command on a corpus of a given size: does it grow with the corpus?

    python scripts/pretrain_memory.py --mb 100 --work /tmp/pretrain_mem -- --max-steps 10 --layers 2 ...

Builds an ``--mb`` MB corpus from the real text on this machine by repetition (``corpus_memory.build_corpus``;
kept and reused when ``--work`` already holds it), trains a WordPiece vocabulary on its first ``--train-mb`` MB
(``--vocab`` for the command, so the vocabulary is the same for every corpus size), then runs
``effbert pretrain --data CORPUS --vocab VOCAB --out OUT --max-seq-length 128 --num-proc 2
--cache-dir CACHE --device cpu --backend eager`` plus the arguments after ``--`` as a child process,
and samples the child's process tree every
``--interval`` seconds (100 ms). It prints one JSON line with, over the run:

- ``peak_rss_mb`` / ``peak_anon_mb`` / ``peak_pss_mb``: the largest sum over the process tree of VmRSS, RssAnon
  (``/proc/PID/status``) and Pss (``/proc/PID/smaps_rollup``; a page shared by k processes counts 1/k in each);
- ``main_peak_rss_mb`` / ``main_peak_anon_mb``: the same for the command's own process alone, and
  ``main_vmhwm_mb``: its VmHWM (the kernel's peak RSS, read at the last sample);
- ``main_peak_anon_training_mb``: the command's anonymous peak once it has printed its ``pretraining a ...`` line
  (the data is tokenized, counted and packed; the Trainer runs);
- ``stage_at_main_anon_peak``: the last line the command had printed when its anonymous peak was sampled.

RSS counts the clean pages of the memory-mapped Arrow cache the process has touched (reclaimable: the kernel drops
them under pressure); RssAnon is what the process holds itself (heap, Python objects, tensors).
Progress lines (one per ``--note-every`` seconds) go to stderr so a run cut short still tells what it measured.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus_memory import build_corpus  # noqa: E402


def _fields(pid, path, names):
    got = dict.fromkeys(names, 0)
    with open(f"/proc/{pid}/{path}") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in got:
                got[key] = int(line.split()[1]) * 1024
    return got


class TreeSampler:
    """Samples a process and its descendants every ``interval`` seconds; keeps the peaks."""

    KEYS = ("VmRSS", "RssAnon", "VmHWM")

    def __init__(self, proc, interval, log_path):
        self.proc, self.interval, self.log_path = proc, interval, log_path
        self.peak = {
            "rss": 0,
            "anon": 0,
            "pss": 0,
            "main_rss": 0,
            "main_anon": 0,
            "main_vmhwm": 0,
            "procs": 0,
            "main_anon_training": 0,
        }
        self.stage_at_main_anon_peak = ""
        self.training = False  # the command printed its "pretraining a ..." line: the data is ready
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _last_line(self):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 4096))
                lines = [
                    ln
                    for ln in f.read().decode("utf-8", "replace").replace("\r", "\n").split("\n")
                    if ln.strip()
                ]
            return lines[-1].strip()[:200] if lines else ""
        except OSError:
            return ""

    def _sample(self):
        if not self.training:
            self.training = self._last_line().startswith(("pretraining a", "step", "done:"))
        try:
            procs = [self.proc] + self.proc.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        tot = {"rss": 0, "anon": 0, "pss": 0}
        for p in procs:
            try:
                st = _fields(p.pid, "status", self.KEYS)
                pss = _fields(p.pid, "smaps_rollup", ("Pss",))["Pss"]
            except (OSError, ValueError):
                continue  # the process ended between listing and reading
            tot["rss"] += st["VmRSS"]
            tot["anon"] += st["RssAnon"]
            tot["pss"] += pss
            if p.pid == self.proc.pid:
                self.peak["main_rss"] = max(self.peak["main_rss"], st["VmRSS"])
                self.peak["main_vmhwm"] = max(self.peak["main_vmhwm"], st["VmHWM"])
                if self.training:
                    self.peak["main_anon_training"] = max(
                        self.peak["main_anon_training"], st["RssAnon"]
                    )
                if st["RssAnon"] > self.peak["main_anon"]:
                    self.peak["main_anon"] = st["RssAnon"]
                    self.stage_at_main_anon_peak = self._last_line()
        for k, v in tot.items():
            self.peak[k] = max(self.peak[k], v)
        self.peak["procs"] = max(self.peak["procs"], len(procs))

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def peaks(self):
        mb = {k: round(v / 2**20) for k, v in self.peak.items() if k != "procs"}
        return {
            "peak_rss_mb": mb["rss"],
            "peak_anon_mb": mb["anon"],
            "peak_pss_mb": mb["pss"],
            "main_peak_rss_mb": mb["main_rss"],
            "main_peak_anon_mb": mb["main_anon"],
            "main_vmhwm_mb": mb["main_vmhwm"],
            "main_peak_anon_training_mb": mb["main_anon_training"],
            "max_processes": self.peak["procs"],
            "stage_at_main_anon_peak": self.stage_at_main_anon_peak,
        }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=100, help="corpus size in MB (default 100)")
    p.add_argument("--num-proc", type=int, default=2, help="tokenization processes (default 2)")
    p.add_argument(
        "--max-seq-length",
        type=int,
        default=128,
        help="--max-seq-length of the command (default 128)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=8000, help="WordPiece vocabulary (default 8000)"
    )
    p.add_argument(
        "--train-mb",
        type=int,
        default=20,
        help="MB of the corpus the vocabulary is trained on (20)",
    )
    p.add_argument(
        "--interval", type=float, default=0.1, help="seconds between samples (default 0.1)"
    )
    p.add_argument(
        "--note-every", type=float, default=60, help="seconds between progress lines (default 60)"
    )
    p.add_argument(
        "--work",
        default="/tmp/effbert_pretrain_memory",
        help="folder for the corpus, cache and run",
    )
    p.add_argument("--keep", action="store_true", help="keep the corpus and the cache")
    p.add_argument(
        "--reuse-cache",
        action="store_true",
        help="keep the tokenized cache of an earlier --keep run "
        "(measures the run after the data is ready, not the tokenization)",
    )
    p.add_argument(
        "rest", nargs=argparse.REMAINDER, help="-- then more arguments of effbert pretrain"
    )
    a = p.parse_args()
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest

    os.makedirs(a.work, exist_ok=True)
    corpus = os.path.join(a.work, f"corpus_{a.mb}mb.txt")
    cache, out = os.path.join(a.work, f"cache_{a.mb}mb"), os.path.join(a.work, f"run_{a.mb}mb")
    vocab = os.path.join(a.work, "tokenizer.json")
    log_path = os.path.join(a.work, f"log_{a.mb}mb.txt")
    result = {"mb": a.mb, "num_proc": a.num_proc, "max_len": a.max_seq_length}
    t = time.perf_counter()
    if not os.path.isfile(corpus):
        result.update(build_corpus(corpus, a.mb))
    result["corpus_mb"] = round(os.path.getsize(corpus) / 1e6, 1)
    if not os.path.isfile(vocab):
        from effbert.data.tokenization import train_wordpiece

        sample = os.path.join(a.work, "sample.txt")
        with open(corpus, "rb") as src, open(sample, "wb") as dst:
            dst.write(src.read(a.train_mb * 1_000_000).rsplit(b"\n", 1)[0] + b"\n")
        train_wordpiece([sample], vocab_size=a.vocab_size).backend_tokenizer.save(vocab)
        os.remove(sample)
    result["prepare_s"] = round(time.perf_counter() - t, 1)
    if not a.reuse_cache:
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    result["reuse_cache"] = a.reuse_cache
    cmd = [
        sys.executable,
        "-m",
        "effbert.commands",
        "pretrain",
        "--data",
        corpus,
        "--vocab",
        vocab,
        "--out",
        out,
        "--max-seq-length",
        str(a.max_seq_length),
        "--num-proc",
        str(a.num_proc),
        "--cache-dir",
        cache,
        "--device",
        "cpu",
        "--backend",
        "eager",
        *rest,
    ]
    result["command"] = " ".join(cmd[2:])
    t = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            sampler = TreeSampler(psutil.Process(proc.pid), a.interval, log_path)
            sampler.start()
            last = time.perf_counter()
            while proc.poll() is None:
                time.sleep(0.5)
                if time.perf_counter() - last >= a.note_every:
                    last = time.perf_counter()
                    print(
                        json.dumps({"s": round(last - t), **sampler.peaks()}),
                        file=sys.stderr,
                        flush=True,
                    )
            sampler.stop()
        result.update(
            {"rc": proc.returncode, "run_s": round(time.perf_counter() - t, 1), **sampler.peaks()}
        )
        with open(log_path) as f:
            result["last_lines"] = [ln.strip() for ln in f.read().splitlines() if ln.strip()][-3:]
    finally:
        if not a.keep:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            if os.path.exists(corpus):
                os.remove(corpus)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
