"""The decode step with static shapes, captured as CUDA graphs (as gpt-fast and vLLM do).

Why: on a GPU the eager decode step is bound by Python and kernel launches, not by the card (measured on
an H100: 26 ms per step for a 1B model whose weights take 0.7 ms to read): 16 layers of a dozen small
kernels each, plus a host sync for the attention length. A CUDA graph replays the whole step's kernels
with one launch.

How the step is made static:
- rows are padded to a bucket (1, 2, 4, 8, then multiples of 8 up to max_batch_size) and the keys
  attended to a power-of-two bucket (at least one KV block) above the longest row, so a step's shapes
  depend on the two buckets only, and the engine knows both on the host (no `int(positions.max())`);
- the step's inputs live in preallocated device buffers written in place before each replay: token,
  position and adapter slot per row (one [3, R] host->device copy) and a copy of the rows' block tables
  whose padding rows are zero, i.e. point at the paged cache's scratch block (their writes land nowhere
  anything reads, their logits are dropped);
- the adapter math reads the slot tensors through the gathered path (no single-slot branch), and which
  linear kinds run is part of the graph's key: one graph per (row bucket, length bucket, linear kinds),
  captured on first use, all in one memory pool;
- a graph holds the slot tensors' addresses: when the bank reallocates one (a higher rank, a kind's first
  adapter on a module), every graph is dropped and recaptured on demand (`bank.writes` says when to look);
- every graph copies its logits into one buffer shared by all graphs ([max_rows, vocab], outside the
  graphs' pool), so a graph keeps no output memory of its own; at most `max_decode_graphs` graphs are
  kept, least recently used dropped first (shapes are row bucket x length bucket x linear kinds, so a
  long-running server with a large batch could otherwise capture hundreds);
- the first run of each shape is a warm-up under `torch.cuda.set_sync_debug_mode("error")`: a step that
  would synchronise with the host cannot be captured, so graphs are turned off (with a warning) and the
  engine decodes with the same static step uncaptured from then on (`adapterserve_decode_fallback`).

Without capture (CPU, or `decode_step="static"`) the same static step runs as is, optionally through
`torch.compile`; the eager dynamic step (`runner.decode`) stays the reference path.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from adapterserve.server.adapters.kind import HookSite, RowSelection, all_kinds
from adapterserve.server.adapters.slots import AdapterBank
from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.engine.runner import ModelRunner
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.settings import EngineSettings

log = logging.getLogger(__name__)


def decode_step_mode(settings: EngineSettings, device: torch.device) -> str:
    """The decode step the settings ask for on this device: eager, static or graphs (InvalidArgumentError
    for a combination that cannot work)."""
    mode = settings.decode_step
    if mode == "auto":
        mode = "graphs" if device.type == "cuda" and settings.kv_cache == "paged" else "eager"
    if settings.compile_decode and mode != "static":
        raise InvalidArgumentError("compile_decode needs decode_step='static'")
    if mode != "eager" and settings.kv_cache != "paged":
        raise InvalidArgumentError(f"decode_step={mode!r} needs kv_cache='paged'")
    if mode == "graphs" and device.type != "cuda":
        raise InvalidArgumentError("decode_step='graphs' needs a CUDA device")
    return mode


def make_decode_graphs(
    mode: str, runner: ModelRunner, cache, bank: AdapterBank, settings: EngineSettings
) -> DecodeGraphs | None:
    """The static decode step for `mode` (from decode_step_mode), or None for the eager one."""
    if mode == "eager":
        return None
    linear = frozenset(k.name for k in all_kinds() if k.hook == HookSite.LINEAR)
    return DecodeGraphs(
        runner,
        cache,
        bank,
        linear,
        settings.max_batch_size,
        capture=mode == "graphs",
        compile_step=settings.compile_decode,
        max_graphs=settings.max_decode_graphs,
    )


def row_buckets(max_rows: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then every multiple of 8, up to and including max_rows."""
    sizes = [n for n in (1, 2, 4) if n < max_rows]
    sizes += list(range(8, max_rows, 8))
    return sorted({*sizes, max_rows})


