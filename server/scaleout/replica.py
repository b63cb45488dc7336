"""One engine replica of the Ray Serve scale-out: the base model once, its own continuous batcher, and
the same OpenAIService as `adapterserve serve`'s HTTP API.

Adapter affinity: `adapter(name)` is wrapped in `serve.multiplexed`, so Ray Serve knows which adapters
each replica holds and routes a request whose `multiplexed_model_id` is an adapter's name to a replica
that already has it (when that replica has room). No `@serve.batch` anywhere: requests of many adapters
reach the replica concurrently (up to `max_ongoing_requests`) and the engine mixes them in one batch.

Adapters come from the store directory that every replica shares; one that was written after this
replica started is found on first use (`AdapterStore.refresh`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from adapterserve.server.api.http.errors import OpenAIError, to_openai_error
from adapterserve.server.api.http.service import CHAT, OpenAIService
from adapterserve.server.api.lifecycle import Lifecycle, Phase
from adapterserve.server.api.metrics import ServerMetrics
from adapterserve.server.api.runtime import RuntimeRef
from adapterserve.server.errors import NotFoundError
from adapterserve.server.settings import ServerSettings

log = logging.getLogger("adapterserve.scaleout")

# A reply that crosses from a replica to the router: (HTTP status, JSON body, replica id).
Reply = tuple[int, dict[str, Any], str]


@dataclass(frozen=True)
class LoadedAdapter:
    """What the multiplexed loader returns: the adapter is in this replica's host cache."""

    name: str
    version: int


class ReplicaBase:
    """The replica's state and methods; app.py subclasses it to add the multiplexed loader."""

    async def __init__(self, settings: ServerSettings) -> None:  # type: ignore[misc]  # Ray awaits it
        from adapterserve.server.api.wiring import start_runtime

        self._settings = settings
        self._started = await start_runtime(settings)
        self._catalog: Any = self._started.runtime.catalog  # StoreCatalog: .store and .registry
        self._lifecycle = Lifecycle(settings.limits.max_concurrent_streams)
        self._lifecycle.phase = Phase.SERVING
        self._service = OpenAIService(
            RuntimeRef(self._started.runtime),
            settings.limits,
            ServerMetrics(),
            self._lifecycle,
            settings.served_model_name,
        )
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        log.info("replica %s ready (store %s)", self.replica_id, settings.store)

    async def load(self, model_id: str) -> LoadedAdapter:
        """Load an adapter into this replica's host cache (the device slot fills on first use)."""
        store = self._catalog.store
        if model_id not in store:
            try:  # written by another process sharing the store folder?
                await asyncio.to_thread(store.refresh, model_id)
            except NotFoundError:
                if not self._catalog.registry.sources:
                    raise
                # else: the registry fetches it from the adapter sources on first use
        resolved = await self._catalog.registry.get(model_id)
        return LoadedAdapter(name=resolved.name, version=resolved.version)

    async def adapter(self, model_id: str) -> LoadedAdapter:  # replaced by the multiplexed loader
        return await self.load(model_id)

    async def _route_check(self) -> None:
        """Resolve the request's adapter through the multiplexed loader (records the affinity)."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            try:
                await self.adapter(model_id)
            except NotFoundError as exc:
                raise OpenAIError.model_not_found(model_id, detail=str(exc)) from None

    def served_name(self) -> str:
        return self._service.served_name()

    async def models(self) -> dict[str, Any]:
        return await self._service.models()

    async def complete(self, endpoint: str, body: Any) -> Reply:
        """A unary completion or chat completion: (status, body, replica id); errors as OpenAI's shape."""
        try:
            await self._route_check()
            if endpoint == CHAT:
                return 200, await self._service.chat(body), self.replica_id
            return 200, await self._service.complete(body), self.replica_id
        except Exception as exc:
            err = to_openai_error(exc, endpoint)
            return err.status, err.body(), self.replica_id

    async def stream(self, endpoint: str, body: Any) -> AsyncIterator[Reply | str]:
        """First a Reply (200 to go on, or the refusal), then the SSE frames."""
        try:
            await self._route_check()
            frames = await self._service.stream(endpoint, body)
        except Exception as exc:
            err = to_openai_error(exc, endpoint)
            yield err.status, err.body(), self.replica_id
            return
        yield 200, {}, self.replica_id
        async for frame in frames:
            yield frame
