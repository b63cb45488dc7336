"""The FastAPI app of the OpenAI-compatible API: routes, bearer auth, errors in OpenAI's shape, SSE.

    GET  /v1/models              the base model and every adapter (parent/root, adapter_kind)
    POST /v1/completions         `stream: true` answers with server-sent events
    POST /v1/chat/completions    likewise
    GET  /health                 200 while serving, 503 while starting or draining
    POST /v1/adapters/{name}/weights   in-place weight update (admin token; body: safetensors)

The routes only move bytes; OpenAIService (service.py) does the protocol.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterserve.server.api.auth import ADMIN_PREFIX, AuthPolicy
from adapterserve.server.api.http.admin import AdminHttp, admin_refusal
from adapterserve.server.api.http.errors import OpenAIError
from adapterserve.server.api.http.service import CHAT, COMPLETIONS, PROTOCOL, OpenAIService, bearer_refusal
from adapterserve.server.api.lifecycle import Lifecycle
from adapterserve.server.api.metrics import OTHER_LABEL, ServerMetrics

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # the status logged for a call whose client disconnected (nginx's)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def read_json(request: Request) -> Any:
    """The request body as JSON; a clear 400 when it is not."""
    raw = await request.body()
    try:
        # Strict UTF-8 (RFC 8259); json.loads on bytes would guess the encoding and let invalid bytes through.
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Run a unary call's work; None if the client disconnects first: the work is cancelled then (its
    engine rows are freed at once, as a stream's are when its client goes away)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client went away (or this handler itself was cancelled)
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        return None
    return task.result()


def build_http_app(
    service: OpenAIService,
    policy: AuthPolicy,
    metrics: ServerMetrics,
    lifecycle: Lifecycle,
    admin: AdminHttp | None = None,
) -> FastAPI:
    """The ASGI app for `adapterserve serve --http-port`."""
    app = FastAPI(
        title="adapterserve",
        description="OpenAI-compatible API: `model` is an adapter name or the base model's served name.",
        openapi_url="/openapi.json",
    )

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request: Request, err: OpenAIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(OpenAIError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(OpenAIError(400, str(exc)))

    def authorize(request: Request, method: str) -> None:
        refusal = bearer_refusal(policy, request.headers.get("authorization"))
        if refusal is not None:
            metrics.record_request(method, OTHER_LABEL, refusal.grpc_code, protocol=PROTOCOL)
            raise refusal

    @app.get("/health")
    async def health() -> JSONResponse:
        reason = lifecycle.refusal()
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "serving"})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request, "models")
        return JSONResponse(await service.models())

    async def generate(request: Request, endpoint: str) -> Any:
        authorize(request, endpoint)
        body = await read_json(request)
        if service.is_streaming(body):
            frames = await service.stream(endpoint, body)
            return StreamingResponse(frames, media_type="text/event-stream", headers=SSE_HEADERS)
        work = service.chat(body) if endpoint == CHAT else service.complete(body)
        reply = await until_disconnected(request, work)
        if reply is None:  # nobody reads this: the client is gone
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(reply)

    @app.post("/v1/adapters/{name}/refresh")
    async def refresh_adapter(request: Request, name: str) -> JSONResponse:
        refusal = bearer_refusal(
            policy, request.headers.get("authorization"), ADMIN_PREFIX + "RefreshAdapter"
        )
        if refusal is not None:
            metrics.record_request("refresh", OTHER_LABEL, refusal.grpc_code, protocol=PROTOCOL)
            raise refusal
        return JSONResponse(await service.refresh(name))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, COMPLETIONS)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, CHAT)

    if admin is not None:

        @app.post("/v1/adapters/{name}/weights")
        async def update_weights(request: Request, name: str, persist: bool = False) -> JSONResponse:
            refusal = admin_refusal(policy, request.headers.get("authorization"))
            if refusal is not None:
                raise refusal
            admin.check_length(request.headers.get("content-length"))  # before reading the body
            return JSONResponse(await admin.update_weights(name, await request.body(), persist=persist))

    return app
