"""A paged key/value cache: fixed-size blocks in one pool, a block table per row, a free list.

Memory is the pool, sized by `EngineSettings.kv_cache_bytes` (or, unset, the dense worst case rows x
max_seq_len): a request reserves the blocks its whole length needs (virtual + prompt + max_new_tokens)
when it is admitted, and gives them back when it leaves, so memory follows the tokens in use rather than
rows x max length, and a pool smaller than the worst case serves more rows as long as their tokens fit
(admission waits for free blocks; a running request never runs out).

The interface is the dense KVCache's (kv_cache.py), so the runner and the scheduler use either: `write`
scatters new keys/values through the block table; `read` gathers a row's blocks into a dense
[rows, kvH, length, D] view for SDPA ("SDPA over gathered pages": one implementation on CPU and GPU);
moving or swapping rows moves block-table entries, never key/value data.

Block 0 is a scratch block owned by no row: table entries of blocks a row does not own point at it, so
the padded positions of a right-padded prefill chunk are written there and never read unmasked.

Prefix tuning's key/values are shared (`share_prefix`): the whole blocks of an adapter's prefix are
written once, and every running row of that adapter points its first table entries at them (reference
counted; freed with the last row that uses them). A row only writes the prefix's last, partial block
itself, since its prompt continues in that block. No row ever writes a position below its prefix length,
so shared blocks are read-only once written. A reservation still counts the blocks of its whole length;
the blocks a row then shares go straight back to the free list.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import torch


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
    ):
        self.block_size = block_size
        self.blocks_per_row = math.ceil(max_len / block_size)
        self.max_rows = max_rows
        self.max_len = self.blocks_per_row * block_size
        usable = num_blocks if num_blocks is not None else max_rows * self.blocks_per_row
        # Positions before heads: a row's gathered blocks [nb, bs, kvH, D] are already its keys in order
        # ([nb * bs, kvH, D] is a view), so a read is one gather and no second copy.
        shape = (num_layers, usable + 1, block_size, kv_heads, head_dim)  # +1: the scratch block 0
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, blocks, bs, kvH, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.table = torch.zeros(
            max_rows, self.blocks_per_row, dtype=torch.long, device=device
        )  # [rows, bpr]
        # Host mirror of each row's table: its shared prefix blocks, then the blocks it owns.
        self._owned: list[list[int]] = [[] for _ in range(max_rows)]
        self._shared: list[list[int]] = [[] for _ in range(max_rows)]
        self._free: list[int] = list(range(usable, 0, -1))  # pop() hands out low ids first
        self._prefixes: dict[Hashable, list[int]] = {}  # prefix key -> its shared blocks
        self._prefix_of: dict[int, Hashable] = {}  # first shared block -> its key
        self._refs: dict[int, int] = {}  # shared block -> rows using it
        self.prefix_reuses = 0  # rows that found their prefix already written (stats, tests)

    # ----- blocks ---------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def total_blocks(self) -> int:
        return self.k.shape[1] - 1

    @property
    def capacity_tokens(self) -> int:
        """The longest request the cache can ever hold (its whole pool, at most one row's table)."""
        return min(self.total_blocks, self.blocks_per_row) * self.block_size

    def can_reserve(self, requests: list[int]) -> bool:
        """Whether rows of these token counts (each rounded up to whole blocks) fit in the free blocks."""
        return sum(self.blocks_for(tokens) for tokens in requests) <= len(self._free)

    def can_ever_reserve(self, requests: list[int]) -> bool:
        """Whether rows of these token counts fit the whole pool at once (when nothing else runs)."""
        return (
            len(requests) <= self.max_rows and sum(self.blocks_for(t) for t in requests) <= self.total_blocks
        )

    def reserve(self, row: int, tokens: int) -> None:
        """Give `row` (which owns nothing) the blocks for `tokens` positions."""
        need = self.blocks_for(tokens)
        if self._owned[row] or self._shared[row]:
            raise RuntimeError(f"row {row} already holds blocks")
        if need > self.blocks_per_row or need > len(self._free):
            raise RuntimeError(f"cannot reserve {need} blocks for row {row} ({len(self._free)} free)")
        blocks = [self._free.pop() for _ in range(need)]
        self._owned[row] = blocks
        self.table[row, :need] = torch.tensor(blocks, dtype=torch.long, device=self.table.device)

    def release(self, row: int) -> None:
        """Return `row`'s blocks to the free list (the row leaves the batch); its shared prefix blocks
        go back with the last row that uses them."""
        self._free.extend(reversed(self._owned[row]))
        self._owned[row] = []
        self._unshare(self._shared[row])
        self._shared[row] = []
        self.table[row] = 0

    def _unshare(self, blocks: list[int]) -> None:
        if not blocks:
            return
        for block in blocks:
            self._refs[block] -= 1
        if self._refs[blocks[0]] == 0:  # a prefix's blocks are always used together
            for block in blocks:
                del self._refs[block]
            del self._prefixes[self._prefix_of.pop(blocks[0])]
            self._free.extend(reversed(blocks))

    @property
    def shared_blocks(self) -> int:
        """Blocks held by shared prefixes (each counted once)."""
        return len(self._refs)

    # ----- the KVCache interface -----------------------------------------------------------------
    def write(
        self, layer: int, row_start: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write k, v [B, kvH, S, D] of rows row_start..row_start+B-1 at positions [B, S]."""
        b = k.shape[0]
        self.write_blocks(layer, self.table[row_start : row_start + b], positions, k, v)

    def read(self, layer: int, row_start: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [rows, kvH, length, D], gathered from the rows' blocks."""
        return self.read_blocks(layer, self.table[row_start : row_start + rows], length)

    # The same through an explicit block table [B, >= blocks used] (the static decode step passes a
    # padded copy, whose padding rows point at the scratch block): shapes depend on its shape only.
    def write_blocks(
        self, layer: int, table: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write k, v [B, kvH, S, D] at positions [B, S] of the rows whose block tables are `table`."""
        blocks = torch.gather(table, 1, positions // self.block_size).reshape(-1)  # [B*S]
        offsets = (positions % self.block_size).reshape(-1)  # [B*S]
        # [B, kvH, S, D] -> [B*S, kvH, D], matching (blocks, offsets) row-major over (B, S)
        self.k[layer][blocks, offsets] = k.transpose(1, 2).reshape(-1, k.shape[1], k.shape[3])
        self.v[layer][blocks, offsets] = v.transpose(1, 2).reshape(-1, v.shape[1], v.shape[3])

    def read_blocks(self, layer: int, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kvH, length, D] of the rows whose block tables are `table` [B, >= nb]."""
        nb = self.blocks_for(length)
        blocks = table[:, :nb]  # [B, nb]

        def gather(pool: torch.Tensor) -> torch.Tensor:
            # index_select over whole blocks: the one copy (3x faster than advanced indexing on a CPU)
            paged = torch.index_select(pool[layer], 0, blocks.reshape(-1))  # [B*nb, bs, kvH, D]
            _, bs, heads, dim = paged.shape
            rows = paged.view(blocks.shape[0], nb * bs, heads, dim)
            return rows[:, :length].transpose(1, 2)  # [B, kvH, length, D], a strided view

        return gather(self.k), gather(self.v)

    def write_prefix(self, row: int, keys: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
        """Prefix tuning: keys/values [L, kvH, n, D] at positions start..n-1 of `row` in every layer."""
        n = keys.shape[2]
        if start >= n:
            return
        positions = torch.arange(start, n, device=self.table.device)
        blocks = self.table[row, positions // self.block_size]  # [n - start]
        offsets = positions % self.block_size
        self.k[:, blocks, offsets] = (
            keys[:, :, start:].permute(0, 2, 1, 3).to(self.k.dtype)
        )  # [L, n', kvH, D]
        self.v[:, blocks, offsets] = values[:, :, start:].permute(0, 2, 1, 3).to(self.v.dtype)

    def share_prefix(self, row: int, key: Hashable, keys: torch.Tensor, values: torch.Tensor) -> None:
        """write_prefix, with the prefix's whole blocks shared by every row that passes the same `key`
        (which must name these exact keys/values). `row` has just been reserved and holds no prefix."""
        full = keys.shape[2] // self.block_size  # whole blocks of the prefix
        if full == 0 or self._shared[row]:
            self.write_prefix(row, keys, values)
            return
        blocks = self._prefixes.get(key)
        own = self._owned[row]
        if blocks is None:  # the first row of this prefix: its own first blocks become the shared ones
            blocks = own[:full]
            self.write_prefix(row, keys, values)
            self._prefixes[key] = blocks
            self._prefix_of[blocks[0]] = key
            self._refs.update(dict.fromkeys(blocks, 0))
        else:  # later rows point at them, and give back the blocks they reserved for those positions
            self.prefix_reuses += 1
            self._free.extend(reversed(own[:full]))
            self.table[row, :full] = torch.tensor(blocks, dtype=torch.long, device=self.table.device)
            self.write_prefix(row, keys, values, start=full * self.block_size)
        for block in blocks:
            self._refs[block] += 1
        self._owned[row] = own[full:]
        self._shared[row] = list(blocks)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Row src becomes row dst (dst was released): its block-table entries move, no data is copied."""
        del length  # the whole reservation moves
        if self._owned[dst] or self._shared[dst]:
            raise RuntimeError(f"row {dst} still holds blocks")
        self._owned[dst], self._owned[src] = self._owned[src], []
        self._shared[dst], self._shared[src] = self._shared[src], []
        self.table[dst] = self.table[src]
        self.table[src] = 0

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Row dst (reserved, at least as long) gets a copy of row src's first `length` positions: the
        blocks that hold them, whole (n choices of one prefill; shared prefix blocks are copied too)."""
        nb = self.blocks_for(length)
        src_blocks, dst_blocks = self.table[src, :nb], self.table[dst, :nb]  # [nb]
        self.k[:, dst_blocks] = self.k[:, src_blocks]  # [L, nb, bs, kvH, D]
        self.v[:, dst_blocks] = self.v[:, src_blocks]

    def swap_rows(self, a: int, b: int, length: int) -> None:
        del length
        self._owned[a], self._owned[b] = self._owned[b], self._owned[a]
        self._shared[a], self._shared[b] = self._shared[b], self._shared[a]
        self.table[[a, b]] = self.table[[b, a]]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def bytes_in_use(self) -> int:
        per_block = 2 * self.k[0, 0].numel() * self.k.element_size() * self.k.shape[0]
        return (self.total_blocks - len(self._free)) * per_block
