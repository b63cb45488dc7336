"""Bottleneck adapters at training time (PEFT lacks them): inject, train, save in PEFT's layout, reload.

`BottleneckModel` wraps a causal LM: every sublayer output the placement names (attention: o_proj,
feed-forward: down_proj) gets `h + up(act(down(h)))`, the base stays frozen. `save_pretrained` writes
adapter_config.json (peft_type BOTTLENECK, validated by the server's own config model) and
adapter_model.safetensors with `base_model.model.<module>.adapter_down/up.weight/bias`, which the
server's bottleneck kind (server/adapters/kinds/bottleneck.py) serves per row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterserve.server.adapters.kinds.bottleneck import (
    ACTIVATIONS,
    PEFT_TYPE,
    BottleneckAdapterConfig,
    placement_modules,
)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class BottleneckAdapter(nn.Module):
    """h [..., hidden] -> h + up(act(down(h))). `up` starts at zero: the adapter starts as the identity."""

    def __init__(self, hidden: int, size: int, non_linearity: str) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(hidden, size)
        self.adapter_up = nn.Linear(size, hidden)
        self.non_linearity = non_linearity
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.non_linearity]
        down = self.adapter_down(h.to(self.adapter_down.weight.dtype))
        return h + self.adapter_up(act(down)).to(h.dtype)  # type: ignore[operator]


class AdaptedLinear(nn.Module):
    """A frozen base linear followed by its bottleneck adapter."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(x))


class BottleneckModel(nn.Module):
    """A causal LM with bottleneck adapters injected in place (see the module docstring)."""

    def __init__(self, model: nn.Module, config: BottleneckAdapterConfig) -> None:
        super().__init__()
        self.base_model = model
        self.adapter_config = config
        self.config = model.config  # what the Trainer and generation helpers read
        model.requires_grad_(False)
        hidden = int(model.config.hidden_size)
        size = config.bottleneck_size(hidden)
        device = next(model.parameters()).device
        self.wrapped: dict[str, AdaptedLinear] = {}
        wanted = placement_modules(config.placement)
        for name, module in list(model.named_modules()):
            parent_name, _, attr = name.rpartition(".")
            if attr not in wanted or ".layers." not in f".{name}":
                continue
            adapter = BottleneckAdapter(hidden, size, config.non_linearity).to(device)
            wrapper = AdaptedLinear(module, adapter)
            setattr(model.get_submodule(parent_name), attr, wrapper)
            self.wrapped[name] = wrapper
        if not self.wrapped:
            raise ValueError(f"no {', '.join(wanted)} linears found for placement {config.placement!r}")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT-style names: base_model.model.<module>.adapter_down.weight, ..."""
        out: dict[str, torch.Tensor] = {}
        for name, wrapper in self.wrapped.items():
            for key, tensor in wrapper.adapter.state_dict().items():
                out[f"base_model.model.{name}.{key}"] = tensor.detach().float().cpu().contiguous()
        return out

    def save_pretrained(self, path: str | Path, **_: Any) -> None:
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        config = self.adapter_config.model_dump(mode="json", exclude_none=True)
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(self.adapter_state_dict(), str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    def load_adapter_weights(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(Path(path) / WEIGHTS_FILE))
        for name, wrapper in self.wrapped.items():
            prefix = f"base_model.model.{name}."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            wrapper.adapter.load_state_dict(state, strict=True)

    def unload(self) -> nn.Module:
        """Put the base linears back; returns the base model (adapters dropped, nothing merged)."""
        for name, wrapper in self.wrapped.items():
            parent_name, _, attr = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent_name), attr, wrapper.base_layer)
        self.wrapped = {}
        return self.base_model

    def get_base_model(self) -> nn.Module:
        return self.base_model


def config_from_settings(settings: Any, hidden_size: int) -> BottleneckAdapterConfig:
    return BottleneckAdapterConfig(
        peft_type=PEFT_TYPE,
        task_type="CAUSAL_LM",
        reduction_factor=settings.reduction_factor,
        placement=settings.bottleneck_placement,
        non_linearity=settings.non_linearity,
        hidden_size=hidden_size,
        inference_mode=True,
    )


def wrap_for_training(model: nn.Module, settings: Any) -> BottleneckModel:
    """The method table's `wrap` for --method bottleneck."""
    return BottleneckModel(model, config_from_settings(settings, int(model.config.hidden_size)))


def load_bottleneck(model: nn.Module, path: str | Path) -> BottleneckModel:
    """A saved bottleneck adapter on `model` (the method table's `reload`), in eval mode."""
    raw = json.loads((Path(path) / CONFIG_FILE).read_text())
    wrapped = BottleneckModel(model, BottleneckAdapterConfig.model_validate(raw))
    wrapped.load_adapter_weights(path)
    return wrapped.eval()
