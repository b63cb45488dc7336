"""adapter_config.json parsing: every served PEFT type as PEFT 0.21.2 writes it, and every refusal."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adapterserve.server.adapters.config_parsing import parse_adapter_config, resolve_config
from adapterserve.server.adapters.kinds.ia3 import IA3AdapterConfig
from adapterserve.server.adapters.kinds.lora import AdaLoraAdapterConfig, LoraAdapterConfig
from adapterserve.server.adapters.kinds.prefix import PrefixTuningAdapterConfig
from adapterserve.server.adapters.kinds.prompt import PromptTuningAdapterConfig, PTuningAdapterConfig
from adapterserve.server.errors import AdapterValidationError, UnsupportedAdapterError
from tests.helpers.peft_adapters import PEFT_TYPES, peft_config, save_peft_adapter


@pytest.fixture(scope="module")
def saved_configs(tiny_model_dir, tmp_path_factory) -> dict[str, bytes]:
    """peft_type -> the adapter_config.json bytes that PeftModel.save_pretrained wrote."""
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for t in PEFT_TYPES:
        d = save_peft_adapter(tiny_model_dir, root / t, t)
        out[t] = (d / "adapter_config.json").read_bytes()
    return out


def lora_dict(**changes) -> dict:
    """A LoRA config dict exactly as PEFT writes it, with `changes` applied."""
    d = json.loads(json.dumps(peft_config("LORA").to_dict(), default=sorted))
    d.update(changes)
    return d


EXPECTED_TYPES = {
    "LORA": (LoraAdapterConfig, "lora"),
    "ADALORA": (AdaLoraAdapterConfig, "lora"),
    "IA3": (IA3AdapterConfig, "ia3"),
    "PROMPT_TUNING": (PromptTuningAdapterConfig, "prompt"),
    "P_TUNING": (PTuningAdapterConfig, "prompt"),
    "PREFIX_TUNING": (PrefixTuningAdapterConfig, "prefix"),
}


@pytest.mark.parametrize("peft_type", PEFT_TYPES)
def test_every_served_type_as_saved_by_peft_parses(saved_configs, peft_type):
    kind, config = resolve_config(saved_configs[peft_type])
    cls, kind_name = EXPECTED_TYPES[peft_type]
    assert type(config) is cls
    assert kind.name == kind_name
    assert config.peft_type == peft_type
    assert config.task_type == "CAUSAL_LM"
    assert config.base_model_name_or_path  # kept, informational


@pytest.mark.parametrize("peft_type", PEFT_TYPES)
def test_str_bytes_and_dict_inputs_agree(saved_configs, peft_type):
    raw = saved_configs[peft_type]
    assert (
        parse_adapter_config(raw)
        == parse_adapter_config(raw.decode())
        == parse_adapter_config(json.loads(raw))
    )


def test_typed_attributes_the_engine_reads(saved_configs):
    lora = parse_adapter_config(saved_configs["LORA"])
    assert (lora.r, lora.lora_alpha, lora.use_rslora) == (4, 8.0, False)
    assert sorted(lora.target_modules) == ["q_proj", "v_proj"]
    assert lora.scaling_for("model.layers.0.self_attn.q_proj") == 2.0

    ada = parse_adapter_config(saved_configs["ADALORA"])
    assert (ada.init_r, ada.target_r) == (6, 4)

    ia3 = parse_adapter_config(saved_configs["IA3"])
    assert sorted(ia3.target_modules) == ["down_proj", "k_proj", "v_proj"]
    assert ia3.feedforward_modules == ["down_proj"]

    pt = parse_adapter_config(saved_configs["PROMPT_TUNING"])
    assert (pt.num_virtual_tokens, pt.token_dim, pt.num_transformer_submodules) == (4, 64, 1)
    assert (pt.num_layers, pt.prompt_tuning_init) == (2, "RANDOM")

    ptune = parse_adapter_config(saved_configs["P_TUNING"])
    assert (ptune.encoder_reparameterization_type, ptune.encoder_hidden_size) == ("MLP", 16)

    prefix = parse_adapter_config(saved_configs["PREFIX_TUNING"])
    assert prefix.num_virtual_tokens == 4 and prefix.prefix_projection is False
    assert prefix.token_dim == 32  # key/value width of the tiny model's GQA (2 kv heads x 16)


def test_rank_and_alpha_patterns_follow_peft_semantics():
    config = parse_adapter_config(
        lora_dict(
            r=4,
            lora_alpha=8,
            rank_pattern={"q_proj": 8},
            alpha_pattern={"model.layers.1.self_attn.v_proj": 2},
        )
    )
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert config.alpha_for("model.layers.1.self_attn.v_proj") == 2.0
    assert config.alpha_for("model.layers.0.self_attn.v_proj") == 8.0
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == 1.0  # 8 / 8
    rs = parse_adapter_config(lora_dict(r=16, lora_alpha=8, use_rslora=True))
    assert math.isclose(rs.scaling_for("model.layers.0.self_attn.q_proj"), 8 / 4)


def test_adalora_rank_pattern_masks_give_kept_ranks():
    d = json.loads(json.dumps(peft_config("ADALORA").to_dict(), default=sorted))
    d["rank_pattern"] = {"model.layers.0.self_attn.q_proj": [True, False, True, False, False, False]}
    config = parse_adapter_config(d)
    assert config.rank_for("base_model.model.model.layers.0.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 6  # init_r


def test_regex_target_modules_and_init_only_fields_are_accepted():
    config = parse_adapter_config(
        lora_dict(
            target_modules=r".*\.(q_proj|v_proj)$",
            lora_dropout=0.1,
            init_lora_weights="gaussian",
            eva_config={"rho": 2.0},
            loftq_config={},
            layers_to_transform=[0],
        )
    )
    assert config.target_modules == r".*\.(q_proj|v_proj)$"
    assert config.layers_to_transform == [0]


def test_task_type_null_with_transformers_auto_mapping_is_accepted():
    d = lora_dict(
        task_type=None,
        auto_mapping={
            "base_model_class": "LlamaForCausalLM",
            "parent_library": "transformers.models.llama.modeling_llama",
        },
    )
    assert parse_adapter_config(d).task_type is None


@pytest.mark.parametrize(
    "changes, field",
    [
        (
            {"use_dora": True, "lora_bias": True},
            "lora_bias",
        ),  # DoRA is served; its unsupported fields are not
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "all"}, "bias"),
        ({"bias": "lora_only"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
        ({"use_qalora": True}, "use_qalora"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config"),
        ({"task_type": "SEQ_CLS"}, "task_type"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
        ({"init_lora_weights": "olora"}, "init_lora_weights"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights"),
        ({"kasa_config": {"x": 1}}, "kasa_config"),
        ({"arrow_config": {"top_k": 2}}, "arrow_config"),
        ({"rank_pattern": {"(a+)+$": 8}}, "rank_pattern"),
    ],
)
def test_unserved_lora_values_are_refused_naming_field_and_value(changes, field):
    with pytest.raises(UnsupportedAdapterError) as info:
        parse_adapter_config(lora_dict(**changes))
    message = str(info.value)
    assert field in message
    assert repr(next(iter(changes.values())))[:20] in message or "(a+)+$" in message


@pytest.mark.parametrize("peft_type", ["VERA", "LOHA", "BOFT", "lora", "POLY"])
def test_unserved_peft_types_are_refused(peft_type):
    with pytest.raises(UnsupportedAdapterError, match=f"peft_type '{peft_type}' is not served"):
        parse_adapter_config(lora_dict(peft_type=peft_type))


def test_ia3_and_prompt_unserved_values(saved_configs):
    ia3 = json.loads(saved_configs["IA3"])
    with pytest.raises(UnsupportedAdapterError, match="fan_in_fan_out"):
        parse_adapter_config({**ia3, "fan_in_fan_out": True})
    with pytest.raises(UnsupportedAdapterError, match="modules_to_save"):
        parse_adapter_config({**ia3, "modules_to_save": ["score"]})
    prompt = json.loads(saved_configs["PROMPT_TUNING"])
    with pytest.raises(UnsupportedAdapterError, match="num_transformer_submodules = 2"):
        parse_adapter_config({**prompt, "num_transformer_submodules": 2})


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"auto_map": {"AutoModel": "evil.Model"}}, "auto_map"),
        ({"trust_remote_code": True}, "trust_remote_code"),
        ({"megatron_core": "os"}, "megatron_core"),
        ({"auto_mapping": {"base_model_class": "Evil", "parent_library": "evil_pkg.models"}}, "auto_mapping"),
    ],
)
def test_remote_code_fields_are_refused(changes, field):
    with pytest.raises(AdapterValidationError) as info:
        parse_adapter_config(lora_dict(**changes))
    assert not isinstance(info.value, UnsupportedAdapterError)
    assert field in str(info.value)


def test_tokenizer_kwargs_asking_for_remote_code_are_refused(saved_configs):
    prompt = json.loads(saved_configs["PROMPT_TUNING"])
    prompt["tokenizer_kwargs"] = {"trust_remote_code": True}
    with pytest.raises(AdapterValidationError, match="tokenizer_kwargs.trust_remote_code"):
        parse_adapter_config(prompt)


def test_unknown_fields_are_refused_by_name(saved_configs):
    for peft_type in PEFT_TYPES:
        d = json.loads(saved_configs[peft_type])
        d["surprise_field"] = 1
        with pytest.raises(AdapterValidationError, match="unknown field 'surprise_field'"):
            parse_adapter_config(d)
    # A field of another type is unknown too (r is LoRA's, not IA3's).
    with pytest.raises(AdapterValidationError, match="unknown field 'r'"):
        parse_adapter_config({**json.loads(saved_configs["IA3"]), "r": 8})


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"[1, 2]", "must be a JSON object"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"peft_type": "LORA", "peft_type": "IA3"}', "'peft_type' appears twice"),
        (b'{"r": 8}', "'peft_type' is missing"),
        (b'{"peft_type": 3}', "'peft_type' must be a string"),
        (b'{"peft_type": "LORA", "r": NaN}', "NaN is not a valid JSON number"),
        (b'{"peft_type": "LORA", "r": 0}', "field 'r'"),
        (b'{"peft_type": "LORA", "r": true}', "field 'r'"),
        (b'{"peft_type": "LORA", "use_dora": "yes"}', "field 'use_dora'"),
        (b" " * 70_000 + b"{}", "at most 65536 bytes"),
        (b"[" * 100_000 + b"]" * 100_000, "at most 65536 bytes"),
    ],
)
def test_malformed_configs_are_refused_precisely(raw, message):
    with pytest.raises(AdapterValidationError, match=message):
        parse_adapter_config(raw)


def test_deep_nesting_within_the_size_cap_is_refused_cleanly():
    raw = b'{"peft_type": "LORA", "eva_config": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    with pytest.raises(AdapterValidationError):
        parse_adapter_config(raw)


def test_parsed_config_is_frozen(saved_configs):
    config = parse_adapter_config(saved_configs["LORA"])
    with pytest.raises(Exception):  # noqa: B017 (pydantic's frozen error type)
        config.r = 64  # type: ignore[misc]


def test_real_saved_file_round_trip(tiny_model_dir, tmp_path: Path):
    d = save_peft_adapter(tiny_model_dir, tmp_path / "rs", "LORA", use_rslora=True, r=8, lora_alpha=16)
    config = parse_adapter_config((d / "adapter_config.json").read_bytes())
    assert config.use_rslora and config.r == 8
    assert math.isclose(config.scaling_for("model.layers.0.self_attn.v_proj"), 16 / math.sqrt(8))
