"""`adapterserve serve`: flags, settings, logging, and the event loop around ServeApp.

The CLI (`adapterserve.cli`) imports `add_serve_arguments` and `run_serve` lazily; this module also runs
on its own: `python -m adapterserve.server.api.app --base-model DIR --port 0`.
Flags left unset fall back to ADAPTERSERVE_* environment variables, then to the settings' defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from adapterserve.server.settings import (
    ENV_PREFIX,
    CacheSettings,
    CpuSettings,
    EngineSettings,
    LimitSettings,
    LoraBackendName,
    ServerSettings,
    SourceSettings,
)

# `serve` listens for HTTP here unless --no-http (ServerSettings itself defaults to no HTTP).
DEFAULT_HTTP_PORT = 8000

# A nested section by its path in ServerSettings ("engine.cpu": ServerSettings.engine.cpu).
_SECTIONS: dict[str, type[BaseModel]] = {
    "engine": EngineSettings,
    "engine.cpu": CpuSettings,
    "cache": CacheSettings,
    "limits": LimitSettings,
    "sources": SourceSettings,
}
# flag dest -> (settings section, field) for the nested settings.
_SECTION_FLAGS: dict[str, tuple[str, str]] = {
    "max_batch_size": ("engine", "max_batch_size"),
    "max_seq_len": ("engine", "max_seq_len"),
    "max_prefill_tokens": ("engine", "max_prefill_tokens"),
    "prefill_group_cost": ("engine", "prefill_group_cost"),
    "max_queue": ("engine", "max_queue"),
    "adapter_slots": ("engine", "adapter_slots"),
    "max_lora_rank": ("engine", "max_lora_rank"),
    "max_virtual_tokens": ("engine", "max_virtual_tokens"),
    "kv_cache": ("engine", "kv_cache"),
    "kv_cache_bytes": ("engine", "kv_cache_bytes"),
    "kv_block_size": ("engine", "kv_block_size"),
    "compile_decode": ("engine", "compile_decode"),
    "decode_step": ("engine", "decode_step"),
    "max_decode_graphs": ("engine", "max_decode_graphs"),
    "lora_backend": ("engine", "lora_backend"),
    "host_cache_bytes": ("cache", "host_cache_bytes"),
    "max_adapter_bytes": ("cache", "max_adapter_bytes"),
    "persist_every": ("cache", "persist_every"),
    "max_prompt_tokens": ("limits", "max_prompt_tokens"),
    "max_new_tokens": ("limits", "max_new_tokens"),
    "max_stop_sequences": ("limits", "max_stop_sequences"),
    "max_n": ("limits", "max_n"),
    "max_batch_rows": ("limits", "max_batch_rows"),
    "max_batch_tokens": ("limits", "max_batch_tokens"),
    "max_logprobs": ("limits", "max_logprobs"),
    "max_concurrent_streams": ("limits", "max_concurrent_streams"),
    "max_upload_bytes": ("limits", "max_upload_bytes"),
    "cpu_threads": ("engine.cpu", "threads"),
    "cpu_wait_policy": ("engine.cpu", "wait_policy"),
    "cpu_prefill_threads": ("engine.cpu", "prefill_threads"),
    "cpu_linear": ("engine.cpu", "linear"),
    "cpu_paged_attention": ("engine.cpu", "paged_attention"),
    "decode_pace_ms": ("engine.cpu", "decode_pace_ms"),
    "max_message_bytes": ("limits", "max_message_bytes"),
    "upload_chunk_bytes": ("limits", "upload_chunk_bytes"),
    "adapter_source": ("sources", "uris"),
    "adapter_source_ttl": ("sources", "ttl_s"),
    "adapter_fetch_timeout": ("sources", "fetch_timeout_s"),
    "adapter_negative_ttl": ("sources", "negative_ttl_s"),
    "store_max_bytes": ("sources", "store_max_bytes"),
}
# TLS flag dest -> TlsSettings field.
_TLS_FLAGS: dict[str, str] = {
    "tls_cert": "cert_file",
    "tls_key": "key_file",
    "tls_client_ca": "client_ca_file",
}
_TOP_FLAGS = (
    "base_model",
    "quantize",
    "dtype",
    "device",
    "store",
    "host",
    "port",
    "metrics_port",
    "http_port",
    "served_model_name",
    "insecure_admin",
    "grace_seconds",
    "demo_adapters",
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` flags to `parser` (every default is None: unset flags defer to the environment)."""
    net = parser.add_argument_group("model and network")
    net.add_argument(
        "--base-model", help="model directory, .gguf file or name (default: the embedded SmolLM2)"
    )
    net.add_argument("--quantize", choices=["nf4", "int8", "none"], help="default: nf4 on CUDA, none on CPU")
    net.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype of the base (default auto: the model's own, float32 on CPU)",
    )
    net.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    net.add_argument("--store", type=Path, help="adapter store directory (default: ./adapters-store)")
    net.add_argument("--host", help="address to bind (default 127.0.0.1)")
    net.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    net.add_argument("--metrics-port", type=int, help="Prometheus port (default 9090; 0 picks a free one)")
    net.add_argument(
        "--http-port",
        type=int,
        help=f"OpenAI-compatible HTTP port (default {DEFAULT_HTTP_PORT}; 0 picks a free one)",
    )
    net.add_argument("--no-http", action="store_true", help="serve gRPC only (no OpenAI-compatible HTTP)")
    net.add_argument(
        "--served-model-name", help="the base model's name in HTTP `model` (default: its directory name)"
    )
    net.add_argument(
        "--insecure-admin",
        action="store_true",
        default=None,
        help="allow admin calls without ADAPTERSERVE_ADMIN_TOKEN (anyone who can connect may upload)",
    )
    net.add_argument(
        "--grace", dest="grace_seconds", type=float, help="seconds running calls get on SIGTERM (default 10)"
    )
    net.add_argument(
        "--demo-adapters",
        action="store_true",
        default=None,
        help="add the trained demo adapters and one random adapter of each of four kinds (lora, ia3, prompt, "
        "prefix) to the store at startup",
    )
    tls = parser.add_argument_group("TLS (gRPC and the HTTP API)")
    tls.add_argument(
        "--tls-cert", type=Path, help="PEM certificate chain: serve gRPC and HTTP over TLS (with --tls-key)"
    )
    tls.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    tls.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA bundle: require client certificates signed by it (mutual TLS)",
    )
    net.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    eng = parser.add_argument_group("engine and cache sizes")
    for dest in (
        "max_batch_size",
        "max_seq_len",
        "max_prefill_tokens",
        "prefill_group_cost",
        "max_queue",
        "adapter_slots",
        "max_lora_rank",
        "max_virtual_tokens",
        "max_decode_graphs",
        "kv_cache_bytes",
        "kv_block_size",
        "host_cache_bytes",
        "max_adapter_bytes",
        "persist_every",
    ):
        eng.add_argument(flag_of(dest), dest=dest, type=int, metavar="N", help=section_flag_help(dest))
    for dest in ("kv_cache", "decode_step"):
        choices = EngineSettings.model_fields[dest].annotation.__args__  # the Literal's values
        eng.add_argument(flag_of(dest), dest=dest, choices=choices, help=section_flag_help(dest))
    eng.add_argument(
        "--compile-decode", action="store_true", default=None, help=section_flag_help("compile_decode")
    )
    eng.add_argument(
        "--lora-backend", choices=list(get_args(LoraBackendName)), help=section_flag_help("lora_backend")
    )
    eng.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        default=None,
        help="turn off prefix caching, which means: "
        + (EngineSettings.model_fields["prefix_cache"].description or "")
        + f" (env {env_var('engine', 'prefix_cache')}=false)",
    )
    cpu = parser.add_argument_group("CPU control (CPU device; docs/cpu.md)")
    for dest in ("cpu_linear", "cpu_paged_attention"):
        field = CpuSettings.model_fields[_SECTION_FLAGS[dest][1]]
        choices = field.annotation.__args__  # the Literal's values
        cpu.add_argument(flag_of(dest), dest=dest, choices=choices, help=section_flag_help(dest))
    cpu.add_argument("--decode-pace-ms", type=int, metavar="MS", help=section_flag_help("decode_pace_ms"))
    cpu.add_argument("--cpu-threads", type=int, metavar="N", help=section_flag_help("cpu_threads"))
    cpu.add_argument(
        "--cpu-prefill-threads", type=int, metavar="N", help=section_flag_help("cpu_prefill_threads")
    )
    cpu.add_argument(
        "--cpu-wait-policy", choices=["auto", "active", "passive"], help=section_flag_help("cpu_wait_policy")
    )
    cpu.add_argument(
        "--no-cpu-governor",
        dest="cpu_governor",
        action="store_false",
        default=None,
        help="turn off the contention governor, which "
        + (CpuSettings.model_fields["governor"].description or "")
        + f" (env {env_var('engine.cpu', 'governor')}=false)",
    )
    src = parser.add_argument_group("adapter sources (fetched on first use)")
    src.add_argument(
        "--adapter-source",
        dest="adapter_source",
        action="append",
        metavar="URI",
        help="repeatable: " + section_flag_help("adapter_source"),
    )
    for dest in ("adapter_source_ttl", "adapter_fetch_timeout", "adapter_negative_ttl"):
        src.add_argument(
            flag_of(dest), dest=dest, type=float, metavar="SECONDS", help=section_flag_help(dest)
        )
    src.add_argument("--store-max-bytes", type=int, metavar="N", help=section_flag_help("store_max_bytes"))
    lim = parser.add_argument_group("request limits")
    for dest in (
        "max_prompt_tokens",
        "max_new_tokens",
        "max_stop_sequences",
        "max_n",
        "max_batch_rows",
        "max_batch_tokens",
        "max_logprobs",
        "max_concurrent_streams",
        "max_upload_bytes",
        "max_message_bytes",
        "upload_chunk_bytes",
    ):
        lim.add_argument(flag_of(dest), dest=dest, type=int, metavar="N", help=section_flag_help(dest))


