"""The reference backend: gather each row's slot tensor and bmm (a plain matmul for one slot).

The gather is `index_select`, not advanced indexing (`w[slots]`): the same copy, ~6x less time on a CPU
(SmolLM2 q_proj shapes, 64 rows over 33 slots, r = 8, 2 threads: 7 vs 44 us per A, measured in
isolation on a 2-core VM). The bmm runs in the slot tensors' dtype, which the bank makes float32 on a CPU
(`linear_slot_dtype`: torch's half-precision bmm of these thin shapes is the slow one there).

Decode rows on a CPU (one token per row) skip the gathered copy: y[b] = x[b] @ w[slot_b] is a weighted
sum of rows of w viewed as [num_slots * K, N], which is what `embedding_bag(mode="sum",
per_sample_weights=...)` computes while reading each row's slot in place. The copy is what a decode step's
LoRA math costs on a CPU (LoRA on all seven linears copies more bytes per step than the model's weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapterserve.server.adapters.kernels.base import LoraKernels


class TorchLoraKernels(LoraKernels):
    """`w.index_select(0, slots)` copies every row's A (or B) before the bmm (any device, any dtype);
    decode rows on a CPU use an embedding bag over the slot tensor instead."""

    name = "torch"

    def __init__(self) -> None:
        # K -> (the slots tensor they were made for, bag indices, bag offsets). Every layer of one step
        # passes the same slots tensor; holding it keeps its identity from being reused by another.
        self._bags: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def gathered_matmul(
        self, x: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, single_slot: int | None
    ) -> torch.Tensor:
        if single_slot is not None:
            return x.to(w.dtype) @ w[single_slot]  # [B, S, K] @ [K, N]
        if w.device.type == "cpu" and x.shape[1] == 1 and x.shape[0] > 0 and w.is_contiguous():
            return self._bag_matmul(x, w, slots)
        return torch.bmm(x.to(w.dtype), w.index_select(0, slots))  # [B, S, K] @ [B, K, N]

    def _bag_matmul(self, x: torch.Tensor, w: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [B, 1, K], w [num_slots, K, N] -> [B, 1, N]: bag b sums rows slot_b*K .. slot_b*K + K-1 of
        w.view(num_slots * K, N), weighted by x[b]."""
        num_slots, k, n = w.shape
        indices, offsets = self._bag_indices(slots, k)
        y = F.embedding_bag(
            indices,
            w.view(num_slots * k, n),
            offsets,
            mode="sum",
            per_sample_weights=x.reshape(-1).to(w.dtype),
        )  # [B, N]
        return y.view(x.shape[0], 1, n)

    def _bag_indices(self, slots: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        compiling = torch.compiler.is_compiling()  # a traced step builds them in the graph, uncached
        cached = None if compiling else self._bags.get(k)
        if cached is not None and cached[0] is slots:
            return cached[1], cached[2]
        indices = (slots[:, None] * k + torch.arange(k, device=slots.device)).reshape(-1)  # [B*K]
        offsets = torch.arange(slots.shape[0], device=slots.device) * k  # [B]
        if not compiling:
            self._bags[k] = (slots, indices, offsets)
        return indices, offsets
