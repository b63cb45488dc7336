"""--demo-adapters: trained demo adapters are stored only for the base they were trained on."""

from __future__ import annotations

import json
import shutil

import pytest

from adapterserve.server.api.demo import demo_dir, trained_demo_adapters


def _fake_demo(root, name, fingerprint):
    adapter = root / "adapters" / name
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (root / "adapters" / f"{name}.manifest.json").write_text(json.dumps({"base_fingerprint": fingerprint}))


def test_only_adapters_of_the_served_base_are_picked(tmp_path):
    _fake_demo(tmp_path, "mine", "sha256:aaa")
    _fake_demo(tmp_path, "other", "sha256:bbb")
    (tmp_path / "adapters" / "broken.manifest.json").write_text("{not json")
    assert trained_demo_adapters("sha256:aaa", tmp_path) == {"mine": tmp_path / "adapters" / "mine"}
    assert trained_demo_adapters("sha256:ccc", tmp_path) == {}


def test_demo_dir_env_override(tmp_path, monkeypatch):
    _fake_demo(tmp_path, "x", "f")
    monkeypatch.setenv("ADAPTERSERVE_DEMO_DIR", str(tmp_path))
    assert demo_dir() == tmp_path


@pytest.mark.smollm2
def test_committed_demo_adapters_match_the_default_model(smollm2_dir, tmp_path):
    """The committed adapters were trained on the embedded default: its fingerprint must still match,
    and each one loads in the engine's validator."""
    from adapterserve.server.adapters.loader import load_adapter_dir
    from adapterserve.server.model.loading import load_base_model
    from adapterserve.server.settings import EngineSettings

    base = load_base_model(None, quantize="none", device="cpu")
    found = trained_demo_adapters(base.fingerprint)
    assert {"json-extract", "sentiment", "pirate"} <= set(found)
    kinds = set()
    for src in found.values():
        copy = shutil.copytree(src, tmp_path / src.name)
        kinds.add(load_adapter_dir(copy, base.spec, EngineSettings()).kind)
    assert len(kinds) == 3  # LoRA, prompt, prefix
