"""Types shared by the adapter kinds, the store and the API layer (no torch)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AdapterKind(enum.StrEnum):
    LORA = "lora"  # LoRA, rsLoRA, AdaLoRA (folded), QLoRA adapters
    IA3 = "ia3"
    PROMPT = "prompt"  # prompt tuning and P-tuning (encoder output computed once at load)
    PREFIX = "prefix"  # prefix tuning / P-tuning v2 (per-layer key/value prefix)


# PEFT's peft_type values the engine serves, and the kind each one is served as.
SERVED_PEFT_TYPES: dict[str, AdapterKind] = {
    "LORA": AdapterKind.LORA,
    "ADALORA": AdapterKind.LORA,
    "IA3": AdapterKind.IA3,
    "PROMPT_TUNING": AdapterKind.PROMPT,
    "P_TUNING": AdapterKind.PROMPT,
    "PREFIX_TUNING": AdapterKind.PREFIX,
}


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter is, as validated against the served base. Goes into the store's manifest."""

    kind: AdapterKind
    peft_type: str  # as in adapter_config.json, e.g. "LORA", "P_TUNING"
    rank: int | None  # LoRA: the largest rank over modules after AdaLoRA pruning; else None
    num_virtual_tokens: int | None  # prompt / prefix kinds; else None
    target_modules: tuple[str, ...]  # short names, e.g. ("q_proj", "v_proj"); () for prompt/prefix
    num_parameters: int  # elements in the served tensors
    nbytes: int  # bytes of the served tensors (what a host-cache entry costs)
