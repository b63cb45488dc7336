"""The interface every low-rank kernel backend implements (the choice of one at engine start: choice.py)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from adapterserve.server.errors import FailedPreconditionError


class KernelBackendError(FailedPreconditionError):
    """The chosen kernel backend cannot run here (not installed, or not on this device)."""


class LoraKernels(ABC):
    """The two halves of a per-row low-rank product, over slot tensors shared by every adapter:

        shrink: x [B, S, in]  x  a [num_slots, in, r]  -> h [B, S, r]    (h[b] = x[b] @ a[slots[b]])
        expand: h [B, S, r]   x  b [num_slots, r, out] -> y [B, S, out]  (y[b] = h[b] @ b[slots[b]])

    `slots` [B] (long, on the device) is each row's slot; a packed batch of T tokens with one slot per
    token is B = T rows of S = 1. `single_slot` (a host int) says every row uses that slot (the caller
    knows it without reading `slots`): then it is one plain matmul on that slot's view, no gather.
    The result has the slot tensor's dtype; the products accumulate in fp32 (bmm and the kernels alike).
    Implementations never read device values on the host (no sync), so they can be captured in a
    CUDA graph once warmed up.
    """

    name: ClassVar[str]

    def check(self, device: torch.device) -> None:
        """Raise KernelBackendError if this backend cannot run on `device` (called at engine start).
        Default: runs anywhere torch does."""
        return None

    def shrink(
        self, x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, single_slot: int | None = None
    ) -> torch.Tensor:
        """x [B, S, in], a [num_slots, in, r], slots [B] -> [B, S, r] (a.dtype)."""
        return self.gathered_matmul(x, a, slots, single_slot)

    def expand(
        self, h: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, single_slot: int | None = None
    ) -> torch.Tensor:
        """h [B, S, r], b [num_slots, r, out], slots [B] -> [B, S, out] (b.dtype)."""
        return self.gathered_matmul(h, b, slots, single_slot)

    @abstractmethod
    def gathered_matmul(
        self, x: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, single_slot: int | None
    ) -> torch.Tensor:
        """x [B, S, K], w [num_slots, K, N], slots [B] -> x[b] @ w[slots[b]] [B, S, N] (w.dtype).
        Both halves are this product (shrink: K = in, N = r; expand: K = r, N = out); a backend with a
        kernel tuned for one half overrides `shrink` or `expand`."""


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on the CPU through its interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "on", "yes"}
