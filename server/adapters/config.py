"""adapter_config.json, parsed with pydantic against an allowlist of the PEFT types the engine serves.

Every byte of an uploaded adapter is untrusted, so the parser is strict:

- the JSON is size-capped, must be an object and must not repeat a key;
- `peft_type` must be one of SERVED_PEFT_TYPES (else UnsupportedAdapterError);
- fields that name code to import (`auto_map`, a non-default `megatron_core`, a custom `auto_mapping`,
  `trust_remote_code`, ...) are refused with AdapterValidationError;
- any field that PEFT 0.21.2 does not write for that type is refused (AdapterValidationError naming it);
- a well-formed value that changes the forward pass in a way the engine does not implement (DoRA,
  LoRA bias, modules_to_save, Activated LoRA, ...) is refused with UnsupportedAdapterError naming the
  field and the value;
- init-time-only fields (dropout, AdaLoRA's schedule, EVA/CorDA configs, prompt-init text, ...) are
  accepted and ignored: they do not change what the saved weights compute.

Caps (rank, virtual tokens) and shape checks against the base are the loader's job, not this module's.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from adapterserve.server.adapters.types import SERVED_PEFT_TYPES, AdapterKind
from adapterserve.server.errors import AdapterValidationError, UnsupportedAdapterError

MAX_CONFIG_BYTES = 64 << 10  # a real adapter_config.json is ~1-2 KiB
_MAX_LIST = 1024  # entries in target_modules, patterns, ...

# Field names that ask a loader to import or run code. Refused wherever they appear at top level.
REMOTE_CODE_FIELDS = frozenset(
    {
        "auto_map",
        "trust_remote_code",
        "custom_code",
        "code_path",
        "module_path",
        "class_path",
        "import_path",
        "custom_module",
        "custom_modules",
        "custom_class",
        "model_class",
        "_target_",
    }
)
_REMOTE_CODE_HINT = re.compile(r"remote_code|auto_map$|^_target_$", re.IGNORECASE)

# init_lora_weights values that rewrite the BASE weights at init (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA).
# PEFT resets the field to True when it saves such an adapter converted to plain LoRA
# (save_pretrained(path_initial_model_for_weight_conversion=...)); an unconverted one only fits the
# mutated base, which is not what the server holds.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# Plain module names (no regex metacharacters other than '.'): what rank/alpha pattern keys may be.
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,256}$")

Str = Annotated[str, Field(max_length=4096)]
ShortStr = Annotated[str, Field(max_length=256)]
StrList = Annotated[list[ShortStr], Field(max_length=_MAX_LIST)]


class _PeftConfigBase(BaseModel):
    """Fields every PEFT config writes (PeftConfig / PeftConfigMixin in PEFT 0.21.2)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    peft_type: str
    task_type: Str | None = None
    auto_mapping: dict[ShortStr, ShortStr] | None = None
    peft_version: ShortStr | None = None
    base_model_name_or_path: Str | None = None  # informational only; never loaded
    revision: ShortStr | None = None  # informational only
    inference_mode: bool = True
    modules_to_save: StrList | None = None

    @property
    def kind(self) -> AdapterKind:
        """How the engine serves this adapter (LoRA, IA3, prompt, prefix)."""
        return SERVED_PEFT_TYPES[self.peft_type]

    def unsupported(self) -> list[tuple[str, Any, str]]:
        """(field, value, why) for each value the engine does not serve; empty when servable."""
        out: list[tuple[str, Any, str]] = []
        if self.task_type not in (None, "CAUSAL_LM"):
            out.append(("task_type", self.task_type, "only CAUSAL_LM adapters are served"))
        if self.modules_to_save is not None:
            out.append(
                (
                    "modules_to_save",
                    self.modules_to_save,
                    "adapters that replace whole base modules are not served",
                )
            )
        return out

    def remote_code(self) -> list[tuple[str, Any, str]]:
        """(field, value, why) for values that name code to import; empty when none."""
        out: list[tuple[str, Any, str]] = []
        if self.auto_mapping is not None:
            cls = self.auto_mapping.get("base_model_class", "")
            lib = self.auto_mapping.get("parent_library", "")
            ok = (
                set(self.auto_mapping) <= {"base_model_class", "parent_library"}
                and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cls or "") is not None
                and re.fullmatch(r"transformers(\.[A-Za-z0-9_]+)*", lib or "") is not None
            )
            if not ok:
                out.append(
                    ("auto_mapping", self.auto_mapping, "names a class outside transformers to import")
                )
        return out


