"""Fixtures for the SDK and CLI tests: the real server in a subprocess, adapter dirs, clients."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterserve import Client, RetryPolicy
from tests.helpers.server_process import ServerProcess, start_server

ADMIN_TOKEN = "client-tests-admin-token"
MAX_UPLOAD_BYTES = 65536
MAX_NEW_TOKENS = 48
UPLOAD_CHUNK_BYTES = 4096  # below the SDK's 256 KiB default: uploads must follow the server's limit

_names = itertools.count()


def pytest_configure(config):
    # Declared here as well as in pyproject.toml's markers, so that this folder's tests run on their own.
    config.addinivalue_line(
        "markers", "client_install: builds a client-only venv (no torch) from the package registry (~1 min)"
    )


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    """`adapterserve serve` on the tiny model, loopback, admin token ADMIN_TOKEN, small upload limit."""
    proc = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("client-server") / "store",
        env={"ADAPTERSERVE_ADMIN_TOKEN": ADMIN_TOKEN},
        extra_args=(
            "--grace",
            "5",
            "--max-upload-bytes",
            str(MAX_UPLOAD_BYTES),
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
            "--upload-chunk-bytes",
            str(UPLOAD_CHUNK_BYTES),
        ),
    )
    yield proc
    proc.stop()


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(server.target, admin_token=ADMIN_TOKEN, timeout=30, retry=RetryPolicy(max_attempts=3)) as c:
        yield c


@pytest.fixture
def name() -> str:
    """A fresh adapter name for this test."""
    return f"t{next(_names)}-{uuid.uuid4().hex[:8]}"


def _make(base: Path, kind: str, out: Path) -> Path:
    from tests.helpers.peft_refs import make_adapter

    return make_adapter(base, kind, out)


@pytest.fixture(scope="session")
def lora_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A real PEFT LoRA (r=4 on q_proj, v_proj) for the tiny model, as `save_pretrained` writes it."""
    return _make(tiny_model_dir, "lora_qv_r4", tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="session")
def prompt_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A real PEFT prompt-tuning adapter (4 virtual tokens) for the tiny model."""
    return _make(tiny_model_dir, "prompt", tmp_path_factory.mktemp("prompt") / "adapter")
