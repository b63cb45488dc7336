"""The `adapterserve` command line.

    adapterserve serve --base-model DIR            run the server (needs the [server] extra)
    adapterserve generate "Hello" --adapter X      generate (--stream, --chat, sampling flags, --json)
    adapterserve upload DIR --name X               upload a PEFT adapter directory
    adapterserve adapters list|show|delete|pin|unpin|refresh
    adapterserve health | info                     server status and limits
    adapterserve train ... | bench ...             training and benchmark (need the [server] extra)

Connection flags (--target, --admin-token, --token, --timeout) default to ADAPTERSERVE_TARGET,
ADAPTERSERVE_ADMIN_TOKEN and ADAPTERSERVE_TOKEN. Errors print one line, `adapterserve CMD: error
(CODE): message`, and exit with a code a script can act on (see EXIT_CODES and docs/cli.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from adapterserve import cli_commands, cli_delegates
from adapterserve.errors import AdapterServeError

EXIT_OK = 0
EXIT_ERROR = 1  # any other failure (INTERNAL, UNKNOWN, ...): see the message and the server log
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_UNAVAILABLE = 3  # server unreachable, starting or draining: retry later
EXIT_AUTH = 4  # UNAUTHENTICATED / PERMISSION_DENIED: check the token
EXIT_NOT_FOUND = 5  # no such adapter
EXIT_INVALID = 6  # INVALID_ARGUMENT / FAILED_PRECONDITION / OUT_OF_RANGE: the request or adapter was refused
EXIT_EXISTS = 7  # ALREADY_EXISTS: pass --overwrite
EXIT_EXHAUSTED = 8  # RESOURCE_EXHAUSTED: server busy or a size limit passed
EXIT_DEADLINE = 9  # DEADLINE_EXCEEDED: raise --timeout
EXIT_MISSING_COMPONENT = 10  # serve/train/bench without the [server] extra
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_CODES: dict[str, int] = {
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "UNAUTHENTICATED": EXIT_AUTH,
    "PERMISSION_DENIED": EXIT_AUTH,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "INVALID_ARGUMENT": EXIT_INVALID,
    "FAILED_PRECONDITION": EXIT_INVALID,
    "OUT_OF_RANGE": EXIT_INVALID,
    "ALREADY_EXISTS": EXIT_EXISTS,
    "RESOURCE_EXHAUSTED": EXIT_EXHAUSTED,
    "DEADLINE_EXCEEDED": EXIT_DEADLINE,
}

# A short hint appended to the error line, per status code.
_HINTS: dict[str, str] = {
    "UNAVAILABLE": "is the server running and serving? (adapterserve health --wait 30)",
    "ALREADY_EXISTS": "pass --overwrite to replace it",
    "DEADLINE_EXCEEDED": "raise --timeout",
}
# Commands whose calls are admin calls (the admin token); the others send the generation token.
_ADMIN_COMMANDS = frozenset({"upload", "adapters"})


def hint_for(command: str | None, err: AdapterServeError) -> str | None:
    """The hint for `err` from `command`: the one token flag and variable that command uses, and
    nothing the server's message already says."""
    if err.code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        flag, env = (
            ("--admin-token", "ADAPTERSERVE_ADMIN_TOKEN")
            if command in _ADMIN_COMMANDS
            else ("--token", "ADAPTERSERVE_TOKEN")
        )
        if err.code == "UNAUTHENTICATED":
            return f"pass {flag} or set {env}"
        return f"check {flag} (or {env}) against the server's token"
    hint = _HINTS.get(err.code)
    if hint is not None and err.code == "ALREADY_EXISTS" and "overwrite" in err.message:
        return None  # the message already says how
    return hint


Handler = Callable[[argparse.Namespace, TextIO, TextIO], int]


def exit_code_for(err: AdapterServeError) -> int:
    return EXIT_CODES.get(err.code, EXIT_ERROR)


def _connection_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    cli_commands.add_connection_arguments(parent)
    return parent


