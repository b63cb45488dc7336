"""What the engine reports about itself (`EngineCore.stats()`): queue, rows, adapter slots, memory, and
which decode step runs. The metrics endpoint reads it at every scrape (api/wiring.snapshot_of)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapterserve.server.engine.core import EngineCore


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    slots_in_use: int
    slots_total: int
    slot_loads: int
    slot_hits: int
    slot_evictions: int
    kv_cache_bytes: int
    adapter_device_bytes: int
    steps: int
    # The decode step: "eager", "static", "static, compiled" or "graphs" (decode_step_mode), and what the
    # static step did. `decode_fallback`: why graph capture or compilation was turned off (the engine
    # then runs the static step uncaptured/uncompiled; on a GPU that is many times slower), else None.
    decode_step: str = "eager"
    decode_graph_captures: int = 0
    decode_graph_replays: int = 0
    decode_static_steps: int = 0
    decode_fallback: str | None = None
    # prompts whose prefill completed (a request with n choices counts once) and the choices that
    # shared another's prefill (engine/fork.py)
    prefilled_prompts: int = 0
    forked_choices: int = 0
    # prefix caching (prefix_cache.py): prompt tokens looked up and found computed, cached blocks given
    # to other content, blocks holding a key now
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_evictions: int = 0
    prefix_cache_blocks: int = 0


def engine_stats(core: EngineCore) -> EngineStats:
    """A snapshot of `core` (read from any thread: counters and sizes only)."""
    table = core.bank.table
    graphs = core.decode_graphs
    decode = {}
    if graphs is not None:
        decode = {
            "decode_graph_captures": graphs.stats.captures,
            "decode_graph_replays": graphs.stats.replays,
            "decode_static_steps": graphs.stats.static_steps,
            "decode_fallback": graphs.stats.disabled,
        }
    return EngineStats(
        waiting=len(core.waiting),
        running=len(core.running),
        slots_in_use=sum(1 for e in table.entries.values() if e.refs > 0),
        slots_total=table.num_slots,
        slot_loads=table.stats.loads,
        slot_hits=table.stats.hits,
        slot_evictions=table.stats.evictions,
        kv_cache_bytes=core.cache.nbytes(),
        adapter_device_bytes=core.bank.device_bytes(),
        steps=core.steps,
        decode_step=core.decode_step,
        prefilled_prompts=core.prefilled_prompts,
        forked_choices=core.forked_choices,
        prefix_cache_queries=core.prefix_cache_queries,
        prefix_cache_hits=core.prefix_cache_hits,
        prefix_cache_evictions=core.cache.evictions,
        prefix_cache_blocks=core.cache.cached_blocks,
        **decode,
    )
