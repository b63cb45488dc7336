"""IA3: learned scaling vectors on target linears.

PEFT semantics: for a feed-forward module the vector scales the linear's INPUT (x * l, l: [in]);
for any other module it scales the OUTPUT (base(x) * l, l: [out]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from adapterserve.server.adapters.config import IA3AdapterConfig
from adapterserve.server.errors import BaseMismatchError, UnsupportedAdapterError
from adapterserve.server.model.spec import BaseModelSpec

ModuleKey = tuple[int, str]

_IA3_KEY = re.compile(r"^(?P<module>.+)\.ia3_l(?:\.weight)?$")


@dataclass
class IA3Weights:
    """Per adapted module: (vector, scales_input). vector: [in] if scales_input else [out]."""

    modules: dict[ModuleKey, tuple[torch.Tensor, bool]]

    def tensors(self) -> list[torch.Tensor]:
        return [v for v, _ in self.modules.values()]


def _is_feedforward(config: IA3AdapterConfig, module_name: str) -> bool:
    ff = config.feedforward_modules
    if ff is None:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, module_name) is not None
    return any(module_name == key or module_name.endswith("." + key) for key in ff)


def load_ia3(config: IA3AdapterConfig, tensors: dict[str, torch.Tensor], spec: BaseModelSpec) -> IA3Weights:
    modules: dict[ModuleKey, tuple[torch.Tensor, bool]] = {}
    for name, tensor in sorted(tensors.items()):
        m = _IA3_KEY.match(name)
        if m is None:
            raise UnsupportedAdapterError(f"tensor {name!r} is not an IA3 weight (expected <module>.ia3_l)")
        key = spec.parse_module_name(m.group("module"))
        if key is None:
            raise BaseMismatchError(f"tensor {name!r} targets a module the base model does not have")
        module_name = spec.module_name(*key)
        in_f, out_f = spec.linear_shapes[key[1]]
        feedforward = _is_feedforward(config, module_name)
        # PEFT stores [1, in] for feed-forward modules and [out, 1] otherwise.
        expected = (1, in_f) if feedforward else (out_f, 1)
        if tuple(tensor.shape) != expected:
            raise BaseMismatchError(
                f"module {module_name}: ia3_l has shape {tuple(tensor.shape)}, expected {expected}"
                f" ({'feed-forward: scales the input' if feedforward else 'scales the output'})"
            )
        modules[key] = (tensor.float().reshape(-1).contiguous(), feedforward)
    if not modules:
        raise BaseMismatchError("the adapter adapts no module of the base model (it would change nothing)")
    return IA3Weights(modules=modules)
