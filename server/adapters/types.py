"""Types shared by the adapter kinds, the store and the API layer (no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter is, as validated against the served base. Goes into the store's manifest."""

    kind: str  # a registered kind's name ("lora", "ia3", ...; see adapters/kind.py)
    peft_type: str  # as in adapter_config.json, e.g. "LORA", "P_TUNING"
    rank: int | None  # low-rank kinds: the largest rank over modules (AdaLoRA: after pruning); else None
    num_virtual_tokens: int | None  # prompt / prefix kinds; else None
    target_modules: tuple[str, ...]  # short names, e.g. ("q_proj", "v_proj"); () for prompt/prefix
    num_parameters: int  # elements in the served tensors
    nbytes: int  # bytes of the served tensors (what a host-cache entry costs)
