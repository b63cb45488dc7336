"""Load a PEFT adapter directory into the served form of its kind, validating it against the base.

The one entry point the store, the engine and the training module use. The config is parsed against
the allowlist of the kind that claims it; the tensors are read by the `safetensors` library (which
checks the header, offsets and dtypes) after the project's own caps; the kind checks every tensor name
and shape against the base model and the caps from EngineSettings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adapterserve.server.adapters.config_parsing import MAX_CONFIG_BYTES, resolve_config
from adapterserve.server.adapters.kind import AdapterKind, KindWeights
from adapterserve.server.adapters.safetensors_check import check_not_pickle, read_safetensors_checked
from adapterserve.server.adapters.types import AdapterInfo
from adapterserve.server.errors import AdapterValidationError
from adapterserve.server.model.spec import BaseModelSpec
from adapterserve.server.settings import EngineSettings

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class LoadedAdapter:
    """An adapter in host memory, validated against the base, ready to be placed into device slots."""

    info: AdapterInfo
    weights: KindWeights
    handler: AdapterKind  # the registered kind that serves it

    @property
    def kind(self) -> str:
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
    """Served form + AdapterInfo from a config and its tensors (the claiming kind checks caps and shapes)."""
    kind, config = resolve_config(config_bytes)
    if not kind.stores_weights and tensors:
        raise AdapterValidationError(f"a {kind.name} adapter holds no tensors; found {len(tensors)}")
    weights = kind.load(config, tensors, spec, settings)
    served = weights.tensors()
    info = AdapterInfo(
        kind=kind.name,
        peft_type=config.peft_type,
        rank=weights.rank,
        num_virtual_tokens=weights.num_virtual_tokens,
        target_modules=weights.target_modules,
        num_parameters=sum(t.numel() for t in served),
        nbytes=sum(t.numel() * t.element_size() for t in served),
    )
    return LoadedAdapter(info=info, weights=weights, handler=kind)


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
        kind, _ = resolve_config(config_bytes)
        if not kind.stores_weights and not weights_path.exists():
            return build_adapter(config_bytes, {}, spec, settings)
        pickled = [p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
        hint = f" ({', '.join(pickled)} is a pickle format and is never loaded)" if pickled else ""
        raise AdapterValidationError(f"{WEIGHTS_FILE} is missing from the adapter directory{hint}")
    tensors = read_safetensors_checked(weights_path, max_bytes=max_bytes)
    return build_adapter(config_bytes, tensors, spec, settings)
