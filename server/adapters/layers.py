"""Multi-adapter linear: wraps one base linear (plain or bitsandbytes) and applies, per batch row, the
LoRA delta and IA3 scaling of that row's adapter slot.

The runner sets the batch's `AdapterBatch` on the shared `AdapterContext` before each forward; every
wrapped layer reads it. Rows with slot 0 get the base output (zero LoRA, unit IA3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapterserve.server.adapters.slots import NO_ADAPTER, AdapterBank, ModuleSlots


@dataclass
class AdapterBatch:
    """Adapter metadata of one forward. slots: [B] long (row -> slot)."""

    slots: torch.Tensor
    any_lora: bool  # some row has a LoRA adapter
    any_ia3: bool  # some row has an IA3 adapter
    single_slot: int | None  # every row uses this one slot (a plain matmul replaces the gather)

    @classmethod
    def build(cls, slot_list: list[int], lora_slots: set[int], ia3_slots: set[int], device) -> AdapterBatch:
        distinct = set(slot_list)
        return cls(
            slots=torch.tensor(slot_list, dtype=torch.long, device=device),
            any_lora=bool(distinct & lora_slots),
            any_ia3=bool(distinct & ia3_slots),
            single_slot=next(iter(distinct)) if len(distinct) == 1 else None,
        )


class AdapterContext:
    """Holder of the current forward's AdapterBatch, shared by all wrapped layers of one model."""

    def __init__(self) -> None:
        self.batch: AdapterBatch | None = None


class MultiAdapterLinear(nn.Module):
    def __init__(self, base: nn.Module, slots: ModuleSlots, context: AdapterContext):
        super().__init__()
        self.base = base
        self.slots = slots
        self.context = context

    @property
    def in_features(self) -> int:
        return self.slots.in_features

    @property
    def out_features(self) -> int:
        return self.slots.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, S, in]
        batch = self.context.batch
        ms = self.slots
        if batch is None or batch.single_slot == NO_ADAPTER:
            return self.base(x)
        idx = batch.slots  # [B]
        scaled = x
        if batch.any_ia3 and ms.ia3_in is not None:
            scaled = x * ms.ia3_in[idx].unsqueeze(1)  # [B, 1, in]
        y = self.base(scaled)  # [B, S, out]
        if batch.any_ia3 and ms.ia3_out is not None:
            y = y * ms.ia3_out[idx].unsqueeze(1)  # [B, 1, out]
        if batch.any_lora and ms.lora_a is not None and ms.lora_b is not None:
            xa = x.to(ms.lora_a.dtype)
            if batch.single_slot is not None:
                s = batch.single_slot
                delta = (xa @ ms.lora_a[s]) @ ms.lora_b[s]  # [B, S, out]
            else:
                a = ms.lora_a[idx]  # [B, in, r]
                b = ms.lora_b[idx]  # [B, r, out]
                delta = torch.bmm(torch.bmm(xa, a), b)  # [B, S, out]
            y = y + delta.to(y.dtype)
        return y


def wrap_model(model: nn.Module, bank: AdapterBank, context: AdapterContext) -> None:
    """Replace every decoder linear of the base model by a MultiAdapterLinear (once, in place)."""
    for layer_idx, layer in enumerate(model.model.layers):
        for short, path in bank.spec.linear_paths.items():
            parent_path, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            base = getattr(parent, attr)
            if isinstance(base, MultiAdapterLinear):
                raise RuntimeError("the base model is already wrapped for multi-adapter serving")
            setattr(parent, attr, MultiAdapterLinear(base, bank.modules[(layer_idx, short)], context))
