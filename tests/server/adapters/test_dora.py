"""DoRA through the registry: claimed inside peft_type LORA, validated against the base, and refused
when its magnitude does not fit. (Per-row equality with PEFT, plain and 4-bit, is the mixed-batch test.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterserve.server.adapters.config_parsing import resolve_config
from adapterserve.server.adapters.loader import load_adapter_dir
from adapterserve.server.errors import BaseMismatchError
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import make_adapter

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def dora_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, "dora", tmp_path_factory.mktemp("dora") / "a", seed=1)


def test_use_dora_is_served_as_dora_and_plain_lora_stays_lora(dora_dir):
    raw = json.loads((dora_dir / "adapter_config.json").read_text())
    assert resolve_config(raw)[0].name == "dora"
    assert resolve_config({**raw, "use_dora": False})[0].name == "lora"


def test_loaded_dora_reports_what_it_adapts(dora_dir, tiny_base):
    adapter = load_adapter_dir(dora_dir, tiny_base.spec, EngineSettings())
    info = adapter.info
    assert (info.kind, info.peft_type, info.rank) == ("dora", "LORA", 4)
    assert info.target_modules == ("down_proj", "o_proj", "q_proj", "v_proj")
    a, b, magnitude = adapter.weights.modules[(0, "down_proj")]
    assert a.shape == (tiny_base.spec.linear_shapes["down_proj"][0], 2)  # rank_pattern down_proj: 2
    assert magnitude.shape == (tiny_base.spec.linear_shapes["down_proj"][1],)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(dst / WEIGHTS))
    return dst


def test_missing_or_misshapen_magnitude_is_refused(dora_dir, tiny_base, tmp_path):
    key = next(k for k in load_file(str(dora_dir / WEIGHTS)) if k.endswith("q_proj.lora_magnitude_vector"))

    def drop(t):
        del t[key]

    def shrink(t):
        t[key] = t[key][:-1].clone()

    def stray(t):
        t[key.replace("self_attn.q_proj", "self_attn.k_proj")] = torch.ones(t[key].shape[0] // 2)

    for name, edit, match in [
        ("drop", drop, "needs lora_magnitude_vector"),
        ("shrink", shrink, "lora_magnitude_vector has shape"),
        ("stray", stray, "k_proj"),
    ]:
        with pytest.raises(BaseMismatchError, match=match):
            load_adapter_dir(_rewrite(dora_dir, tmp_path / name, edit), tiny_base.spec, EngineSettings())
