"""``effbert check``: every op on this machine's backends against the float64 reference, as a table.

The first thing to run on a new machine: it shows which backends exist, and that each one computes the right thing.
An install that cannot serve (the Triton kernels or the C++ CPU extension missing, no Triton result on a GPU) fails
the command with one line saying what is missing, instead of passing on the eager reference alone.
"""

import importlib
import sys
import time

import torch

from .. import ops as effbert_ops
from .. import reference
from ..reference.compare import relative_error
from ..ops import backends
from ..ops import attention as attention_ops
from ..ops import position_bias as bias_ops
from ..ops import early_exit as early_exit_ops


def _devices():
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtypes(full, quick, one=torch.float32):
    """The dtypes a check runs: ``full``, or ``(one,)`` under ``--quick`` (each dtype is one more JIT compile of
    every Triton kernel on a GPU: about a second each)."""
    if not isinstance(quick, bool):
        raise ValueError(f"quick must be a bool, got {quick!r}")
    if one not in full:
        raise ValueError(f"one must be one of {full}, got {one}")
    return (one,) if quick else tuple(full)


def check_exit_entropy(quick=False):
    rows = []
    for device in _devices():
        for dtype in _dtypes(ALL_DTYPES, quick):
            for shape in ((97, 3), (33, 30522)):
                x = (torch.randn(shape) * 4).to(dtype).to(device)
                x[0, 1] = float("nan")  # NaN in, NaN out
                ref = reference.exit_entropy(x.double())
                for backend in ("cuda", "triton", "cpu", "eager"):
                    try:
                        early_exit_ops.entropy_backend(x, backend)
                    except Exception:
                        continue  # not serviceable here; the backend table says why
                    out = early_exit_ops.entropy_into(backend, x, torch.full((shape[0],), float("nan"),
                                                                             device=device))
                    tol = 1e-4 if device.type == "cuda" else 1e-5
                    rows.append(("exit_entropy", backend, device.type, str(dtype).replace("torch.", ""),
                                 "x".join(map(str, shape)), relative_error(out, ref), tol))
    return rows


def _serviceable(probe):
    try:
        probe()
        return True
    except Exception:
        return False  # not serviceable here; the backend table says why


def check_tupe(quick=False):
    """tupe_position_bias, then tupe_attention fed its P (with padding), forward, against float64 (``quick``: bf16
    on a GPU, the dtype BERT trains in, and fp32 on the CPU)."""
    rows = []
    b, n, h, d = 3, 97, 4, 64
    for device in _devices():
        pq, pk = (torch.randn(n, h, d, dtype=torch.float64, device=device) for _ in range(2))
        table = torch.randn(32, h, dtype=torch.float64, device=device)
        buckets = reference.t5_relative_buckets(n, device=device)
        cls = torch.randn(h, dtype=torch.float64, device=device)
        q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64, device=device) for _ in range(3))
        mask = torch.arange(n, device=device)[None, :] < torch.tensor([[n], [50], [1]], device=device)
        kw = dict(scale=(2 * d) ** -0.5, rel_table=table, rel_buckets=buckets, cls_row=cls, cls_col=-cls)
        pos_ref = reference.tupe_position_bias(pq, pk, **kw)
        att_ref = reference.tupe_attention(q, k, v, pos_ref, attention_mask=mask, scale=(2 * d) ** -0.5)
        for dtype in _dtypes((torch.float32, torch.bfloat16), quick,
                             torch.bfloat16 if device.type == "cuda" else torch.float32):
            tol = (1e-4 if device.type == "cuda" else 1e-5) if dtype == torch.float32 else 3e-2
            for backend in ("triton", "eager"):
                low = lambda t: t.to(dtype)  # noqa: E731
                if not _serviceable(lambda: bias_ops.position_bias_backend(low(pq), backend)):
                    continue
                pos = effbert_ops.tupe_position_bias(low(pq), low(pk), backend=backend, **dict(
                    kw, rel_table=low(table), cls_row=low(cls), cls_col=low(-cls)))
                rows.append(("tupe_position_bias", backend, device.type, str(dtype).replace("torch.", ""),
                             f"{n}x{h}x{d}", relative_error(pos, pos_ref), tol))
                if not _serviceable(lambda: attention_ops.attention_backend(low(q), backend)):
                    continue
                out = effbert_ops.tupe_attention(low(q), low(k), low(v), pos_ref.float(), attention_mask=mask,
                                                 scale=(2 * d) ** -0.5, backend=backend)
                rows.append(("tupe_attention", backend, device.type, str(dtype).replace("torch.", ""),
                             f"{b}x{n}x{h}x{d}", relative_error(out, att_ref), tol))
    return rows


