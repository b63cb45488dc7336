"""Multi-adapter linear: wraps one base linear (plain or bitsandbytes) and applies, per batch row, the
hooks of every linear kind that has rows in the batch (LoRA delta, IA3 scaling, ...).

The runner sets the batch's `AdapterBatch` on the shared `AdapterContext` before each forward (a
thread-local: forwards on several threads each see their own); every wrapped layer reads it. Each kind's slots are the identity for slot 0 and for slots of other kinds, so
hooks compose: pre-hooks (on the input) in kind order, the base linear, then post-hooks in kind order.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from adapterserve.server.adapters.kind import ModuleKey, ModuleSlots, RowSelection
from adapterserve.server.adapters.slots import NO_ADAPTER, AdapterBank
from adapterserve.server.cpu.linear import PackedLinear, pack
from adapterserve.server.model.family import decoder_parts

AdapterBatch = RowSelection  # one forward's rows: slots [B], kinds present, single shared slot


def build_batch(slot_list: list[int], slot_kinds: dict[int, str], device: torch.device) -> AdapterBatch:
    """The AdapterBatch of rows using `slot_list` (row -> slot; slot 0 = no adapter)."""
    distinct = set(slot_list)
    return RowSelection(
        slots=torch.tensor(slot_list, dtype=torch.long, device=device),
        kinds=frozenset(slot_kinds[s] for s in distinct if s in slot_kinds),
        single_slot=next(iter(distinct)) if len(distinct) == 1 else None,
    )


class AdapterContext(threading.local):
    """Holder of the current forward's AdapterBatch, shared by all wrapped layers of one model. Per
    thread: a prefill worker's forward and the engine thread's decode forward run at the same time
    (server/cpu/prefill_workers.py), each with its own batch."""

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
        active = [ms for name, ms in sorted(self.slots.items()) if name in batch.kinds]
        if not active:
            return self.base(x)
        h = x
        for ms in active:
            h = ms.pre(h, batch)
        y = self.base(h)  # [B, S, out]
        for ms in active:
            y = ms.post(x, y, batch)
        return y


def pack_base_linears(model: nn.Module, setting: str = "onednn") -> list[PackedLinear]:
    """Run the wrapped base linears and the lm_head through oneDNN-packed weights (a CPU engine; see
    server/cpu/linear.py; `setting` "auto": only the shapes measured faster there, and at those
    row counts). Returns the decoder layers' packed linears."""
    packed: list[PackedLinear] = []
    for module in model.modules():
        if isinstance(module, MultiAdapterLinear):
            module.base = pack(module.base, setting)
            if isinstance(module.base, PackedLinear):
                packed.append(module.base)
    head = model.get_output_embeddings()
    if head is not None:
        model.set_output_embeddings(pack(head, setting))
    return packed


def wrap_model(
    model: nn.Module, bank: AdapterBank, context: AdapterContext, *, pack_cpu_linears: str | None = None
) -> list[PackedLinear]:
    """Replace every decoder linear of the base model by a MultiAdapterLinear (once, in place); with
    `pack_cpu_linears` (EngineSettings.cpu.linear: "auto" or "onednn"), their base linears and the
    lm_head then run on oneDNN-packed weights. Returns the decoder layers' packed linears."""
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
    return pack_base_linears(model, pack_cpu_linears) if pack_cpu_linears else []
