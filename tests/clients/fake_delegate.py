"""A stand-in delegate module for the CLI tests: `serve --answer N` exits with N."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--answer", type=int, required=True)


def run(args: argparse.Namespace) -> int:
    return args.answer


def run_needing_torch(args: argparse.Namespace) -> int:
    """Like the real `serve` in a client-only install: the heavy import happens at run time."""
    import surely_not_installed_torch  # noqa: F401

    return 0
