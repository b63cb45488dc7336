"""What an adapter must fit: the base model's dimensions and its linear layers, as plain data."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from adapterserve.server.model.family import UnsupportedModelError, decoder_parts, text_config


@dataclass(frozen=True)
class BaseModelSpec:
    model_type: str  # "llama", "mistral", "qwen2", ...
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    # short name ("q_proj") -> (in_features, out_features); same in every layer for these families
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # short name -> path inside a layer ("self_attn.q_proj")
    linear_paths: dict[str, str] = field(default_factory=dict)
    # where the decoder layers live in the causal LM: "model.layers" (Llama-like), "gpt_neox.layers"
    layers_path: str = "model.layers"

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def module_name(self, layer: int, short: str) -> str:
        """Full module name as in the base model, e.g. model.layers.3.self_attn.q_proj."""
        return f"{self.layers_path}.{layer}.{self.linear_paths[short]}"

    def parse_module_name(self, name: str) -> tuple[int, str] | None:
        """(layer index, short name) for a full decoder-linear name, or None if it is not one.

        Accepts names with or without PEFT's prefixes (base_model.model.) in front of the layers' path.
        """
        idx = name.find(self.layers_path + ".")
        if idx < 0:
            return None
        m = re.match(r"^(\d+)\.(.+)$", name[idx + len(self.layers_path) + 1 :])
        if m is None:
            return None
        layer, path = int(m.group(1)), m.group(2)
        for short, known in self.linear_paths.items():
            if path == known:
                return (layer, short) if layer < self.num_layers else None
        return None


def spec_from_model(model: Any) -> BaseModelSpec:
    """Read a BaseModelSpec off a loaded transformers causal LM (plain or bitsandbytes-quantized)."""
    config = text_config(model)
    parts = decoder_parts(model)  # UnsupportedModelError for a family the engine cannot serve
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    shapes: dict[str, tuple[int, int]] = {}
    paths: dict[str, str] = {}
    layer0 = parts.layers[0]
    for path, module in layer0.named_modules():
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if not path or in_f is None or out_f is None:
            continue
        short = path.rsplit(".", 1)[-1]
        if short in paths:
            raise UnsupportedModelError(
                f"model_type {parts.model_type!r} is not supported by the engine: two linears of a layer "
                f"share the name {short!r} ({paths[short]}, {path})"
            )
        shapes[short] = (int(in_f), int(out_f))
        paths[short] = path
    return BaseModelSpec(
        model_type=parts.model_type,
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(config.intermediate_size),
        vocab_size=int(config.vocab_size),
        linear_shapes=shapes,
        linear_paths=paths,
        layers_path=parts.layers_path,
    )
