"""Ahead-of-time compile report: registers, spills, shared memory and matrix instructions, with no GPU needed.

Every Triton kernel configuration listed in ``effbert.kernels.<family>.COMPILE_SPECS`` is compiled with
``triton.compile`` for each asked target (sm_80, sm_90 by default) that it serves: a spec's ``targets`` names the
compute capabilities whose launchers pick that configuration (every one when absent), so where a kernel takes its own
tile on sm_90 (H100, H200) the report builds and lists that tile for sm_90 and the other for sm_80; its PTX goes through ptxas for the register and spill counts and
its cubin through cuobjdump for the SASS. Every ``csrc/cuda/*.cu`` file goes through ``nvcc -Xptxas -v``.

Exit status: 1 on a compile failure, on spills in a kernel marked must-not-spill (every csrc kernel is), or on a
missing matrix instruction where a spec expects one; 0 otherwise.

    python -m effbert.tools.compile_report [--targets 80,90] [--only NAME] [--no-csrc] [--json FILE]
"""

import argparse
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MATRIX_SASS = {
    80: ("HMMA",),
    90: ("HGMMA", "HMMA"),
}  # what a tensor-core kernel should show per target
_PTXAS_REG = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")


def _triton_tool(name):
    """The ptxas / cuobjdump Triton itself uses (TRITON_PTXAS_PATH and the like honoured), so the PTX version
    Triton emitted is one this ptxas reads."""
    from triton import knobs

    return knobs.nvidia.ptxas.path if name == "ptxas" else getattr(knobs.nvidia, name).path


def _run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{Path(cmd[0]).name} exited {done.returncode}: {(done.stderr or done.stdout).strip()[:500]}"
        )
    return done.stdout + done.stderr


def kernel_specs(only=None):
    """(family, spec) for every COMPILE_SPECS entry in effbert.kernels."""
    import effbert.kernels as pkg

    out = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"effbert.kernels.{info.name}")
        for spec in getattr(module, "COMPILE_SPECS", []):
            if only is None or only in spec["name"]:
                out.append((info.name, spec))
    return out


def parse_ptxas(text):
    """Per kernel entry: registers, spill bytes (stores + loads), stack frame and static shared memory."""
    rows, current = {}, None
    for line in text.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = (m.group(1), m.group(2))
            rows[current] = {"registers": 0, "spill_bytes": 0, "stack_bytes": 0, "smem_bytes": 0}
            continue
        if current is None:
            continue
        if m := _PTXAS_SPILL.search(line):
            rows[current]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        if m := _PTXAS_STACK.search(line):
            rows[current]["stack_bytes"] = int(m.group(1))
        if m := _PTXAS_REG.search(line):
            rows[current]["registers"] = int(m.group(1))
        if m := _PTXAS_SMEM.search(line):
            rows[current]["smem_bytes"] = int(m.group(1))
    return rows


def compile_triton(spec, cc, workdir):
    import triton
    from triton.backends.compiler import GPUTarget

    fn = spec["fn"]
    signature = dict(spec["signature"])
    signature.update({k: "constexpr" for k in spec["constexprs"]})
    # Arguments the launcher guarantees 16-divisible (pointers from torch, aligned strides) get the same hint the
    # runtime specialisation gives them, so vector widths here match what runs on the GPU.
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.get("divisible", ())}
    src = triton.compiler.ASTSource(
        fn=fn, signature=signature, constexprs=dict(spec["constexprs"]), attrs=attrs
    )
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    stem = Path(workdir) / re.sub(r"[^A-Za-z0-9_]+", "_", f"{spec['name']}_sm{cc}")
    ptx, cubin = stem.with_suffix(".ptx"), stem.with_suffix(".cubin")
    ptx.write_text(compiled.asm["ptx"])
    cubin.write_bytes(compiled.asm["cubin"])
    stats = parse_ptxas(
        _run(
            [
                _triton_tool("ptxas"),
                "-v",
                f"--gpu-name=sm_{cc}{'a' if cc == 90 else ''}",
                str(ptx),
                "-o",
                os.devnull,
            ]
        )
    )
    row = next(
        iter(stats.values()), {"registers": 0, "spill_bytes": 0, "stack_bytes": 0, "smem_bytes": 0}
    )
    sass = _run([_triton_tool("cuobjdump"), "-sass", str(cubin)])
    row["smem_bytes"] = max(row["smem_bytes"], int(compiled.metadata.shared))
    row["matrix"] = sorted({op for op in ("HGMMA", "HMMA") if re.search(rf"\b{op}\b", sass)})
    row["ldg128"] = len(re.findall(r"LDG\.E\.(?:\w+\.)?128", sass))
    return row


