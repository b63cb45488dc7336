"""The CLI's client-side commands: generate, upload, adapters list|show|delete|pin|unpin, health, info.

Each `cmd_*` takes the parsed arguments and the output streams and returns an exit code; errors are
raised as AdapterServeError and turned into one line and an exit code by `adapterserve.cli.main`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from adapterserve import cli_output
from adapterserve.client import Client
from adapterserve.connection import ADMIN_TOKEN_ENV, TOKEN_ENV
from adapterserve.errors import InvalidArgument, Unavailable
from adapterserve.models import ChatMessage, GenerateResult
from adapterserve.progress import ProgressBar
from adapterserve.retry import RetryPolicy


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--target, tokens, --timeout, --tls, --retries (each defaulting to the environment)."""
    g = parser.add_argument_group("connection")
    g.add_argument("--target", help="server host:port (default: $ADAPTERSERVE_TARGET or 127.0.0.1:50051)")
    g.add_argument("--admin-token", help=f"admin bearer token (default: ${ADMIN_TOKEN_ENV})")
    g.add_argument("--token", help=f"generation bearer token (default: ${TOKEN_ENV})")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per call (default 120)")
    g.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    g.add_argument(
        "--retries",
        type=int,
        default=4,
        help="retries of safe calls on UNAVAILABLE/RESOURCE_EXHAUSTED (default 4)",
    )


def client_from_args(args: argparse.Namespace) -> Client:
    return Client(
        args.target,
        admin_token=args.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None,
        token=args.token or os.environ.get(TOKEN_ENV) or None,
        timeout=args.timeout,
        tls=True if args.tls else None,
        retry=RetryPolicy(max_attempts=max(1, args.retries + 1)),
    )


# -- generate --------------------------------------------------------------------------------------


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt ('-' reads it from standard input)")
    p.add_argument("--adapter", "-a", default="", help="adapter name (default: the base model)")
    p.add_argument(
        "--chat", action="store_true", help="send the prompt as a user chat message (chat template)"
    )
    p.add_argument("--system", help="a system message before the prompt (implies --chat)")
    p.add_argument(
        "--messages", help="a JSON file with a list of {role, content} chat messages ('-' = stdin)"
    )
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", "-n", type=int, help="tokens to generate at most (server default 64)")
    s.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, help="nucleus sampling, (0, 1]")
    s.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    s.add_argument("--repetition-penalty", type=float, help="1.0 = off")
    s.add_argument("--seed", type=int, help="sampling seed (same seed, same output)")
    s.add_argument("--stop", action="append", default=[], help="a stop sequence (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="generate past end-of-sequence")
    o = p.add_argument_group("output")
    o.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    o.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON (with --stream: one JSON line per chunk)",
    )
    o.add_argument(
        "--verbose", "-v", action="store_true", help="print finish reason, token counts and timings to stderr"
    )


def _read_text(source: str) -> str:
    return sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")


def _generate_input(args: argparse.Namespace) -> tuple[str | None, list[ChatMessage] | None]:
    """(prompt, None) or (None, messages) from the command line."""
    if args.messages is not None:
        if args.prompt is not None or args.system is not None:
            raise InvalidArgument("--messages cannot be combined with a prompt or --system")
        try:
            data = json.loads(_read_text(args.messages))
            return None, [ChatMessage.model_validate(m) for m in data]
        except (OSError, ValueError, TypeError) as err:
            raise InvalidArgument(
                f"--messages: expected a JSON list of {{role, content}} objects ({err})"
            ) from None
    if args.prompt is None:
        raise InvalidArgument("give a prompt (or '-' to read it from standard input) or --messages FILE")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.chat or args.system is not None:
        chat = [ChatMessage(role="system", content=args.system)] if args.system is not None else []
        return None, [*chat, ChatMessage(role="user", content=prompt)]
    return prompt, None


def _stats_line(r: GenerateResult) -> str:
    return (
        f"finish_reason={r.finish_reason.value} prompt_tokens={r.prompt_tokens} "
        f"generated_tokens={r.generated_tokens} ttft_s={r.timings.time_to_first_token_s:.3f} "
        f"total_s={r.timings.total_s:.3f}\n"
    )


