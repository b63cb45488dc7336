"""A preallocated per-row key/value cache (as gpt-fast's KVCache, with per-row positions).

Rows are kept compact: running requests occupy rows 0..n-1, so a decode step reads plain slices (no
gather). A request joining takes row n (nothing else moves); a request leaving row i has the last row
moved into i (one row copied, never the whole batch).
"""

from __future__ import annotations

import torch

from adapterserve.server.engine.paged_kv_cache import PagedKVCache


class KVCache:
    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.max_rows, self.max_len = max_rows, max_len
        shape = (num_layers, max_rows, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, rows, kvH, max_len, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(
        self, layer: int, row_start: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write k, v [B, kvH, S, D] of rows row_start..row_start+B-1 at positions [B, S]."""
        b, heads, _, dim = k.shape
        index = positions[:, None, :, None].expand(b, heads, -1, dim)  # [B, kvH, S, D]
        self.k[layer, row_start : row_start + b].scatter_(2, index, k)
        self.v[layer, row_start : row_start + b].scatter_(2, index, v)

    def read(self, layer: int, row_start: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of keys and values [rows, kvH, length, D]."""
        end = row_start + rows
        return self.k[layer, row_start:end, :, :length], self.v[layer, row_start:end, :, :length]

    def write_prefix(self, row: int, keys: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
        """Prefix tuning: keys/values [L, kvH, n, D] at positions start..n-1 of `row` in every layer."""
        n = keys.shape[2]
        self.k[:, row, :, start:n] = keys[:, :, start:]
        self.v[:, row, :, start:n] = values[:, :, start:]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst (compaction when a row leaves)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Row dst gets a copy of the first `length` positions of row src (n choices of one prefill)."""
        self.move_row(src, dst, length)

    def swap_rows(self, a: int, b: int, length: int) -> None:
        """Exchange the first `length` positions of rows a and b (a prefilled row joining the decoders)."""
        for buf in (self.k, self.v):
            tmp = buf[:, a, :, :length].clone()
            buf[:, a, :, :length] = buf[:, b, :, :length]
            buf[:, b, :, :length] = tmp

    # A dense cache holds every row's whole length already: reserving and releasing are free.
    @property
    def capacity_tokens(self) -> int:
        return self.max_len

    def can_reserve(self, requests: list[int]) -> bool:
        return all(tokens <= self.max_len for tokens in requests)

    def can_ever_reserve(self, requests: list[int]) -> bool:
        return len(requests) <= self.max_rows and self.can_reserve(requests)

    def reserve(self, row: int, tokens: int, cached: list[int] | None = None) -> None:
        del row, tokens, cached

    # No prefix caching: no block is shared (prefix_cache.py needs the paged cache).
    block_size = 0
    evictions = 0
    cached_blocks = 0

    def match(self, keys: list[bytes]) -> list[int]:
        del keys
        return []

    def cached_tokens(self, row: int) -> int:
        del row
        return 0

    def register(self, row: int, keys: list[bytes]) -> None:
        del row, keys

    def forget(self) -> None:
        pass

    def release(self, row: int) -> None:
        del row

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def bytes_in_use(self) -> int:
        return self.nbytes()


def make_kv_cache(settings, spec, dtype: torch.dtype, device: torch.device) -> KVCache | PagedKVCache:
    """The cache EngineSettings ask for: paged (default) or dense, sized from the base model's spec."""
    dims = (
        spec.num_layers,
        settings.max_batch_size,
        spec.num_key_value_heads,
        settings.max_seq_len,
        spec.head_dim,
    )
    if settings.kv_cache == "dense":
        return KVCache(*dims, dtype, device)
    num_blocks = None
    if settings.kv_cache_bytes is not None:
        per_block = 2 * spec.num_layers * spec.num_key_value_heads * settings.kv_block_size * spec.head_dim
        per_block *= torch.empty((), dtype=dtype).element_size()
        num_blocks = max(1, settings.kv_cache_bytes // per_block - 1)  # the scratch block counts too
    return PagedKVCache(*dims, dtype, device, block_size=settings.kv_block_size, num_blocks=num_blocks)
