"""Fixtures for store tests: real PEFT adapters saved from the tiny model, and a store on tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterserve.server.store.store import AdapterStore
from tests.helpers.peft_adapters import write_lora_dir
from tests.server.store.validators import make_validator


@pytest.fixture(scope="session")
def spec(tiny_base):
    return tiny_base.spec


@pytest.fixture(scope="session")
def lora_dirs(spec, tmp_path_factory) -> list[Path]:
    """Four LoRA adapters (different weights) for the tiny base, in PEFT's layout."""
    root = tmp_path_factory.mktemp("loras")
    return [write_lora_dir(root / f"l{i}", spec, seed=i) for i in range(4)]


@pytest.fixture
def make_store(spec, tiny_base, tmp_path):
    """make_store(**kw) -> an AdapterStore on tmp_path/store with the test validator (re-open = restart)."""
    root = tmp_path / "store"

    def make(**kw) -> AdapterStore:
        kw.setdefault("base_fingerprint", tiny_base.fingerprint)
        validate = kw.pop("validate", None) or make_validator(spec)
        return AdapterStore(kw.pop("root", root), validate, **kw)

    return make
