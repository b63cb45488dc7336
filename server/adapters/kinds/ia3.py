"""IA3: learned scaling vectors on target linears, a LINEAR kind.

Stores, per adapted linear, one vector. PEFT semantics: for a feed-forward module the vector scales the
linear's INPUT (x * l, l: [in]); for any other module it scales the OUTPUT (base(x) * l, l: [out]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

from adapterserve.server.adapters.config import Str, StrList, TargetedConfig, check_targets_agree
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
from adapterserve.server.adapters.kinds._linear import group_module_tensors
from adapterserve.server.errors import BaseMismatchError


class IA3AdapterConfig(TargetedConfig):
    """IA3: a learned vector scales the input (feed-forward modules) or the output of each target linear."""

    peft_type: Literal["IA3"]
    feedforward_modules: StrList | Str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def unsupported(self) -> list[tuple[str, Any, str]]:
        out = super().unsupported()
        if self.fan_in_fan_out:
            out.append(("fan_in_fan_out", True, "transposed (Conv1D) base weights are not served"))
        return out

    def is_feedforward(self, module_name: str) -> bool:
        ff = self.feedforward_modules
        if ff is None:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name == key or module_name.endswith("." + key) for key in ff)


_IA3_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>ia3_l)(?:\.weight)?$")


@dataclass
class IA3Weights(LinearKindWeights):
    """Per adapted module: (vector, scales_input). vector: [in] if scales_input else [out]."""

    modules: dict[ModuleKey, tuple[torch.Tensor, bool]]

    def tensors(self) -> list[torch.Tensor]:
        return [v for v, _ in self.modules.values()]


class IA3ModuleSlots(ModuleSlots):
    """scale_in [S, in], scale_out [S, out], each allocated when first needed (ones: no scaling)."""

    def __init__(self, site: LinearSite) -> None:
        super().__init__(site)
        self.scale_in: torch.Tensor | None = None
        self.scale_out: torch.Tensor | None = None

    def _ones(self, width: int) -> torch.Tensor:
        return torch.ones(self.site.num_slots, width, dtype=self.site.dtype, device=self.site.device)

    def write(self, slot: int, value: tuple[torch.Tensor, bool]) -> None:
        vector, scales_input = value
        if scales_input:
            if self.scale_in is None:
                self.scale_in = self._ones(self.site.in_features)
            self.scale_in[slot] = vector.to(self.site.device, self.site.dtype)
        else:
            if self.scale_out is None:
                self.scale_out = self._ones(self.site.out_features)
            self.scale_out[slot] = vector.to(self.site.device, self.site.dtype)

    def clear(self, slot: int) -> None:
        for t in (self.scale_in, self.scale_out):
            if t is not None:
                t[slot].fill_(1.0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.scale_in, self.scale_out) if t is not None)

    def pre(self, x: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        if self.scale_in is None:
            return x
        return x * rows.of(self.scale_in).unsqueeze(1).to(x.dtype)  # [B, 1, in]

    def post(self, x: torch.Tensor, y: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        if self.scale_out is None:
            return y
        return y * rows.of(self.scale_out).unsqueeze(1).to(y.dtype)  # [B, 1, out]


class IA3Kind(AdapterKind):
    name = "ia3"
    peft_method = "ia3"
    configs = {"IA3": IA3AdapterConfig}
    hook = HookSite.LINEAR
    summary = "one vector per adapted linear; scales its input (feed-forward modules) or its output per row"

    def load(self, config, tensors, spec, settings) -> IA3Weights:
        assert isinstance(config, IA3AdapterConfig)
        grouped = group_module_tensors(tensors, spec, _IA3_KEY, "<module>.ia3_l")
        check_targets_agree(config, list(grouped), spec)
        modules: dict[ModuleKey, tuple[torch.Tensor, bool]] = {}
        for key, parts in sorted(grouped.items()):
            tensor = parts["ia3_l"]
            module_name = spec.module_name(*key)
            in_f, out_f = spec.linear_shapes[key[1]]
            feedforward = config.is_feedforward(module_name)
            # PEFT stores [1, in] for feed-forward modules and [out, 1] otherwise.
            expected = (1, in_f) if feedforward else (out_f, 1)
            if tuple(tensor.shape) != expected:
                raise BaseMismatchError(
                    f"module {module_name}: ia3_l has shape {tuple(tensor.shape)}, expected {expected}"
                    f" ({'feed-forward: scales the input' if feedforward else 'scales the output'})"
                )
            modules[key] = (tensor.float().reshape(-1).contiguous(), feedforward)
        if not modules:
            raise BaseMismatchError(
                "the adapter adapts no module of the base model (it would change nothing)"
            )
        return IA3Weights(modules=modules)

    def module_slots(self, site: LinearSite) -> ModuleSlots:
        return IA3ModuleSlots(site)


register_kind(IA3Kind())
