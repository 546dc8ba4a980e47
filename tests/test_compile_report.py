"""The ahead-of-time compile report: every Triton kernel config builds for sm_80 and sm_90 with no spills."""

import json
import os
import subprocess
import sys

import pytest
import torch

from effbert.tools import compile_report

pytestmark = pytest.mark.aot


def run_report(*args):
    """In a child process without TRITON_INTERPRET (the harness sets it here; the real compiler is needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "effbert.tools.compile_report", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_triton_config_compiles_without_spills(tmp_path):
    out = tmp_path / "report.json"
    done = run_report("--no-csrc", "--json", str(out))
    data = json.loads(out.read_text())
    assert done.returncode == 0, data["problems"]
    assert "0 problems" in done.stdout
    rows = data["rows"]
    specs = compile_report.kernel_specs()
    # each spec is built for the targets whose launchers pick it, and only for those
    assert (
        sorted((r["kernel"], r["target"]) for r in rows)
        == sorted(
            (spec["name"], f"sm_{cc}") for _, spec in specs for cc in spec.get("targets", (80, 90))
        )
        and specs
    )
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    strict = {spec["name"] for _, spec in specs if spec.get("must_not_spill", True)}
    assert strict
    for r in rows:
        assert "error" not in r and 0 < r["registers"] <= 255, r
        if r["kernel"] in strict:  # sm_80's D=128 attention builds may spill; the rest may not
            assert r["spill_bytes"] == 0, r
        if (
            r["target"] == "sm_90"
            and r["kernel"].startswith("tupe_attn")
            and "fp32" not in r["kernel"]
        ):
            # H100/H200: every 16-bit attention build on wgmma, without spills, in the SM's 227 KB per block
            assert (
                "HGMMA" in r["matrix"] and r["spill_bytes"] == 0 and r["smem_bytes"] <= 227 * 1024
            ), r


def test_attention_kernels_use_tensor_cores(tmp_path):
    out = tmp_path / "report.json"
    # forward, dK/dV and dQ at BERT's head dim: wgmma on sm_90, mma.sync on sm_80
    assert run_report("--no-csrc", "--only", "[bf16,D=64,M=", "--json", str(out)).returncode == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["kernel"].split("[")[0] for r in rows} == {
        "tupe_attn_fwd",
        "tupe_attn_dkdv",
        "tupe_attn_dq",
    }
    for r in rows:
        assert ("HGMMA" if r["target"] == "sm_90" else "HMMA") in r["matrix"], r


def test_long_row_entropy_uses_16_byte_loads(tmp_path):
    out = tmp_path / "report.json"
    assert (
        run_report(
            "--no-csrc", "--targets", "90", "--only", "exit_entropy[bf16,C<=any", "--json", str(out)
        ).returncode
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["ldg128"] > 0 for r in rows), rows


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-m", "effbert.tools.compile_report", "--no-csrc"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "TRITON_INTERPRET" in done.stderr


def test_parse_ptxas_reads_registers_and_spills():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 256 bytes smem"""
    assert compile_report.parse_ptxas(text) == {
        ("_Z3fooPf", "sm_90"): {
            "registers": 40,
            "spill_bytes": 16,
            "stack_bytes": 8,
            "smem_bytes": 256,
        }
    }


def test_bad_targets_are_rejected(capsys):
    import pytest

    with pytest.raises(SystemExit):
        compile_report.main(["--targets", "75"])
    assert "--targets" in capsys.readouterr().err


def test_sm90_takes_its_own_attention_tiles_and_the_report_builds_what_each_target_picks():
    """The launchers pick the tile by the device's compute capability; COMPILE_SPECS holds, for each target, the
    very configuration the launchers pick there, so the report checks what runs on an H100/H200 and on an A100."""
    from effbert.kernels import tupe_attention as ta

    # sm_90 differs where wgmma needs 64 rows: the backward (packed too) and the forward at D=128
    assert ta.bwd_config(64, "bf16", True, False, arch=90)["BLOCK_N"] == 64
    assert ta.bwd_config(64, "bf16", True, False, arch=80)["BLOCK_N"] == 32
    assert ta.dq_config(64, "bf16", True, False, arch=90)["BLOCK_M"] == 64
    assert ta.dq_config(128, "fp16", False, False, arch=90) == {
        "BLOCK_M": 64,
        "BLOCK_N": 32,
        "num_warps": 8,
        "num_stages": 2,
    }
    assert ta.fwd_config(128, "bf16", False, arch=90)["BLOCK_N"] == 64
    assert ta.fwd_config(128, "bf16", False, arch=80)["BLOCK_N"] == 32
    # fp32 (exact products on the FMA units) and the interpreter's tiles do not depend on the target
    for kind in (
        lambda a: ta.fwd_config(64, "fp32", False, arch=a),
        lambda a: ta.dq_config(64, "fp32", False, False, a),
        lambda a: ta.bwd_config(64, "bf16", False, True, a),
    ):
        assert kind(80) == kind(90)

    seen = set()
    for spec in ta.COMPILE_SPECS:
        kind = spec["name"].split("[")[0].removeprefix("tupe_attn_")
        c = spec["constexprs"]
        dt = {"ieee": "fp32"}.get(c["DOT_PRECISION"], spec["signature"]["Q"].lstrip("*"))
        for cc in spec["targets"]:
            varlen = c.get(
                "VARLEN", True
            )  # the query-subset forward is packed only and has no VARLEN flag
            cfg = ta._config(kind, dt, c["D"], varlen, cc)
            assert (c["BLOCK_M"], c["BLOCK_N"], spec["num_warps"], spec["num_stages"]) == (
                cfg["BLOCK_M"],
                cfg["BLOCK_N"],
                cfg["num_warps"],
                cfg["num_stages"],
            ), (spec["name"], cc)
            key = (kind, dt, c["D"], varlen, c.get("DROPOUT", False), cc)
            assert key not in seen, key  # one build per target
            seen.add(key)
    # every build is there for both targets
    assert {k[:5] for k in seen if k[5] == 80} == {k[:5] for k in seen if k[5] == 90}


def test_the_launchers_read_the_current_devices_capability(monkeypatch):
    """device_arch: the current CUDA device's capability (cached per device), 80 with no CUDA device."""
    import effbert.kernels as kernels
    from effbert.kernels import tupe_attention as ta

    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernels.device_arch() == 80 and kernels.device_arch(90) == 90
    kernels._capability.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    try:
        assert kernels.device_arch() == 90
        assert ta.bwd_config(64, "bf16", True, False) == ta.bwd_config(
            64, "bf16", True, False, arch=90
        )
        assert ta.fwd_config(128, "bf16", False) == ta.fwd_config(128, "bf16", False, arch=90)
    finally:
        kernels._capability.cache_clear()
