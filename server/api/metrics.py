"""Prometheus metrics of one server, in its own CollectorRegistry (several servers can share a process).

Request-level metrics are recorded by the servicers; engine and cache gauges are read from a snapshot
callable at scrape time, so they are always current and cost nothing between scrapes. Adapter labels
are bounded: the base model is "base", the first `max_adapter_labels` adapters that serve a request
get their own label, every other adapter is "other" (a flood of names cannot grow the series count).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

BASE_LABEL = "base"
OTHER_LABEL = "other"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class AdapterLabels:
    """Maps adapter names to a bounded set of label values (thread-safe)."""

    def __init__(self, max_labels: int) -> None:
        self._max = max_labels
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def known(self, adapter: str | None) -> str:
        """The label of an adapter without granting a new one (for requests that failed early)."""
        if not adapter:
            return BASE_LABEL
        return adapter if adapter in self._named else OTHER_LABEL

    def grant(self, adapter: str | None) -> str:
        """The label of an adapter that exists, granting it its own label while any are left."""
        if not adapter:
            return BASE_LABEL
        with self._lock:
            if adapter in self._named:
                return adapter
            if len(self._named) < self._max:
                self._named.add(adapter)
                return adapter
        return OTHER_LABEL


@dataclass(frozen=True)
class TierStats:
    """One adapter cache tier ("host" or "device") at one moment; counters are cumulative."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0
    capacity_bytes: int | None = None


@dataclass(frozen=True)
class RuntimeSnapshot:
    """Engine and cache state at scrape time."""

    queue_depth: int = 0
    running_requests: int = 0
    slots_in_use: int = 0
    slots_total: int = 0
    tiers: dict[str, TierStats] = field(default_factory=dict)
    decode_step: str = "eager"  # EngineStats.decode_step
    decode_graph_captures: int = 0
    decode_graph_replays: int = 0
    decode_static_steps: int = 0
    decode_fallback: bool = False  # graphs or compilation were turned off (see the server log for why)
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, found computed
    prefix_cache_evictions: int = 0  # cached blocks given to other content
    prefix_cache_blocks: int = 0  # blocks holding a key now
    # Adapter sources (store/sources/fetcher.py FetchStats; None without sources): outcomes by
    # (source, outcome), `seconds` and `nbytes` histograms (buckets, cumulative counts, total, count),
    # negative_hits; and the fetched adapters on disk (bytes) under --store-max-bytes.
    fetch: Any = None
    fetched_disk_bytes: int = 0


