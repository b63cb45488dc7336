"""Prefix tuning (and P-tuning v2): a learned key/value prefix in every layer's attention cache.

PEFT saves `prompt_embeddings` [num_virtual_tokens, num_layers * 2 * kv_dim] (with prefix_projection the
MLP has already been applied when PEFT saved it). At prefill the engine writes the prefix into the
request's cache rows at positions 0..n-1; the prompt tokens follow at positions n.. (as PEFT's forward
does: the cache length sets the next position). Keys are stored as given (no rotary applied to them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterserve.server.adapters.config import PrefixTuningAdapterConfig
from adapterserve.server.adapters.prompt import single_prompt_tensor
from adapterserve.server.errors import BaseMismatchError, UnsupportedAdapterError
from adapterserve.server.model.spec import BaseModelSpec


@dataclass
class PrefixWeights:
    keys: torch.Tensor  # [num_layers, kv_heads, num_virtual_tokens, head_dim]
    values: torch.Tensor  # [num_layers, kv_heads, num_virtual_tokens, head_dim]

    @property
    def num_virtual_tokens(self) -> int:
        return self.keys.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]


def load_prefix(
    config: PrefixTuningAdapterConfig, tensors: dict[str, torch.Tensor], spec: BaseModelSpec
) -> PrefixWeights:
    emb = single_prompt_tensor(tensors)
    if (config.num_transformer_submodules or 1) != 1:
        raise UnsupportedAdapterError("only decoder-only (causal LM) prefix adapters are served")
    n = config.num_virtual_tokens
    layers, kv_heads, head_dim = spec.num_layers, spec.num_key_value_heads, spec.head_dim
    if config.num_layers not in (None, layers):
        raise BaseMismatchError(f"num_layers={config.num_layers} but the base model has {layers} layers")
    if config.token_dim not in (None, spec.kv_dim) or config.num_attention_heads not in (None, kv_heads):
        raise BaseMismatchError(
            f"token_dim={config.token_dim}, num_attention_heads={config.num_attention_heads} do not match "
            f"the base model's key/value size {spec.kv_dim} over {kv_heads} heads"
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
