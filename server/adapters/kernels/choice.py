"""The choice of a low-rank kernel backend at engine start: `lora_kernels(name, device)`."""

from __future__ import annotations

from typing import get_args

import torch

from adapterserve.server.adapters.kernels.base import KernelBackendError, LoraKernels
from adapterserve.server.adapters.kernels.torch_backend import TorchLoraKernels
from adapterserve.server.adapters.kernels.triton_backend import TritonLoraKernels
from adapterserve.server.settings import LoraBackendName

BACKENDS: tuple[str, ...] = get_args(LoraBackendName)

# Each backend by its `lora_backend` name (the triton one imports triton only when it launches a kernel).
_BY_NAME: dict[str, type[LoraKernels]] = {cls.name: cls for cls in (TorchLoraKernels, TritonLoraKernels)}


def lora_kernels(name: str, device: torch.device | str | None = None) -> LoraKernels:
    """The backend `name` ("torch" or "triton"), checked against `device` when one is given."""
    backend_class = _BY_NAME.get(name)
    if backend_class is None:
        raise KernelBackendError(f"lora_backend {name!r} is not one of {', '.join(BACKENDS)}")
    backend = backend_class()
    if device is not None:
        backend.check(torch.device(device))
    return backend