# ---- batched early exit ----

def check_exit_decision(quick=False):
    """The fused decision on each backend against the reference: the error is 0 when every exit, layer, compacted id
    and patience counter matches, inf otherwise (decisions are exact, not approximate)."""
    rows = []
    for device in _devices():
        for dtype in _dtypes(ALL_DTYPES, quick):
            for criterion, kw in (("entropy", dict(threshold=0.5)), ("max_prob", dict(threshold=0.6)),
                                  ("patience", dict(patience=1))):
                batch, c = 97, 3
                x = (torch.randn(batch, c) * 2).to(dtype)
                x[5, 1] = float("nan")  # never exits early
                prev = torch.randint(0, c, (batch,)).float()
                exits, _, cnt = reference.exit_decision(x.double(), 2, criterion, prev=prev.double(),
                                                        counter=torch.zeros(batch, dtype=torch.long), **kw)
                for backend in ("cuda", "triton", "cpu", "eager"):
                    xd = x.to(device)
                    try:
                        early_exit_ops.decision_backend(xd, backend)
                    except Exception:
                        continue
                    i32 = dict(dtype=torch.int32, device=device)
                    st_prev, st_cnt = prev.clone().to(device), torch.zeros(batch, **i32)  # updated in place
                    out_logits = torch.full((batch, c), float("nan"), dtype=dtype, device=device)
                    out_layer = torch.zeros(batch, **i32)
                    nxt, loc, count = torch.zeros(batch, **i32), torch.zeros(batch, **i32), torch.zeros(1, **i32)
                    early_exit_ops.exit_decision(xd, torch.arange(batch, **i32), st_prev, st_cnt, out_logits,
                                                 out_layer, nxt, loc, count, layer=2, criterion=criterion,
                                                 backend=backend, **kw)
                    n = int((~exits).sum())
                    ok = (int(count) == n and out_layer.cpu().eq(2).eq(exits).all()
                          and nxt[:n].cpu().long().tolist() == torch.nonzero(~exits).flatten().tolist()
                          and (criterion != "patience" or st_cnt.cpu().long().tolist() == cnt.tolist()))
                    rows.append(("exit_decision", backend, device.type, str(dtype).replace("torch.", ""),
                                 f"{batch}x{c},{criterion}", 0.0 if ok else float("inf"), 0.0))
    return rows


def check_multi_exit_loss(quick=False):
    """RomeBERT's loss and its gradient (the fused kernel where it runs) against autograd of the reference (float32
    only, ``quick`` or not)."""
    _dtypes((torch.float32,), quick)
    rows = []
    for device in _devices():
        z = (torch.randn(4, 33, 5) * 2).to(device)
        y = torch.randint(0, 5, (33,), device=device)
        z64 = z.double().requires_grad_()
        reference.multi_exit_distillation_loss(z64, y).backward()
        for backend in ("triton", "eager"):
            try:
                early_exit_ops.loss_backend(z, backend)
            except Exception:
                continue
            z1 = z.clone().requires_grad_()
            loss = early_exit_ops.multi_exit_distillation_loss(z1, y, backend=backend)
            loss.backward()
            tol = 1e-4 if device.type == "cuda" else 1e-5
            err = max(relative_error(loss, reference.multi_exit_distillation_loss(z64.detach(), y)),
                      relative_error(z1.grad, z64.grad))
            rows.append(("multi_exit_loss", backend, device.type, "float32", "4x33x5", err, tol))
    return rows



