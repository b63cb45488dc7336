"""The CPU decode attention that reads the paged KV cache in place: it equals the torch path (gather the
pages, then SDPA with the engine's mask) for grouped heads, windows, rows at block edges and head sizes
off the vector width; a corrupt block table is an error, not a read outside the pool; the setting picks
the path, and the default CPU engine takes the kernel; the C++ source compiles without a warning."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from adapterserve.server.cpu import paged_attention as cpu_paged_attention
from adapterserve.server.engine.attention import AttentionStep, attend
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import CpuSettings, EngineSettings

needs_kernel = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler to build the kernel"
)


def _filled_cache(heads_kv: int, head_dim: int, block_size: int, rows: int, max_len: int, seed: int):
    cache = PagedKVCache(
        2, rows, heads_kv, max_len, head_dim, torch.float32, torch.device("cpu"), block_size=block_size
    )
    g = torch.Generator().manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    # every row's blocks scattered over the pool, in no order
    order = torch.randperm(cache.k.shape[1] - 1, generator=g)[: rows * cache.blocks_per_row] + 1
    return cache, order.view(rows, cache.blocks_per_row), g


@needs_kernel
@pytest.mark.parametrize(
    "heads,heads_kv,head_dim,window",
    [(6, 2, 16, None), (4, 4, 8, None), (6, 3, 16, 5), (4, 2, 6, None), (2, 1, 12, 3)],
)
def test_the_kernel_equals_gathered_pages_and_sdpa(heads, heads_kv, head_dim, window):
    block_size, rows = 4, 5
    cache, table, g = _filled_cache(heads_kv, head_dim, block_size, rows, 40, seed=heads * head_dim)
    # positions: the first key, a block's last and first slots, the middle, the last slot of the table
    positions = torch.tensor([[0], [3], [4], [17], [39]])
    query = torch.randn(rows, heads, 1, head_dim, generator=g)
    step = AttentionStep(positions=positions, length=40, table=table)
    for layer in range(2):
        want = attend(query, *cache.read_blocks(layer, table, 40), step.mask(window), 0.3)  # [B, H, 1, D]
        got = cpu_paged_attention.paged_decode_attention(
            query, cache.k[layer], cache.v[layer], table, positions, window, 0.3
        )
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=2e-6, rtol=1e-5), (got - want).abs().max()


@needs_kernel
def test_a_block_table_entry_outside_the_pool_is_an_error_not_a_wild_read():
    cache, table, g = _filled_cache(2, 8, 4, 2, 16, seed=1)
    table[1, 2] = cache.k.shape[1] + 1000
    query = torch.randn(2, 4, 1, 8, generator=g)
    with pytest.raises(RuntimeError, match="outside the KV pool"):
        cpu_paged_attention.paged_decode_attention(
            query, cache.k[0], cache.v[0], table, torch.tensor([[3], [11]]), None, 1.0
        )
    with pytest.raises(RuntimeError, match="outside the row's block table"):
        cpu_paged_attention.paged_decode_attention(
            query, cache.k[0], cache.v[0], table, torch.tensor([[3], [16]]), None, 1.0
        )


def test_the_setting_chooses_the_path():
    cpu = torch.device("cpu")
    assert not cpu_paged_attention.use_kernel("torch", cpu, torch.float32, paged=True)
    assert not cpu_paged_attention.use_kernel("auto", cpu, torch.bfloat16, paged=True)
    assert not cpu_paged_attention.use_kernel("auto", cpu, torch.float32, paged=False)
    assert not cpu_paged_attention.use_kernel("auto", torch.device("meta"), torch.float32, paged=True)
    with pytest.raises(InvalidArgumentError, match="dense"):
        cpu_paged_attention.use_kernel("kernel", cpu, torch.float32, paged=False)


@needs_kernel
def test_the_default_cpu_engine_reads_pages_in_place_and_gives_the_torch_paths_tokens(tiny_model_dir):
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42], [100, 17, 250, 3, 77, 12, 9, 31, 8], [60, 61]]
    outputs = {}
    for setting in ("auto", "torch"):
        base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
        engine = OfflineEngine(
            base,
            EngineSettings(
                max_batch_size=4, max_seq_len=64, kv_block_size=4, cpu=CpuSettings(paged_attention=setting)
            ),
            capture_logits=True,
        )
        assert engine.core.runner.attention.paged_kernel == (setting == "auto")
        results = engine.generate([engine.request(p, max_new_tokens=12, ignore_eos=True) for p in prompts])
        outputs[setting] = [(r.token_ids, torch.stack(r.logits)) for r in results]
    for (want_t, want_l), (got_t, got_l) in zip(outputs["torch"], outputs["auto"], strict=True):
        assert got_t == want_t
        assert torch.allclose(got_l, want_l, atol=1e-5, rtol=0)


@needs_kernel
def test_the_kernel_source_compiles_without_a_warning():
    """The C++ is linted by the compiler: -Wall -Wextra -Werror against torch's and Python's headers."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("c++") or shutil.which("g++")
    includes = [*include_paths(), sysconfig.get_paths()["include"]]
    command = [
        compiler,
        "-std=c++17",
        "-fsyntax-only",
        "-Wall",
        "-Wextra",
        "-Werror",
        *cpu_paged_attention.FLAGS,
    ]
    command += [f"-isystem{path}" for path in includes]  # warnings in torch's own headers are not ours
    command += ["-DTORCH_EXTENSION_NAME=adapterserve_paged_attention", str(cpu_paged_attention.SOURCE)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
