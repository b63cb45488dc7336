"""Subcommands whose code lives outside the SDK (`serve`, `train`, `bench`), imported only when used.

Each delegate module provides `add_<name>_arguments(parser)` and `run_<name>(args) -> int`. They need
the `[server]` extra (torch, transformers, ...); in a client-only install the subcommand says so and
exits with EXIT_MISSING_COMPONENT instead of failing with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Delegate:
    """Where a delegated subcommand's code is."""

    command: str
    module: str
    add_arguments: str
    run: str
    help: str


DELEGATES: dict[str, Delegate] = {
    d.command: d
    for d in (
        Delegate(
            "serve",
            "adapterserve.server.api.app",
            "add_serve_arguments",
            "run_serve",
            "run the server: gRPC and the OpenAI-compatible HTTP API (base model + adapters)",
        ),
        Delegate(
            "train",
            "adapterserve.training.cli",
            "add_train_arguments",
            "run_train",
            "train an adapter (LoRA, QLoRA, DoRA, AdaLoRA, IA3, bottleneck, prompt/P-/prefix tuning) or full SFT",
        ),
        Delegate(
            "bench",
            "adapterserve.bench.cli",
            "add_bench_arguments",
            "run_bench",
            "benchmark the engine against its baselines",
        ),
    )
}

Runner = Callable[[argparse.Namespace], int]


class MissingComponent(Exception):
    """A delegated subcommand whose code (or its dependencies) is not installed."""

    def __init__(self, delegate: Delegate, reason: str) -> None:
        super().__init__(
            f"'adapterserve {delegate.command}' is not available here ({reason}); "
            "it needs the server components: pip install 'adapterserve[server]'"
        )
        self.delegate = delegate


def load(delegate: Delegate) -> tuple[Callable[[argparse.ArgumentParser], None], Runner]:
    """(add_arguments, run) of a delegate; MissingComponent if its module or functions are missing."""
    try:
        module = importlib.import_module(delegate.module)
    except ImportError as err:
        missing = getattr(err, "name", None) or ""
        if missing and delegate.module.startswith(missing + ".") or missing == delegate.module:
            reason = f"this installation has no {missing}"
        else:
            reason = str(err) or type(err).__name__
        raise MissingComponent(delegate, reason) from None
    add = getattr(module, delegate.add_arguments, None)
    run = getattr(module, delegate.run, None)
    if not callable(add) or not callable(run):
        raise MissingComponent(delegate, f"{delegate.module} lacks {delegate.add_arguments}/{delegate.run}")
    return add, run
