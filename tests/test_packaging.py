"""The package's shape: DESIGN.md's layout, one-way data flow, and csrc free of torch and cuBLAS headers."""

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import effbert

ROOT = Path(__file__).resolve().parents[1]


def python_sources(folder):
    return sorted((ROOT / folder).rglob("*.py"))


def test_kernels_are_a_subpackage_and_shadow_nothing():
    kernels = importlib.import_module("effbert.kernels")
    assert Path(kernels.__file__).resolve().parent == ROOT / "effbert" / "kernels"
    # a top-level folder named like a real package shadows it for anyone running from the checkout's root
    # (Hugging Face's `kernels`, which transformers >= 5.25 imports)
    top_level = {
        p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() or p.suffix == ".py"
    }
    assert top_level <= {"effbert", "setup.py"}, (
        f"top-level importable names besides effbert: {top_level}"
    )
    for path in python_sources("effbert") + python_sources("tests") + python_sources("benchmarks"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+kernels\b", text, re.M), (
            f"{path} imports a top-level kernels"
        )


def test_import_from_the_checkout_root_keeps_real_packages():
    """From the root (``python -c``, ``python -m pytest``), the cwd comes first on sys.path: nothing of ours may stand
    in for an installed package there. Hugging Face's ``kernels`` is the one transformers imports."""
    code = (
        "import importlib.util, effbert; spec = importlib.util.find_spec('kernels'); "
        "print(spec.origin if spec else 'absent')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    origin = out.stdout.strip().splitlines()[-1]
    assert origin == "absent" or not Path(origin).resolve().is_relative_to(ROOT), origin
    if origin != "absent":  # installed: it must import as itself, beside effbert
        out = subprocess.run(
            [sys.executable, "-c", "import effbert, kernels; print(kernels.__file__)"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert (
            out.returncode == 0 and Path(out.stdout.strip()).resolve() == Path(origin).resolve()
        ), out.stderr


@pytest.mark.parametrize(
    "folder,forbidden",
    [
        (
            "effbert/kernels",
            r"^\s*(from|import)\s+(effbert(\.ops|\.nn|\.models)?\b|\.\.ops)",
        ),  # kernels never import ops
        (
            "effbert/reference",
            r"^\s*(from|import)\s+(effbert\.kernels|\.\.kernels|kernels)\b",
        ),  # nor references
        (
            "effbert/ops",
            r"^\s*(from|import)\s+(effbert\.(nn|models)|\.\.(nn|models))\b",
        ),  # ops never import modules
    ],
)
def test_data_flows_one_way(folder, forbidden):
    for path in python_sources(folder):
        assert not re.search(forbidden, path.read_text(), re.M), (
            f"{path} imports against the data flow"
        )


def test_csrc_has_no_torch_or_cublas_headers():
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu")]
    assert sources
    for path in sources:
        includes = re.findall(r'#\s*include\s*[<"]([^>"]+)[>"]', path.read_text())
        bad = [
            i for i in includes if re.match(r"(torch|ATen|c10|cublas|cusparse|cublasLt)", i, re.I)
        ]
        assert not bad, f"{path} includes {bad}"


def test_cpu_extension_is_built_and_registered():
    module, why = effbert._ext.load("_C")
    assert module is not None, why
    assert "early_exit" in module.families


def test_backends_report_each_backend():
    status = effbert.backends()
    assert set(status) == set(effbert.BACKENDS) == {"triton", "cuda", "cpu", "eager"}
    assert status["eager"].available and status["eager"].reasons == ()
    for s in status.values():
        assert s.available == (not s.reasons)
        assert isinstance(str(s), str)


def test_cli_lists_commands(capsys):
    from effbert import commands as cli

    assert cli.main([]) == 2
    assert "check" in capsys.readouterr().out
    assert cli.main(["nonsense"]) == 2


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_command_names_the_package_it_lacks(command, monkeypatch, capsys, tmp_path):
    """The GPU image has no datasets (and at times no accelerate): the command says which, in one line, exit 2,
    before parsing or writing anything."""
    import importlib.util

    from effbert import commands as cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("datasets", "accelerate") else real(name, *a),
    )
    assert cli.main([command, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"effbert {command}: error: needs datasets and accelerate, not installed here "
        "(pip install datasets accelerate)"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("datasets") is not None, reason="datasets is installed here"
)
def test_without_datasets_the_library_imports_and_pretrain_says_so():
    """Where datasets really is absent (CI's venv shaped like the GPU image): the models and the training floor
    import, and the real command line names the package."""
    code = "import effbert, effbert.models, effbert.training, effbert.data; print('ok')"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "effbert.commands", "pretrain", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "needs datasets" in out.stderr


def test_cli_version(capsys):
    from effbert import commands as cli

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"effbert {effbert.__version__}"
    assert cli.main(["-V"]) == 0


def test_command_backends_must_run_on_the_device():
    """A backend for the wrong device is a one-line usage error before any work (cuda:0 needs no GPU here: only
    its type is looked at)."""
    import torch

    from effbert import commands as cli

    cli.check_backend("eager", torch.device("cuda", 0))
    cli.check_backend("auto", torch.device("cpu"))
    with pytest.raises(cli.UsageError, match="--backend cpu does not run with --device cuda:0"):
        cli.check_backend("cpu", torch.device("cuda", 0))
    if effbert.backends()["cuda"].available:
        with pytest.raises(cli.UsageError, match="--backend cuda does not run with --device cpu"):
            cli.check_backend("cuda", torch.device("cpu"))
    with pytest.raises(cli.UsageError, match="--backend must be auto or one of"):
        cli.check_backend("tpu", torch.device("cpu"))
    with pytest.raises(cli.UsageError, match="--device must be cpu, cuda or cuda:N"):
        cli.parse_device("cuda:x")


def _run_python(code):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_effbert_registers_the_auto_classes():
    done = _run_python(
        "import effbert\n"
        "from transformers import AutoConfig, AutoModelForMaskedLM\n"
        "cfg = AutoConfig.for_model('tupe-bert', vocab_size=11, hidden_size=8, num_hidden_layers=1,"
        " num_attention_heads=2, intermediate_size=8, max_position_embeddings=8)\n"
        "print(type(cfg).__name__, type(AutoModelForMaskedLM.from_config(cfg)).__name__)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["TupeBertConfig", "TupeBertForMaskedLM"]


def test_the_ops_work_without_transformers():
    """A kernels-only install (transformers absent) imports effbert and runs the ops."""
    done = _run_python(
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, effbert\n"
        "print(float(effbert.exit_entropy(torch.zeros(1, 2))[0]))\n"
    )
    assert done.returncode == 0, done.stderr
    assert abs(float(done.stdout) - 0.6931471805599453) < 1e-6
