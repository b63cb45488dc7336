"""Shared fixtures: the tiny random-weight model (seconds), markers for SmolLM2 and CUDA tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.tiny_model import make_tiny_model_dir

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# Without a GPU the Triton kernels (lora_backend "triton") run in Triton's CPU interpreter, which must be
# switched on before triton is first imported (its library functions are decorated at import).
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    has_cuda = _cuda_available()
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A directory with a tiny random Llama (2 layers, hidden 64, GQA 4/2 heads) and its tokenizer."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir):
    """The tiny model loaded through the project's one loading function (fp32, CPU)."""
    from adapterserve.server.model.loading import load_base_model

    return load_base_model(tiny_model_dir, quantize="none", device="cpu")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model as a cached safetensors dir (converted once, ~20 s the first time)."""
    from adapterserve.server.model.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def peft_adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """peft_type -> a directory PEFT saved (adapter_config.json, adapter_model.safetensors, README.md)."""
    from tests.helpers.peft_adapters import PEFT_TYPES, save_peft_adapter

    root = tmp_path_factory.mktemp("peft-adapters")
    return {t: save_peft_adapter(tiny_model_dir, root / t.lower(), t) for t in PEFT_TYPES}
