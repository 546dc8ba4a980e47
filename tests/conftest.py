"""Test harness: the Triton interpreter when there is no CUDA device, the `gpu` marker, shared fixtures.

TRITON_INTERPRET must be set before anything imports effbert.kernels (triton.jit reads it when a kernel is defined),
which is why it is set here at import time and not in a fixture.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the marker itself: item.keywords also holds the names of the folders above the test, so a checkout in a
        # folder named "gpu" would skip every test
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        # regular dependencies that an install can lack: the GPU image has no datasets, and at times no accelerate
        # (which transformers' Trainer needs)
        for mark in item.iter_markers("requires"):
            missing = [name for name in mark.args if importlib.util.find_spec(name) is None]
            if missing:
                item.add_marker(
                    pytest.mark.skip(reason=f"needs {' and '.join(missing)}, not installed here")
                )


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Tests choose their backend explicitly; a user's EFFBERT_BACKEND must not leak into them."""
    monkeypatch.delenv("EFFBERT_BACKEND", raising=False)


@pytest.fixture
def seeded():
    """Fresh random inputs each run, but a failure prints the seed that reproduces it."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    return seed
