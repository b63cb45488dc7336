"""The reference backend: gather each row's slot tensor and bmm (a plain matmul for one slot).

The gather is `index_select`, not advanced indexing (`w[slots]`): the same copy, ~6x less time on a CPU
(SmolLM2 q_proj shapes, 64 rows over 33 slots, r = 8, 2 threads: 7 vs 44 us per A; docs/performance.md,
"LoRA math on a CPU"). The bmm runs in the slot tensors' dtype, which the bank makes float32 on a CPU
(`linear_slot_dtype`: torch's half-precision bmm of these thin shapes is the slow one there).
"""

from __future__ import annotations

import torch

from adapterserve.server.adapters.kernels.base import LoraKernels


class TorchLoraKernels(LoraKernels):
    """`w.index_select(0, slots)` copies every row's A (or B) before the bmm: simple, any device, any dtype."""

    name = "torch"

    def gathered_matmul(
        self, x: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, single_slot: int | None
    ) -> torch.Tensor:
        if single_slot is not None:
            return x.to(w.dtype) @ w[single_slot]  # [B, S, K] @ [K, N]
        return torch.bmm(x.to(w.dtype), w.index_select(0, slots))  # [B, S, K] @ [B, K, N]