def flag_of(dest: str) -> str:
    """The command-line flag of a settings field: max_prompt_tokens -> --max-prompt-tokens."""
    return "--" + dest.replace("_", "-")


def section_flag_help(dest: str) -> str:
    """Help text of an engine/cache/limit flag: the field's description, its default and its
    environment variable (all from the settings model, so they cannot drift)."""
    section, field = _SECTION_FLAGS[dest]
    info = _SECTIONS[section].model_fields[field]
    default = "" if info.default is None else f"default {info.default}; "  # None: the description says
    return f"{info.description or field.replace('_', ' ')} ({default}env {env_var(section, field)})"


def env_var(section: str, field: str) -> str:
    """The environment variable of a section's field: engine.cpu, threads -> ADAPTERSERVE_ENGINE__CPU__THREADS."""
    return ENV_PREFIX + "__".join([*section.split("."), field]).upper()


def _set_in_section(overrides: dict[str, Any], section: str, field: str, value: Any) -> None:
    """overrides[section...][field] = value, one nested dict per part of the section's path."""
    node = overrides
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[field] = value


def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServerSettings:
    """ServerSettings from parsed flags over ADAPTERSERVE_* environment variables."""
    overrides: dict[str, Any] = {}
    for name in _TOP_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    for dest, (section, field) in _SECTION_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            _set_in_section(overrides, section, field, value)
    if getattr(args, "prefix_cache", None) is False:  # --no-prefix-cache
        overrides.setdefault("engine", {})["prefix_cache"] = False
    if getattr(args, "cpu_governor", None) is False:  # --no-cpu-governor (a switch, not a section value)
        _set_in_section(overrides, "engine.cpu", "governor", False)
    for dest, field in _TLS_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.setdefault("tls", {})[field] = value
    settings = ServerSettings.from_env(environ, **overrides)
    env = os.environ if environ is None else environ
    if getattr(args, "no_http", False):
        return settings.model_copy(update={"http_port": None})
    if settings.http_port is None and "ADAPTERSERVE_HTTP_PORT" not in env:
        return settings.model_copy(update={"http_port": DEFAULT_HTTP_PORT})
    return settings


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit code (0 after a clean drain)."""
    configure_logging(getattr(args, "log_level", "INFO") or "INFO")
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"adapterserve serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    from adapterserve.server.cpu.threads import apply_wait_policy

    # before anything imports torch (libgomp reads it once)
    apply_wait_policy(settings.engine.cpu.wait_policy)
    from adapterserve.server.api.serve import ServeApp

    return asyncio.run(ServeApp(settings).run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="adapterserve serve", description="Serve the base model and its adapters."
    )
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
