"""Bottleneck adapters ("Adapter tuning", Houlsby et al. 2019; Pfeiffer et al. 2020), a LINEAR kind.

A bottleneck adapter is a small residual MLP on a sublayer's output, before the residual stream adds it:
    h' = h + up(act(down(h)))      down: hidden -> hidden / reduction_factor, up: back to hidden
Houlsby places one after the attention block and one after the feed-forward block; Pfeiffer after the
feed-forward block only. In a Llama-family decoder the attention block's output is `o_proj`'s and the
feed-forward block's is `down_proj`'s, so the adapter is a post-hook on those linears.

PEFT has no such method; the adapter is saved in PEFT's layout by `adapterserve train --method
bottleneck` (training/bottleneck.py): adapter_config.json with peft_type BOTTLENECK, and
adapter_model.safetensors with `<module>.adapter_down.weight` [r, hidden], `.adapter_down.bias` [r],
`<module>.adapter_up.weight` [hidden, r], `.adapter_up.bias` [hidden] per adapted module.

Stored per slot and module: down [S, hidden, r_cap], up [S, r_cap, hidden] (zero-padded), their biases
and the slot's nonlinearity (every supported one maps 0 to 0, so zeros are the identity).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from adapterserve.server.adapters.config import PeftConfigBase
from adapterserve.server.adapters.kind import (
    AdapterKind,
    HookSite,
    LinearKindWeights,
    LinearSite,
    ModuleKey,
    ModuleSlots,
    RowSelection,
    register_kind,
)
from adapterserve.server.adapters.kinds._linear import LowRankSlots, group_module_tensors
from adapterserve.server.errors import BaseMismatchError

PEFT_TYPE = "BOTTLENECK"
Placement = Literal["houlsby", "pfeiffer"]
NonLinearity = Literal["relu", "gelu", "silu", "tanh"]
ACTIVATIONS: dict[str, object] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
_ACT_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}

# Short names of the sublayer outputs in Llama-family decoders.
ATTENTION_OUTPUT, FEEDFORWARD_OUTPUT = "o_proj", "down_proj"


def placement_modules(placement: str) -> tuple[str, ...]:
    """The linears whose outputs carry an adapter for a placement."""
    return (ATTENTION_OUTPUT, FEEDFORWARD_OUTPUT) if placement == "houlsby" else (FEEDFORWARD_OUTPUT,)


class BottleneckAdapterConfig(PeftConfigBase):
    """adapter_config.json of a bottleneck adapter (written by training/bottleneck.py)."""

    peft_type: Literal["BOTTLENECK"]
    reduction_factor: Annotated[int, Field(ge=1, le=4096)] = 16
    placement: Placement = "houlsby"
    non_linearity: NonLinearity = "relu"
    hidden_size: Annotated[int, Field(ge=1)] | None = None  # of the base it was trained on (checked)

    def bottleneck_size(self, hidden: int) -> int:
        return max(1, hidden // self.reduction_factor)


_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>adapter_(?:down|up)\.(?:weight|bias))$")


@dataclass
class BottleneckWeights(LinearKindWeights):
    """Per adapted module: (down [hidden, r], down bias [r], up [r, hidden], up bias [hidden], act name)."""

    modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]]

    @property
    def rank(self) -> int:  # type: ignore[override]
        return max(v[0].shape[1] for v in self.modules.values())

    def tensors(self) -> list[torch.Tensor]:
        return [t for v in self.modules.values() for t in v[:4]]


class BottleneckModuleSlots(ModuleSlots):
    """down/up [S, out, r_cap] / [S, r_cap, out], down_bias [S, r_cap], up_bias [S, out], act [S]."""

    def __init__(self, site: LinearSite) -> None:
        super().__init__(site)
        width = site.out_features
        self.pairs = LowRankSlots(site, width, width)
        self.down_bias: torch.Tensor | None = None
        self.up_bias = torch.zeros(site.num_slots, width, dtype=site.dtype, device=site.device)
        self.act = torch.zeros(site.num_slots, dtype=torch.long, device=site.device)

    def write(
        self, slot: int, value: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]
    ) -> None:
        down, down_bias, up, up_bias, act = value
        self.pairs.write(slot, down, up)
        cap = self.pairs.capacity
        if self.down_bias is None or self.down_bias.shape[1] < cap:
            grown = torch.zeros(self.site.num_slots, cap, dtype=self.site.dtype, device=self.site.device)
            if self.down_bias is not None:
                grown[:, : self.down_bias.shape[1]] = self.down_bias
            self.down_bias = grown
        self.down_bias[slot].zero_()
        self.down_bias[slot, : down_bias.shape[0]] = down_bias.to(self.site.device, self.site.dtype)
        self.up_bias[slot] = up_bias.to(self.site.device, self.site.dtype)
        self.act[slot] = _ACT_IDS[act]

    def clear(self, slot: int) -> None:
        self.pairs.clear(slot)
        if self.down_bias is not None:
            self.down_bias[slot].zero_()
        self.up_bias[slot].zero_()
        self.act[slot] = 0

    def nbytes(self) -> int:
        extra = [t for t in (self.down_bias, self.up_bias, self.act) if t is not None]
        return self.pairs.nbytes() + sum(t.numel() * t.element_size() for t in extra)

    def post(self, x: torch.Tensor, y: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        assert self.down_bias is not None
        h = self.pairs.down(y, rows) + rows.of(self.down_bias).unsqueeze(1)  # [B, S, r_cap]
        acts = rows.of(self.act)  # [B]
        out = torch.zeros_like(h)
        # Every activation, selected per row: no host sync on which ones are present (the decode step
        # is captured as a CUDA graph); r_cap is small, so the extra elementwise work is negligible.
        for act_id, fn in enumerate(ACTIVATIONS.values()):
            out = torch.where((acts == act_id)[:, None, None], fn(h), out)  # type: ignore[operator]
        up = self.pairs.up(out, rows) + rows.of(self.up_bias).unsqueeze(1)  # [B, S, out]
        return y + up.to(y.dtype)


class BottleneckKind(AdapterKind):
    name = "bottleneck"
    configs = {PEFT_TYPE: BottleneckAdapterConfig}
    hook = HookSite.LINEAR
    summary = (
        "down [hidden, r], up [r, hidden] and biases after the attention and/or feed-forward output; "
        "h += up(act(down(h))) per row (Houlsby, Pfeiffer)"
    )

    def load(self, config, tensors, spec, settings) -> BottleneckWeights:
        assert isinstance(config, BottleneckAdapterConfig)
        hidden = spec.hidden_size
        if config.hidden_size not in (None, hidden):
            raise BaseMismatchError(f"hidden_size={config.hidden_size} but the base model's is {hidden}")
        r = config.bottleneck_size(hidden)  # <= hidden: reduction_factor >= 1; bytes are capped by upload
        wanted = placement_modules(config.placement)
        missing = [m for m in wanted if m not in spec.linear_shapes]
        if missing:
            raise BaseMismatchError(f"placement {config.placement!r} needs {missing}, which this base lacks")
        grouped = group_module_tensors(tensors, spec, _KEY, "<module>.adapter_down/.adapter_up .weight/.bias")
        expected = {(layer, short) for layer in range(spec.num_layers) for short in wanted}
        if set(grouped) != expected:
            extra = sorted(spec.module_name(*k) for k in set(grouped) - expected)
            absent = sorted(spec.module_name(*k) for k in expected - set(grouped))
            raise BaseMismatchError(
                f"placement {config.placement!r} needs adapters on {', '.join(wanted)} in every layer; "
                + (f"unexpected: {', '.join(extra[:4])} " if extra else "")
                + (f"missing: {', '.join(absent[:4])}" if absent else "")
            )
        modules = {}
        for key, parts in sorted(grouped.items()):
            name = spec.module_name(*key)
            shapes = {
                "adapter_down.weight": (r, hidden),
                "adapter_down.bias": (r,),
                "adapter_up.weight": (hidden, r),
                "adapter_up.bias": (hidden,),
            }
            for part, shape in shapes.items():
                if part not in parts or tuple(parts[part].shape) != shape:
                    got = tuple(parts[part].shape) if part in parts else "missing"
                    raise BaseMismatchError(f"module {name}: {part} is {got}, expected {shape}")
            modules[key] = (
                parts["adapter_down.weight"].float().t().contiguous(),  # [hidden, r]
                parts["adapter_down.bias"].float().contiguous(),  # [r]
                parts["adapter_up.weight"].float().t().contiguous(),  # [r, hidden]
                parts["adapter_up.bias"].float().contiguous(),  # [hidden]
                config.non_linearity,
            )
        return BottleneckWeights(modules=modules)

    def module_slots(self, site: LinearSite) -> ModuleSlots:
        return BottleneckModuleSlots(site)


register_kind(BottleneckKind())