def check_notes(quick=False):
    """note_mix and note_update_ (TNF) on every backend here against the float64 loop reference."""
    from ..ops import notes as notes_ops

    rows = []
    for device in _devices():
        tol = 1e-4 if device.type == "cuda" else 1e-5
        for dtype in _dtypes(ALL_DTYPES, quick):
            B, N, D, S = 5, 97, 129, 11
            x = torch.randn(B, N, D).to(dtype).to(device)
            notes = torch.randn(S, D, device=device)
            slots = torch.randint(-1, S, (B, N), device=device)
            mix_ref = reference.note_mix(x.double(), notes.double(), slots, 0.5)
            lengths = torch.tensor([97, 50, 1, 97, 80], device=device)
            spans = torch.tensor([[0, 0, 3, 2], [1, 47, 50, 2], [2, 0, 1, 7], [3, 90, 97, 2], [4, 10, 11, 0],
                                  [0, 40, 42, 7], [3, 5, 9, 2]], device=device)
            counts0 = torch.tensor([0, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0], device=device)
            n64, c64 = notes.double().cpu(), counts0.clone().cpu()
            reference.note_update_(n64, c64, x.double().cpu(), spans.cpu(), window=16, gamma=0.1,
                                   lengths=lengths.cpu())
            for backend in ("cuda", "triton", "cpu", "eager"):
                try:
                    notes_ops.mix_backend(x, notes, backend)
                except Exception:
                    continue  # not serviceable here; the backend table says why
                out = notes_ops.mix_into(backend, x, notes, slots, 0.5, torch.full_like(x, float("nan")))
                eager = reference.note_mix(x, notes, slots, 0.5)
                low = tol if dtype == torch.float32 else 2 * relative_error(eager, mix_ref) + tol
                rows.append(("note_mix", backend, device.type, str(dtype).replace("torch.", ""),
                             f"{B}x{N}x{D}", relative_error(out, mix_ref), low))
                upd, cnt = notes.clone(), counts0.clone()
                notes_ops.update_into(backend, upd, cnt, x, spans, 16, 0.1, lengths)
                err = relative_error(upd, n64) if torch.equal(cnt.cpu(), c64) else float("inf")
                rows.append(("note_update_", backend, device.type, str(dtype).replace("torch.", ""),
                             f"{B}x{N}x{D}", err, tol))
    return rows


def check_mc_bert(quick=False):
    """mc_candidate_loss (loss and the three gradients) against float64; mc_sample: the Triton draws bit for bit
    against the Philox/Gumbel reference, every backend's draw frequencies against the softmax."""
    from ..ops import mc_bert as mc_ops

    rows = []
    for device in _devices():
        tol = 1e-4 if device.type == "cuda" else 1e-5
        for dtype in _dtypes(ALL_DTYPES, quick):
            M, V, D, K = 33, 101, 65, 10  # odd sizes; small enough for the Triton interpreter
            h, e = torch.randn(M, D).to(dtype).to(device), (torch.randn(V, D) * 0.3).to(dtype).to(device)
            b = torch.randn(V, device=device)
            c, y = torch.randint(0, V, (M, K), device=device), torch.randint(0, K, (M,), device=device)
            ref_in = [t.double().requires_grad_() for t in (h, e, b)]
            ref = reference.mc_candidate_loss(*ref_in, c, y)
            ref.backward()
            for backend in ("triton", "eager"):
                try:
                    mc_ops.loss_backend(h, e, b, backend)
                except Exception:
                    continue  # not serviceable here; the backend table says why
                leaves = [t.clone().requires_grad_() for t in (h, e, b)]
                out = effbert_ops.mc_candidate_loss(*leaves, c, y, backend=backend)
                out.backward()
                err = max([relative_error(out, ref)]
                          + [relative_error(t.grad, r.grad) for t, r in zip(leaves, ref_in)])
                # 16-bit inputs: float32 math, so the only error is rounding the gradients to 16 bits once
                low = tol if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 1e-2)
                rows.append(("mc_candidate_loss", backend, device.type, str(dtype).replace("torch.", ""),
                             f"{M}x{K}x{D}", err, low))
        logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0, 0.5]] * 64, device=device)
        p = torch.softmax(logits[0].double(), 0).cpu()
        for backend in ("triton", "eager"):
            try:
                mc_ops.sample_backend(logits, backend)
            except Exception:
                continue
            draws = effbert_ops.mc_sample(logits, 40, backend=backend)
            freq = torch.bincount(draws.reshape(-1).cpu(), minlength=6).double() / draws.numel()
            bound = float(5 * (p * (1 - p) / draws.numel()).sqrt().max())
            rows.append(("mc_sample (freq.)", backend, device.type, "float32", "64x6x40",
                         float((freq - p).abs().max()), bound))
            if backend == "triton":
                x = torch.randn(33, 257, device=device)
                seed = mc_ops.new_seed(device)
                from ..kernels import mc_bert as mc_kernels  # the op draws its own seed: the kernel on a known one

                out = mc_kernels.mc_sample(x, K, seed, torch.full((33, K), -7, dtype=torch.int64, device=device))
                same = torch.equal(out.cpu(), reference.mc_sample_gumbel(x, K, int(seed)).cpu())
                rows.append(("mc_sample (bits)", backend, device.type, "float32", f"33x257x{K}",
                             0.0 if same else float("inf"), 0.0))
    return rows