# ----------------------------------------------------------------------------------------------- LoRA
class LoraAdapterConfig(_PeftConfigBase):
    """LoRA / rsLoRA (and QLoRA: a LoRA trained on a quantized base). Fields as PEFT 0.21.2 writes them."""

    peft_type: Literal["LORA"]
    r: Annotated[int, Field(ge=1)] = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    target_modules: StrList | Str | None = None  # list of names, or one regex string ("all-linear" too)
    exclude_modules: StrList | Str | None = None
    rank_pattern: dict[ShortStr, Annotated[int, Field(ge=1)]] | None = None  # module name -> rank
    alpha_pattern: dict[ShortStr, float] | None = None  # module name -> alpha
    layers_to_transform: Annotated[list[int], Field(max_length=_MAX_LIST)] | int | None = None
    layers_pattern: StrList | ShortStr | None = None

    # Init/training-time only: accepted, ignored by the server.
    lora_dropout: float = 0.0
    init_lora_weights: bool | ShortStr = True
    loftq_config: dict[str, Any] | None = None
    eva_config: dict[str, Any] | None = None
    corda_config: dict[str, Any] | None = None
    lora_ga_config: dict[str, Any] | None = None
    velora_config: dict[str, Any] | None = None  # VeLoRA only changes the backward pass
    qalora_group_size: int = 16  # only read when use_qalora
    ensure_weight_tying: bool = False  # only acts on modules_to_save, which is refused
    megatron_core: ShortStr | None = "megatron.core"

    # Values other than the default are refused (see unsupported()).
    fan_in_fan_out: bool = False
    bias: ShortStr = "none"
    use_dora: bool = False
    lora_bias: bool = False
    use_qalora: bool = False
    target_parameters: StrList | None = None
    alora_invocation_tokens: Annotated[list[int], Field(max_length=_MAX_LIST)] | None = None
    layer_replication: Annotated[list[list[int]], Field(max_length=_MAX_LIST)] | None = None
    trainable_token_indices: Annotated[list[int], Field(max_length=_MAX_LIST)] | dict[str, Any] | None = None
    megatron_config: dict[str, Any] | None = None
    monteclora_config: dict[str, Any] | None = None
    use_bdlora: dict[str, Any] | bool | None = None
    arrow_config: dict[str, Any] | None = None
    kasa_config: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, Any, str]]:
        out = super().unsupported()
        default_only: list[tuple[str, Any, str]] = [
            ("use_dora", False, "DoRA is not served"),
            ("lora_bias", False, "a bias on LoRA B is not served"),
            ("bias", "none", "trained base biases are not served"),
            ("fan_in_fan_out", False, "transposed (Conv1D) base weights are not served"),
            ("use_qalora", False, "QALoRA is not served"),
            ("target_parameters", None, "LoRA on raw parameters (MoE experts) is not served"),
            ("alora_invocation_tokens", None, "Activated LoRA is not served"),
            ("layer_replication", None, "layer replication is not served"),
            ("trainable_token_indices", None, "trainable tokens are not served"),
            ("megatron_config", None, "Megatron parallel layers are not served"),
            ("monteclora_config", None, "Monte Carlo LoRA is not served"),
            ("use_bdlora", None, "block-diagonal LoRA is not served"),
            ("arrow_config", None, "Arrow routing is not served"),
            ("kasa_config", None, "KaSA is not served"),
        ]
        for name, default, why in default_only:
            value = getattr(self, name)
            off = value == default or (default is None and _is_off(value))
            if not off:
                out.append((name, value, why))
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
            out.append(
                (
                    "init_lora_weights",
                    init,
                    "this init rewrites the base weights; save the adapter converted to plain LoRA "
                    "(save_pretrained(..., path_initial_model_for_weight_conversion=...))",
                )
            )
        for field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field) or {}:
                if _PLAIN_KEY.fullmatch(key) is None:
                    out.append(
                        (field, key, "only plain module names are served as pattern keys, not regexes")
                    )
        return out

    def remote_code(self) -> list[tuple[str, Any, str]]:
        out = super().remote_code()
        if self.megatron_core not in (None, "megatron.core"):
            out.append(("megatron_core", self.megatron_core, "names a module to import"))
        return out

    @staticmethod
    def _pattern_value(patterns: dict[str, Any] | None, module_name: str) -> Any | None:
        """PEFT's get_pattern_key for plain keys: the first key equal to the name or to a dotted suffix."""
        for key in patterns or {}:
            if module_name == key or module_name.endswith("." + key):
                return patterns[key]  # type: ignore[index]
        return None

    def rank_for(self, module_name: str) -> int:
        """The rank PEFT gives `module_name` (e.g. model.layers.0.self_attn.q_proj)."""
        value = self._pattern_value(self.rank_pattern, module_name)
        return self.r if value is None else int(value)

    def alpha_for(self, module_name: str) -> float:
        """The lora_alpha PEFT gives `module_name`."""
        value = self._pattern_value(self.alpha_pattern, module_name)
        return self.lora_alpha if value is None else float(value)

    def scaling_for(self, module_name: str, rank: int | None = None) -> float:
        """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA. `rank` overrides the config's."""
        r = self.rank_for(module_name) if rank is None else rank
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


