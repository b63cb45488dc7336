"""Train every method on one task and tabulate what each costs and how well it does (SFT = reference).

Rows are `RowSpec`s: a label and the settings that differ from the shared ones (a method, or LoRA at
another rank). Each row trains in a fresh process (see training/isolated.py), so its peak memory is its
own; its numbers come from the manifest that run wrote. Each finished (or failed) row is also kept as
`<out-dir>/<label>.row.json` with when it ran, the load average before and after, how many rows ran
beside it and the command that ran it, so a table can be rebuilt from rows measured by several runs
(`load_rows`, `merge_rows`) and says which row was measured when.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapterserve.training.errors import TrainingError
from adapterserve.training.isolated import train_in_subprocess
from adapterserve.training.settings import METHODS, TrainSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowSpec:
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainSettings fields for this row
    note: str = ""


def method_row(method: str) -> RowSpec:
    """The row of one method (`dora` is a method of its own, served by the engine like the others)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    return RowSpec(method, {"method": method})


def rank_rows(ranks: Sequence[int], alpha_per_rank: float | None) -> list[RowSpec]:
    """LoRA at each rank (alpha = alpha_per_rank * r when given, so the scale alpha/r stays fixed)."""
    rows = []
    for r in ranks:
        overrides: dict[str, Any] = {"method": "lora", "rank": r}
        if alpha_per_rank is not None:
            overrides["alpha"] = alpha_per_rank * r
        rows.append(RowSpec(f"lora r={r}", overrides))
    return rows


@dataclass(frozen=True)
class CompareRow:
    """One row of the table. A row that did not finish has `error` set and no measurements."""

    label: str
    method: str
    peft_type: str | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    trainable_percent: float | None = None
    bytes_on_disk: int | None = None
    peak_memory_bytes: int | None = None
    peak_memory_measure: str | None = None
    train_seconds: float | None = None
    wall_seconds: float | None = None  # the whole row: process start, load, train, save, evaluate
    steps: int | None = None
    stop_reason: str | None = None
    final_loss: float | None = None
    best_val_loss: float | None = None
    exact_match: float | None = None
    token_f1: float | None = None
    eval_backend: str | None = None
    base_exact_match: float | None = None
    base_token_f1: float | None = None
    note: str = ""
    error: str | None = None  # why the row did not finish
    # How it was measured: UTC start/end, os.getloadavg() (1, 5, 15 min) before and after, rows
    # running at the same time, OMP_NUM_THREADS, and the command that ran it.
    started_at: str | None = None
    finished_at: str | None = None
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None
    jobs: int | None = None
    omp_threads: str | None = None
    command: str | None = None


def row_record_path(out_dir: str | Path, label: str) -> Path:
    return Path(out_dir) / f"{_slug(label)}.row.json"


def write_row(row: CompareRow, out_dir: str | Path) -> Path:
    path = row_record_path(out_dir, row.label)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(row), indent=2) + "\n")
    return path


def read_row(path: str | Path) -> CompareRow:
    data = json.loads(Path(path).read_text())
    known = {f.name for f in fields(CompareRow)}
    for key in ("load_before", "load_after"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    return CompareRow(**{k: v for k, v in data.items() if k in known})


def load_rows(out_dir: str | Path) -> list[CompareRow]:
    """Every row recorded under `out_dir` (`*.row.json`), in table order."""
    return sort_rows([read_row(p) for p in sorted(Path(out_dir).glob("*.row.json"))])


def merge_rows(old: Sequence[CompareRow], new: Sequence[CompareRow]) -> list[CompareRow]:
    """`old` with the rows of `new` added; a new row replaces an old one of the same label, except
    that a row that did not finish never replaces a measured one."""
    merged = {r.label: r for r in old}
    for r in new:
        if r.error is None or r.label not in merged or merged[r.label].error is not None:
            merged[r.label] = r
    return sort_rows(list(merged.values()))


def sort_rows(rows: Sequence[CompareRow]) -> list[CompareRow]:
    """SFT (the reference) first, then the methods in the method table's order, then LoRA by rank."""
    order = {name: i for i, name in enumerate(METHODS)}

    def key(r: CompareRow) -> tuple[int, int, str]:
        if r.label.startswith("lora r="):
            digits = r.label.split("=", 1)[1]
            return (len(order), int(digits) if digits.isdigit() else 0, r.label)
        return (order.get(r.label, order.get(r.method, len(order))), 0, r.label)

    return sorted(rows, key=key)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _load() -> tuple[float, float, float] | None:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return None
    return (round(one, 2), round(five, 2), round(fifteen, 2))


def settings_for(spec: RowSpec, shared: TrainSettings) -> TrainSettings:
    """`shared` with the row's overrides (options that only apply to other methods are dropped)."""
    values = shared.model_dump()
    values.update(spec.overrides)
    if values["method"] != "prompt-tuning":
        values["init_text"] = None
    if values["method"] not in ("lora", "qlora"):
        values["use_dora"] = False
    return TrainSettings.model_validate(values)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in label).strip("-")


