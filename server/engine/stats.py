"""What the engine reports about itself (`EngineCore.stats()`): queue, rows, adapter slots, memory, and
which decode step runs. The metrics endpoint reads it at every scrape (api/wiring.snapshot_of)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineCounters:
    """Counts the step's parts keep (read from any thread: plain integers)."""

    steps: int = 0
    prefilled_prompts: int = 0  # prompts whose prefill completed (n choices of a request: one)
    forked_choices: int = 0  # choices that took a copy of another's prefill (fork.py)
    # prefix caching (prefix_cache.py): prompt positions looked up, and those found computed
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


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
