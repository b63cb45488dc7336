"""LoRA (and rsLoRA, AdaLoRA, QLoRA adapters): per-module low-rank deltas.

Served form: for each adapted linear (layer, short name) a pair A [in, r], B [r, out] with the
scaling folded into B, so that the delta is `x @ A @ B` (x: [..., in]). AdaLoRA's singular values
(lora_E) and its `scaling / ranknum` are folded the same way; pruned ranks are already dropped by PEFT
when it saves (its rank_pattern is applied to the state dict).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from adapterserve.server.adapters.config import AdaLoraAdapterConfig, LoraAdapterConfig
from adapterserve.server.errors import BaseMismatchError, UnsupportedAdapterError
from adapterserve.server.model.spec import BaseModelSpec

ModuleKey = tuple[int, str]  # (layer index, short linear name such as "q_proj")

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[ABE])(?:\.weight)?$")


@dataclass
class LoraWeights:
    """A: [in, r], B: [r, out] (scaling folded into B) per adapted module."""

    modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]

    @property
    def max_rank(self) -> int:
        return max(a.shape[1] for a, _ in self.modules.values())

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.modules.values() for t in pair]


def _pattern_value(patterns: dict | None, module_name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: exact name, else `(.*\\.)?pattern$` on the name."""
    if not patterns:
        return default
    if module_name in patterns:
        return patterns[module_name]
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _group_tensors(
    tensors: dict[str, torch.Tensor], spec: BaseModelSpec
) -> dict[ModuleKey, dict[str, torch.Tensor]]:
    grouped: dict[ModuleKey, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        m = _LORA_KEY.match(name)
        if m is None:
            raise UnsupportedAdapterError(
                f"tensor {name!r} is not a LoRA weight (expected <module>.lora_A/.lora_B[.weight])"
            )
        key = spec.parse_module_name(m.group("module"))
        if key is None:
            raise BaseMismatchError(
                f"tensor {name!r} targets a module the base model does not have "
                f"(decoder linears: {', '.join(spec.linear_paths)}; layers 0-{spec.num_layers - 1})"
            )
        grouped.setdefault(key, {})[m.group("part")] = tensor
    return grouped


def load_lora(
    config: LoraAdapterConfig, tensors: dict[str, torch.Tensor], spec: BaseModelSpec
) -> LoraWeights:
    """Build the served LoRA form from PEFT's state dict (names as PEFT saves them)."""
    is_adalora = isinstance(config, AdaLoraAdapterConfig)
    modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, short), parts in sorted(_group_tensors(tensors, spec).items()):
        name = spec.module_name(layer, short)
        if "A" not in parts or "B" not in parts or (is_adalora and "E" not in parts):
            need = "lora_A, lora_B" + (" and lora_E" if is_adalora else "")
            raise BaseMismatchError(f"module {name}: needs {need}; found {sorted(parts)}")
        if not is_adalora and "E" in parts:
            raise UnsupportedAdapterError(f"module {name}: lora_E only exists in ADALORA adapters")
        a, b = parts["A"].float(), parts["B"].float()  # a: [r, in], b: [out, r]
        in_f, out_f = spec.linear_shapes[short]
        if (
            a.dim() != 2
            or b.dim() != 2
            or a.shape[1] != in_f
            or b.shape[0] != out_f
            or a.shape[0] != b.shape[1]
        ):
            raise BaseMismatchError(
                f"module {name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"a {in_f}->{out_f} linear (expected [r, {in_f}] and [{out_f}, r])"
            )
        rank = a.shape[0]
        if rank == 0:  # AdaLoRA pruned this module entirely: it changes nothing
            continue
        if is_adalora:
            e = parts["E"].float().reshape(-1)  # [r]
            if e.shape[0] != rank:
                raise BaseMismatchError(f"module {name}: lora_E has {e.shape[0]} values for rank {rank}")
            # PEFT: delta = x @ (A*E).T @ B.T * scaling / (ranknum + 1e-5). ranknum is the rank the
            # module was created with (init_r); PEFT keeps it when it prunes by rank_pattern on load.
            scaling = (config.lora_alpha if config.lora_alpha > 0 else float(rank)) / (
                float(config.init_r) + 1e-5
            )
            a = a * e[:, None]
        else:
            r_cfg = int(_pattern_value(config.rank_pattern, name, config.r))
            if r_cfg != rank:
                raise BaseMismatchError(
                    f"module {name}: weights have rank {rank} but the config says {r_cfg}"
                )
            alpha = float(_pattern_value(config.alpha_pattern, name, config.lora_alpha))
            scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        # Served form: A [in, r], B [r, out] * scaling.
        modules[(layer, short)] = (a.t().contiguous(), (b.t() * scaling).contiguous())
    if not modules:
        raise BaseMismatchError("the adapter adapts no module of the base model (it would change nothing)")
    return LoraWeights(modules=modules)