class _RuntimeCollector(Collector):
    """Turns a RuntimeSnapshot (read at scrape time) into gauges and counters."""

    def __init__(self, snapshot: Callable[[], RuntimeSnapshot | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Any]:
        try:
            snap = self._snapshot()
        except Exception:  # a scrape must never fail because a component is mid-shutdown
            log.exception("metrics snapshot failed")
            snap = None
        if snap is None:
            return []
        return list(self._families(snap))

    def _families(self, snap: RuntimeSnapshot) -> Iterator[Any]:
        yield GaugeMetricFamily(
            "adapterserve_queue_depth", "Requests waiting for the engine", value=snap.queue_depth
        )
        yield GaugeMetricFamily(
            "adapterserve_running_requests",
            "Rows in the running batch (batch size)",
            value=snap.running_requests,
        )
        yield GaugeMetricFamily(
            "adapterserve_adapter_slots_in_use",
            "Device adapter slots holding an adapter",
            value=snap.slots_in_use,
        )
        yield GaugeMetricFamily(
            "adapterserve_adapter_slots", "Device adapter slots in all", value=snap.slots_total
        )
        counters = {
            "hits": CounterMetricFamily(
                "adapterserve_adapter_cache_hits", "Adapter cache hits", labels=["tier"]
            ),
            "misses": CounterMetricFamily(
                "adapterserve_adapter_cache_misses", "Adapter cache misses", labels=["tier"]
            ),
            "evictions": CounterMetricFamily(
                "adapterserve_adapter_cache_evictions", "Adapter cache evictions", labels=["tier"]
            ),
        }
        size = GaugeMetricFamily(
            "adapterserve_adapter_cache_bytes", "Bytes of adapters cached", labels=["tier"]
        )
        entries = GaugeMetricFamily("adapterserve_adapter_cache_entries", "Adapters cached", labels=["tier"])
        for tier, stats in sorted(snap.tiers.items()):
            counters["hits"].add_metric([tier], stats.hits)
            counters["misses"].add_metric([tier], stats.misses)
            counters["evictions"].add_metric([tier], stats.evictions)
            size.add_metric([tier], stats.bytes)
            entries.add_metric([tier], stats.entries)
        yield from counters.values()
        yield size
        yield entries
        yield from self._decode_families(snap)
        yield from self._prefix_cache_families(snap)
        if snap.fetch is not None:
            yield from self._fetch_families(snap)

    @staticmethod
    def _prefix_cache_families(snap: RuntimeSnapshot) -> Iterator[Any]:
        for name, help_text, value in (
            (
                "prefix_cache_queries_tokens",
                "Prompt tokens looked up in the prefix cache",
                snap.prefix_cache_queries,
            ),
            (
                "prefix_cache_hits_tokens",
                "Prompt tokens found computed in the prefix cache (not prefilled again)",
                snap.prefix_cache_hits,
            ),
            (
                "prefix_cache_evicted_blocks",
                "Cached KV blocks evicted for other content",
                snap.prefix_cache_evictions,
            ),
        ):
            yield CounterMetricFamily(f"adapterserve_{name}", help_text, value=value)
        yield GaugeMetricFamily(
            "adapterserve_prefix_cache_blocks",
            "KV blocks holding a cached prefix",
            value=snap.prefix_cache_blocks,
        )

    @staticmethod
    def _fetch_families(snap: RuntimeSnapshot) -> Iterator[Any]:
        stats = snap.fetch
        fetches = CounterMetricFamily(
            "adapterserve_adapter_fetches",
            "Adapter fetches from the adapter sources by outcome (fetched, unchanged, not_found, invalid, "
            "unavailable); source '*' for a name in none of them",
            labels=["source", "outcome"],
        )
        for (source, outcome), count in sorted(stats.outcomes.items()):
            fetches.add_metric([source, outcome], count)
        yield fetches
        for name, help_text, hist in (
            (
                "adapter_fetch_seconds",
                "Seconds of a successful fetch, first byte asked to commit",
                stats.seconds,
            ),
            ("adapter_fetch_bytes", "Bytes of a successful fetch", stats.nbytes),
        ):
            buckets = [(repr(float(le)), c) for le, c in zip(hist.buckets, hist.counts, strict=True)]
            buckets.append(("+Inf", hist.count))
            yield HistogramMetricFamily(
                f"adapterserve_{name}", help_text, buckets=buckets, sum_value=hist.total
            )
        yield CounterMetricFamily(
            "adapterserve_adapter_fetch_negative_cache_hits",
            "Requests refused from the negative cache (a name just found missing or invalid in the sources)",
            value=stats.negative_hits,
        )
        yield GaugeMetricFamily(
            "adapterserve_adapter_fetched_disk_bytes",
            "Bytes of fetched adapters kept on disk (bounded by --store-max-bytes; evictions are "
            'adapterserve_adapter_cache_evictions{tier="disk"})',
            value=snap.fetched_disk_bytes,
        )

    @staticmethod
    def _decode_families(snap: RuntimeSnapshot) -> Iterator[Any]:
        mode = GaugeMetricFamily(
            "adapterserve_decode_step_info",
            "The decode step the engine was started with (eager, static, static compiled, graphs)",
            labels=["mode"],
        )
        mode.add_metric([snap.decode_step], 1)
        yield mode
        yield GaugeMetricFamily(
            "adapterserve_decode_fallback",
            "1 when CUDA-graph capture or compilation was turned off and the engine fell back to the "
            "uncompiled static step (the reason is in the server log)",
            value=int(snap.decode_fallback),
        )
        for name, help_text, value in (
            ("decode_graph_captures", "CUDA graphs captured for the decode step", snap.decode_graph_captures),
            ("decode_graph_replays", "Decode steps run by replaying a CUDA graph", snap.decode_graph_replays),
            (
                "decode_static_steps",
                "Decode steps run by the static step without a graph",
                snap.decode_static_steps,
            ),
        ):
            yield CounterMetricFamily(f"adapterserve_{name}", help_text, value=value)


class ServerMetrics:
    """All metrics of one server. Servicers call the `record_*` methods."""

    def __init__(self, registry: CollectorRegistry | None = None, max_adapter_labels: int = 32) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.labels = AdapterLabels(max_adapter_labels)
        self.requests = Counter(
            "adapterserve_requests",
            "API calls by protocol (grpc or http), method, adapter and final status code",
            ["protocol", "method", "adapter", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "adapterserve_prompt_tokens",
            "Prompt tokens of served requests",
            ["adapter"],
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "adapterserve_generated_tokens", "Generated tokens", ["adapter"], registry=self.registry
        )
        self.ttft = Histogram(
            "adapterserve_time_to_first_token_seconds",
            "Seconds from request arrival to its first generated token",
            ["adapter"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "adapterserve_queue_wait_seconds",
            "Seconds from request arrival at the engine to its first prefill chunk (waiting for a row, then "
            "behind the requests admitted before it)",
            ["adapter"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "adapterserve_time_per_output_token_seconds",
            "Seconds per generated token after the first",
            ["adapter"],
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.uploads = Counter(
            "adapterserve_uploads", "Adapter uploads by final status code", ["status"], registry=self.registry
        )
        self.upload_bytes = Counter(
            "adapterserve_upload_bytes", "Bytes received by successful uploads", registry=self.registry
        )
        self._http: Any = None
        self._http_thread: threading.Thread | None = None

    def attach_runtime(self, snapshot: Callable[[], RuntimeSnapshot | None]) -> None:
        """Read engine and cache gauges from `snapshot()` at every scrape."""
        self.registry.register(_RuntimeCollector(snapshot))

    def record_refused(self, full_method: str, status: str) -> None:
        """A generation call refused before it was read (auth, starting, draining): adapter unknown."""
        if "/adapterserve.v1.Generation/" in full_method:
            self.record_request(full_method.rsplit("/", 1)[-1], OTHER_LABEL, status)

    def record_request(self, method: str, adapter_label: str, status: str, protocol: str = "grpc") -> None:
        self.requests.labels(protocol=protocol, method=method, adapter=adapter_label, status=status).inc()

    def record_generation(
        self,
        adapter_label: str,
        prompt_tokens: int,
        generated_tokens: int,
        ttft_s: float | None,
        total_s: float,
        queue_wait_s: float | None = None,
    ) -> None:
        """One finished generation: token counts, queue wait, time to first token and per later token."""
        self.prompt_tokens.labels(adapter=adapter_label).inc(prompt_tokens)
        if queue_wait_s is not None:
            self.queue_wait.labels(adapter=adapter_label).observe(queue_wait_s)
        self.generated_tokens.labels(adapter=adapter_label).inc(generated_tokens)
        if ttft_s is not None and generated_tokens > 0:
            self.ttft.labels(adapter=adapter_label).observe(ttft_s)
            if generated_tokens > 1:
                self.tpot.labels(adapter=adapter_label).observe((total_s - ttft_s) / (generated_tokens - 1))

    def record_upload(self, status: str, nbytes: int) -> None:
        self.uploads.labels(status=status).inc()
        if status == "OK":
            self.upload_bytes.inc(nbytes)

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port (port 0 picks one)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http, self._http_thread = server, thread
        return int(server.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint (if started)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