def triton_report(targets, only=None):
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="effbert-aot-") as tmp:
        for family, spec in kernel_specs(only):
            for cc in targets:
                if cc not in spec.get("targets", targets):
                    continue  # the launchers on that target pick another configuration
                entry = {
                    "kind": "triton",
                    "family": family,
                    "kernel": spec["name"],
                    "target": f"sm_{cc}",
                    "num_warps": spec.get("num_warps", 4),
                    "num_stages": spec.get("num_stages", 3),
                }
                try:
                    entry.update(compile_triton(spec, cc, tmp))
                except Exception as exc:  # report every failure, then exit non-zero
                    entry["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                    failures.append(f"{spec['name']} sm_{cc}: compile failed: {entry['error']}")
                    rows.append(entry)
                    continue
                if spec.get("must_not_spill", True) and entry["spill_bytes"] > 0:
                    failures.append(
                        f"{spec['name']} sm_{cc}: {entry['spill_bytes']} bytes of spills"
                    )
                if spec.get("matrix_instructions") and not set(entry["matrix"]) & set(
                    MATRIX_SASS[cc]
                ):
                    failures.append(
                        f"{spec['name']} sm_{cc}: no {'/'.join(MATRIX_SASS[cc])} in the SASS"
                    )
                rows.append(entry)
    return rows, failures


def csrc_report(targets, root):
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    sources = sorted(Path(root, "csrc", "cuda").glob("*.cu"))
    if nvcc is None:
        return [], [], "nvcc not found: csrc not compiled"
    rows, failures = [], []
    tmp = tempfile.mkdtemp(prefix="effbert-nvcc-")
    for src in sources:
        for cc in targets:
            cubin = Path(tmp, f"{src.stem}_sm{cc}.cubin")
            cmd = [
                nvcc,
                "-cubin",
                "-std=c++17",
                "-O3",
                "-DEFFBERT_KERNELS_ONLY",
                f"-I{Path(root, 'csrc', 'include')}",
                f"-gencode=arch=compute_{cc},code=sm_{cc}",
                "-Xptxas",
                "-v",
                str(src),
                "-o",
                str(cubin),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                failures.append(f"{src.name} sm_{cc}: nvcc failed:\n{done.stderr[-2000:]}")
                continue
            sass = sass_by_function(_run([_triton_tool("cuobjdump"), "-sass", str(cubin)]))
            for (entry_name, arch), stats in parse_ptxas(done.stderr + done.stdout).items():
                demangled = _demangle(entry_name)
                text = sass.get(entry_name, "")
                stats["matrix"] = sorted(
                    {op for op in ("HGMMA", "HMMA") if re.search(rf"\b{op}\b", text)}
                )
                stats["ldg128"] = len(re.findall(r"LDG\.E\.(?:\w+\.)?128", text))
                rows.append(
                    {
                        "kind": "csrc",
                        "family": src.stem,
                        "kernel": demangled,
                        "target": arch,
                        **stats,
                    }
                )
                if stats["spill_bytes"] > 0:
                    failures.append(
                        f"{src.name}:{demangled} {arch}: {stats['spill_bytes']} bytes of spills"
                    )
    return rows, failures, None


def sass_by_function(sass):
    """cuobjdump -sass output split per kernel (mangled name -> its instructions)."""
    out, current = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            out[current] = ""
        elif current is not None:
            out[current] += line + "\n"
    return out


def _demangle(name):
    filt = shutil.which("c++filt")
    if filt is None:
        return name
    out = subprocess.run([filt, name], capture_output=True, text=True).stdout.strip() or name
    return re.sub(r"\(anonymous namespace\)::", "", out)


def format_table(rows):
    head = (
        f"{'kind':6} {'kernel':58} {'target':6} {'w/s':>4} {'regs':>4} {'spill':>5} {'stack':>5} {'smem':>6} "
        f"{'mma':>6} note"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(
                f"{r['kind']:6} {r['kernel'][:58]:58} {r['target']:6} {_warps(r):>4} {'-':>4} {'-':>5} "
                f"{'-':>5} {'-':>6} {'-':>6} {r['error']}"
            )
            continue
        mma = ",".join(r.get("matrix", [])) or "-"
        note = f"{r['ldg128']}xLDG.128" if r.get("ldg128") else ""
        lines.append(
            f"{r['kind']:6} {r['kernel'][:58]:58} {r['target']:6} {_warps(r):>4} {r['registers']:>4} "
            f"{r['spill_bytes']:>5} {r['stack_bytes']:>5} {r['smem_bytes']:>6} {mma:>6} {note}"
        )
    lines.append(
        "w/s: warps per program / pipeline stages (Triton builds); a kernel named once per target takes its "
        "own tile there"
    )
    return "\n".join(lines)


def _warps(row):
    return f"{row['num_warps']}/{row['num_stages']}" if "num_warps" in row else "-"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m effbert.tools.compile_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)"
    )
    parser.add_argument("--only", default=None, help="only Triton kernels whose name contains this")
    parser.add_argument("--no-csrc", action="store_true", help="skip the nvcc report of csrc/cuda")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    try:
        targets = [int(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--targets must be comma-separated integers like 80,90, got {args.targets!r}")
    if not targets or any(t not in MATRIX_SASS for t in targets):
        parser.error(f"--targets must be among {sorted(MATRIX_SASS)}, got {args.targets!r}")

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error(
            "TRITON_INTERPRET=1 replaces the compiler with the interpreter; unset it for the compile report"
        )
    rows, failures = triton_report(targets, args.only)
    note = None
    if not args.no_csrc:
        crows, cfail, note = csrc_report(targets, Path(__file__).resolve().parents[2])
        rows += crows
        failures += cfail
    print(format_table(rows))
    if note:
        print(f"note: {note}")
    n_triton = sum(r["kind"] == "triton" for r in rows)
    print(
        f"\n{n_triton} Triton kernel builds, {len(rows) - n_triton} csrc kernel builds, {len(failures)} problems"
    )
    for f in failures:
        print(f"PROBLEM: {f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "problems": failures}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
