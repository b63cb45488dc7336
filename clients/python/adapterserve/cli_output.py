"""How the CLI prints things: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TextIO

from pydantic import BaseModel

from adapterserve.models import AdapterInfo, UploadResult
from adapterserve.progress import format_bytes


def to_jsonable(value: BaseModel | Sequence[BaseModel]) -> Any:
    """A model (or list of models) as plain JSON data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return [v.model_dump(mode="json") for v in value]


def print_json(value: BaseModel | Sequence[BaseModel], out: TextIO) -> None:
    out.write(json.dumps(to_jsonable(value), indent=2, ensure_ascii=False) + "\n")


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the header line first."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *rows]
    ]
    return "\n".join(lines) + "\n"


def _shape(a: AdapterInfo) -> str:
    """'r=8' for LoRA kinds, 'vt=20' for prompt/prefix, '-' otherwise."""
    if a.rank is not None:
        return f"r={a.rank}"
    if a.num_virtual_tokens is not None:
        return f"vt={a.num_virtual_tokens}"
    return "-"


ADAPTER_HEADERS = (
    "NAME",
    "KIND",
    "PEFT_TYPE",
    "SHAPE",
    "TARGETS",
    "SIZE",
    "VERSION",
    "PINNED",
    "TIER",
    "ORIGIN",
)


def adapter_row(a: AdapterInfo) -> list[str]:
    return [
        a.name,
        a.kind.value,
        a.peft_type,
        _shape(a),
        ",".join(a.target_modules) or "-",
        format_bytes(a.size_bytes),
        str(a.version),
        "yes" if a.pinned else "no",
        a.cache_tier.value,
        a.origin.source if a.origin is not None else "upload",
    ]


def adapters_table(adapters: Sequence[AdapterInfo]) -> str:
    if not adapters:
        return "no adapters\n"
    return render_table(ADAPTER_HEADERS, [adapter_row(a) for a in adapters])


def adapter_details(a: AdapterInfo) -> str:
    """A `key: value` description of one adapter, its files last."""
    fields = [
        ("name", a.name),
        ("kind", a.kind.value),
        ("peft_type", a.peft_type),
        ("rank", "-" if a.rank is None else str(a.rank)),
        ("num_virtual_tokens", "-" if a.num_virtual_tokens is None else str(a.num_virtual_tokens)),
        ("target_modules", ", ".join(a.target_modules) or "-"),
        ("num_parameters", f"{a.num_parameters:,}"),
        ("weight_bytes", format_bytes(a.weight_bytes)),
        ("size_bytes", format_bytes(a.size_bytes)),
        ("version", str(a.version)),
        ("pinned", "yes" if a.pinned else "no"),
        ("cache_tier", a.cache_tier.value),
        ("created_at", a.created_at.isoformat() if a.created_at else "-"),
        ("digest", a.digest or "-"),
        ("base_fingerprint", a.base_fingerprint or "-"),
        ("description", a.description or "-"),
        ("origin", a.origin.source if a.origin is not None else "upload"),
    ]
    if a.origin is not None:
        fields.append(("origin_etag", a.origin.etag or "-"))
        if a.origin.revision:
            fields.append(("origin_revision", a.origin.revision))
        fields.append(("fetched_at", a.origin.fetched_at.isoformat() if a.origin.fetched_at else "-"))
    width = max(len(k) for k, _ in fields)
    lines = [f"{k.ljust(width)}  {v}" for k, v in fields]
    lines.append("files:")
    lines.extend(f"  {f.name}  {format_bytes(f.size_bytes)}  sha256:{f.sha256}" for f in a.files)
    return "\n".join(lines) + "\n"


def upload_summary(r: UploadResult) -> str:
    a = r.adapter
    verb = "replaced" if r.replaced else "stored"
    return (
        f"{verb} adapter {a.name!r} version {a.version} ({a.kind.value}, {_shape(a)}, "
        f"{len(a.files)} files, {format_bytes(r.received_bytes)} sent)\n"
    )