def _add_delegate(
    sub: argparse._SubParsersAction,
    delegate: cli_delegates.Delegate,
    loaded: tuple[Callable[[argparse.ArgumentParser], None], cli_delegates.Runner] | None,
) -> None:
    """Register serve/train/bench; with `loaded` (the command being run) its flags are added too."""
    if loaded is None:
        sub.add_parser(delegate.command, help=delegate.help, add_help=False)
        return
    add_arguments, run = loaded
    p = sub.add_parser(delegate.command, help=delegate.help, description=delegate.help)
    add_arguments(p)
    p.set_defaults(delegate_run=run)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser. `command` is the subcommand about to run: only that delegate is imported.

    Raises cli_delegates.MissingComponent when `command` is a delegate that is not installed.
    """
    loaded = (
        cli_delegates.load(cli_delegates.DELEGATES[command]) if command in cli_delegates.DELEGATES else None
    )
    from adapterserve import __version__

    parser = argparse.ArgumentParser(
        prog="adapterserve",
        description="One base model, many PEFT adapters, one batch: server, client and tools.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 unavailable, 4 auth, 5 not found, 6 invalid/refused, "
        "7 already exists, 8 resource exhausted, 9 deadline, 10 component not installed, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"adapterserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parent = _connection_parent()

    _add_delegate(sub, cli_delegates.DELEGATES["serve"], loaded if command == "serve" else None)
    gen = sub.add_parser(
        "generate", parents=[parent], help="generate text (prompt or chat, optional adapter)"
    )
    cli_commands.add_generate_arguments(gen)
    gen.set_defaults(handler=cli_commands.cmd_generate)
    up = sub.add_parser("upload", parents=[parent], help="upload a PEFT adapter directory")
    cli_commands.add_upload_arguments(up)
    up.set_defaults(handler=cli_commands.cmd_upload)
    ad = sub.add_parser("adapters", help="list, show, delete, pin, unpin, refresh adapters")
    cli_commands.add_adapters_arguments(ad, parent)
    ad.set_defaults(handler=cli_commands.cmd_adapters)
    he = sub.add_parser("health", parents=[parent], help="the server's health (exit 0 when SERVING)")
    cli_commands.add_health_arguments(he)
    he.set_defaults(handler=cli_commands.cmd_health)
    info = sub.add_parser("info", parents=[parent], help="the served base model and the server's limits")
    cli_commands.add_info_arguments(info)
    info.set_defaults(handler=cli_commands.cmd_info)
    _add_delegate(sub, cli_delegates.DELEGATES["train"], loaded if command == "train" else None)
    _add_delegate(sub, cli_delegates.DELEGATES["bench"], loaded if command == "bench" else None)
    return parser


def _run_delegate(command: str, args: argparse.Namespace, err: TextIO) -> int:
    """Run serve/train/bench; a dependency missing at run time (e.g. torch) is one line and exit 10."""
    try:
        return int(args.delegate_run(args))
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.split(".")[0] == "adapterserve":
            raise  # our own module missing is a bug, not an optional component
        missing = cli_delegates.MissingComponent(
            cli_delegates.DELEGATES[command], f"missing module {exc.name!r}"
        )
        err.write(f"adapterserve {command}: error: {missing}\n")
        return EXIT_MISSING_COMPONENT


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    err = err or sys.stderr
    command = _command_of(argv)
    try:
        args = build_parser(command).parse_args(argv)
    except cli_delegates.MissingComponent as missing:
        err.write(f"adapterserve {command}: error: {missing}\n")
        return EXIT_MISSING_COMPONENT
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if getattr(args, "delegate_run", None) is not None:
            return _run_delegate(command or "", args, err)
        return args.handler(args, out, err)
    except AdapterServeError as exc:
        hint = hint_for(args.command, exc)
        line = f"adapterserve {args.command}: error ({exc.code}): {exc.message}"
        err.write(line + (f" [{hint}]" if hint else "") + "\n")
        return exit_code_for(exc)
    except KeyboardInterrupt:
        err.write(f"adapterserve {args.command}: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `adapterserve adapters list | head -1`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
