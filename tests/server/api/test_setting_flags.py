"""A setting that an error message tells users to change can be changed from `adapterserve serve`'s
command line: every snake_case settings field named in a `raise` anywhere in server/ has a flag, and the
flag reaches the field."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

from adapterserve.server.api import app
from adapterserve.server.settings import ServerSettings

SERVER = Path(__file__).resolve().parents[3] / "server"


def setting_fields() -> dict[str, str]:
    """snake_case field -> its section ("" for ServerSettings' own fields)."""
    fields: dict[str, str] = {}
    for name, info in ServerSettings.model_fields.items():
        section = getattr(info.annotation, "model_fields", None)
        for field in section or [name]:
            if "_" in field:
                fields[field] = name if section else ""
    return fields


def fields_named_in_errors() -> dict[str, list[str]]:
    """Settings fields named as whole words in the string literals of `raise` statements in server/."""
    fields = setting_fields()
    named: dict[str, list[str]] = {}
    for path in sorted(SERVER.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            for part in ast.walk(node.exc):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    for field in fields:
                        if re.search(rf"(?<![\w-]){field}(?!\w)", part.value):
                            named.setdefault(field, []).append(f"{path.relative_to(SERVER)}:{node.lineno}")
    return named


def flagged_fields() -> set[str]:
    return {field for _, field in app._SECTION_FLAGS.values()} | set(app._TOP_FLAGS)


def test_every_setting_an_error_names_has_a_flag():
    named = fields_named_in_errors()
    assert "kv_cache_bytes" in named  # the scan finds the KV cache's refusal
    missing = {field: where for field, where in named.items() if field not in flagged_fields()}
    assert missing == {}, f"give these settings a `serve` flag (server/api/app.py): {missing}"


def test_the_new_flags_reach_their_settings():
    parser = argparse.ArgumentParser()
    app.add_serve_arguments(parser)
    args = parser.parse_args(
        [
            "--kv-cache-bytes",
            "4096",
            "--kv-block-size",
            "32",
            "--compile-decode",
            "--decode-step",
            "static",
            "--cpu-paged-attention",
            "torch",
            "--decode-pace-ms",
            "0",
            "--cpu-linear",
            "torch",
        ]
    )
    engine = app.settings_from_args(args, environ={}).engine
    assert (engine.kv_cache_bytes, engine.kv_block_size, engine.compile_decode) == (4096, 32, True)
    assert (engine.cpu_paged_attention, engine.decode_pace_ms, engine.cpu_linear) == ("torch", 0, "torch")
    unset = app.settings_from_args(parser.parse_args([]), environ={}).engine
    assert not unset.compile_decode and unset.kv_cache_bytes is None  # unset flags leave the defaults
