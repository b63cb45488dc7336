"""The paged KV cache: blocks from a free list, a block table per row, memory that follows the tokens in
use. Its reads equal the dense cache's for the same writes; rows move by block-table entries only; the
engine over it gives exactly the dense engine's tokens and logits for every adapter kind, also when the
pool is smaller than the worst case and requests wait for blocks."""

from __future__ import annotations

import pytest
import torch

from adapterserve.server.engine.kv_cache import KVCache, make_kv_cache
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import ADAPTER_KINDS, make_adapter

DIMS = dict(num_layers=2, max_rows=4, kv_heads=2, max_len=40, head_dim=8, dtype=torch.float32)


def _pair(block_size=8, num_blocks=None):
    dense = KVCache(**DIMS, device=torch.device("cpu"))
    paged = PagedKVCache(**DIMS, device=torch.device("cpu"), block_size=block_size, num_blocks=num_blocks)
    return dense, paged


def _kv(b, s, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, s, 8, generator=g), torch.randn(b, 2, s, 8, generator=g)


def test_reads_equal_the_dense_cache_after_writes_prefixes_moves_and_swaps():
    dense, paged = _pair()
    for row, tokens in enumerate([30, 12, 25, 9]):
        paged.reserve(row, tokens)
    keys = torch.randn(2, 2, 5, 8)
    dense.write_prefix(1, keys, keys + 1)
    paged.write_prefix(1, keys, keys + 1)
    positions = torch.tensor([[0, 1, 2], [5, 6, 7], [20, 21, 22], [3, 4, 5]])
    k, v = _kv(4, 3, 0)
    for layer in range(2):
        dense.write(layer, 0, positions, k, v)
        paged.write(layer, 0, positions, k, v)
    # a decode-like write to rows 1..2 only
    k1, v1 = _kv(2, 1, 1)
    dense.write(1, 1, torch.tensor([[8], [23]]), k1, v1)
    paged.write(1, 1, torch.tensor([[8], [23]]), k1, v1)
    dense.move_row(3, 0, 24)
    paged.release(0)
    paged.move_row(3, 0, 24)
    dense.swap_rows(1, 2, 24)
    paged.swap_rows(1, 2, 24)
    for layer in range(2):
        for row, length in [(0, 6), (1, 24), (2, 9)]:
            dk, dv = dense.read(layer, row, 1, length)
            pk, pv = paged.read(layer, row, 1, length)
            assert torch.equal(dk, pk) and torch.equal(dv, pv), (layer, row)


def test_blocks_come_from_the_free_list_and_go_back():
    paged = PagedKVCache(**DIMS, device=torch.device("cpu"), block_size=8, num_blocks=6)
    assert paged.free_blocks == 6 and paged.capacity_tokens == 40
    paged.reserve(0, 17)  # 3 blocks
    assert paged.free_blocks == 3 and paged.can_reserve([24]) and not paged.can_reserve([25])
    assert not paged.can_reserve([9, 9])  # 2 + 2 blocks, though 18 tokens would fit 3
    with pytest.raises(RuntimeError):
        paged.reserve(1, 25)
    before = paged.k.clone()
    paged.move_row(0, 2, 17)  # no key/value data moves
    assert torch.equal(paged.k, before) and paged.free_blocks == 3
    paged.release(2)
    assert paged.free_blocks == 6 and paged.bytes_in_use() == 0


