"""The HTTP ingress of the scale-out: the same OpenAI-compatible endpoints as `adapterserve serve`,
forwarded to engine replicas with adapter affinity.

The router reads `model` from the body: an adapter name becomes the request's
`multiplexed_model_id`, so Ray Serve sends it to a replica that already holds that adapter; the base
model's name goes to any replica (no affinity: every replica has the base). Auth is checked here, with
the same bearer token as gRPC. A replica that dies under a request turns into a 503 (the `openai`
client retries it); a stream that loses its replica ends with an error frame, never silently.
"""

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle

from adapterserve.server.api.auth import AuthPolicy
from adapterserve.server.api.http.app import SSE_HEADERS, error_response, read_json
from adapterserve.server.api.http.errors import OpenAIError
from adapterserve.server.api.http.service import CHAT, COMPLETIONS, bearer_refusal, sse
from adapterserve.server.store.names import is_valid_name

log = logging.getLogger("adapterserve.scaleout")

REPLICA_HEADER = "x-adapterserve-replica"
app = FastAPI(title="adapterserve (Ray Serve)")


def replica_lost(exc: BaseException) -> OpenAIError:
    log.warning("engine replica failed under a request: %s", exc)
    return OpenAIError.of_code("UNAVAILABLE", "the engine replica serving this request failed; retry")


@app.exception_handler(OpenAIError)
async def _openai_error(_request: Request, err: OpenAIError) -> JSONResponse:
    return error_response(err)


@serve.ingress(app)
class Router:
    def __init__(self, engine: DeploymentHandle, generate_token: str | None = None) -> None:
        self._engine = engine
        self._policy = AuthPolicy(admin_token=None, generate_token=generate_token)
        self._served: str | None = None

    def _authorize(self, request: Request) -> None:
        refusal = bearer_refusal(self._policy, request.headers.get("authorization"))
        if refusal is not None:
            raise refusal

    async def _served_name(self) -> str:
        if self._served is None:
            self._served = await self._engine.served_name.remote()
        return self._served

    async def _handle_for(self, body: Any) -> DeploymentHandle:
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            raise OpenAIError(
                400, "model: field required (an adapter name or the base model's name)", param="model"
            )
        if model == await self._served_name():
            return self._engine  # the base: any replica
        if not is_valid_name(model):
            raise OpenAIError.model_not_found(model)
        return self._engine.options(multiplexed_model_id=model)

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "serving"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        try:
            return JSONResponse(await self._engine.models.remote())
        except RayError as exc:
            raise replica_lost(exc) from None

    async def _generate(self, request: Request, endpoint: str) -> Any:
        self._authorize(request)
        body = await read_json(request)
        handle = await self._handle_for(body)
        if isinstance(body, dict) and body.get("stream") is True:
            return await self._stream(handle, endpoint, body)
        try:
            status, payload, replica = await handle.complete.remote(endpoint, body)
        except RayError as exc:
            raise replica_lost(exc) from None
        return JSONResponse(payload, status_code=status, headers={REPLICA_HEADER: replica})

    async def _stream(self, handle: DeploymentHandle, endpoint: str, body: Any) -> Any:
        frames = handle.options(stream=True).stream.remote(endpoint, body)
        try:
            status, payload, replica = await frames.__anext__()
        except RayError as exc:
            raise replica_lost(exc) from None
        if status != 200:
            return JSONResponse(payload, status_code=status, headers={REPLICA_HEADER: replica})

        async def relay() -> AsyncIterator[str]:
            try:
                async for frame in frames:
                    yield frame
            except RayError as exc:
                yield sse(replica_lost(exc).body())

        return StreamingResponse(
            relay(), media_type="text/event-stream", headers={**SSE_HEADERS, REPLICA_HEADER: replica}
        )

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._generate(request, COMPLETIONS)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._generate(request, CHAT)
