"""Helpers shared by the linear kinds: grouping a PEFT state dict by adapted module, and the padded
low-rank slot tensors of LoRA-like kinds."""

from __future__ import annotations

import re

import torch

from adapterserve.server.adapters.kind import LinearSite, ModuleKey, RowSelection
from adapterserve.server.errors import BaseMismatchError, UnsupportedAdapterError
from adapterserve.server.model.spec import BaseModelSpec


def group_module_tensors(
    tensors: dict[str, torch.Tensor], spec: BaseModelSpec, key: re.Pattern[str], expected: str
) -> dict[ModuleKey, dict[str, torch.Tensor]]:
    """(layer, short) -> {part: tensor} for names `key` matches (groups "module" and "part").

    A name `key` does not match is refused (UnsupportedAdapterError saying `expected`); a module that
    is not a decoder linear of the base is refused (BaseMismatchError)."""
    grouped: dict[ModuleKey, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        m = key.match(name)
        if m is None:
            raise UnsupportedAdapterError(f"tensor {name!r} is not expected here (expected {expected})")
        module = spec.parse_module_name(m.group("module"))
        if module is None:
            raise BaseMismatchError(
                f"tensor {name!r} targets a module the base model does not have "
                f"(decoder linears: {', '.join(spec.linear_paths)}; layers 0-{spec.num_layers - 1})"
            )
        grouped.setdefault(module, {})[m.group("part")] = tensor
    return grouped


class LowRankSlots:
    """Per-slot pair A [S, in, r_cap], B [S, r_cap, out]; ranks zero-padded (a padded rank is exact),
    so slot 0 and slots of other kinds give a zero delta. Capacity grows to the next power of two."""

    def __init__(self, site: LinearSite, in_dim: int, out_dim: int) -> None:
        self.site, self.in_dim, self.out_dim = site, in_dim, out_dim
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.a is None else self.a.shape[2]

    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: [in, r], b: [r, out]."""
        rank = a.shape[1]
        if rank > self.capacity:
            self._grow(rank)
        assert self.a is not None and self.b is not None
        self.clear(slot)
        self.a[slot, :, :rank] = a.to(self.site.device, self.site.dtype)
        self.b[slot, :rank, :] = b.to(self.site.device, self.site.dtype)

    def clear(self, slot: int) -> None:
        if self.a is not None and self.b is not None:
            self.a[slot].zero_()
            self.b[slot].zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b) if t is not None)

    def slot_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.a, self.b) if t is not None]

    def down(self, x: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        """x [B, S, in] -> x @ A[slot] [B, S, r_cap] (through the site's kernel backend)."""
        assert self.a is not None
        return self.site.kernels.shrink(x, self.a, rows.slots, rows.single_slot)

    def up(self, h: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        """h [B, S, r_cap] -> h @ B[slot] [B, S, out] (through the site's kernel backend)."""
        assert self.b is not None
        return self.site.kernels.expand(h, self.b, rows.slots, rows.single_slot)

    def delta(self, x: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        """x [B, S, in] -> (x @ A) @ B [B, S, out]."""
        return self.up(self.down(x, rows), rows)

    def _grow(self, rank: int) -> None:
        cap = 1 << max(rank - 1, 0).bit_length()
        s, dt, dev = self.site.num_slots, self.site.dtype, self.site.device
        a = torch.zeros(s, self.in_dim, cap, dtype=dt, device=dev)
        b = torch.zeros(s, cap, self.out_dim, dtype=dt, device=dev)
        if self.a is not None and self.b is not None:
            old = self.capacity
            a[:, :, :old] = self.a
            b[:, :old, :] = self.b
        self.a, self.b = a, b
