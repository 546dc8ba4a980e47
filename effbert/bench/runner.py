"""Suite runner: ceilings, correctness check, timing, table, JSON / Markdown / PNG, comparison with an older run.

(run through ``effbert bench``: effbert.commands.bench parses, effbert.bench.suite runs)
effbert bench --index benchmarks/results     # regenerate benchmarks/RESULTS.md from the committed runs
"""

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from . import timing
from .case import check_output

# modules of effbert.bench that contribute cases
FAMILIES = (
    "early_exit",
    "token_exit",
    "train_step",
    "train_step_padding",
    "train_step_transformers",
    "tupe_attention",
    "notes",
    "mc_bert",
    "cpu_inference",
)


def environment(device):
    import effbert

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_type": device.type,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "effbert": effbert.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        # the 1, 5 and 15-minute load averages when the run started: other work on the machine while it timed
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            sm_count=props.multi_processor_count,
            l2_bytes=props.L2_cache_size,
            capability=f"{props.major}.{props.minor}",
            driver=_driver_version(),
        )
    return env


def _git_commit(root=None):
    """The commit under test: ``EFFBERT_COMMIT`` when set (a copy of the tree without its .git: the GPU suite passes
    it in), else git's HEAD of ``root`` (default: the checkout effbert was imported from) with "+dirty" for
    uncommitted changes, when ``root`` has a .git of its own (not a repository above it, which an installed copy
    may sit in); else None."""
    if os.environ.get("EFFBERT_COMMIT"):
        return os.environ["EFFBERT_COMMIT"]
    here = Path(__file__).resolve().parents[2] if root is None else Path(root)
    if not here.is_dir():
        raise ValueError(f"root must be an existing folder, got {str(root)!r}")
    if not (here / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def short_commit(root=None):
    """The first 7 characters of ``_git_commit(root)`` (the commit a result folder is named and
    recorded with), or ``"nogit"``."""
    return (_git_commit(root) or "nogit")[:7]


def new_result_folder(kind, out=None, root=None):
    """The folder a real-task script writes its results into, created now: ``out`` when given,
    else ``benchmarks/results/<UTC %Y-%m-%dT%H%MZ>_CPU_<commit>_<kind>`` under ``root`` (the
    checkout; default the one effbert was imported from), ``<commit>`` its ``short_commit``.
    Returns a ``Path``. Raises ``FileExistsError`` when the
    folder exists (a run never writes into another run's folder, even one started the same
    minute) and ``ValueError`` for a ``kind`` that is not a plain name."""
    if not isinstance(kind, str) or not re.fullmatch(r"[A-Za-z0-9_]+", kind):
        raise ValueError(f"kind must be a plain name (letters, digits, _), got {kind!r}")
    if out is None:
        root = Path(__file__).resolve().parents[2] if root is None else Path(root)
        commit = short_commit(root)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H%MZ")
        out = root / "benchmarks" / "results" / f"{stamp}_CPU_{commit}_{kind}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    return out


def _driver_version():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return (
            out.stdout.strip().splitlines()[0]
            if out.returncode == 0 and out.stdout.strip()
            else None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def collect_cases(device, quick, only=None):
    """Every family's cases; ``only``: an op or family name, or several joined by commas."""
    import importlib

    names = None if only is None else {n.strip() for n in only.split(",")}
    cases = []
    for family in FAMILIES:
        module = importlib.import_module(f"effbert.bench.{family}")
        cases += [
            c
            for c in module.cases(device, quick)
            if names is None or c.op in names or family in names
        ]
    return cases


def _prepare(case, device):
    """A case's row so far and its timed step (rotating its input sets), or ``(row, None)`` when the row is
    settled already: skipped, wrong, or raised before timing."""
    row = {
        "op": case.op,
        "shape": case.shape,
        "params": dict(case.params),
        "dtype": case.dtype,
        "mode": case.mode,
        "provider": case.provider,
        "key": case.key,
        "bytes": case.bytes,
        "flops": case.flops,
        "baseline": case.baseline,
    }
    if case.skip_reasons:
        row.update(status="skipped", reason="; ".join(case.skip_reasons))
        return row, None
    try:
        first = case.make_inputs()
        if case.check:
            fields, problem = check_output(case, first)
            row.update(fields)
            if problem is not None:
                row.update(status="wrong", reason=f"{problem}; not timed")
                return row, None
        sets = [first] + [
            case.make_inputs() for _ in range(timing.rotation_count(case.bytes, device) - 1)
        ]
    except (
        Exception
    ) as exc:  # a provider that breaks is reported in the table, not fatal to the run
        return _error(row, exc), None
    row["input_sets"] = len(sets)
    state = {"i": 0}

    def step():
        inputs = sets[state["i"] % len(sets)]
        state["i"] += 1
        return case.fn(*inputs)

    return row, step


def _error(row, exc):
    row.update(
        status="error",
        reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
    )
    return row


def _finish(case, row, ceilings):
    """A timed row's figures beyond its time: note, tokens/s, rates and floor."""
    # a case that sets itself up lazily (in make_inputs) knows its FLOPs and note only now
    row["flops"] = case.flops
    note = case.note
    if "max_abs_diff" in row:
        note = "; ".join(
            filter(None, [note, f"max abs diff {row['max_abs_diff']:.1e} (<= {case.atol:g})"])
        )
    if "min_cosine" in row:
        note = "; ".join(
            filter(
                None,
                [note, f"cosine >= {row['min_cosine']:.4f} per token (>= {case.min_cosine:g})"],
            )
        )
    if row.get("noisy"):
        note = "; ".join(filter(None, [note, f"NOISY: rounds spread {row['spread']:.2f}x"]))
    if note:
        row["note"] = note
    if case.ratio_target:
        row["ratio_target"] = case.ratio_target
    if case.tokens:
        row["tokens_per_s"] = case.tokens / row["ms"] * 1e3
    row.update(
        row_rates(
            row["ms"],
            case.flops,
            case.bytes,
            ceilings,
            case.dtype,
            case.work_flops,
            case.work_bytes,
        )
    )
    return row


def run_case(case, device, ceilings, quick):
    """One case timed on its own (the GPU path: ``triton.testing.do_bench``, twice)."""
    row, step = _prepare(case, device)
    if step is None:
        return row
    try:
        # Two independent timings: their disagreement is the noise a later --compare must see past.
        ms_a, spread, n = timing.time_fn(step, device, quick=quick)
        ms_b, _, _ = timing.time_fn(step, device, quick=quick)
    except Exception as exc:
        return _error(row, exc)
    ms = min(ms_a, ms_b)
    row.update(status="ok", ms=ms, noise=abs(ms_a - ms_b) / ms, spread=spread, samples=n)
    return _finish(case, row, ceilings)


def group_key(case):
    return case.op, case.shape, case.dtype, case.mode


def groups(cases):
    """Consecutive cases of one (op, shape, dtype, mode): the providers timed against each other."""
    out = []
    for case in cases:
        if out and group_key(out[-1][0]) == group_key(case):
            out[-1].append(case)
        else:
            out.append([case])
    return out


def run_group(cases, device, ceilings, quick, emit=None, rounds=None):
    """The rows of one group's cases, in the cases' order, each passed to ``emit``. On the CPU the providers that
    pass their check are timed interleaved (``timing.interleave``) and each row gets the median of its rounds, its
    process CPU time, the spread, the noisy flag and the 1-minute load average while it ran; elsewhere each case is
    timed on its own (``run_case``) and emitted as soon as it is."""
    if device.type != "cpu":
        rows = []
        for case in cases:
            rows.append(run_case(case, device, ceilings, quick))
            if emit is not None:
                emit(rows[-1])
        return rows
    prepared = [(case, *_prepare(case, device)) for case in cases]
    ready = [(case, row, step) for case, row, step in prepared if step is not None]
    if ready:
        load_before = os.getloadavg()[0]
        wall, cpu, errors = timing.interleave(
            [step for _, _, step in ready], quick=quick, rounds=rounds
        )
        load = max(load_before, os.getloadavg()[0])
        for i, (case, row, _) in enumerate(ready):
            if i in errors:
                _error(row, errors[i])
                continue
            row.update(
                status="ok",
                timing="interleaved",
                samples=len(wall[i]),
                loadavg_1min=load,
                **timing.summarize(wall[i], cpu[i]),
            )
            _finish(case, row, ceilings)
    rows = [row for _, row, _ in prepared]
    for row in rows:
        if emit is not None:
            emit(row)
    return rows


def row_rates(ms, flops, nbytes, ceilings, dtype, work_flops=None, work_bytes=None):
    """A timed row's rates and floor.

    ``flops`` and ``nbytes`` are the fewest the op needs (the same for every provider of one op and shape, e.g. the
    real tokens of a padded batch); ``work_flops`` / ``work_bytes`` what this provider computes and moves (a padded
    provider's padded positions included; None: the fewest). GB/s and TFLOP/s are rates of the provider's work (how
    busy it keeps the machine); the floor is the largest of the fewest bytes at the measured copy bandwidth, the
    fewest FLOPs at the measured matrix rate of ``dtype`` and the measured launch time, and ``pct_of_floor`` is
    floor over measured time: at most 100% unless the ceilings were measured low, whatever work a provider wastes.
    """
    work_flops = flops if work_flops is None else work_flops
    work_bytes = nbytes if work_bytes is None else work_bytes
    out = {
        "work_flops": work_flops,
        "work_bytes": work_bytes,
        "GBps": work_bytes / ms / 1e6,
        "TFLOPs": work_flops / ms / 1e9 if work_flops else None,
    }
    floor_ms = max(nbytes / (ceilings["copy_GBps"] * 1e6), ceilings["launch_us"] / 1e3)
    rate = ceilings.get(f"{dtype}_matmul_TFLOPs")
    if flops and rate:
        floor_ms = max(floor_ms, flops / (rate * 1e9))
    out.update(floor_ms=floor_ms, pct_of_floor=100 * floor_ms / ms)
    return out


def add_speedups(rows):
    """Each row's speed-up over its baseline: the ratio of tokens/s where both report it (rows may process
    different numbers of tokens, as packed and unpacked batches do), else of times. A row with a ``ratio_target``
    also gets ``time_ratio`` (its time over the baseline's) and a note saying whether it meets the target."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), []).append(r)
    for group in groups.values():
        base = next(
            (r for r in group if r["provider"] == r["baseline"] and r["status"] == "ok"), None
        )
        for r in group:
            if r["status"] != "ok" or base is None:
                continue
            if r.get("tokens_per_s") and base.get("tokens_per_s"):
                r["speedup_vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"]
            else:
                r["speedup_vs_baseline"] = base["ms"] / r["ms"]
            if r.get("ratio_target") and r is not base:
                r["time_ratio"] = r["ms"] / base["ms"]
                verdict = "meets" if r["time_ratio"] <= r["ratio_target"] else "misses"
                r["ratio_note"] = (
                    f"time ratio {r['provider']}/{base['provider']} {r['time_ratio']:.2f} ({verdict} "
                    f"the target <= {r['ratio_target']:g})"
                )


# What stage 1 of the GPU suite measures (`effbert bench --headline`): one shape per op family at
# BERT-base sizes, in this order: the fused kernels against their baselines first (each case takes
# seconds), then the training step (a BERT-base model built per provider: the longest cases), so
# that a stage that runs out of time has measured the most figures. op -> the params its shape
# should have (`Case.matches`: None for a param it must not have; the first case that matches one of
# them, the op's first shape when none does).
HEADLINE = {
    "exit_entropy": ({"B": 4096, "C": 30522}, {"B": 512, "C": 30522}),
    "note_mix": ({"B": 32, "N": 512, "Dm": 768},),
    "note_update_": ({"B": 32, "N": 512, "Dm": 768},),
    "mc_sample_fused": (),
    "mc_candidate_loss": (),
    "early_exit_inference": ({"B": 64, "avg_exit": 6},),
    # full depth / SENTEE / TOKEE at B=8 (the published loop only at B=1 and 32: with the rest)
    "token_exit_inference": ({"B": 8},),
    "tupe_attention": ({"B": 32, "N": 512, "H": 12, "D": 64, "pad": None},),
    "tupe_attention_varlen": (),
    "train_step_padding": ({"B": 32, "N": 512},),
}
# Providers that time PyTorch's compiler from cold (tens of seconds on a fresh machine before the first figure):
# never in the headline, measured with the rest.
COMPILED_PROVIDERS = ("torch.compile", "flexattention")

MEASURED_STATUSES = ("ok", "wrong", "error")  # a row with one of these ran; "skipped" did not
BUDGET_SKIP = "budget"  # a row's "skipped_for" when the run's --budget was spent before it (not a reason of its own)


def select(cases, which, measured=None):
    """``which``: ``"all"``, ``"headline"`` (the HEADLINE cases: every provider but the compiled ones, every dtype
    and mode of one shape per op, the most wanted op first) or ``"rest"`` (all but those). ``measured``: with
    ``"rest"``, the keys an earlier ``"headline"`` run settled (`settled_keys`; None: all of them); the headline
    cases it left (skipped for its budget, or never reached) come first, in headline order."""
    if which == "all":
        return list(cases)
    if which not in ("headline", "rest"):
        raise ValueError(f"which must be 'all', 'headline' or 'rest', got {which!r}")
    if measured is not None and (
        isinstance(measured, str) or not all(isinstance(k, str) for k in measured)
    ):
        raise ValueError(f"measured must be a collection of case keys (str), got {measured!r:.80}")
    if measured is not None and which != "rest":
        raise ValueError(
            "measured is only for which='rest' (the headline cases an earlier run left)"
        )
    chosen = {}
    for op, wanted in HEADLINE.items():
        mine = [c for c in cases if c.op == op]
        match = [c.shape for c in mine if any(c.matches(w) for w in wanted)]
        if match or mine:
            chosen[op] = (match or [mine[0].shape])[0]

    def headline(c):
        return chosen.get(c.op) == c.shape and c.provider not in COMPILED_PROVIDERS

    order = list(
        HEADLINE
    )  # the most wanted figures first: a stage that runs out of time has measured them
    head = sorted((c for c in cases if headline(c)), key=lambda c: order.index(c.op))
    if which == "headline":
        return head
    left = [] if measured is None else [c for c in head if c.key not in set(measured)]
    return left + [c for c in cases if not headline(c)]


def settled_keys(result):
    """The keys of the cases a bench.json (its parsed dict) settled: rows that ran, whatever their verdict, and
    rows skipped for a reason of their own (a provider that cannot run here); not rows skipped because the run's
    --budget was spent, nor cases the run never reached."""
    if not isinstance(result, dict) or not isinstance(result.get("cases"), list):
        raise ValueError("result must be a parsed bench.json (a dict with a 'cases' list)")
    return {
        r["key"]
        for r in result["cases"]
        if isinstance(r, dict)
        and "key" in r
        and (
            r.get("status") in MEASURED_STATUSES
            or r.get("status") == "skipped"
            and r.get("skipped_for") != BUDGET_SKIP
        )
    }


def _notes(row):
    return "; ".join(filter(None, [row.get("note"), row.get("ratio_note")]))


def format_tables(rows, ceilings, env):
    lines = [
        f"device: {env['device']}  torch {env['torch']}  triton {env.get('triton')}  cuda {env.get('cuda')}  "
        f"commit {env.get('git_commit')}",
        "ceilings (measured now): " + ", ".join(f"{k} {v:,.1f}" for k, v in ceilings.items()),
    ]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [
            "",
            f"== {op} ==",
            f"{'shape':22} {'dtype':9} {'mode':16} {'provider':18} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} "
            f"{'%floor':>7} {'speedup':>8}",
        ]
        for r in (r for r in rows if r["op"] == op):
            head = f"{r['shape']:22} {r['dtype']:9} {r['mode']:16} {r['provider']:18}"
            if r["status"] != "ok":
                lines.append(f"{head} {r['status']}: {r['reason']}")
                continue
            tf = f"{r['TFLOPs']:8.1f}" if r.get("TFLOPs") else f"{'-':>8}"
            sp = f"{r['speedup_vs_baseline']:7.2f}x" if "speedup_vs_baseline" in r else f"{'-':>8}"
            tok = f" {r['tokens_per_s']:12,.0f} tokens/s" if "tokens_per_s" in r else ""
            tok += f"  ({_notes(r)})" if _notes(r) else ""
            lines.append(
                f"{head} {r['ms']:9.4f} {r['GBps']:8.1f} {tf} {r['pct_of_floor']:6.1f}% {sp}{tok}"
            )
    lines.append(
        "\n%floor: the op's floor over the measured time; the floor is the largest of its fewest bytes at the "
        "measured copy bandwidth, its fewest FLOPs at the measured matrix rate, and the measured launch time "
        "of the cheapest op (padded positions a provider computes are its own work, not the op's, so they "
        "lower its %floor). GB/s, TFLOP/s: rates of the work each provider does. speedup: against the "
        "row's baseline provider."
    )
    return "\n".join(lines)


def write_markdown(path, rows, ceilings, env, title="effbert benchmark"):
    lines = [
        f"# {title}",
        "",
        f"- device: **{env['device']}** ({env['device_type']}), driver {env.get('driver')}, "
        f"CUDA {env.get('cuda')}",
        f"- torch {env['torch']}, triton {env.get('triton')}, effbert "
        f"{env['effbert']}, commit `{env.get('git_commit')}`, {env['date']}",
        "- ceilings measured in the same run: "
        + ", ".join(f"{k} {v:,.1f}" for k, v in ceilings.items()),
        "",
    ]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [
            f"## {op}",
            "",
            "| shape | dtype | mode | provider | ms | GB/s | TFLOP/s | % of floor | speed-up |",
            "|---|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in rows if r["op"] == op):
            if r["status"] != "ok":
                lines.append(
                    f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | {r['status']}: "
                    f"{r['reason']} | | | | |"
                )
                continue
            tf = f"{r['TFLOPs']:.1f}" if r.get("TFLOPs") else "-"
            sp = (
                f"{r['speedup_vs_baseline']:.2f}x vs {r['baseline']}"
                if "speedup_vs_baseline" in r
                else "-"
            )
            tok = f"; {r['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in r else ""
            tok += f"; {_notes(r)}" if _notes(r) else ""
            lines.append(
                f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | {r['ms']:.4f} | "
                f"{r['GBps']:.1f} | {tf} | {r['pct_of_floor']:.1f}% | {sp}{tok} |"
            )
        lines.append("")
    Path(path).write_text("\n".join(lines))


def _pyplot():
    """matplotlib's pyplot on a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(out_dir, rows):
    """One PNG per op: speed-up of each provider over the baseline, per case. Returns the files written."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    for op in dict.fromkeys(r["op"] for r in rows):
        ok = [r for r in rows if r["op"] == op and "speedup_vs_baseline" in r]
        if not ok:
            continue
        groups = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']} {r['mode']}" for r in ok))
        providers = list(dict.fromkeys(r["provider"] for r in ok))
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(providers)) / 3), 4))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            xs, ys = [], []
            for g_i, g in enumerate(groups):
                match = [
                    r
                    for r in ok
                    if r["provider"] == p and f"{r['shape']}\n{r['dtype']} {r['mode']}" == g
                ]
                if match:
                    xs.append(g_i + i * width)
                    ys.append(match[0]["speedup_vs_baseline"])
            ax.bar(xs, ys, width, label=p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=7)
        ax.set_ylabel(f"speed-up vs {ok[0]['baseline']} (higher is better)")
        ax.set_yscale("log")
        ax.set_title(op)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / f"speedup_{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_seqlen_plots(out_dir, rows):
    """One PNG per op whose cases sweep the sequence length (the ``N`` of the rows' params, three
    values or more):
    time against N per provider. Returns the files written."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    for op in dict.fromkeys(r["op"] for r in rows):
        ok = [
            r for r in rows if r["op"] == op and r["status"] == "ok" and "N" in r.get("params", {})
        ]
        if len({r["params"]["N"] for r in ok}) < 3:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in dict.fromkeys(r["provider"] for r in ok):
            pts = sorted((int(r["params"]["N"]), r["ms"]) for r in ok if r["provider"] == p)
            ax.plot([n for n, _ in pts], [ms for _, ms in pts], marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(f"ms per call ({ok[0]['dtype']}, {ok[0]['mode']}; lower is better)")
        ax.set_title(op)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / f"time_vs_seqlen_{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def compare(rows, old_path):
    """Per-case ratio new/old time; a regression is slower by more than the noise both runs measured (>= 5%)."""
    old = {
        r["key"]: r
        for r in json.loads(Path(old_path).read_text())["cases"]
        if r.get("status") == "ok"
    }
    out = []
    for r in rows:
        o = old.get(r["key"])
        if r["status"] != "ok" or o is None:
            continue
        ratio = r["ms"] / o["ms"]
        tolerance = max(0.05, 2 * (r.get("noise", 0) + o.get("noise", 0)))
        out.append(
            {
                "key": r["key"],
                "old_ms": o["ms"],
                "new_ms": r["ms"],
                "ratio": ratio,
                "tolerance": tolerance,
                "regression": ratio > 1 + tolerance,
            }
        )
    return out


def write_index(results_dir):
    """Regenerate RESULTS.md beside ``results_dir`` from the committed JSON runs: per device, each (op, provider)
    from the newest run that measured it, each run's rows in that run's own section (a run of a few ops, or of a
    few providers with ``--providers``, does not hide the others' latest figures, and no table mixes two runs)."""
    results_dir = Path(results_dir)
    runs = []
    for path in sorted(results_dir.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if "cases" in data and "env" in data:
            runs.append((data["env"]["date"], path, data))
    by_device = {}
    for date, path, data in sorted(runs, key=lambda t: t[0], reverse=True):
        by_device.setdefault(data["env"]["device"], []).append((path, data))
    index = results_dir.parent / "RESULTS.md"
    lines = [
        "# Benchmark results",
        "",
        "Regenerated by `effbert bench --index benchmarks/results` from the committed "
        "runs under `benchmarks/results/`: per device, each op and provider from the newest run that measured "
        "it, each run in its own section (speed-ups within a run only). Numbers are never edited by hand.",
        "",
    ]
    for device in sorted(by_device):
        covered = set()
        for path, data in by_device[device]:
            rows = [c for c in data["cases"] if (c["op"], c["provider"]) not in covered]
            covered |= {(c["op"], c["provider"]) for c in data["cases"]}
            if not rows:
                continue
            tmp = results_dir / ".section.md"
            write_markdown(tmp, rows, data["ceilings"], data["env"], title=f"{device}")
            section = (
                tmp.read_text().replace(f"# {device}", f"## {device}", 1).replace("\n## ", "\n### ")
            )
            tmp.unlink()
            lines += [section, f"Source: `{path.relative_to(results_dir.parent)}`", ""]
    index.write_text("\n".join(lines))
    return index


def progress(items, enabled):
    """``items`` wrapped in a tqdm bar on stderr ("effbert bench", one step a case group) when
    ``enabled`` and tqdm
    is installed; ``items`` unchanged otherwise."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, desc="effbert bench", unit="case", file=sys.stderr)
    except ImportError:
        return items