class AdaLoraAdapterConfig(LoraAdapterConfig):
    """AdaLoRA: LoRA with an SVD-style E vector and per-module pruned ranks (rank_pattern holds masks)."""

    peft_type: Literal["ADALORA"]  # type: ignore[assignment]
    target_r: Annotated[int, Field(ge=1)] = 8
    init_r: Annotated[int, Field(ge=1)] = 12
    # After training: module name -> keep-mask over init_r ranks (PEFT's resize_modules_by_rank_pattern).
    rank_pattern: dict[ShortStr, Annotated[list[bool], Field(max_length=1 << 16)]] | None = None  # type: ignore[assignment]
    # Training schedule only.
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def rank_for(self, module_name: str) -> int:
        """Kept ranks of `module_name` after pruning (init_r when there is no mask for it)."""
        mask = self._pattern_value(self.rank_pattern, module_name)
        return self.init_r if mask is None else sum(1 for keep in mask if keep)


# ------------------------------------------------------------------------------------------------ IA3
class IA3AdapterConfig(_PeftConfigBase):
    """IA3: a learned vector scales the input (feed-forward modules) or the output of each target linear."""

    peft_type: Literal["IA3"]
    target_modules: StrList | Str | None = None
    exclude_modules: StrList | Str | None = None
    feedforward_modules: StrList | Str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def unsupported(self) -> list[tuple[str, Any, str]]:
        out = super().unsupported()
        if self.fan_in_fan_out:
            out.append(("fan_in_fan_out", True, "transposed (Conv1D) base weights are not served"))
        return out


# ------------------------------------------------------------------------------------ prompt learning
class _PromptLearningBase(_PeftConfigBase):
    """Fields of PEFT's PromptLearningConfig."""

    num_virtual_tokens: Annotated[int, Field(ge=1)]
    token_dim: Annotated[int, Field(ge=1)] | None = None
    num_transformer_submodules: Annotated[int, Field(ge=1)] | None = None
    num_attention_heads: Annotated[int, Field(ge=1)] | None = None
    num_layers: Annotated[int, Field(ge=1)] | None = None

    def unsupported(self) -> list[tuple[str, Any, str]]:
        out = super().unsupported()
        if self.num_transformer_submodules not in (None, 1):
            out.append(
                (
                    "num_transformer_submodules",
                    self.num_transformer_submodules,
                    "encoder-decoder prompts are not served (decoder-only base)",
                )
            )
        return out


class PromptTuningAdapterConfig(_PromptLearningBase):
    """Prompt tuning: num_virtual_tokens learned input embeddings, prepended to the prompt."""

    peft_type: Literal["PROMPT_TUNING"]
    # Init-time only: how the embeddings were initialised before training.
    prompt_tuning_init: Literal["RANDOM", "TEXT", "SAMPLE_VOCAB"] = "RANDOM"
    prompt_tuning_init_text: Str | None = None
    tokenizer_name_or_path: Str | None = None  # never loaded by the server
    tokenizer_kwargs: dict[ShortStr, Any] | None = None  # never used by the server

    def remote_code(self) -> list[tuple[str, Any, str]]:
        out = super().remote_code()
        for key in self.tokenizer_kwargs or {}:
            if _REMOTE_CODE_HINT.search(key):
                out.append((f"tokenizer_kwargs.{key}", self.tokenizer_kwargs[key], "asks for remote code"))  # type: ignore[index]
        return out


class PTuningAdapterConfig(_PromptLearningBase):
    """P-tuning: virtual tokens produced by an MLP/LSTM encoder (PEFT saves the encoder's output)."""

    peft_type: Literal["P_TUNING"]
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: Annotated[int, Field(ge=1)] | None = None
    encoder_num_layers: Annotated[int, Field(ge=1)] = 2
    encoder_dropout: float = 0.0


class PrefixTuningAdapterConfig(_PromptLearningBase):
    """Prefix tuning: a per-layer key/value prefix of num_virtual_tokens positions."""

    peft_type: Literal["PREFIX_TUNING"]
    encoder_hidden_size: Annotated[int, Field(ge=1)] | None = None
    prefix_projection: bool = False
    init_weights: Literal["zero"] | bool | None = None  # init-time only


AdapterConfig = Annotated[
    LoraAdapterConfig
    | AdaLoraAdapterConfig
    | IA3AdapterConfig
    | PromptTuningAdapterConfig
    | PTuningAdapterConfig
    | PrefixTuningAdapterConfig,
    Field(discriminator="peft_type"),
]
"""One parsed adapter_config.json; `.peft_type` tells which model it is, `.kind` how it is served."""