def length_bucket(length: int, block_size: int, max_len: int) -> int:
    """Keys attended for rows whose longest needs `length`: the next power of two, at least one block,
    at most the cache's row length."""
    bucket = max(block_size, 1 << max(length - 1, 0).bit_length())
    return min(bucket, max_len)


@dataclass(frozen=True)
class StepShape:
    rows: int  # padded batch size
    length: int  # keys attended
    kinds: frozenset[str]  # linear adapter kinds with rows in the batch


@dataclass
class DecodeGraphStats:
    captures: int = 0  # graphs captured (a shape seen for the first time, or after invalidation)
    replays: int = 0  # steps run by replaying a graph
    static_steps: int = 0  # steps run by the static step without a graph
    invalidations: int = 0  # times the adapter slot tensors moved and every graph was dropped
    evictions: int = 0  # graphs dropped, least recently used first, to stay within max_decode_graphs
    capture_seconds: float = 0.0
    disabled: str | None = None  # why capture was turned off, if it was


class DecodeGraphs:
    """The static decode step and its graphs, for one engine (engine thread only)."""

    def __init__(
        self,
        runner: ModelRunner,
        cache: PagedKVCache,
        bank: AdapterBank,
        linear_kinds: frozenset[str],
        max_rows: int,
        *,
        capture: bool,
        compile_step: bool = False,
        max_graphs: int = 64,
    ):
        if not isinstance(cache, PagedKVCache):
            raise ValueError("the static decode step needs the paged KV cache (kv_cache='paged')")
        device = cache.table.device
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device (decode_step='graphs')")
        self.runner, self.cache, self.bank = runner, cache, bank
        self.linear_kinds = linear_kinds
        self.buckets = row_buckets(max_rows)
        self.capture = capture
        self.meta = torch.zeros(3, max_rows, dtype=torch.long, device=device)  # tokens, positions, slots
        self.table = torch.zeros(max_rows, cache.blocks_per_row, dtype=torch.long, device=device)
        # shape -> (CUDAGraph, its logits: a view of logits_out), least recently replayed first
        self.graphs: OrderedDict[StepShape, tuple[Any, torch.Tensor]] = OrderedDict()
        self.max_graphs = max_graphs
        self.logits_out: torch.Tensor | None = None  # [max_rows, vocab]: every graph's output
        self.max_rows = max_rows
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.stats = DecodeGraphStats()
        self._writes_seen = bank.writes
        self._fingerprint = self._slot_fingerprint()
        self._step = runner.decode_static
        if compile_step:
            compiled = torch.compile(runner.decode_static_step, dynamic=False)

            def step(*args):
                try:
                    with torch.inference_mode():
                        return compiled(*args)
                except Exception as exc:  # a compiler failure: keep serving with the uncompiled step
                    self.stats.disabled = f"compile failed: {type(exc).__name__}: {exc}"[:500]
                    log.warning("torch.compile of the decode step failed, running it uncompiled: %s", exc)
                    self._step = runner.decode_static
                    return self._step(*args)

            self._step = step

    # ----- the engine calls this ------------------------------------------------------------------
    def shape_for(self, positions: list[int], kinds: frozenset[str]) -> StepShape:
        rows = self.buckets[bisect.bisect_left(self.buckets, len(positions))]
        length = length_bucket(max(positions) + 1, self.cache.block_size, self.cache.max_len)
        return StepShape(rows, length, kinds & self.linear_kinds)

    def decode(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """One decode step for rows 0..B-1 of the cache (tokens, positions, adapter slots: one per row).
        Returns logits [B, V] (valid until the next call)."""
        b = len(tokens)
        kinds = frozenset(self.bank.slot_kinds[s] for s in set(slots) if s in self.bank.slot_kinds)
        shape = self.shape_for(positions, kinds)
        pad = [0] * (shape.rows - b)
        host = torch.tensor([tokens + pad, positions + pad, slots + pad], dtype=torch.long)  # [3, rows]
        self.meta[:, : shape.rows].copy_(host, non_blocking=True)
        self.table[:b].copy_(self.cache.table[:b])
        self.table[b : shape.rows].zero_()  # padding rows: the scratch block
        self._check_slots()
        if self.capture and self.stats.disabled is None:
            graph = self.graphs.get(shape)
            if graph is not None:
                self.graphs.move_to_end(shape)
            else:
                graph = self._capture(shape)
            if graph is not None:
                graph[0].replay()
                self.stats.replays += 1
                return graph[1][:b]
        self.stats.static_steps += 1
        return self._run(shape)[:b]

    # ----- internals ------------------------------------------------------------------------------
    def _run(self, shape: StepShape) -> torch.Tensor:
        r = shape.rows
        batch = RowSelection(slots=self.meta[2, :r], kinds=shape.kinds, single_slot=None)
        return self._step(self.meta[0, :r], self.meta[1, :r], self.table[:r], batch, shape.length)

    def _slot_fingerprint(self) -> tuple:
        return tuple((t.data_ptr(), tuple(t.shape)) for t in self.bank.slot_tensors())

    def _check_slots(self) -> None:
        if self.bank.writes == self._writes_seen:
            return
        self._writes_seen = self.bank.writes
        fingerprint = self._slot_fingerprint()
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            if self.graphs:
                self._drop_graphs()
                self.stats.invalidations += 1

    def _drop_graphs(self) -> None:
        """Forget every graph. Their memory pool is released with the last of them, and the caching
        allocator refuses to capture into a released pool again: the next captures get a fresh one."""
        self.graphs.clear()
        if self.capture:
            self.pool = torch.cuda.graph_pool_handle()

    def _capture(self, shape: StepShape) -> tuple[Any, torch.Tensor] | None:
        """Capture `shape` (dropping the least recently used graph beyond max_graphs); None (and graphs
        off) if it cannot be captured."""
        started = time.perf_counter()
        try:
            graph = self._record(shape)
        except Exception as exc:  # the engine runs the static step uncaptured instead
            self.stats.disabled = f"{type(exc).__name__}: {exc}"[:500]
            self._drop_graphs()
            log.warning(
                "decode graphs turned off, running the decode step uncaptured: %s", self.stats.disabled
            )
            return None
        assert self.logits_out is not None
        while len(self.graphs) >= max(self.max_graphs, 1):
            self.graphs.popitem(last=False)  # other graphs still hold the pool, so it stays usable
            self.stats.evictions += 1
        self.graphs[shape] = (graph, self.logits_out[: shape.rows])
        self.stats.captures += 1
        self.stats.capture_seconds += time.perf_counter() - started
        log.info(
            "captured a decode graph for %d rows, %d keys, kinds %s in %.2fs",
            shape.rows,
            shape.length,
            sorted(shape.kinds) or "-",
            time.perf_counter() - started,
        )
        return self.graphs[shape]

    def _output(self, logits: torch.Tensor) -> torch.Tensor:
        """The shared logits buffer, (re)made for these logits' vocabulary and dtype (outside a capture)."""
        out = self.logits_out
        if out is None or out.shape[1] != logits.shape[1] or out.dtype != logits.dtype:
            if out is not None:  # captured graphs write into the old buffer: none may replay again
                self._drop_graphs()
            out = torch.empty(self.max_rows, logits.shape[1], dtype=logits.dtype, device=logits.device)
            self.logits_out = out
        return out

    def _record(self, shape: StepShape) -> Any:
        """Warm up `shape` (checking it never syncs with the host) and capture it into a CUDA graph whose
        replay leaves the logits in logits_out[:rows]. The warm-up writes the same keys/values the replay
        then writes."""
        # Warm-up and capture on a side stream (capture cannot use the default stream), as
        # torch.cuda.graph does, without its gc.collect() and empty_cache() at every capture: shapes
        # are captured lazily while serving. thread_local: other threads' CUDA calls (an upload
        # parsing tensors) do not invalidate the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = self._output(self._run(shape))
            finally:
                torch.cuda.set_sync_debug_mode(previous)
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                out[: shape.rows].copy_(self._run(shape))
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        return graph
