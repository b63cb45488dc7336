"""The kernel seam of the low-rank adapter math (LoRA, DoRA, bottleneck): `LoraKernels` and its backends.

- `torch`: the reference. A mixed batch gathers each row's A / B (`index_select`) and runs one bmm; one slot
  for every row is a plain matmul on that slot's view.
- `triton`: BGMV-style kernels that read each token's slot index and multiply by that slot's A / B
  straight out of the slot tensors (no gathered copy); safe inside a CUDA graph capture.

`lora_kernels(name, device)` picks one at engine start and refuses a backend that cannot run there.
"""

from adapterserve.server.adapters.kernels.base import KernelBackendError, LoraKernels
from adapterserve.server.adapters.kernels.choice import BACKENDS, lora_kernels
from adapterserve.server.settings import LoraBackendName

__all__ = ["BACKENDS", "KernelBackendError", "LoraBackendName", "LoraKernels", "lora_kernels"]
