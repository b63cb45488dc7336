"""Multi-adapter linear: wraps one base linear (plain or bitsandbytes) and applies, per batch row, the
hooks of every linear kind that has rows in the batch (LoRA delta, IA3 scaling, ...).

The runner sets the batch's `AdapterBatch` on the shared `AdapterContext` before each forward; every
wrapped layer reads it. Each kind's slots are the identity for slot 0 and for slots of other kinds, so
hooks compose: pre-hooks (on the input) in kind order, the base linear, then post-hooks in kind order.
A kind with rows in at most half of an eager batch runs its hooks on those rows only (gathered, then
written back): in a mix of kinds each row pays for its own kind's math, not for every kind's.
"""

from __future__ import annotations

import torch
from torch import nn

from adapterserve.server.adapters.kind import ModuleKey, ModuleSlots, RowSelection
from adapterserve.server.adapters.slots import NO_ADAPTER, AdapterBank
from adapterserve.server.model.cpu_linear import PackedLinear, can_pack
from adapterserve.server.model.family import decoder_parts

AdapterBatch = RowSelection  # one forward's rows: slots [B], kinds present, single shared slot


def build_batch(slot_list: list[int], slot_kinds: dict[int, str], device: torch.device) -> AdapterBatch:
    """The AdapterBatch of rows using `slot_list` (row -> slot; slot 0 = no adapter). A kind whose rows
    are at most half of the batch gets a subset of its own, so its hooks skip the other rows."""
    distinct = set(slot_list)
    rows_of_kind: dict[str, list[int]] = {}
    for row, slot in enumerate(slot_list):
        if slot in slot_kinds:
            rows_of_kind.setdefault(slot_kinds[slot], []).append(row)
    subsets = {
        kind: (
            torch.tensor(rows, dtype=torch.long, device=device),
            build_batch([slot_list[r] for r in rows], slot_kinds, device),
        )
        for kind, rows in rows_of_kind.items()
        if 2 * len(rows) <= len(slot_list)
    }
    return RowSelection(
        slots=torch.tensor(slot_list, dtype=torch.long, device=device),
        kinds=frozenset(rows_of_kind),
        single_slot=next(iter(distinct)) if len(distinct) == 1 else None,
        subsets=subsets,
    )


class AdapterContext:
    """Holder of the current forward's AdapterBatch, shared by all wrapped layers of one model."""

    def __init__(self) -> None:
        self.batch: AdapterBatch | None = None


class MultiAdapterLinear(nn.Module):
    def __init__(
        self, base: nn.Module, key: ModuleKey, slots: dict[str, ModuleSlots], context: AdapterContext
    ):
        super().__init__()
        self.base = base
        self.key = key
        self.slots = slots  # kind name -> that kind's slots for this module (filled by the bank)
        self.context = context
        self.in_features: int = int(base.in_features)
        self.out_features: int = int(base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, S, in]
        batch = self.context.batch
        if batch is None or batch.single_slot == NO_ADAPTER or not batch.kinds:
            return self.base(x)
        active = [(name, ms) for name, ms in sorted(self.slots.items()) if name in batch.kinds]
        if not active:
            return self.base(x)
        h = x
        for name, ms in active:
            part = batch.subsets.get(name)
            if part is None:
                h = ms.pre(h, batch)
            else:  # the kind's rows only (its hooks are the identity on the others)
                rows, selection = part  # [B_k], the rows' own selection
                h = h.index_copy(0, rows, ms.pre(h.index_select(0, rows), selection))
        y = self.base(h)  # [B, S, out]
        for name, ms in active:
            part = batch.subsets.get(name)
            if part is None:
                y = ms.post(x, y, batch)
            else:  # y is this forward's own tensor: written in place
                rows, selection = part
                y.index_copy_(0, rows, ms.post(x.index_select(0, rows), y.index_select(0, rows), selection))
        return y


def pack_base_linears(model: nn.Module) -> int:
    """Run the wrapped base linears and the lm_head through oneDNN-packed weights (a CPU engine; see
    server/model/cpu_linear.py). Returns how many linears were packed."""
    packed = 0
    for module in model.modules():
        if isinstance(module, MultiAdapterLinear) and can_pack(module.base):
            module.base = PackedLinear(module.base)
            packed += 1
    head = model.get_output_embeddings()
    if head is not None and can_pack(head):
        model.set_output_embeddings(PackedLinear(head))
        packed += 1
    return packed


def wrap_model(
    model: nn.Module, bank: AdapterBank, context: AdapterContext, *, pack_cpu_linears: bool = False
) -> None:
    """Replace every decoder linear of the base model by a MultiAdapterLinear (once, in place); with
    `pack_cpu_linears`, their base linears and the lm_head then run on oneDNN-packed weights."""
    for layer_idx, layer in enumerate(decoder_parts(model).layers):
        for short, path in bank.spec.linear_paths.items():
            parent_path, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            base = getattr(parent, attr)
            if isinstance(base, MultiAdapterLinear):
                raise RuntimeError("the base model is already wrapped for multi-adapter serving")
            key = (layer_idx, short)
            bank.sites[key].base = base
            setattr(parent, attr, MultiAdapterLinear(base, key, bank.module_slots[key], context))
    if pack_cpu_linears:
        pack_base_linears(model)
