"""Prefix tuning (and P-tuning v2): a learned key/value prefix in every layer's attention cache, a
PREFILL kind.

PEFT saves `prompt_embeddings` [num_virtual_tokens, num_layers * 2 * kv_dim] (with prefix_projection the
MLP has already been applied when PEFT saved it). Stored as keys, values [layers, kv_heads, n, head_dim];
at prefill they are written into the request's cache row at positions 0..n-1 and the prompt follows at
positions n.. (as PEFT's forward does: the cache length sets the next position). Keys are stored as
given (no rotary applied to them). In the paged cache the prefix's whole blocks are shared by every row
of the same adapter version (content-addressed blocks, engine/prefix_cache.py): a row writes only the
positions it did not take from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field

from adapterserve.server.adapters.config import PromptLearningConfig
from adapterserve.server.adapters.kind import (
    AdapterKind,
    BankSite,
    HookSite,
    KindWeights,
    PrefillSlots,
    register_kind,
)
from adapterserve.server.adapters.kinds.prompt import check_virtual_tokens, single_prompt_tensor
from adapterserve.server.errors import BaseMismatchError


class PrefixTuningAdapterConfig(PromptLearningConfig):
    """Prefix tuning: a per-layer key/value prefix of num_virtual_tokens positions."""

    peft_type: Literal["PREFIX_TUNING"]
    encoder_hidden_size: Annotated[int, Field(ge=1)] | None = None
    prefix_projection: bool = False
    init_weights: Literal["zero"] | bool | None = None  # init-time only


@dataclass
class PrefixWeights(KindWeights):
    keys: torch.Tensor  # [num_layers, kv_heads, num_virtual_tokens, head_dim]
    values: torch.Tensor  # [num_layers, kv_heads, num_virtual_tokens, head_dim]

    @property
    def num_virtual_tokens(self) -> int:  # type: ignore[override]
        return self.keys.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]


class PrefixSlots(PrefillSlots):
    """slot -> (keys, values) [L, kvH, n, D] on the device."""

    def __init__(self, site: BankSite) -> None:
        super().__init__(site)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def write(self, slot: int, weights: KindWeights) -> None:
        assert isinstance(weights, PrefixWeights)
        dev, dt = self.site.device, self.site.dtype
        self.kv[slot] = (weights.keys.to(dev, dt), weights.values.to(dev, dt))

    def clear(self, slot: int) -> None:
        self.kv.pop(slot, None)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv.values())

    def prefill(self, slot, row, embeds, cache):
        keys, values = self.kv[slot]
        # positions the row took from cached blocks hold this prefix already (prefix_cache.py)
        cache.write_prefix(row, keys, values, start=cache.cached_tokens(row))
        return embeds, keys.shape[2]


class PrefixKind(AdapterKind):
    name = "prefix"
    peft_method = "prefix-tuning"
    configs = {"PREFIX_TUNING": PrefixTuningAdapterConfig}
    hook = HookSite.PREFILL
    kv_prefix = True
    summary = (
        "per-layer key/value prefix [layers, kv_heads, n, head_dim]; written into the row's cache at prefill"
    )

    def load(self, config, tensors, spec, settings) -> PrefixWeights:
        assert isinstance(config, PrefixTuningAdapterConfig)
        check_virtual_tokens(config, settings)
        emb = single_prompt_tensor(tensors)
        n = config.num_virtual_tokens
        layers, kv_heads, head_dim = spec.num_layers, spec.num_key_value_heads, spec.head_dim
        if config.num_layers not in (None, layers):
            raise BaseMismatchError(f"num_layers={config.num_layers} but the base model has {layers} layers")
        if config.token_dim not in (None, spec.kv_dim) or config.num_attention_heads not in (None, kv_heads):
            raise BaseMismatchError(
                f"token_dim={config.token_dim}, num_attention_heads={config.num_attention_heads} do not "
                f"match the base model's key/value size {spec.kv_dim} over {kv_heads} heads"
            )
        expected = (n, layers * 2 * spec.kv_dim)
        if tuple(emb.shape) != expected:
            raise BaseMismatchError(
                f"prompt_embeddings has shape {tuple(emb.shape)}, expected {expected} "
                f"(num_virtual_tokens x num_layers * 2 * kv_dim)"
            )
        # [n, L*2, kvH, D] -> [L*2, kvH, n, D]; even entries are keys, odd are values (PEFT's layout).
        kv = emb.float().view(n, layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)
        return PrefixWeights(keys=kv[0::2].contiguous(), values=kv[1::2].contiguous())

    def prefill_slots(self, site: BankSite) -> PrefillSlots:
        return PrefixSlots(site)


register_kind(PrefixKind())
