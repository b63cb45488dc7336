"""A real (small) validator for store tests: the config allowlist, the safetensors checks, and tensor
names/shapes checked against the tiny base's spec. It refuses what the server's loader refuses for the
cases these tests use (foreign modules, wrong shapes, rank cap, adapters that change nothing)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterserve.server.adapters.config_parsing import parse_adapter_config
from adapterserve.server.adapters.kinds.lora import LoraAdapterConfig
from adapterserve.server.adapters.safetensors_check import read_safetensors_checked
from adapterserve.server.adapters.types import AdapterInfo
from adapterserve.server.errors import AdapterValidationError, BaseMismatchError
from adapterserve.server.model.spec import BaseModelSpec

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class CheckedAdapter:
    info: AdapterInfo
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return self.tensors


def make_validator(
    spec: BaseModelSpec, *, max_rank: int = 64, calls: list | None = None
) -> Callable[[Path], CheckedAdapter]:
    """validate(path) -> CheckedAdapter for LoRA adapters on `spec`; raises the server's error types."""

    def validate(path: Path) -> CheckedAdapter:
        if calls is not None:
            calls.append(path)
        config = parse_adapter_config((path / "adapter_config.json").read_bytes())
        if not isinstance(config, LoraAdapterConfig) or config.peft_type != "LORA":
            raise AdapterValidationError(f"test validator serves LORA only, got {config.peft_type}")
        tensors = read_safetensors_checked(path / "adapter_model.safetensors", max_bytes=64 << 20)
        modules: set[str] = set()
        rank = 0
        for name, t in tensors.items():
            m = _LORA_KEY.match(name)
            parsed = spec.parse_module_name(m.group("module")) if m else None
            if m is None or parsed is None:
                raise BaseMismatchError(f"tensor {name!r} targets no linear module of the base")
            _, short = parsed
            in_f, out_f = spec.linear_shapes[short]
            r = t.shape[0] if m.group("part") == "A" else t.shape[1]
            expected = (r, in_f) if m.group("part") == "A" else (out_f, r)
            if tuple(t.shape) != expected:
                raise BaseMismatchError(
                    f"tensor {name!r} has shape {tuple(t.shape)}, the base needs {expected}"
                )
            if r > max_rank:
                raise AdapterValidationError(f"LoRA rank {r} is above this server's cap of {max_rank}")
            rank = max(rank, r)
            modules.add(short)
        if not tensors:
            raise AdapterValidationError("adapter changes nothing: no tensor matches a module of the base")
        info = AdapterInfo(
            kind="lora",
            peft_type=config.peft_type,
            rank=rank,
            num_virtual_tokens=None,
            target_modules=tuple(sorted(modules)),
            num_parameters=sum(t.numel() for t in tensors.values()),
            nbytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        )
        return CheckedAdapter(info, tensors)

    return validate
