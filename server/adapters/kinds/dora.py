"""DoRA (PEFT's `LoraConfig(use_dora=True)`): weight-decomposed LoRA, a LINEAR kind.

PEFT, per adapted linear W [out, in] with LoRA pair A, B (scaling s) and magnitude m [out]:
    norm  = ||W + s * B @ A|| over each output row (treated as a constant)
    scale = m / norm                                                         [out]
    y     = base(x) + (scale - 1) * (base(x) - bias) + scale * (x @ A.T @ B.T) * s

Stores, per adapted linear, A [in, r], B [r, out] (scaling folded in) and the magnitude m [out]. The
row norms need the base weight: they are computed once when the adapter is written into a device slot
(from the dequantized weight on a 4-bit base), and the slot keeps `scale` [out] (ones for slot 0 and
for slots of other kinds, with a zero A/B: the identity).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from adapterserve.server.adapters.config import check_targets_agree
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
from adapterserve.server.adapters.kinds.lora import LoraAdapterConfig, check_rank_cap, lora_pairs
from adapterserve.server.errors import BaseMismatchError

_DORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:lora_(?P<part>[AB])(?:\.weight)?|(?P<mag>lora_magnitude_vector))$"
)


class DoraAdapterConfig(LoraAdapterConfig):
    """A LoRA config with use_dora=True: every LoRA field, and DoRA served."""

    def unsupported(self) -> list[tuple[str, Any, str]]:
        return [u for u in super().unsupported() if u[0] != "use_dora"]


@dataclass
class DoraWeights(LinearKindWeights):
    """Per adapted module: (A [in, r], B [r, out] * scaling, magnitude [out])."""

    modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:  # type: ignore[override]
        return max(a.shape[1] for a, _, _ in self.modules.values())

    def tensors(self) -> list[torch.Tensor]:
        return [t for triple in self.modules.values() for t in triple]


def dequantized_weight(base: torch.nn.Module) -> torch.Tensor:
    """The base linear's weight [out, in] in float32 (bitsandbytes 4-bit weights dequantized)."""
    weight = base.weight
    if weight.__class__.__name__ == "Params4bit":
        import bitsandbytes as bnb

        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # load_base_model keeps CPU 4-bit weights in the plain layout; the repacked one is lossy.
            raise BaseMismatchError("DoRA needs the base's 4-bit weights in bitsandbytes' plain layout")
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.detach().float()


class DoraModuleSlots(ModuleSlots):
    """A [S, in, r_cap], B [S, r_cap, out] (zeros) and scale [S, out] = m / ||W + dW|| (ones)."""

    def __init__(self, site: LinearSite) -> None:
        super().__init__(site)
        self.pairs = LowRankSlots(site, site.in_features, site.out_features)
        self.scale = torch.ones(site.num_slots, site.out_features, dtype=site.dtype, device=site.device)

    def write(self, slot: int, value: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        a, b, magnitude = value  # [in, r], [r, out], [out]
        assert self.site.base is not None, "DoRA needs the base linear (wrap the model first)"
        weight = dequantized_weight(self.site.base)  # [out, in]
        delta = (a.to(weight.device) @ b.to(weight.device)).t()  # [out, in], scaling already in b
        norm = torch.linalg.norm(weight + delta, dim=1)  # [out]
        self.pairs.write(slot, a, b)
        self.scale[slot] = (magnitude.to(norm.device) / norm).to(self.site.device, self.site.dtype)

    def clear(self, slot: int) -> None:
        self.pairs.clear(slot)
        self.scale[slot].fill_(1.0)

    def nbytes(self) -> int:
        return self.pairs.nbytes() + self.scale.numel() * self.scale.element_size()

    def post(self, x: torch.Tensor, y: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        scale = rows.of(self.scale).unsqueeze(1).to(y.dtype)  # [B, 1, out]
        bias = getattr(self.site.base, "bias", None)
        base = y if bias is None else y - bias  # [B, S, out]
        delta = self.pairs.delta(x, rows).to(y.dtype)  # [B, S, out]
        return y + (scale - 1) * base + scale * delta


class DoraKind(AdapterKind):
    name = "dora"
    peft_method = "dora"
    configs = {"LORA": DoraAdapterConfig}
    hook = HookSite.LINEAR
    priority = 10  # claims LORA configs with use_dora=True before the LoRA kind sees them
    summary = (
        "A [in, r], B [r, out] and a magnitude [out] per adapted linear; row norms of W + dW computed "
        "once per slot load; y rescaled per output row and the LoRA delta added, per row"
    )

    def claims(self, raw: dict[str, Any]) -> bool:
        return raw.get("peft_type") == "LORA" and raw.get("use_dora") is True

    def load(self, config, tensors, spec, settings) -> DoraWeights:
        assert isinstance(config, DoraAdapterConfig)
        check_rank_cap(config, settings)
        lora: dict[str, torch.Tensor] = {}
        magnitudes: dict[ModuleKey, torch.Tensor] = {}
        for name, tensor in tensors.items():
            m = _DORA_KEY.match(name)
            if m is not None and m.group("mag"):
                key = spec.parse_module_name(m.group("module"))
                if key is None:
                    raise BaseMismatchError(f"tensor {name!r} targets a module the base model does not have")
                magnitudes[key] = tensor
            else:
                lora[name] = tensor
        grouped = group_module_tensors(
            lora,
            spec,
            re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.weight)?$"),
            "<module>.lora_A/.lora_B[.weight] or <module>.lora_magnitude_vector",
        )
        check_targets_agree(config, sorted(set(grouped) | set(magnitudes)), spec)
        pairs = lora_pairs(config, grouped, spec)
        modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for key, (a, b) in pairs.items():
            name = spec.module_name(*key)
            out_f = spec.linear_shapes[key[1]][1]
            magnitude = magnitudes.get(key)
            if magnitude is None:
                raise BaseMismatchError(f"module {name}: DoRA needs lora_magnitude_vector; it is missing")
            if tuple(magnitude.shape) != (out_f,):
                raise BaseMismatchError(
                    f"module {name}: lora_magnitude_vector has shape {tuple(magnitude.shape)}, expected ({out_f},)"
                )
            modules[key] = (a, b, magnitude.float().contiguous())
        extra = sorted(spec.module_name(*k) for k in set(magnitudes) - set(pairs))
        if extra:
            raise BaseMismatchError(f"lora_magnitude_vector without lora_A/lora_B for {', '.join(extra)}")
        return DoraWeights(modules=modules)

    def module_slots(self, site: LinearSite) -> ModuleSlots:
        return DoraModuleSlots(site)


register_kind(DoraKind())
