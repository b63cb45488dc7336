"""The tables of `python -m adapterserve.bench.aiperf`: one row per run, a summary of the rounds' medians
(each workload against the same round's base), and each --variant against the first in the same round."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from adapterserve.bench.cpu_usage import CpuUsage


class RunLabels(Protocol):
    """What names a run's server in the table (AiperfSettings)."""

    label: str
    placement: str
    rounds: int


@dataclass
class Row:
    scenario: str
    client: str
    tokens_per_s: float
    ttft_p50_ms: float
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    errors: int
    governor: str = ""
    ttft_max_ms: float | None = None  # the longest wait for a first token (starvation shows here)
    variant: str = ""  # the server configuration (--variant), "" with none
    note: str = ""  # e.g. AIPerf exited non-zero with its records whole
    round: int = 1
    cpu: CpuUsage | None = None  # the server's and the client's CPU seconds over the run, and steal


def _median_ms(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.median(known):.0f}" if known else "—"


def summary(rows: list[Row]) -> str:
    """Per workload and client: the median over the rounds (and the range), and its throughput against
    the base's of the same round and client (the median of those ratios, then each round's)."""
    base = {(r.variant, r.client, r.round): r.tokens_per_s for r in rows if r.scenario == "base"}
    lines = [SUMMARY_HEADER]
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.variant, row.scenario, row.client), []).append(row)
    for (variant, scenario, client), group in groups.items():
        tps = [r.tokens_per_s for r in group]
        ratios = [
            r.tokens_per_s / base[(variant, client, r.round)]
            for r in group
            if (variant, client, r.round) in base
        ]
        vs_base = "—"
        if ratios and scenario != "base":
            vs_base = f"x{statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)})"
        itl50 = _median_ms([r.itl_p50_ms for r in group])
        itl99 = _median_ms([r.itl_p99_ms for r in group])
        workload = f"{scenario} ({variant})" if variant else scenario
        lines.append(
            f"| {workload} | {client} | {len(group)} | {statistics.median(tps):.1f} "
            f"({min(tps):.1f}-{max(tps):.1f}) | {vs_base} | {itl50} | {itl99} | {sum(r.errors for r in group)} |"
        )
    return "\n".join(lines)


def variant_summary(rows: list[Row]) -> str:
    """Each variant against the first one (--variant order), per workload and client, in the same round:
    the medians over the rounds of the throughput ratio and of the TTFT p50 and max ratios."""
    order = list(dict.fromkeys(r.variant for r in rows))
    first = {(r.scenario, r.client, r.round): r for r in rows if r.variant == order[0]}
    lines = [VARIANT_HEADER]
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        if row.variant != order[0]:
            groups.setdefault((row.variant, row.scenario, row.client), []).append(row)
    for (variant, scenario, client), group in groups.items():
        pairs = [
            (r, first[(scenario, client, r.round)]) for r in group if (scenario, client, r.round) in first
        ]

        lines.append(
            f"| {variant} vs {order[0]} | {scenario} | {client} | {len(pairs)} "
            f"| {_median_ratio(pairs, lambda r: r.tokens_per_s)} | {_median_ratio(pairs, lambda r: r.ttft_p50_ms)} "
            f"| {_median_ratio(pairs, lambda r: r.ttft_max_ms)} |"
        )
    return "\n".join(lines)


def _median_ratio(pairs: list[tuple[Row, Row]], get: Callable[[Row], float | None]) -> str:
    """x(median of get(row) / get(its reference)) over the pairs where both are known."""
    values = []
    for row, reference in pairs:
        a, b = get(row), get(reference)
        if a is not None and b:
            values.append(a / b)
    return f"x{statistics.median(values):.2f}" if values else "—"


def format_row(row: Row, settings: RunLabels) -> str:
    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v:.0f}"

    def s(v: float | None) -> str:
        return "—" if v is None else f"{v / 1e3:.2f} s"

    server = row.variant or settings.label or settings.placement
    if settings.rounds > 1:
        server += f" (round {row.round})"
    return (
        f"| {server} | {row.scenario} | {row.client} | {row.tokens_per_s:.1f} | "
        f"{s(row.ttft_p50_ms)} | {s(row.ttft_max_ms)} | {ms(row.itl_p50_ms)} | {ms(row.itl_p99_ms)} | {row.errors} | "
        f"{row.governor or '—'}{f' ({row.note})' if row.note else ''} | {row.cpu.describe() if row.cpu else '—'} |"
    )


HEADER = (
    "| server | workload | client | output tok/s | TTFT p50 | TTFT max | inter-token p50 (ms) | p99 (ms) "
    "| errors | governor (threads), decode pacing | CPU over the run |\n|---|---|---|---|---|---|---|---|---|---|---|"
)
VARIANT_HEADER = (
    "| variants | workload | client | rounds | output tok/s, same round | TTFT p50 | TTFT max |"
    "\n|---|---|---|---|---|---|---|"
)
SUMMARY_HEADER = (
    "| workload | client | rounds | output tok/s, median (range) | vs base, same round: median (each) "
    "| inter-token p50, median (ms) | p99, median (ms) | errors |\n|---|---|---|---|---|---|---|---|"
)