_ADAPTER: TypeAdapter[Any] = TypeAdapter(AdapterConfig)

# The pydantic model for each served peft_type.
CONFIG_MODELS: dict[str, type[_PeftConfigBase]] = {
    "LORA": LoraAdapterConfig,
    "ADALORA": AdaLoraAdapterConfig,
    "IA3": IA3AdapterConfig,
    "PROMPT_TUNING": PromptTuningAdapterConfig,
    "P_TUNING": PTuningAdapterConfig,
    "PREFIX_TUNING": PrefixTuningAdapterConfig,
}
assert set(CONFIG_MODELS) == set(SERVED_PEFT_TYPES)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise AdapterValidationError(f"adapter_config.json: key {key!r} appears twice")
        out[key] = value
    return out


def _load_json(data: bytes | str) -> Any:
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterValidationError(
            f"adapter_config.json is {len(raw)} bytes; at most {MAX_CONFIG_BYTES} bytes are accepted"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise AdapterValidationError(
            f"adapter_config.json is not UTF-8 ({err.reason} at byte {err.start})"
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise AdapterValidationError(
            f"adapter_config.json is not valid JSON: {err.msg} (line {err.lineno})"
        ) from None
    except RecursionError:
        raise AdapterValidationError("adapter_config.json is nested too deeply") from None


def _refuse_constant(name: str) -> Any:
    raise AdapterValidationError(f"adapter_config.json: {name} is not a valid JSON number")


def _describe(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error.get("loc", ())]
    if loc and loc[0] in CONFIG_MODELS:  # drop the discriminator tag pydantic puts first
        loc = loc[1:]
    field = ".".join(loc) or "(root)"
    if error.get("type") == "extra_forbidden":
        return f"unknown field {field!r} is not accepted"
    return f"field {field!r}: {error.get('msg', 'invalid')}"


def parse_adapter_config(data: bytes | str | dict[str, Any]) -> AdapterConfig:
    """Parse and check an adapter_config.json (bytes/str) or an already-decoded dict.

    Raises AdapterValidationError (malformed, unknown or remote-code fields) or UnsupportedAdapterError
    (a peft_type or field value the engine does not serve); messages name the field and value.
    """
    obj = dict(data) if isinstance(data, dict) else _load_json(data)
    if not isinstance(obj, dict):
        raise AdapterValidationError(f"adapter_config.json must be a JSON object, not {type(obj).__name__}")

    for key in obj:
        if not isinstance(key, str):
            raise AdapterValidationError(f"adapter_config.json: key {key!r} is not a string")
        if key in REMOTE_CODE_FIELDS or _REMOTE_CODE_HINT.search(key):
            raise AdapterValidationError(
                f"adapter_config.json: field {key!r} asks to import or run code; remote code is refused"
            )

    peft_type = obj.get("peft_type")
    if peft_type is None:
        raise AdapterValidationError("adapter_config.json: field 'peft_type' is missing")
    if not isinstance(peft_type, str):
        raise AdapterValidationError(
            f"adapter_config.json: field 'peft_type' must be a string, got {peft_type!r}"
        )
    if peft_type not in SERVED_PEFT_TYPES:
        served = ", ".join(sorted(SERVED_PEFT_TYPES))
        raise UnsupportedAdapterError(
            f"adapter_config.json: peft_type {peft_type[:64]!r} is not served (served: {served})"
        )

    try:
        config = _ADAPTER.validate_python(obj)
    except ValidationError as err:
        errors = err.errors(include_url=False, include_input=False)
        # Unknown fields first: they are the most precise reason.
        errors.sort(key=lambda e: e.get("type") != "extra_forbidden")
        detail = "; ".join(_describe(e) for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise AdapterValidationError(f"adapter_config.json ({peft_type}): {detail}{more}") from None

    for field, value, why in config.remote_code():
        raise AdapterValidationError(
            f"adapter_config.json ({peft_type}): field {field!r} = {_short(value)} is refused: {why}"
        )
    for field, value, why in config.unsupported():
        raise UnsupportedAdapterError(
            f"adapter_config.json ({peft_type}): {field} = {_short(value)} is not supported: {why}"
        )
    return config


def _is_off(value: Any) -> bool:
    """False, an empty list or an empty dict: what older PEFT versions write for a feature left off."""
    return value is False or (isinstance(value, (list, dict)) and len(value) == 0)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "AdaLoraAdapterConfig",
    "AdapterConfig",
    "CONFIG_MODELS",
    "IA3AdapterConfig",
    "LoraAdapterConfig",
    "MAX_CONFIG_BYTES",
    "PTuningAdapterConfig",
    "PrefixTuningAdapterConfig",
    "PromptTuningAdapterConfig",
    "REMOTE_CODE_FIELDS",
    "parse_adapter_config",
]
