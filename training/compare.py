"""Train every method on one task and tabulate what each costs and how well it does (SFT = reference).

Rows are `RowSpec`s: a label and the settings that differ from the shared ones (a method, or LoRA at
another rank, or LoRA with DoRA). Each row trains in a fresh process (see training/isolated.py), so its
peak memory is its own; its numbers come from the manifest that run wrote.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterserve.training.isolated import train_in_subprocess
from adapterserve.training.settings import METHODS, TrainSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowSpec:
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainSettings fields for this row
    note: str = ""


def method_row(method: str) -> RowSpec:
    """The row of one method. `dora` is LoRA with PEFT's use_dora (unless a `dora` method exists);
    the server of this version does not load DoRA, so its row is evaluated by PEFT forward passes."""
    if method == "dora" and "dora" not in METHODS:
        return RowSpec(
            "dora",
            {"method": "lora", "use_dora": True, "eval_backend": "peft"},
            note="evaluated by PEFT forward passes (this server version does not load DoRA adapters)",
        )
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
    label: str
    method: str
    peft_type: str
    trainable_parameters: int
    total_parameters: int
    trainable_percent: float
    bytes_on_disk: int
    peak_memory_bytes: int | None
    peak_memory_measure: str | None
    train_seconds: float
    wall_seconds: float  # the whole row: process start, load, train, save, evaluate
    steps: int
    stop_reason: str | None
    final_loss: float | None
    best_val_loss: float | None
    exact_match: float | None
    token_f1: float | None
    eval_backend: str | None
    base_exact_match: float | None
    base_token_f1: float | None
    note: str = ""


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
    spec: RowSpec, shared: TrainSettings, train_file: Path, eval_file: Path, out_dir: Path
) -> CompareRow:
    settings = settings_for(spec, shared)
    log.info("compare: training %s", spec.label)
    start = time.perf_counter()
    m = train_in_subprocess(settings, train_file, out_dir / _slug(spec.label), eval_file)
    wall = time.perf_counter() - start
    val = [loss for _, loss in (m.val_losses or [])]
    return CompareRow(
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
    )


def run_compare(
    shared: TrainSettings,
    train_file: str | Path,
    eval_file: str | Path,
    out_dir: str | Path,
    rows: Sequence[RowSpec],
    on_row: Callable[[list[CompareRow]], None] | None = None,
    jobs: int = 1,
) -> list[CompareRow]:
    """Train each row (in its own process, `jobs` at a time) with the `shared` options and collect
    its manifest. on_row: called with the finished rows (in row order) after each one (the CLI
    rewrites the table: a long run that is stopped keeps its finished rows)."""
    from concurrent.futures import ThreadPoolExecutor

    finished: dict[int, CompareRow] = {}
    lock = threading.Lock()

    def work(index: int) -> None:
        row = _train_row(rows[index], shared, Path(train_file), Path(eval_file), Path(out_dir))
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


def render_markdown(
    rows: Sequence[CompareRow], *, title: str, command: str | None = None, machine: str | None = None
) -> str:
    """A markdown table, SFT (the reference) first, then the rows in the order trained."""
    ordered = sorted(rows, key=lambda r: r.method != "sft")
    lines = [f"## {title}", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    if machine:
        lines += [f"Machine: {machine}", ""]
    base = next((r for r in rows if r.base_exact_match is not None and r.method != "qlora"), None)
    if base is not None:
        lines += [
            f"Base model without training: exact match {_score(base.base_exact_match)}, "
            f"token F1 {_score(base.base_token_f1)}.",
            "",
        ]
    measures = {r.peak_memory_measure for r in rows if r.peak_memory_measure}
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
        stored = "whole model (reference)" if r.method == "sft" else f"PEFT {r.peft_type}"
        label = r.label
        if r.note:
            notes.append(f"- {r.label}: {r.note}.")
            label += " *"
        lines.append(
            f"| {label} | {stored} | {r.trainable_parameters:,} | {r.trainable_percent:.4f} "
            f"| {_bytes(r.bytes_on_disk)} | {_bytes(r.peak_memory_bytes)} | {r.train_seconds:.1f} "
            f"| {r.wall_seconds:.1f} | {r.steps} ({r.stop_reason or '-'}) | {_score(r.final_loss)} "
            f"| {_score(r.best_val_loss)} | {_score(r.exact_match)} | {_score(r.token_f1)} "
            f"| {r.eval_backend or '-'} |"
        )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"
