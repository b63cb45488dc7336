"""Load a PEFT adapter directory into the served form of its kind, validating it against the base.

The one entry point the store, the engine and the training module use. Files are checked before any
tensor is read (safetensors header, pickle refusal); the config is parsed against the allowlist; every
tensor name and shape must fit the base model; caps from EngineSettings apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adapterserve.server.adapters.config import (
    AdaLoraAdapterConfig,
    IA3AdapterConfig,
    LoraAdapterConfig,
    PrefixTuningAdapterConfig,
    PromptTuningAdapterConfig,
    PTuningAdapterConfig,
    parse_adapter_config,
)
from adapterserve.server.adapters.ia3 import IA3Weights, load_ia3
from adapterserve.server.adapters.lora import LoraWeights, load_lora
from adapterserve.server.adapters.prefix import PrefixWeights, load_prefix
from adapterserve.server.adapters.prompt import PromptWeights, load_prompt
from adapterserve.server.adapters.types import SERVED_PEFT_TYPES, AdapterInfo, AdapterKind
from adapterserve.server.errors import AdapterValidationError
from adapterserve.server.model.spec import BaseModelSpec
from adapterserve.server.settings import EngineSettings
from adapterserve.server.store.safetensors_check import check_not_pickle, read_safetensors_checked

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20

AdapterWeights = LoraWeights | IA3Weights | PromptWeights | PrefixWeights


@dataclass
class LoadedAdapter:
    """An adapter in host memory, validated against the base, ready to be placed into device slots."""

    info: AdapterInfo
    weights: AdapterWeights

    @property
    def kind(self) -> AdapterKind:
        return self.info.kind

    @property
    def nbytes(self) -> int:
        return self.info.nbytes


def _read_config(path: Path) -> bytes:
    config_path = path / CONFIG_FILE
    if not config_path.is_file() or config_path.is_symlink():
        raise AdapterValidationError(f"{CONFIG_FILE} is missing from the adapter directory")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterValidationError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    check_not_pickle(config_path)
    return config_path.read_bytes()


def build_adapter(
    config_bytes: bytes | dict,
    tensors: dict[str, torch.Tensor],
    spec: BaseModelSpec,
    settings: EngineSettings,
) -> LoadedAdapter:
    """Served form + AdapterInfo from a parsed config and its tensors (caps and shapes checked)."""
    config = parse_adapter_config(config_bytes)
    kind = SERVED_PEFT_TYPES[config.peft_type]
    rank: int | None = None
    virtual: int | None = None
    targets: tuple[str, ...] = ()
    weights: AdapterWeights
    if isinstance(config, LoraAdapterConfig):  # AdaLoRA is a subclass
        peak = max(
            [config.r, *(config.rank_pattern or {}).values()]
            if not isinstance(config, AdaLoraAdapterConfig)
            else [config.init_r]
        )
        if peak > settings.max_lora_rank:
            raise AdapterValidationError(
                f"LoRA rank {peak} is above this server's cap of {settings.max_lora_rank}"
            )
        weights = load_lora(config, tensors, spec)
        rank = weights.max_rank
        targets = tuple(sorted({short for _, short in weights.modules}))
    elif isinstance(config, IA3AdapterConfig):
        weights = load_ia3(config, tensors, spec)
        targets = tuple(sorted({short for _, short in weights.modules}))
    elif isinstance(config, PromptTuningAdapterConfig | PTuningAdapterConfig | PrefixTuningAdapterConfig):
        if config.num_virtual_tokens > settings.max_virtual_tokens:
            raise AdapterValidationError(
                f"num_virtual_tokens={config.num_virtual_tokens} is above this server's cap of "
                f"{settings.max_virtual_tokens}"
            )
        if isinstance(config, PrefixTuningAdapterConfig):
            weights = load_prefix(config, tensors, spec)
        else:
            weights = load_prompt(config, tensors, spec)
        virtual = weights.num_virtual_tokens
    else:  # pragma: no cover - parse_adapter_config only returns the types above
        raise AdapterValidationError(f"peft_type {config.peft_type} is not served")
    served = weights.tensors()
    info = AdapterInfo(
        kind=kind,
        peft_type=config.peft_type,
        rank=rank,
        num_virtual_tokens=virtual,
        target_modules=targets,
        num_parameters=sum(t.numel() for t in served),
        nbytes=sum(t.numel() * t.element_size() for t in served),
    )
    return LoadedAdapter(info=info, weights=weights)


def load_adapter_dir(
    path: Path, spec: BaseModelSpec, settings: EngineSettings, *, max_bytes: int = 512 << 20
) -> LoadedAdapter:
    """Load and validate a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterValidationError(f"adapter directory not found: {path}")
    config_bytes = _read_config(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file() or weights_path.is_symlink():
        pickled = [p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
        hint = f" ({', '.join(pickled)} is a pickle format and is never loaded)" if pickled else ""
        raise AdapterValidationError(f"{WEIGHTS_FILE} is missing from the adapter directory{hint}")
    tensors = read_safetensors_checked(weights_path, max_bytes=max_bytes)
    return build_adapter(config_bytes, tensors, spec, settings)