CHECKS = [check_exit_entropy, check_tupe, check_notes, check_exit_decision, check_multi_exit_loss, check_mc_bert]

# the ops each check covers: on a GPU every one must have a Triton row on cuda, or the install is not serving
KERNEL_MODULES = ("tupe_attention", "position_bias", "notes", "early_exit", "mc_bert")
TRITON_OPS = ("exit_entropy", "tupe_position_bias", "tupe_attention", "note_mix", "note_update_", "exit_decision",
              "multi_exit_loss", "mc_candidate_loss")


def install_problems():
    """What makes this install unfit to check, as one-line messages (empty when none): the Triton kernels
    (``effbert.kernels``) missing or broken while triton itself imports, or the C++ CPU extension (``effbert._C``,
    which every ``pip install`` builds) missing."""
    problems = []
    try:
        import triton  # noqa: F401
    except ImportError:
        triton = None  # the backend table says so; a machine without triton runs the other backends
    if triton is not None:
        for name in KERNEL_MODULES:
            try:
                importlib.import_module(f"effbert.kernels.{name}")
            except Exception as exc:  # noqa: BLE001 - whatever breaks the import, the install is unfit
                problems.append(f"the Triton kernels cannot be imported (effbert.kernels.{name}: "
                                f"{type(exc).__name__}: {exc}); reinstall effbert (pip install -e .)")
                break
    from .. import _ext

    module, why = _ext.load("_C")
    if module is None:
        problems.append(f"the install failed or never ran: {why}")
    return problems


def missing_gpu_rows(rows, cuda_available):
    """On a machine with CUDA, the ops of TRITON_OPS that have no Triton row on cuda (a check that passed there on
    the eager backend alone proved nothing about the kernels). Empty without CUDA."""
    if not isinstance(cuda_available, bool):
        raise ValueError(f"cuda_available must be a bool, got {cuda_available!r}")
    if not cuda_available:
        return []
    served = {op for op, backend, device, *_ in rows if backend == "triton" and device == "cuda"}
    return [op for op in TRITON_OPS if op not in served]


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="effbert check", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one dtype per op (bf16 for TUPE attention on a GPU, fp32 elsewhere): a fraction of the "
                             "Triton JIT compiles, for a first look at a fresh GPU machine")
    args = parser.parse_args(argv)
    started = time.monotonic()
    problems = install_problems()
    print("backends:")
    for status in backends().values():
        print(f"  {status}")
    if problems:
        for problem in problems:
            print(f"effbert check: error: {problem}", file=sys.stderr)
        return 1
    print()
    head = f"{'op':18} {'backend':8} {'device':6} {'dtype':9} {'shape':14} {'rel. error':>11} {'tolerance':>9}  result"
    print(head)
    print("-" * len(head))
    failed, rows = 0, []
    for check in CHECKS:
        try:
            found = check(quick=args.quick)
        except Exception as exc:  # noqa: BLE001 - a check that crashes is a failure to report, not a traceback
            failed += 1
            print(f"{check.__name__:18} ERROR: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        for op, backend, device, dtype, shape, err, tol in found:
            ok = err <= tol
            failed += not ok
            print(f"{op:18} {backend:8} {device:6} {dtype:9} {shape:14} {err:11.2e} {tol:9.0e}  "
                  f"{'pass' if ok else 'FAIL'}")
        rows += found
    print(f"\n({len(rows)} results in {time.monotonic() - started:.1f} s{', --quick' if args.quick else ''})")
    missing = missing_gpu_rows(rows, torch.cuda.is_available())
    if missing:
        print(f"effbert check: error: no Triton result on cuda for {', '.join(missing)}: the GPU is not served by "
              f"the kernels (see the backends above)", file=sys.stderr)
        return 1
    print(f"{'all checks passed' if not failed else f'{failed} checks FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
