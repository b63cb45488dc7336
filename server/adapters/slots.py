"""Device slots: preallocated per-module tensors that hold the resident adapters, and the slot table.

Slot 0 is "no adapter" (LoRA zeros, IA3 ones) and is never assigned. Slots 1..N hold adapters; a step
gathers each row's weights by slot index, so no adapter is ever copied per request. The table is an LRU
over (adapter name, version) with pinning and reference counts: a slot used by a running request, or
pinned, is never evicted; an unreferenced one is reused least-recently-used first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from adapterserve.server.adapters.ia3 import IA3Weights
from adapterserve.server.adapters.loader import LoadedAdapter
from adapterserve.server.adapters.lora import LoraWeights
from adapterserve.server.adapters.prefix import PrefixWeights
from adapterserve.server.adapters.prompt import PromptWeights
from adapterserve.server.model.spec import BaseModelSpec

NO_ADAPTER = 0
SlotKey = tuple[str, int]  # (adapter name, version)


class ModuleSlots:
    """Slot tensors of one wrapped linear (in -> out). Created lazily: nothing until an adapter needs it.

    lora_a: [S, in, r_cap]   lora_b: [S, r_cap, out]   (scaling folded in, ranks zero-padded to r_cap)
    ia3_in: [S, in]          ia3_out: [S, out]         (ones where a slot does not scale)
    """

    def __init__(self, in_features: int, out_features: int, num_slots: int, dtype: torch.dtype, device):
        self.in_features, self.out_features, self.num_slots = in_features, out_features, num_slots
        self.dtype, self.device = dtype, device
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.ia3_in: torch.Tensor | None = None
        self.ia3_out: torch.Tensor | None = None

    @property
    def rank_capacity(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[2]

    def set_lora(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        rank = a.shape[1]
        if rank > self.rank_capacity:
            self._grow_rank(rank)
        assert self.lora_a is not None and self.lora_b is not None
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_a[slot, :, :rank] = a.to(self.device, self.dtype)
        self.lora_b[slot, :rank, :] = b.to(self.device, self.dtype)

    def set_ia3(self, slot: int, vector: torch.Tensor, scales_input: bool) -> None:
        if scales_input:
            if self.ia3_in is None:
                self.ia3_in = torch.ones(
                    self.num_slots, self.in_features, dtype=self.dtype, device=self.device
                )
            self.ia3_in[slot] = vector.to(self.device, self.dtype)
        else:
            if self.ia3_out is None:
                self.ia3_out = torch.ones(
                    self.num_slots, self.out_features, dtype=self.dtype, device=self.device
                )
            self.ia3_out[slot] = vector.to(self.device, self.dtype)

    def clear(self, slot: int) -> None:
        """Back to "no adapter" for this slot."""
        if self.lora_a is not None and self.lora_b is not None:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
        if self.ia3_in is not None:
            self.ia3_in[slot].fill_(1.0)
        if self.ia3_out is not None:
            self.ia3_out[slot].fill_(1.0)

    def _grow_rank(self, rank: int) -> None:
        # Grow to the next power of two so repeated growth stays rare; existing slots keep their weights.
        cap = 1 << max(rank - 1, 0).bit_length()
        a = torch.zeros(self.num_slots, self.in_features, cap, dtype=self.dtype, device=self.device)
        b = torch.zeros(self.num_slots, cap, self.out_features, dtype=self.dtype, device=self.device)
        if self.lora_a is not None and self.lora_b is not None:
            old = self.rank_capacity
            a[:, :, :old] = self.lora_a
            b[:, :old, :] = self.lora_b
        self.lora_a, self.lora_b = a, b

    def nbytes(self) -> int:
        tensors = (self.lora_a, self.lora_b, self.ia3_in, self.ia3_out)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


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

    def can_acquire(self, key: SlotKey) -> bool:
        if key in self.entries or len(self.entries) < self.num_slots:
            return True
        return any(e.refs == 0 and not e.pinned for e in self.entries.values())

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


class AdapterBank:
    """All device-side adapter state: per-module slot tensors, prompt/prefix tensors, the slot table."""

    def __init__(self, spec: BaseModelSpec, num_slots: int, dtype: torch.dtype, device: torch.device):
        self.spec = spec
        self.dtype, self.device = dtype, device
        self.table = SlotTable(num_slots)
        total = num_slots + 1  # + slot 0 = no adapter
        self.modules: dict[tuple[int, str], ModuleSlots] = {
            (layer, short): ModuleSlots(in_f, out_f, total, dtype, device)
            for layer in range(spec.num_layers)
            for short, (in_f, out_f) in spec.linear_shapes.items()
        }
        self.prompts: dict[int, torch.Tensor] = {}  # slot -> [n_virtual, hidden]
        self.prefixes: dict[
            int, tuple[torch.Tensor, torch.Tensor]
        ] = {}  # slot -> keys, values [L, kvH, n, D]
        self._touched: dict[int, list[tuple[int, str]]] = {}  # slot -> modules written

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
        w = adapter.weights
        touched: list[tuple[int, str]] = []
        if isinstance(w, LoraWeights):
            for key, (a, b) in w.modules.items():
                self.modules[key].set_lora(slot, a, b)
                touched.append(key)
        elif isinstance(w, IA3Weights):
            for key, (vector, scales_input) in w.modules.items():
                self.modules[key].set_ia3(slot, vector, scales_input)
                touched.append(key)
        elif isinstance(w, PromptWeights):
            self.prompts[slot] = w.embeddings.to(self.device, self.dtype)
        elif isinstance(w, PrefixWeights):
            self.prefixes[slot] = (w.keys.to(self.device, self.dtype), w.values.to(self.device, self.dtype))
        self._touched[slot] = touched

    def _clear(self, slot: int) -> None:
        for key in self._touched.pop(slot, []):
            self.modules[key].clear(slot)
        self.prompts.pop(slot, None)
        self.prefixes.pop(slot, None)

    def drop(self, key: SlotKey) -> bool:
        entry = self.table.drop(key)
        if entry is None:
            return False
        self._clear(entry.slot)
        return True

    def device_bytes(self) -> int:
        total = sum(m.nbytes() for m in self.modules.values())
        total += sum(t.numel() * t.element_size() for t in self.prompts.values())
        total += sum(k.numel() * k.element_size() * 2 for k, _ in self.prefixes.values())
        return total
