"""The reference backend: gather each row's slot tensor and bmm (a plain matmul for one slot)."""

from __future__ import annotations

import torch

from adapterserve.server.adapters.kernels.base import LoraKernels


class TorchLoraKernels(LoraKernels):
    """`w[slots]` copies every row's A (or B) before the bmm: simple, any device, any dtype."""

    name = "torch"

    def gathered_matmul(
        self, x: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, single_slot: int | None
    ) -> torch.Tensor:
        x = x.to(w.dtype)
        if single_slot is not None:
            return x @ w[single_slot]  # [B, S, K] @ [K, N]
        return torch.bmm(x, w[slots])  # [B, S, K] @ [B, K, N]