def cmd_generate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    prompt, messages = _generate_input(args)
    params: dict[str, Any] = dict(
        messages=messages,
        adapter=args.adapter or None,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    with client_from_args(args) as client:
        if not args.stream:
            result = client.generate(prompt, **params)
            if args.json:
                cli_output.print_json(result, out)
            else:
                out.write(result.text + "\n")
        else:
            chunks = []
            for chunk in client.stream(prompt, **params):
                chunks.append(chunk)
                if args.json:
                    out.write(json.dumps(chunk.model_dump(mode="json"), ensure_ascii=False) + "\n")
                else:
                    out.write(chunk.text)
                out.flush()
            if not args.json:
                out.write("\n")
            result = GenerateResult.from_chunks(chunks, adapter=args.adapter)
    if args.verbose:
        err.write(_stats_line(result))
    return 0


# -- upload ----------------------------------------------------------------------------------------


def add_upload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="PEFT adapter directory (adapter_config.json + *.safetensors)")
    p.add_argument("--name", required=True, help="the adapter's name on the server")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter of the same name")
    p.add_argument("--description", help="free text stored with the adapter")
    p.add_argument(
        "--chunk-bytes",
        type=int,
        default=None,
        help="bytes per upload message (default 256 KiB, or the server's limit if smaller)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the stored adapter as JSON")


def cmd_upload(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with client_from_args(args) as client, ProgressBar(err) as bar:
        result = client.upload_adapter(
            args.dir,
            args.name,
            overwrite=args.overwrite,
            description=args.description,
            progress=None if args.quiet else bar,
            chunk_bytes=args.chunk_bytes,
        )
    if args.json:
        cli_output.print_json(result, out)
    else:
        out.write(cli_output.upload_summary(result))
    return 0


# -- adapters --------------------------------------------------------------------------------------


def add_adapters_arguments(p: argparse.ArgumentParser, parent: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(
        dest="adapters_command", metavar="{list,show,delete,pin,unpin,refresh}", required=True
    )
    ls = sub.add_parser("list", parents=[parent], help="list adapters (a table; --json for scripts)")
    ls.add_argument("--prefix", default="", help="only names starting with this")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    for name, help_text in (
        ("show", "describe one adapter"),
        ("delete", "delete an adapter"),
        ("pin", "pin an adapter (loaded now, never evicted)"),
        ("unpin", "unpin an adapter (evictable again)"),
        ("refresh", "ask a fetched adapter's source again; a new version replaces it"),
    ):
        cp = sub.add_parser(name, parents=[parent], help=help_text)
        cp.add_argument("name", help="adapter name")
        cp.add_argument("--json", action="store_true", help="print the adapter as JSON")


def cmd_adapters(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    action = args.adapters_command
    with client_from_args(args) as client:
        if action == "list":
            adapters = client.list_adapters(name_prefix=args.prefix)
            if args.json:
                cli_output.print_json(adapters, out)
            else:
                out.write(cli_output.adapters_table(adapters))
            return 0
        if action == "refresh":
            result = client.refresh_adapter(args.name)
            if args.json:
                cli_output.print_json(result, out)
            else:
                what = "new version" if result.changed else "unchanged"
                out.write(
                    f"refreshed adapter {result.adapter.name!r}: {what} (version {result.adapter.version})\n"
                )
            return 0
        call = {
            "show": client.get_adapter,
            "delete": client.delete_adapter,
            "pin": client.pin,
            "unpin": client.unpin,
        }[action]
        adapter = call(args.name)
    if args.json:
        cli_output.print_json(adapter, out)
    elif action == "show":
        out.write(cli_output.adapter_details(adapter))
    else:
        past = {"delete": "deleted", "pin": "pinned", "unpin": "unpinned"}[action]
        out.write(f"{past} adapter {adapter.name!r} (version {adapter.version})\n")
    return 0


# -- health and info -------------------------------------------------------------------------------


def add_health_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for SERVING (default: ask once)")
    p.add_argument("--json", action="store_true")


def cmd_health(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with client_from_args(args) as client:
        status = client.wait_until_serving(timeout=args.wait) if args.wait > 0 else client.health()
    if args.json:
        cli_output.print_json(status, out)
    else:
        out.write(status.status + "\n")
    if not status.serving:
        raise Unavailable(f"server at {client.target} is {status.status}")
    return 0


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def cmd_info(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with client_from_args(args) as client:
        info = client.server_info()
    if args.json:
        cli_output.print_json(info, out)
        return 0
    rows = [
        ("server_version", info.server_version),
        ("base_model", info.base_model),
        ("model_type", info.model_type),
        ("quantize", info.quantize),
        ("base_fingerprint", info.base_fingerprint),
        ("adapter_kinds", ", ".join(k.value for k in info.adapter_kinds)),
        ("chat_template", "yes" if info.chat_template else "no"),
        *((f"limits.{k}", str(v)) for k, v in info.limits.model_dump().items()),
    ]
    width = max(len(k) for k, _ in rows)
    out.write("".join(f"{k.ljust(width)}  {v}\n" for k, v in rows))
    return 0
