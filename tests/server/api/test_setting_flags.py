"""A setting that an error message tells users to change can be changed from `adapterserve serve`'s
command line: every snake_case settings field named in a `raise` anywhere in server/ has a flag, and the
flag reaches the field."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from adapterserve.server.api import app
from adapterserve.server.settings import ServerSettings

SERVER = Path(__file__).resolve().parents[3] / "server"


def setting_fields(model: type[BaseModel] = ServerSettings, section: str = "") -> dict[str, str]:
    """snake_case field -> its section, dotted ("" for ServerSettings' own fields; "engine.cpu")."""
    fields: dict[str, str] = {}
    for name, info in model.model_fields.items():
        inner = info.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            fields |= setting_fields(inner, f"{section}.{name}".lstrip("."))
        elif "_" in name:
            fields[name] = section
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
    assert (engine.cpu.paged_attention, engine.cpu.decode_pace_ms, engine.cpu.linear) == ("torch", 0, "torch")
    unset = app.settings_from_args(parser.parse_args([]), environ={}).engine
    assert not unset.compile_decode and unset.kv_cache_bytes is None  # unset flags leave the defaults


def test_every_cpu_control_is_in_one_section_set_by_flags_and_the_environment_together():
    """engine.cpu holds the CPU controls; a flag of that section keeps the environment's other values."""
    parser = argparse.ArgumentParser()
    app.add_serve_arguments(parser)
    flags = ["--decode-pace-ms", "5", "--cpu-paged-attention", "torch", "--no-cpu-governor"]
    flags += ["--cpu-prefill-threads", "0", "--cpu-wait-policy", "passive"]
    environ = {
        "ADAPTERSERVE_ENGINE__CPU__THREADS": "3",
        "ADAPTERSERVE_ENGINE__CPU__LINEAR": "torch",
        "ADAPTERSERVE_ENGINE__MAX_QUEUE": "7",
    }
    engine = app.settings_from_args(parser.parse_args(flags), environ=environ).engine
    assert engine.max_queue == 7
    cpu = engine.cpu
    assert (cpu.threads, cpu.linear, cpu.decode_pace_ms, cpu.paged_attention) == (3, "torch", 5, "torch")
    assert (cpu.governor, cpu.prefill_threads, cpu.wait_policy) == (False, 0, "passive")
    assert "cpu" not in ServerSettings.model_fields  # one section, under the engine
    assert "ADAPTERSERVE_ENGINE__CPU__THREADS" in parser.format_help()


def test_an_environment_variable_of_no_section_is_refused():
    """A nested variable whose section does not exist (ADAPTERSERVE_CPU__THREADS: the CPU controls are
    ADAPTERSERVE_ENGINE__CPU__*) fails at start instead of being ignored; the client's plain variables
    are not settings and are left alone."""
    parser = argparse.ArgumentParser()
    app.add_serve_arguments(parser)
    with pytest.raises(ValidationError, match="cpu"):
        app.settings_from_args(parser.parse_args([]), environ={"ADAPTERSERVE_CPU__THREADS": "2"})
    settings = app.settings_from_args(parser.parse_args([]), environ={"ADAPTERSERVE_TARGET": "host:1"})
    assert settings.engine.cpu.threads is None
