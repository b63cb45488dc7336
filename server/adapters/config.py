"""What every adapter_config.json model shares: each kind (server/adapters/kinds/) declares its config
models, subclasses of `PeftConfigBase`, built from the pieces here:

- the list and string caps (MAX_LIST, Str, ShortStr, StrList);
- the remote-code refusal: field names that ask a loader to import or run code (REMOTE_CODE_FIELDS,
  REMOTE_CODE_HINT) and `remote_code()` for values that name code to import;
- `unsupported()`: well-formed values that change the forward pass in a way the engine does not
  implement (DoRA, LoRA bias, modules_to_save, Activated LoRA, ...), each named with its field and value;
- PEFT's target matching (`TargetedConfig`, `pattern_value`, `check_targets_agree`).

Parsing a config (the JSON checks, the kind that claims it, its model) is config_parsing.py's job; caps
(rank, virtual tokens) and shape checks against the base are the loader's.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from adapterserve.server.errors import BaseMismatchError

MAX_LIST = 1024  # entries in target_modules, patterns, ...

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
REMOTE_CODE_HINT = re.compile(r"remote_code|auto_map$|^_target_$", re.IGNORECASE)

Str = Annotated[str, Field(max_length=4096)]
ShortStr = Annotated[str, Field(max_length=256)]
StrList = Annotated[list[ShortStr], Field(max_length=MAX_LIST)]


class PeftConfigBase(BaseModel):
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


class PromptLearningConfig(PeftConfigBase):
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


def pattern_value(patterns: dict[str, Any] | None, module_name: str) -> Any | None:
    """PEFT's rank_pattern / alpha_pattern lookup for plain keys (regex keys are refused by the configs):
    the first key equal to the module name or to a dotted suffix of it; None when no key matches."""
    for key in patterns or {}:
        if module_name == key or module_name.endswith("." + key):
            return patterns[key]  # type: ignore[index]
    return None


def _name_matches(names: list[str] | str, module_name: str) -> bool:
    """PEFT's rule: a string is a regex matched against the whole name; a list holds names or suffixes."""
    if isinstance(names, str):
        return re.fullmatch(names, module_name) is not None
    return any(module_name == n or module_name.endswith("." + n) for n in names)


class TargetedConfig(PeftConfigBase):
    """Fields of configs that adapt named modules (LoRA, IA3, ...), and PEFT's matching rule for them."""

    target_modules: StrList | Str | None = None  # list of names, or one regex string ("all-linear" too)
    exclude_modules: StrList | Str | None = None

    def targets(self, module_name: str, layer: int) -> bool:
        """Whether PEFT would adapt `module_name` (a decoder linear in layer `layer`) for this config."""
        if self.exclude_modules is not None and _name_matches(self.exclude_modules, module_name):
            return False
        if self.target_modules is None or self.target_modules == "all-linear":
            matched = True  # PEFT's per-architecture default / every linear but the output head
        else:
            matched = _name_matches(self.target_modules, module_name)
        layers = getattr(self, "layers_to_transform", None)  # LoRA-family configs only
        if matched and layers is not None:
            matched = layer in ([layers] if isinstance(layers, int) else layers)
        return matched


def check_targets_agree(config: TargetedConfig, modules: list[tuple[int, str]], spec: Any) -> None:
    """Config and tensors must agree, as PEFT requires when it loads an adapter: the config's
    target_modules must name some module of the base, and every module the tensors adapt must be one the
    config targets. `modules`: the (layer, short name) of every adapted module in the tensors."""
    base_modules = [(layer, short) for layer in range(spec.num_layers) for short in spec.linear_paths]
    if not any(config.targets(spec.module_name(*m), m[0]) for m in base_modules):
        raise BaseMismatchError(
            f"target_modules {shortened(config.target_modules)} match no module of the base model "
            f"(decoder linears: {', '.join(spec.linear_paths)})"
        )
    for layer, short in modules:
        name = spec.module_name(layer, short)
        if not config.targets(name, layer):
            raise BaseMismatchError(
                f"the tensors adapt {name}, which the config's target_modules "
                f"{shortened(config.target_modules)} do not name; config and tensors must agree"
            )


def is_off(value: Any) -> bool:
    """False, an empty list or an empty dict: what older PEFT versions write for a feature left off."""
    return value is False or (isinstance(value, (list, dict)) and len(value) == 0)


def shortened(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "PeftConfigBase",
    "PromptLearningConfig",
    "REMOTE_CODE_FIELDS",
    "ShortStr",
    "Str",
    "StrList",
    "MAX_LIST",
    "TargetedConfig",
    "check_targets_agree",
    "is_off",
    "pattern_value",
    "shortened",
]