def _train_row(
    spec: RowSpec,
    shared: TrainSettings,
    train_file: Path,
    eval_file: Path,
    out_dir: Path,
    *,
    jobs: int = 1,
    command: str | None = None,
) -> CompareRow:
    settings = settings_for(spec, shared)
    log.info("compare: training %s", spec.label)
    measured = {
        "started_at": _now(),
        "load_before": _load(),
        "jobs": jobs,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "command": command,
    }
    start = time.perf_counter()
    try:
        m = train_in_subprocess(settings, train_file, out_dir / _slug(spec.label), eval_file)
    except TrainingError as exc:
        log.error("compare: %s did not finish: %s", spec.label, exc)
        row = CompareRow(
            label=spec.label,
            method=settings.method,
            note=spec.note,
            error=str(exc),
            wall_seconds=round(time.perf_counter() - start, 1),
            finished_at=_now(),
            load_after=_load(),
            **measured,
        )
        write_row(row, out_dir)
        return row
    wall = time.perf_counter() - start
    val = [loss for _, loss in (m.val_losses or [])]
    row = CompareRow(
        label=spec.label,
        method=m.method,
        peft_type=m.peft_type,
        trainable_parameters=m.trainable_parameters,
        total_parameters=m.total_parameters,
        trainable_percent=m.trainable_percent,
        bytes_on_disk=m.bytes_on_disk,
        peak_memory_bytes=m.peak_memory_bytes,
        peak_memory_measure=m.peak_memory_measure,
        train_seconds=m.train_seconds,
        wall_seconds=round(wall, 1),
        steps=m.steps,
        stop_reason=m.stop_reason,
        final_loss=m.final_loss,
        best_val_loss=min(val) if val else None,
        exact_match=m.eval_adapter.exact_match if m.eval_adapter else None,
        token_f1=m.eval_adapter.token_f1 if m.eval_adapter else None,
        eval_backend=m.eval_adapter.backend if m.eval_adapter else None,
        base_exact_match=m.eval_base.exact_match if m.eval_base else None,
        base_token_f1=m.eval_base.token_f1 if m.eval_base else None,
        note=spec.note,
        finished_at=_now(),
        load_after=_load(),
        **measured,
    )
    write_row(row, out_dir)
    return row


def run_compare(
    shared: TrainSettings,
    train_file: str | Path,
    eval_file: str | Path,
    out_dir: str | Path,
    rows: Sequence[RowSpec],
    on_row: Callable[[list[CompareRow]], None] | None = None,
    jobs: int = 1,
    command: str | None = None,
) -> list[CompareRow]:
    """Train each row (in its own process, `jobs` at a time) with the `shared` options and collect
    its manifest; a row whose training fails is kept with its error, and the others go on.
    on_row: called with the finished rows (in row order) after each one (the CLI rewrites the table:
    a long run that is stopped keeps its finished rows)."""
    from concurrent.futures import ThreadPoolExecutor

    finished: dict[int, CompareRow] = {}
    lock = threading.Lock()

    def work(index: int) -> None:
        row = _train_row(
            rows[index], shared, Path(train_file), Path(eval_file), Path(out_dir), jobs=jobs, command=command
        )
        with lock:
            finished[index] = row
            if on_row is not None:
                on_row([finished[i] for i in sorted(finished)])

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(work, i) for i in range(len(rows))]:
            future.result()
    return [finished[i] for i in sorted(finished)]


