"""The reference backend: gather each row's slot tensor and bmm (a plain matmul for one slot)."""

from __future__ import annotations

import torch

from adapterserve.server.adapters.kernels.base import LoraKernels


class TorchLoraKernels(LoraKernels):
    """`a[slots]` copies every row's A ([B, in, r]) before the bmm: simple, any device, any dtype."""

    name = "torch"

    def shrink(
        self, x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, single_slot: int | None = None
    ) -> torch.Tensor:
        x = x.to(a.dtype)
        if single_slot is not None:
            return x @ a[single_slot]  # [B, S, in] @ [in, r]
        return torch.bmm(x, a[slots])  # [B, S, in] @ [B, in, r]

    def expand(
        self, h: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, single_slot: int | None = None
    ) -> torch.Tensor:
        h = h.to(b.dtype)
        if single_slot is not None:
            return h @ b[single_slot]  # [B, S, r] @ [r, out]
        return torch.bmm(h, b[slots])  # [B, S, r] @ [B, r, out]