def _engine(tiny_model_dir, adapters, **settings):
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")  # an engine wraps its base
    engine = OfflineEngine(
        base,
        EngineSettings(max_batch_size=8, max_seq_len=64, adapter_slots=8, **settings),
        capture_logits=True,
    )
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def test_keyed_blocks_are_shared_counted_and_evicted_least_recently_used_first():
    cache = PagedKVCache(**DIMS, device=torch.device("cpu"), block_size=4)  # 4 rows x 10 blocks
    cache.reserve(0, 12)  # 3 blocks
    k, v = _kv(1, 12, 0)
    for layer in range(2):
        cache.write(layer, 0, torch.arange(12)[None], k, v)
    cache.register(0, [b"a", b"b"])  # its two full blocks are computed
    a, b = cache.table[0, :2].tolist()
    assert cache.match([b"a", b"b", b"c"]) == [a, b] and cache.match([b"b"]) == [b]
    assert cache.match([b"x", b"a"]) == []  # a chain matches from its first block only
    cache.reserve(1, 12, cached=cache.match([b"a", b"b"]))
    assert cache.cached_tokens(1) == 8 and cache.table[1, :2].tolist() == [a, b]
    assert cache.table[1, 2] != cache.table[0, 2]  # the rest is the row's own
    assert torch.equal(cache.read(1, 1, 1, 8)[0], k[:, :, :8])
    assert cache.shared_blocks == 2 and cache.free_blocks == 40 - 3 - 1
    cache.release(0)
    cache.release(1)
    # nobody references them: they count as free, yet a later row can still take them
    assert cache.free_blocks == 40 and cache.cached_blocks == 2 and cache.match([b"a", b"b"]) == [a, b]
    for row in range(3):
        cache.reserve(row, 40)  # 30 of the 38 unkeyed free blocks
    cache.reserve(3, 36)  # 9 blocks: the last 8 free ones, then the least recently used cached block
    assert cache.evictions == 1 and cache.match([b"a"]) == [] and cache.match([b"b"]) == [b]
    for row in range(4):
        cache.release(row)
    cache.forget()
    assert cache.cached_blocks == 0 and cache.free_blocks == 40 and cache.match([b"b"]) == []


def test_a_copied_row_shares_the_full_blocks_and_copies_the_partial_one():
    """n choices of one prompt: the prompt's full blocks are shared, not copied; the block it ends in is
    copied (each choice writes its own tokens there)."""
    cache = PagedKVCache(**DIMS, device=torch.device("cpu"), block_size=4)
    cache.reserve(0, 20)
    k, v = _kv(1, 10, 3)
    cache.write(0, 0, torch.arange(10)[None], k, v)
    cache.reserve(1, 20)
    used = 40 - cache.free_blocks  # 10: both reservations whole
    cache.copy_row(0, 1, 10)  # 2 full blocks + 2 positions
    assert cache.table[1, :2].tolist() == cache.table[0, :2].tolist()
    assert cache.table[1, 2] != cache.table[0, 2]
    assert 40 - cache.free_blocks == used - 2 and cache.shared_blocks == 2
    assert torch.equal(cache.read(0, 1, 1, 10)[0], k)
    cache.write(0, 1, torch.tensor([[10]]), *_kv(1, 1, 4))  # choice 1's next token: its own block
    assert torch.equal(cache.read(0, 0, 1, 10)[0], k)  # choice 0's positions are untouched
    cache.release(0)
    cache.release(1)
    assert cache.free_blocks == 40 and cache.shared_blocks == 0


def test_a_prefix_is_written_from_the_first_position_not_taken_cached():
    cache = PagedKVCache(**DIMS, device=torch.device("cpu"), block_size=4)
    keys = torch.randn(2, 2, 6, 8)
    cache.reserve(0, 10)
    cache.write_prefix(0, keys, keys)
    cache.register(0, [b"p"])  # the prefix's one whole block
    cache.reserve(1, 10, cached=cache.match([b"p"]))
    before = cache.k.clone()
    cache.write_prefix(1, keys, keys, start=cache.cached_tokens(1))  # positions 4 and 5 only
    block = cache.table[1, 1]
    assert torch.equal(cache.k[:, cache.table[0, 0]], before[:, cache.table[0, 0]])
    assert torch.equal(cache.read(1, 1, 1, 6)[0][0], keys[1])
    assert not torch.equal(cache.k[:, block], before[:, block])


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("paged-adapters")
    return {k: make_adapter(tiny_model_dir, k, root / k, seed=i) for i, k in enumerate(ADAPTER_KINDS)}


