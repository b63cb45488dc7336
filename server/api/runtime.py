"""What the servicers use once the model is loaded, behind a reference that is empty while starting.

The gRPC server listens (health NOT_SERVING) before the base model is loaded, so the servicers are
registered first and read their engine, tokenizer and catalog from a `RuntimeRef` that `app.py` fills
in when the model is warm. A call that reaches a servicer before that gets UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from adapterserve.server.api.contracts import AdapterCatalog, GenerationEngine
from adapterserve.server.api.metrics import RuntimeSnapshot
from adapterserve.server.errors import UnavailableError
from adapterserve.server.settings import ServerSettings
from adapterserve.v1 import generation_pb2


@dataclass(frozen=True)
class Runtime:
    """The loaded parts the servicers call."""

    engine: GenerationEngine
    tokenizer: Any  # transformers tokenizer of the base model
    catalog: AdapterCatalog
    server_info: generation_pb2.ServerInfo


class RuntimeRef:
    """Holds the Runtime once it exists."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        self._runtime = runtime

    def set(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def get(self) -> Runtime:
        """The runtime; UNAVAILABLE while the server is still starting."""
        if self._runtime is None:
            raise UnavailableError("server is starting (loading the model); retry shortly")
        return self._runtime


@dataclass(frozen=True)
class StartedRuntime:
    """A loaded, warmed runtime plus what the app needs to observe and stop it."""

    runtime: Runtime
    snapshot: Callable[[], RuntimeSnapshot]  # engine and cache state for the metrics endpoint
    stop: Callable[[], Awaitable[None]]  # stops the engine (after the drain)


# Loads the base, opens the store, starts and warms the engine (the app's default is wiring.start_runtime).
RuntimeFactory = Callable[[ServerSettings], Awaitable[StartedRuntime]]
