"""Peak memory of the data side on a corpus of a given size: does it grow with the corpus?

    python scripts/corpus_memory.py --mb 100 --num-proc 2 --work /tmp/corpus_mem

Builds a corpus of ``--mb`` MB from real text on this machine by repetition (the license texts in
/usr/share/common-licenses and the plain-text files under /usr/share/doc, a blank line between documents), then runs
what ``effbert pretrain`` runs on it: ``train_wordpiece`` on the first ``--train-mb`` MB of it (a vocabulary needs a
sample, not every repetition), ``load_corpus`` (``--num-proc``
processes), ``pack``, ``count_words`` + ``rare_words`` + ``rare_word_table``, and the collator over
``--batches`` batches. It prints one JSON line: the time of each stage, the fill rate, and peak memory:

- ``peak_pss_mb``: the most memory this process and its worker processes use together, sampled every 50 ms as the
  sum of their proportional set sizes (a page shared by k processes counts 1/k in each: the worker processes share
  the parent's imported libraries and map the same Arrow files), all pages included;
- ``peak_pss_anon_mb``: the same for anonymous memory only (heap, Python objects: what does not come back when the
  kernel needs memory); the rest is clean file pages of the memory-mapped Arrow cache and of the libraries, which
  the kernel drops under pressure;
- ``peak_rss_mb`` / ``peak_anon_mb``: the same sums with RSS, which counts a shared page once per process;
- ``maxrss_self_mb`` / ``maxrss_children_mb``: ``getrusage``'s peak RSS of this process / of the largest worker.

The corpus and the cache are deleted at the end unless ``--keep``.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time

import psutil


def real_texts(max_file_bytes=1 << 20):
    """Documents of real English text found on the machine, each a string of lines (no blank line inside)."""
    roots = ["/usr/share/common-licenses", "/usr/share/doc"]
    docs = []
    for root in roots:
        for folder, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                path = os.path.join(folder, name)
                if (
                    name.endswith((".gz", ".bz2", ".xz", ".zip", ".png", ".jpg", ".gif", ".pdf"))
                    or os.path.islink(path)
                    or not 200 <= os.path.getsize(path) <= max_file_bytes
                ):
                    continue
                try:
                    with open(path, "rb") as f:
                        raw = f.read()
                    text = raw.decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                if "\0" in text:
                    continue
                # each paragraph of the file is a document; lines stay lines
                for para in text.split("\n\n"):
                    lines = [ln.strip() for ln in para.split("\n") if ln.strip()]
                    if sum(len(ln) for ln in lines) >= 80:
                        docs.append("\n".join(lines))
    return docs


def build_corpus(path, mb):
    docs = real_texts()
    if not docs:
        sys.exit("no real text found under /usr/share/common-licenses or /usr/share/doc")
    unique = sum(len(d.encode()) + 2 for d in docs)
    target = mb * 1_000_000
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for d in docs:
                block = d + "\n\n"
                f.write(block)
                written += len(block.encode())
                if written >= target:
                    break
    return {
        "documents": len(docs),
        "unique_text_mb": round(unique / 1e6, 2),
        "corpus_mb": round(written / 1e6, 1),
    }


class PeakMemory:
    """Samples the RSS and the anonymous RSS of this process and its children every ``interval`` seconds."""

    def __init__(self, interval=0.05):
        self.interval = interval
        self.peak_rss = self.peak_anon = self.peak_pss = self.peak_pss_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _fields(pid, path, names):
        got = dict.fromkeys(names, 0)
        try:
            with open(f"/proc/{pid}/{path}") as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in got:
                        got[key] = int(line.split()[1]) * 1024
        except OSError:
            pass
        return got

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = dict.fromkeys(("VmRSS", "RssAnon", "Pss", "Pss_Anon"), 0)
            for p in [me] + me.children(recursive=True):
                for path, names in (
                    ("status", ("VmRSS", "RssAnon")),
                    ("smaps_rollup", ("Pss", "Pss_Anon")),
                ):
                    for k, v in self._fields(p.pid, path, names).items():
                        total[k] += v
            self.peak_rss = max(self.peak_rss, total["VmRSS"])
            self.peak_anon = max(self.peak_anon, total["RssAnon"])
            self.peak_pss = max(self.peak_pss, total["Pss"])
            self.peak_pss_anon = max(self.peak_pss_anon, total["Pss_Anon"])
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def note(self, stage, seconds):
        """One progress line, so a run cut short still tells what it measured."""
        print(
            json.dumps({"stage": stage, "s": round(seconds, 1), **self.peaks()}),
            file=sys.stderr,
            flush=True,
        )

    def peaks(self):
        return {
            "peak_pss_mb": round(self.peak_pss / 2**20),
            "peak_pss_anon_mb": round(self.peak_pss_anon / 2**20),
            "peak_rss_mb": round(self.peak_rss / 2**20),
            "peak_anon_mb": round(self.peak_anon / 2**20),
        }

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=100, help="corpus size in MB (default 100)")
    p.add_argument("--num-proc", type=int, default=2, help="tokenization processes (default 2)")
    p.add_argument(
        "--max-length",
        type=int,
        default=128,
        help="pieces per text and per packed row (default 128)",
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
        "--batches", type=int, default=200, help="collator batches of 32 rows (default 200)"
    )
    p.add_argument(
        "--work", default="/tmp/effbert_corpus_memory", help="folder for the corpus and the cache"
    )
    p.add_argument("--keep", action="store_true", help="keep the corpus and the cache")
    a = p.parse_args()

    import datasets

    from effbert.data.collator import DataCollatorForTupeMLM
    from effbert.data.corpus import count_words, load_corpus, rare_word_table, rare_words
    from effbert.data.packing import pack
    from effbert.data.tokenization import train_wordpiece

    datasets.disable_progress_bars()
    os.makedirs(a.work, exist_ok=True)
    corpus, cache = (
        os.path.join(a.work, f"corpus_{a.mb}mb.txt"),
        os.path.join(a.work, f"cache_{a.mb}mb"),
    )
    shutil.rmtree(cache, ignore_errors=True)
    result = {"mb": a.mb, "num_proc": a.num_proc, "max_length": a.max_length}
    t = time.perf_counter()
    result.update(build_corpus(corpus, a.mb))
    result["build_s"] = round(time.perf_counter() - t, 1)
    try:
        with PeakMemory() as mem:
            stages = {}
            t = time.perf_counter()
            sample = os.path.join(a.work, "sample.txt")
            with open(corpus, "rb") as src, open(sample, "wb") as dst:
                dst.write(src.read(a.train_mb * 1_000_000).rsplit(b"\n", 1)[0] + b"\n")
            tok = train_wordpiece([sample], vocab_size=a.vocab_size)
            os.remove(sample)
            stages["train_wordpiece_s"] = time.perf_counter() - t
            mem.note("train_wordpiece", stages["train_wordpiece_s"])
            t = time.perf_counter()
            ds = load_corpus([corpus], tok, a.max_length, num_proc=a.num_proc, cache_dir=cache)
            stages["load_corpus_s"] = time.perf_counter() - t
            mem.note("load_corpus", stages["load_corpus_s"])
            t = time.perf_counter()
            packed = pack(ds, a.max_length, num_proc=a.num_proc)
            stages["pack_s"] = time.perf_counter() - t
            mem.note("pack", stages["pack_s"])
            t = time.perf_counter()
            counts = count_words(packed.dataset, tok)
            words = rare_words(counts, tok, 100, 500)
            table = rare_word_table(words, tok)
            stages["count_words_s"] = time.perf_counter() - t
            mem.note("count_words", stages["count_words_s"])
            t = time.perf_counter()
            collator = DataCollatorForTupeMLM(tok, rare_words=table, seed=0)
            n = len(packed.dataset)
            for b in range(a.batches):
                lo = (b * 7919 * 32) % max(1, n - 32)
                collator([packed.dataset[i] for i in range(lo, min(n, lo + 32))])
            stages["collator_s"] = time.perf_counter() - t
            mem.note("collator", stages["collator_s"])
        usage_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        usage_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        result.update({k: round(v, 1) for k, v in stages.items()})
        result.update(
            {
                "texts": packed.texts,
                "rows": packed.rows,
                "tokens": packed.tokens,
                "fill_rate": round(packed.fill_rate, 4),
                "unpacked_fill_rate": round(packed.unpacked_fill_rate, 4),
                "distinct_words": len(counts),
                "rare_words": len(table),
                **mem.peaks(),
                "maxrss_self_mb": round(usage_self / 1024),
                "maxrss_children_mb": round(usage_children / 1024),
            }
        )
    finally:
        if not a.keep:
            shutil.rmtree(cache, ignore_errors=True)
            os.remove(corpus)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
