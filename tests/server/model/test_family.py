"""Where each family keeps its decoder, and what is refused: families whose transformers code the engine
cannot drive, and any forward the start-up self-check finds different from transformers' own."""

from __future__ import annotations

import pytest

from adapterserve.server.engine import attention
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.family import UnsupportedModelError, decoder_parts
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.tiny_model import FAMILY_OVERRIDES, make_tiny_model_dir

LAYERS_PATH = {"gpt_neox": "gpt_neox.layers"}


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "gpt_neox", "mixtral"])
def test_decoder_parts_and_module_names(family, tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, arch=family, **FAMILY_OVERRIDES[family])
    base = load_base_model(model_dir, quantize="none", device="cpu")
    parts = decoder_parts(base.model)
    assert len(parts.layers) == 2
    path = LAYERS_PATH.get(family, "model.layers")
    assert parts.layers_path == path == base.spec.layers_path
    short = next(iter(base.spec.linear_paths))
    name = base.spec.module_name(1, short)
    assert base.model.get_submodule(name) is not None  # the name PEFT uses is the model's own
    assert base.spec.parse_module_name(f"base_model.model.{name}") == (1, short)
    assert base.spec.parse_module_name("base_model.model.lm_head") is None
    assert parts.head_softcap == (4.0 if family == "gemma2" else None)


def test_a_family_without_the_attention_interface_is_refused():
    from transformers import AutoModelForCausalLM, BloomConfig

    model = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(
        UnsupportedModelError, match="model_type 'bloom' is not supported.*attention interface"
    ):
        decoder_parts(model)


def test_the_start_check_refuses_a_forward_that_differs(tmp_path, monkeypatch):
    """If the engine's forward ever diverged from the family's own (here: a mask that forgets Mistral's
    sliding window, as the engine did before), the engine refuses to start instead of serving it."""
    model_dir = make_tiny_model_dir(tmp_path, arch="mistral", head_dim=16, sliding_window=4)
    monkeypatch.setattr(attention.AttentionStep, "mask", lambda self, window: _causal_only(self))
    base = load_base_model(model_dir, quantize="none", device="cpu")
    with pytest.raises(UnsupportedModelError, match="differs from transformers' own"):
        OfflineEngine(base, EngineSettings(max_batch_size=2, max_seq_len=32, adapter_slots=1))


def test_the_start_check_passes_and_reports_its_difference(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, arch="mistral", head_dim=16, sliding_window=4)
    base = load_base_model(model_dir, quantize="none", device="cpu")
    engine = OfflineEngine(base, EngineSettings(max_batch_size=2, max_seq_len=32, adapter_slots=1))
    assert engine.core.forward_check is not None and engine.core.forward_check < 1e-4


def _causal_only(step):
    import torch

    keys = torch.arange(step.length, device=step.positions.device)
    return (keys[None, None, :] <= step.positions[:, :, None]).unsqueeze(1)
