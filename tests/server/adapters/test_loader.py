"""The loader through the kind registry: every kind is claimed by exactly one registered kind, and an
adapter whose config and tensors disagree is refused as PEFT refuses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adapterserve.server.adapters.kind import all_kinds, kind_for_config, served_peft_types
from adapterserve.server.adapters.loader import load_adapter_dir
from adapterserve.server.errors import BaseMismatchError
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_adapters import PEFT_TYPES, save_peft_adapter


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return save_peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora") / "a", "LORA")


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_registry_names_are_unique_and_claim_every_served_peft_type():
    names = [k.name for k in all_kinds()]
    assert len(names) == len(set(names))
    assert set(PEFT_TYPES) <= set(served_peft_types())
    for peft_type in PEFT_TYPES:
        assert kind_for_config({"peft_type": peft_type}) is not None
    assert kind_for_config({"peft_type": "LOHA"}) is None


def test_unknown_target_modules_with_tensors_for_real_modules_are_refused(
    lora_dir, tiny_base, tiny_model_dir, tmp_path
):
    bad = _with_config(lora_dir, tmp_path / "bad", target_modules=["does_not_exist"])
    with pytest.raises(BaseMismatchError, match="match no module of the base"):
        load_adapter_dir(bad, tiny_base.spec, EngineSettings())
    # PEFT refuses the same folder, which is why the server must.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="not found in the base model"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), bad)


def test_tensors_for_modules_the_config_does_not_name_are_refused(lora_dir, tiny_base, tmp_path):
    partial = _with_config(lora_dir, tmp_path / "partial", target_modules=["q_proj"])  # tensors: q and v
    with pytest.raises(BaseMismatchError, match=r"v_proj, which the config's target_modules"):
        load_adapter_dir(partial, tiny_base.spec, EngineSettings())
    excluded = _with_config(lora_dir, tmp_path / "excluded", exclude_modules=["v_proj"])
    with pytest.raises(BaseMismatchError, match="config and tensors must agree"):
        load_adapter_dir(excluded, tiny_base.spec, EngineSettings())
    layers = _with_config(lora_dir, tmp_path / "layers", layers_to_transform=[0])  # tensors in layers 0, 1
    with pytest.raises(BaseMismatchError, match="model.layers.1"):
        load_adapter_dir(layers, tiny_base.spec, EngineSettings())


def test_matching_config_and_tensors_load(lora_dir, tiny_base, tmp_path):
    regex = _with_config(lora_dir, tmp_path / "regex", target_modules=r".*\.(q_proj|v_proj)")
    for path in (lora_dir, regex):
        adapter = load_adapter_dir(path, tiny_base.spec, EngineSettings())
        assert adapter.kind == "lora" and adapter.info.target_modules == ("q_proj", "v_proj")
