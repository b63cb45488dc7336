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


def test_rows_of_one_prefix_share_its_whole_blocks_until_the_last_one_leaves():
    cache = PagedKVCache(**DIMS, device=torch.device("cpu"), block_size=4)  # 4 rows x 10 blocks
    keys, values = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)  # 2 whole blocks + 2 positions
    other = torch.randn(2, 2, 10, 8)
    for row in range(3):
        cache.reserve(row, 20)  # 5 blocks each
    cache.share_prefix(0, "a", keys, values)
    cache.share_prefix(1, "a", keys, values)
    cache.share_prefix(2, "b", other, other)
    assert cache.table[0, :2].tolist() == cache.table[1, :2].tolist() != cache.table[2, :2].tolist()
    assert cache.table[0, 2] != cache.table[1, 2]  # the partial block is each row's own
    assert cache.shared_blocks == 4 and cache.free_blocks == 40 - 15 + 2  # row 1 gave its 2 back
    assert cache.prefix_reuses == 1
    # each row's prompt continues at position 10, in its own block; the prefix reads back in full
    cache.write(0, 0, torch.tensor([[10, 11]]), *_kv(1, 2, 1))
    cache.write(0, 1, torch.tensor([[10, 11]]), *_kv(1, 2, 2))
    for row in (0, 1):
        k, v = cache.read(0, row, 1, 12)
        assert torch.equal(k[0, :, :10], keys[0]) and torch.equal(v[0, :, :10], values[0])
        assert torch.equal(k[0, :, 10:], _kv(1, 2, row + 1)[0][0])
    cache.release(0)  # the prefix stays for row 1
    assert cache.shared_blocks == 4
    k, _ = cache.read(1, 1, 1, 10)
    assert torch.equal(k[0], keys[1])
    cache.move_row(1, 0, 12)  # a row moves with its shared blocks
    cache.release(0)
    assert cache.shared_blocks == 2  # only "b" is left
    cache.release(2)
    assert cache.shared_blocks == 0 and cache.free_blocks == 40
    cache.reserve(3, 12)  # the key again, after its blocks were freed: written afresh
    cache.share_prefix(3, "a", values, keys)
    k, v = cache.read(0, 3, 1, 10)
    assert torch.equal(k[0], values[0]) and torch.equal(v[0], keys[0])
    cache.release(3)
    assert cache.free_blocks == 40


def test_a_prefix_shorter_than_a_block_is_written_per_row():
    cache = PagedKVCache(**DIMS, device=torch.device("cpu"), block_size=8)
    keys = torch.randn(2, 2, 5, 8)
    for row in (0, 1):
        cache.reserve(row, 10)
        cache.share_prefix(row, "a", keys, keys)
    assert cache.shared_blocks == 0 and cache.table[0, 0] != cache.table[1, 0]
    assert torch.equal(cache.read(1, 1, 1, 5)[0][0], keys[1])


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
    assert cache.prefix_reuses == 2 and cache.shared_blocks == 0 and cache.free_blocks == cache.total_blocks
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
