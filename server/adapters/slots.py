"""Device slots: each kind's slot storage that holds the resident adapters, and the slot table.

Slot 0 is "no adapter" (every kind's storage is the identity there) and is never assigned. Slots
1..N hold adapters; a step gathers each row's weights by slot index, so no adapter is ever copied per request. The table is an LRU
over (adapter name, version) with pinning and reference counts: a slot used by a running request, or
pinned, is never evicted; an unreferenced one is reused least-recently-used first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from adapterserve.server.adapters.kernels import lora_kernels
from adapterserve.server.adapters.kind import (
    BankSite,
    HookSite,
    LinearKindWeights,
    LinearSite,
    ModuleKey,
    ModuleSlots,
    PrefillSlots,
    all_kinds,
)
from adapterserve.server.adapters.loader import LoadedAdapter
from adapterserve.server.model.spec import BaseModelSpec

NO_ADAPTER = 0
SlotKey = tuple[str, int]  # (adapter name, version)


@dataclass
class SlotEntry:
    key: SlotKey
    slot: int
    refs: int = 0
    pinned: bool = False


@dataclass
class SlotTableStats:
    loads: int = 0  # adapters copied into a slot
    hits: int = 0  # acquisitions that found the adapter resident
    evictions: int = 0  # resident adapters dropped to make room


@dataclass
class SlotTable:
    """LRU over adapter slots 1..num_slots with pinning and reference counts (no tensors here)."""

    num_slots: int
    entries: OrderedDict[SlotKey, SlotEntry] = field(default_factory=OrderedDict)  # LRU first
    stats: SlotTableStats = field(default_factory=SlotTableStats)

    def lookup(self, key: SlotKey) -> SlotEntry | None:
        return self.entries.get(key)

    def acquire(self, key: SlotKey) -> tuple[SlotEntry, bool, SlotKey | None] | None:
        """Take a reference on `key`'s slot. Returns (entry, needs_load, evicted_key) or None if every
        slot is referenced or pinned."""
        entry = self.entries.get(key)
        if entry is not None:
            entry.refs += 1
            self.entries.move_to_end(key)
            self.stats.hits += 1
            return entry, False, None
        used = {e.slot for e in self.entries.values()}
        free = [s for s in range(1, self.num_slots + 1) if s not in used]
        evicted: SlotKey | None = None
        if free:
            slot = free[0]
        else:
            victim = next((e for e in self.entries.values() if e.refs == 0 and not e.pinned), None)
            if victim is None:
                return None
            del self.entries[victim.key]
            slot, evicted = victim.slot, victim.key
            self.stats.evictions += 1
        entry = SlotEntry(key=key, slot=slot, refs=1)
        self.entries[key] = entry
        self.stats.loads += 1
        return entry, True, evicted

    def release(self, key: SlotKey) -> None:
        entry = self.entries.get(key)
        if entry is not None and entry.refs > 0:
            entry.refs -= 1

    def set_pinned(self, key: SlotKey, pinned: bool) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            entry.pinned = pinned

    def drop(self, key: SlotKey) -> SlotEntry | None:
        """Forget an unreferenced entry (adapter deleted/replaced). Returns it so its slot can be cleared."""
        entry = self.entries.get(key)
        if entry is None or entry.refs > 0:
            return None
        del self.entries[key]
        return entry

    def snapshot(self) -> list[tuple[SlotKey, int, int, bool]]:
        """(key, slot, refs, pinned) in LRU order (least recent first); for tests and stats."""
        return [(e.key, e.slot, e.refs, e.pinned) for e in self.entries.values()]


def linear_slot_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the linear kinds' slot tensors (LoRA, DoRA, IA3, bottleneck) over a base of `dtype`.

    The base's dtype, except float32 over a bf16/fp16 base on a CPU: there torch's half-precision bmm
    of the gathered low-rank shapes runs ~3x slower than the fp32 one (86 against 25 us, measured on a
    2-core AVX-512 VM), and fp32 is what PEFT computes these adapters in over a half-precision base
    (`autocast_adapter_dtype`). Each hook casts its result back to the activations' dtype. The prefill
    kinds' storage (virtual tokens, prefix key/values) stays in the base's dtype: it meets the model's
    own embeddings and key/values."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


class AdapterBank:
    """All device-side adapter state: each registered kind's slot storage, and the slot table.

    Linear kinds get a ModuleSlots per wrapped linear, created when an adapter first writes to it;
    prefill kinds get one PrefillSlots each. `slot_kinds` says which kind holds each occupied slot."""

    def __init__(
        self,
        spec: BaseModelSpec,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device,
        lora_backend: str = "torch",
    ):
        self.spec = spec
        self.dtype, self.device = dtype, device
        # Checked here, at engine start: a backend that cannot run on `device` is refused now.
        self.kernels = lora_kernels(lora_backend, device)
        self.table = SlotTable(num_slots)
        total = num_slots + 1  # + slot 0 = no adapter
        self.linear_dtype = linear_slot_dtype(dtype, device)
        self.sites: dict[ModuleKey, LinearSite] = {
            (layer, short): LinearSite(
                (layer, short), in_f, out_f, total, self.linear_dtype, device, kernels=self.kernels
            )
            for layer in range(spec.num_layers)
            for short, (in_f, out_f) in spec.linear_shapes.items()
        }
        # module -> kind name -> that kind's slots there (what MultiAdapterLinear iterates)
        self.module_slots: dict[ModuleKey, dict[str, ModuleSlots]] = {key: {} for key in self.sites}
        site = BankSite(spec, total, dtype, device)
        self.prefill: dict[str, PrefillSlots] = {
            k.name: k.prefill_slots(site) for k in all_kinds() if k.hook == HookSite.PREFILL
        }
        self.slot_kinds: dict[int, str] = {}  # occupied slot -> kind name
        self._touched: dict[int, list[ModuleKey]] = {}  # slot -> modules written
        self.writes = 0  # bumped by every slot write or clear (decode graphs check their buffers then)

    def acquire(self, key: SlotKey, adapter: LoadedAdapter) -> int | None:
        """The slot holding `adapter` (loading it if needed), with a reference taken; None if all busy."""
        got = self.table.acquire(key)
        if got is None:
            return None
        entry, needs_load, _ = got
        if needs_load:
            self._clear(entry.slot)
            self._write(entry.slot, adapter)
        return entry.slot

    def release(self, key: SlotKey) -> None:
        self.table.release(key)

    def pin(self, key: SlotKey, adapter: LoadedAdapter) -> int | None:
        """Make `adapter` resident and pinned (never evicted). At least one slot always stays
        unpinned so other adapters can still be served; returns None when pinning is not possible."""
        entry = self.table.lookup(key)
        if entry is not None and entry.pinned:
            return entry.slot
        pinned = sum(1 for e in self.table.entries.values() if e.pinned)
        if pinned + 1 >= self.table.num_slots:
            return None
        slot = self.acquire(key, adapter)
        if slot is None:
            return None
        self.table.set_pinned(key, True)
        self.table.release(key)
        return slot

    def unpin(self, key: SlotKey) -> None:
        self.table.set_pinned(key, False)

    def _write(self, slot: int, adapter: LoadedAdapter) -> None:
        self.writes += 1
        kind = adapter.handler
        touched: list[ModuleKey] = []
        if kind.hook == HookSite.LINEAR:
            assert isinstance(adapter.weights, LinearKindWeights)
            for key, value in adapter.weights.modules.items():
                per_kind = self.module_slots[key]
                if kind.name not in per_kind:
                    per_kind[kind.name] = kind.module_slots(self.sites[key])
                per_kind[kind.name].write(slot, value)
                touched.append(key)
        elif kind.hook == HookSite.PREFILL:
            self.prefill[kind.name].write(slot, adapter.weights)
        self._touched[slot] = touched
        self.slot_kinds[slot] = kind.name

    def _clear(self, slot: int) -> None:
        self.writes += 1
        name = self.slot_kinds.pop(slot, None)
        if name is None:
            return
        for key in self._touched.pop(slot, []):
            self.module_slots[key][name].clear(slot)
        if name in self.prefill:
            self.prefill[name].clear(slot)

    def drop(self, key: SlotKey) -> bool:
        entry = self.table.drop(key)
        if entry is None:
            return False
        self._clear(entry.slot)
        return True

    def slot_tensors(self) -> list[torch.Tensor]:
        """Every linear kind's device slot tensors (what a captured decode graph reads)."""
        return [
            t
            for per_kind in self.module_slots.values()
            for ms in per_kind.values()
            for t in ms.slot_tensors()
        ]

    def device_bytes(self) -> int:
        total = sum(ms.nbytes() for per_kind in self.module_slots.values() for ms in per_kind.values())
        return total + sum(p.nbytes() for p in self.prefill.values())
