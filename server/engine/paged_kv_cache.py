"""A paged key/value cache: fixed-size blocks in one pool, a block table per row, reference counts, and
content-addressed blocks (prefix caching).

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

Prefix caching. A full block whose positions are all computed gets a key (`register`): a hash chained
over its parent block's key and its tokens, rooted in the identity of whatever computed it (the adapter's
name and version; prefix_cache.py). A later row whose chain of keys starts the same takes those blocks
(`reserve(..., cached=)`), reference counted, and computes only the rest. Rows only ever append, so a
keyed block is never written again; n choices of one prompt share its full blocks the same way (`fork`)
and copy only the partial last block. A block nobody references goes to the free list, or, when it has a
key, to an LRU of cached blocks that a later row may still take; allocation takes free blocks first and
evicts the least recently used cached block only when none is left (`evictions`). A prefix-tuning
adapter's key/value prefix is such a chain too (placeholder tokens), so every row of one adapter version
shares its whole blocks, with or without prefix caching of prompts.
"""

from __future__ import annotations

import math
from collections import OrderedDict

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
        self._rows: list[list[int]] = [[] for _ in range(max_rows)]  # host mirror of each row's table
        self._cached_tokens = [0] * max_rows  # positions each row took from cached blocks (reserve)
        self._refs = [0] * (usable + 1)  # rows whose table holds each block
        self._free: list[int] = list(range(usable, 0, -1))  # unreferenced, no key; pop() gives low ids first
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks with a key, oldest first
        self._key_of: dict[int, bytes] = {}  # block -> its content key
        self._block_of: dict[bytes, int] = {}  # content key -> the block holding it
        self.evictions = 0  # cached blocks given to other content (stats)

    # ----- blocks ---------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    @property
    def free_blocks(self) -> int:
        """Blocks a reservation can take: free ones and cached ones nobody references."""
        return len(self._free) + len(self._lru)

    @property
    def cached_blocks(self) -> int:
        """Blocks holding a key (referenced or not)."""
        return len(self._key_of)

    @property
    def total_blocks(self) -> int:
        return self.k.shape[1] - 1

    @property
    def capacity_tokens(self) -> int:
        """The longest request the cache can ever hold (its whole pool, at most one row's table)."""
        return min(self.total_blocks, self.blocks_per_row) * self.block_size

    def can_reserve(self, requests: list[int]) -> bool:
        """Whether rows of these token counts (each rounded up to whole blocks) fit in the free blocks."""
        return sum(self.blocks_for(tokens) for tokens in requests) <= self.free_blocks

    def can_ever_reserve(self, requests: list[int]) -> bool:
        """Whether rows of these token counts fit the whole pool at once (when nothing else runs)."""
        return (
            len(requests) <= self.max_rows and sum(self.blocks_for(t) for t in requests) <= self.total_blocks
        )

    def match(self, keys: list[bytes]) -> list[int]:
        """The blocks holding the longest run of `keys` from the first (a prefix of the row's chain)."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def reserve(self, row: int, tokens: int, cached: list[int] | None = None) -> None:
        """Give `row` (which holds nothing) the blocks for `tokens` positions: `cached` (from `match`,
        their positions already computed) first, then blocks of its own."""
        cached = cached or []
        need = self.blocks_for(tokens)
        if self._rows[row]:
            raise RuntimeError(f"row {row} already holds blocks")
        if need > self.blocks_per_row or need - len(cached) > self.free_blocks - self._idle(cached):
            raise RuntimeError(f"cannot reserve {need} blocks for row {row} ({self.free_blocks} free)")
        for block in cached:
            self._take(block)
        blocks = cached + [self._allocate() for _ in range(need - len(cached))]
        self._rows[row] = blocks
        self._cached_tokens[row] = len(cached) * self.block_size
        self.table[row, :need] = torch.tensor(blocks, dtype=torch.long, device=self.table.device)

    def cached_tokens(self, row: int) -> int:
        """Positions `row` took already computed from cached blocks when it was reserved."""
        return self._cached_tokens[row]

    def register(self, row: int, keys: list[bytes]) -> None:
        """`row`'s first len(keys) blocks are full and computed: key them (a block whose content another
        block already holds stays unkeyed, a private copy)."""
        for block, key in zip(self._rows[row], keys, strict=False):
            if block in self._key_of or key in self._block_of:
                continue
            self._key_of[block] = key
            self._block_of[key] = block

    def release(self, row: int) -> None:
        """The row leaves the batch: each of its blocks loses a reference; an unreferenced block goes to
        the free list, or (keyed) to the cached blocks' LRU as the most recently used."""
        for block in self._rows[row]:
            self._drop(block)
        self._rows[row] = []
        self._cached_tokens[row] = 0
        self.table[row] = 0

    def forget(self) -> None:
        """Drop every key (the cached blocks nobody references become free)."""
        self._key_of.clear()
        self._block_of.clear()
        self._free.extend(self._lru)
        self._lru.clear()

    def _idle(self, blocks: list[int]) -> int:
        """How many of `blocks` sit in the LRU (taking them leaves that many fewer to evict)."""
        return sum(1 for block in blocks if self._refs[block] == 0)

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._lru[block]
        self._refs[block] += 1

    def _drop(self, block: int) -> None:
        """One reference fewer; unreferenced, the block is free (or, keyed, the newest in the LRU)."""
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._key_of:
                self._lru[block] = None
            else:
                self._free.append(block)

    def _allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the least recently used cached block
            block, _ = self._lru.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
            self.evictions += 1
        self._refs[block] = 1
        return block

    @property
    def shared_blocks(self) -> int:
        """Blocks referenced by more than one row."""
        return sum(1 for refs in self._refs if refs > 1)

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

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Row src becomes row dst (dst was released): its block-table entries move, no data is copied."""
        del length  # the whole reservation moves
        if self._rows[dst]:
            raise RuntimeError(f"row {dst} still holds blocks")
        self._rows[dst], self._rows[src] = self._rows[src], []
        self._cached_tokens[dst], self._cached_tokens[src] = self._cached_tokens[src], 0
        self.table[dst] = self.table[src]
        self.table[src] = 0

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Row dst (reserved, at least as long) gets row src's first `length` positions: src's full blocks
        are shared (dst gives back the blocks it reserved for them), the partial last one is copied."""
        full = length // self.block_size
        src_blocks, dst_blocks = self._rows[src], self._rows[dst]
        for i in range(full):
            self._drop(dst_blocks[i])
            dst_blocks[i] = src_blocks[i]
            self._refs[src_blocks[i]] += 1
        if full:
            self.table[dst, :full] = self.table[src, :full]
        if length % self.block_size:
            partial_src, partial_dst = src_blocks[full], dst_blocks[full]
            self.k[:, partial_dst] = self.k[:, partial_src]  # [L, bs, kvH, D]
            self.v[:, partial_dst] = self.v[:, partial_src]

    def swap_rows(self, a: int, b: int, length: int) -> None:
        del length
        self._rows[a], self._rows[b] = self._rows[b], self._rows[a]
        self._cached_tokens[a], self._cached_tokens[b] = self._cached_tokens[b], self._cached_tokens[a]
        self.table[[a, b]] = self.table[[b, a]]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def bytes_in_use(self) -> int:
        """Bytes of the blocks rows reference (cached blocks nobody references are reclaimable)."""
        per_block = 2 * self.k[0, 0].numel() * self.k.element_size() * self.k.shape[0]
        return (self.total_blocks - self.free_blocks) * per_block