def machine_description(settings: TrainSettings) -> str:
    """CPU/GPU, thread count and library versions, for the table's header."""
    import os
    import platform

    import torch

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        hardware = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo", encoding="utf-8"):  # noqa: SIM115
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        hardware = (
            f"{cpu}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
        )
    import peft
    import transformers

    return (
        f"{hardware}; {platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    )


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _load_text(load: Sequence[float] | None) -> str:
    return "-" if not load else " / ".join(f"{x:.2f}" for x in load)


def render_markdown(
    rows: Sequence[CompareRow], *, title: str, command: str | None = None, machine: str | None = None
) -> str:
    """A markdown table, SFT (the reference) first, then the methods, then LoRA by rank; below it,
    when and under what load each row was measured, and the command(s) that measured them (`command`:
    the one to show when the rows do not record theirs)."""
    ordered = sort_rows(rows)
    lines = [f"## {title}", ""]
    commands = list(dict.fromkeys(r.command for r in ordered if r.command))
    if not commands and command:
        commands = [command]
    if commands:
        lines += [
            "Produced by:" if len(commands) == 1 else "Produced by these commands (rows: see below):",
            "",
        ]
        for i, c in enumerate(commands, 1):
            prefix = f"{i}. " if len(commands) > 1 else ""
            labels = [r.label for r in ordered if r.command == c]
            if len(commands) > 1:
                lines += [f"{prefix}rows {', '.join(labels) or '-'}:", ""]
            lines += ["```", c, "```", ""]
    if machine:
        lines += [f"Machine: {machine}", ""]
    done = [r for r in ordered if r.error is None]
    base = next((r for r in done if r.base_exact_match is not None and r.method != "qlora"), None)
    if base is not None:
        lines += [
            f"Base model without training: exact match {_score(base.base_exact_match)}, "
            f"token F1 {_score(base.base_token_f1)}.",
            "",
        ]
    measures = {r.peak_memory_measure for r in done if r.peak_memory_measure}
    if measures:
        lines += [f"Peak memory: {', '.join(sorted(measures))} while training.", ""]
    lines += [
        "| method | stored as | trainable params | trainable % | bytes on disk | peak memory "
        "| train time (s) | row wall time (s) | steps (stop) | final loss | best val loss "
        "| exact match | token F1 | eval by |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    notes = []
    for r in ordered:
        label = r.label
        if r.note:
            notes.append(f"- {r.label}: {r.note}.")
            label += " *"
        if r.error is not None:
            lines.append(f"| {label} | **did not finish**: {r.error} |" + " - |" * 12)
            continue
        stored = "whole model (reference)" if r.method == "sft" else f"PEFT {r.peft_type}"
        lines.append(
            f"| {label} | {stored} | {r.trainable_parameters:,} | {r.trainable_percent:.4f} "
            f"| {_bytes(r.bytes_on_disk)} | {_bytes(r.peak_memory_bytes)} | {r.train_seconds:.1f} "
            f"| {r.wall_seconds:.1f} | {r.steps} ({r.stop_reason or '-'}) | {_score(r.final_loss)} "
            f"| {_score(r.best_val_loss)} | {_score(r.exact_match)} | {_score(r.token_f1)} "
            f"| {r.eval_backend or '-'} |"
        )
    if notes:
        lines += ["", *notes]
    if any(r.started_at for r in ordered):
        lines += [
            "",
            "When each row was measured, and under what load (load average over 1 / 5 / 15 minutes as "
            "the row started and as it ended; rows at a time: how many rows of its run trained at once):",
            "",
            "| method | started | finished | load before | load after | rows at a time | OMP_NUM_THREADS "
            "| command |",
            "|---|---|---|---|---|---:|---|---:|",
        ]
        for r in ordered:
            number = commands.index(r.command) + 1 if r.command in commands else "-"
            lines.append(
                f"| {r.label} | {r.started_at or '-'} | {r.finished_at or '-'} | {_load_text(r.load_before)} "
                f"| {_load_text(r.load_after)} | {r.jobs or '-'} | {r.omp_threads or 'unset'} | {number} |"
            )
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- adapterserve train compare: table start -->"
TABLE_END = "<!-- adapterserve train compare: table end -->"


def write_table_into(path: str | Path, table: str) -> None:
    """Write `table` to `path`; when the file exists and holds the TABLE_START/TABLE_END markers, only
    the text between them is replaced (the prose around the table stays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if TABLE_START in old and TABLE_END in old.split(TABLE_START, 1)[1]:
        head, rest = old.split(TABLE_START, 1)
        tail = rest.split(TABLE_END, 1)[1]
        path.write_text(f"{head}{TABLE_START}\n{table}{TABLE_END}{tail}")
    else:
        path.write_text(table)