def test_engine_over_pages_equals_the_dense_engine_for_every_kind(tiny_model_dir, adapters):
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42], [100, 17, 250, 3, 77, 12, 9], [60, 61]]
    rows = [(None, prompts[0])] + [(k, prompts[i % 4]) for i, k in enumerate(ADAPTER_KINDS)] * 2
    outputs = {}
    # A pool of 20 blocks of 4 tokens: fewer than the 12 requests x ~20 tokens need at once, so requests
    # wait for blocks; chunked prefill (budget 6) too.
    for name, extra in {
        "dense": {"kv_cache": "dense"},
        "paged": {"kv_cache": "paged", "kv_block_size": 4},
        "paged-static": {"kv_cache": "paged", "kv_block_size": 4, "decode_step": "static"},
        "paged-small-pool": {
            "kv_cache": "paged",
            "kv_block_size": 4,
            "kv_cache_bytes": 21 * 4 * 2 * 2 * 2 * 16 * 4,
            "max_prefill_tokens": 6,
        },
    }.items():
        engine = _engine(tiny_model_dir, adapters, **extra)
        results = engine.generate(
            [engine.request(p, adapter=a, max_new_tokens=6, ignore_eos=True) for a, p in rows]
        )
        outputs[name] = [(r.token_ids, torch.stack(r.logits)) for r in results]
        if name == "paged-small-pool":
            assert engine.core.cache.total_blocks == 20
            assert engine.core.cache.free_blocks == 20  # every block returned
    for name in ("paged", "paged-static", "paged-small-pool"):
        for (want_t, want_l), (got_t, got_l) in zip(outputs["dense"], outputs[name], strict=True):
            assert got_t == want_t
            assert torch.allclose(got_l, want_l, atol=1e-5, rtol=0)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_engine_rows_of_one_prefix_adapter_share_its_blocks_and_equal_the_dense_engine(
    tiny_model_dir, adapters, decode
):
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42], [100, 17, 250, 3, 77, 12, 9], [60, 61]]
    rows = [("prefix", p) for p in prompts[:3]] + [(None, prompts[3]), ("lora_qv_r4", prompts[0])]
    outputs = {}
    for name, extra in {
        "dense": {"kv_cache": "dense"},
        "paged": {"kv_cache": "paged", "kv_block_size": 4, "decode_step": decode},
    }.items():
        engine = _engine(tiny_model_dir, adapters, **extra)
        results = engine.generate(
            [engine.request(p, adapter=a, max_new_tokens=6, ignore_eos=True) for a, p in rows]
        )
        outputs[name] = [(r.token_ids, torch.stack(r.logits)) for r in results]
    cache = engine.core.cache
    # 5 virtual tokens over blocks of 4: one whole block, written by the first row, used by all three
    assert cache.shared_blocks == 0 and cache.free_blocks == cache.total_blocks
    assert engine.core.prefix_cache_hits >= 2 * 4
    for (want_t, want_l), (got_t, got_l) in zip(outputs["dense"], outputs["paged"], strict=True):
        assert got_t == want_t
        assert torch.allclose(got_l, want_l, atol=1e-5, rtol=0)


def test_a_request_longer_than_the_whole_pool_is_refused(tiny_model_dir):
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    per_block = 2 * 2 * 2 * 16 * 16 * 4  # k+v, layers, kv heads, block 16, head_dim 16, fp32
    engine = OfflineEngine(base, EngineSettings(max_seq_len=512, kv_cache_bytes=2 * per_block))
    with pytest.raises(InvalidArgumentError, match="kv_cache_bytes"):
        engine.submit(engine.request([5, 6, 7], max_new_tokens=40), [])


def test_256_rows_of_2048_tokens_fit_where_the_dense_cache_does_not():
    """Memory follows the tokens in use: 256 requests whose contexts average 2,048 tokens but may grow to
    8,192 need a dense cache of 256 x 8,192 positions; the paged pool holds their actual tokens."""

    class Spec:  # SmolLM2-135M's cache geometry
        num_layers, num_key_value_heads, head_dim = 30, 3, 64

    dense_bytes = 2 * 30 * 256 * 3 * 8192 * 64 * 2  # bf16
    budget = dense_bytes // 3
    settings = EngineSettings(max_batch_size=256, max_seq_len=8192, kv_cache_bytes=budget)
    cache = make_kv_cache(settings, Spec, torch.bfloat16, torch.device("meta"))
    assert cache.nbytes() <= budget < dense_bytes
    for row in range(256):
        cache.reserve(row, 2048)
    assert cache.free_blocks >= 0 and cache.bytes_in_use() <= budget
