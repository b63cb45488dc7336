"""The grpc.aio server interceptor in front of every API call: refuses calls while the server is starting
or draining (UNAVAILABLE), without the right bearer token (auth.decide), or with undecodable bytes
(decoding.py), and counts each refusal in the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from adapterserve.server.api.auth import ADMIN_PREFIX, GENERATION_PREFIX, AuthPolicy, decide
from adapterserve.server.api.grpc.decoding import refuse_undecodable
from adapterserve.server.api.lifecycle import Lifecycle

log = logging.getLogger(__name__)


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts every call with (code, message)."""

    async def abort_unary(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort_unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_unary, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort_unary, **kwargs)


class GateInterceptor(grpc.aio.ServerInterceptor):
    """Refuses API calls while starting/draining (UNAVAILABLE) and without the right token."""

    def __init__(
        self,
        policy: AuthPolicy,
        lifecycle: Lifecycle,
        on_refused: Callable[[str, grpc.StatusCode], None] | None = None,
    ) -> None:
        self._policy = policy
        self._lifecycle = lifecycle
        self._on_refused = on_refused  # (full method name, code): counted in metrics

    def _refuse(self, handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, message: str):
        if self._on_refused is not None:
            self._on_refused(method, code)
        return _deny(handler, code, message)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith((ADMIN_PREFIX, GENERATION_PREFIX)):
            return handler
        reason = self._lifecycle.refusal()
        if reason is not None:
            return self._refuse(handler, method, grpc.StatusCode.UNAVAILABLE, reason)
        refusal = decide(self._policy, method, handler_call_details.invocation_metadata)
        if refusal is not None:
            log.info("refused %s: %s", method, refusal[0].name)
            return self._refuse(handler, method, *refusal)
        return refuse_undecodable(handler)
