"""Train every method on one task and tabulate what each costs and how well it does (SFT = reference)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from adapterserve.training.settings import METHODS, TrainSettings
from adapterserve.training.train import train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareRow:
    method: str
    peft_type: str
    trainable_parameters: int
    total_parameters: int
    trainable_percent: float
    bytes_on_disk: int
    train_seconds: float
    steps: int
    exact_match: float | None
    token_f1: float | None
    base_exact_match: float | None
    base_token_f1: float | None


def settings_for(method: str, shared: TrainSettings) -> TrainSettings:
    """`shared` with another method (options that only apply to other methods are dropped)."""
    values = shared.model_dump()
    values["method"] = method
    if method != "prompt-tuning":
        values["init_text"] = None
    return TrainSettings.model_validate(values)


def run_compare(
    shared: TrainSettings,
    train_file: str | Path,
    eval_file: str | Path,
    out_dir: str | Path,
    methods: Sequence[str] = METHODS,
) -> list[CompareRow]:
    """Train each method with `shared` options (per-method learning rates unless one is set)."""
    rows = []
    for method in methods:
        log.info("compare: training %s", method)
        result = train(
            settings_for(method, shared),
            train_file,
            Path(out_dir) / method,
            eval_file=eval_file,
            overwrite=True,
        )
        m = result.manifest
        rows.append(
            CompareRow(
                method=method,
                peft_type=m.peft_type,
                trainable_parameters=m.trainable_parameters,
                total_parameters=m.total_parameters,
                trainable_percent=m.trainable_percent,
                bytes_on_disk=m.bytes_on_disk,
                train_seconds=m.train_seconds,
                steps=m.steps,
                exact_match=m.eval_adapter.exact_match if m.eval_adapter else None,
                token_f1=m.eval_adapter.token_f1 if m.eval_adapter else None,
                base_exact_match=m.eval_base.exact_match if m.eval_base else None,
                base_token_f1=m.eval_base.token_f1 if m.eval_base else None,
            )
        )
        del result
    return rows


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_markdown(rows: Sequence[CompareRow], *, title: str, command: str | None = None) -> str:
    """A markdown table, SFT (the reference) first, then the PEFT methods in the order trained."""
    ordered = sorted(rows, key=lambda r: r.method != "sft")
    lines = [f"## {title}", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    base = next((r for r in rows if r.base_exact_match is not None and r.method != "qlora"), None)
    if base is not None:
        lines += [
            f"Base model without training: exact match {_score(base.base_exact_match)}, "
            f"token F1 {_score(base.base_token_f1)}.",
            "",
        ]
    lines += [
        "| method | stored as | trainable params | trainable % | bytes on disk | train time (s) | steps "
        "| exact match | token F1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ordered:
        stored = "whole model (reference)" if r.method == "sft" else f"PEFT {r.peft_type}"
        lines.append(
            f"| {r.method} | {stored} | {r.trainable_parameters:,} | {r.trainable_percent:.4f} "
            f"| {_bytes(r.bytes_on_disk)} | {r.train_seconds:.1f} | {r.steps} "
            f"| {_score(r.exact_match)} | {_score(r.token_f1)} |"
        )
    return "\n".join(lines) + "\n"
