"""Which decoder families the engine serves, and where their parts are.

The engine runs each family's own transformers code (embeddings, norms, MLP/MoE, rotary, residual
order, per-layer sliding windows, soft-capping) and replaces only the attention function (see
server/engine/attention.py). So a family is served when transformers routes its attention through the
attention interface (`_supports_attention_backend`), when its decoder layers sit in one `nn.ModuleList`
of the base model, and when its head is the output embedding (optionally scaled or soft-capped). Anything else is
refused at start with one line naming the `model_type` and what is missing (`UnsupportedModelError`),
never served with different text.

`TESTED_FAMILIES` are the model types the PEFT-invariant tests run on (tests/server/engine/
test_families.py); other types that pass these checks and the start-up self-check (engine.verify) are
served with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from adapterserve.server.errors import ModelLoadError

TESTED_FAMILIES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo2",
        "mixtral",
        "gpt_neox",
    }
)


class UnsupportedModelError(ModelLoadError):
    """The base model's family cannot be served by the engine; the message names what is missing."""


@dataclass(frozen=True)
class DecoderParts:
    """Where a causal LM keeps what the engine drives."""

    model_type: str
    decoder: nn.Module  # the base model (LlamaModel, GPTNeoXModel, ...): embeddings -> final norm
    layers: nn.ModuleList  # its decoder layers, in order
    layers_path: str  # their module path inside the causal LM: "model.layers", "gpt_neox.layers"
    head_scale: float  # logits multiplied by this: Cohere's logit_scale, 1 / Granite's logits_scaling
    head_softcap: float | None  # Gemma-2/3's final_logit_softcapping


def text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_parts(model: Any) -> DecoderParts:
    """The decoder's parts, or UnsupportedModelError naming the model type and what is missing."""
    config = text_config(model)
    model_type = str(getattr(config, "model_type", type(model).__name__))

    def refuse(missing: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"model_type {model_type!r} is not supported by the engine: {missing}")

    if getattr(config, "is_encoder_decoder", False):
        raise refuse("encoder-decoder models are not served (decoder-only causal LMs only)")
    if not getattr(type(model), "_supports_attention_backend", False):
        raise refuse("its transformers code does not route attention through the attention interface")
    prefix = getattr(model, "base_model_prefix", "")
    decoder = getattr(model, prefix, None) if prefix else None
    if not isinstance(decoder, nn.Module) or decoder is model:
        raise refuse(f"no base model under {prefix!r}")
    layer_count = int(getattr(config, "num_hidden_layers", -1))
    # The shallowest ModuleList of that length: model.layers, gpt_neox.layers, model.decoder.layers (OPT);
    # never a deeper one of the same length (a layer's experts).
    lists = [
        (name, module)
        for name, module in decoder.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == layer_count
    ]
    depth = min((name.count(".") for name, _ in lists), default=0)
    found = [(name, module) for name, module in lists if name.count(".") == depth]
    if len(found) != 1:
        raise refuse(f"cannot find one list of its {layer_count} decoder layers")
    [(name, layers)] = found
    if model.get_output_embeddings() is None:
        raise refuse("it has no output embedding (lm_head)")
    cap = getattr(config, "final_logit_softcapping", None)
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(
        getattr(config, "logits_scaling", None) or 1.0
    )
    return DecoderParts(
        model_type=model_type,
        decoder=decoder,
        layers=layers,
        layers_path=f"{prefix}.{name}",
        head_scale=scale,
        head_softcap=float(cap) if cap else None,
    )
