"""Bearer-token auth and the starting/draining gate, as one grpc.aio server interceptor.

Admin calls need the admin token (`authorization: Bearer <token>`); generation calls need the
generation token when one is configured. Tokens are compared in constant time. Health checks and
reflection are always open. While the server is starting or draining, API calls get UNAVAILABLE.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from adapterserve.server.api.decoding import refuse_undecodable
from adapterserve.server.api.lifecycle import Lifecycle

log = logging.getLogger(__name__)

ADMIN_PREFIX = "/adapterserve.v1.Admin/"
GENERATION_PREFIX = "/adapterserve.v1.Generation/"


@dataclass(frozen=True)
class AuthPolicy:
    """Who may call what. `admin_token=None` refuses admin calls unless `insecure_admin`."""

    admin_token: str | None
    generate_token: str | None = None
    insecure_admin: bool = False


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry; "" if malformed, None if absent."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return ""
        return token.strip()
    return None


def check_token(presented: str | None, expected: str, what: str) -> tuple[grpc.StatusCode, str] | None:
    """None when `presented` matches `expected`, else (code, message). Constant-time comparison."""
    if presented is None:
        return grpc.StatusCode.UNAUTHENTICATED, f"{what} calls need metadata 'authorization: Bearer <token>'"
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        return grpc.StatusCode.PERMISSION_DENIED, f"wrong {what} token"
    return None


def decide(policy: AuthPolicy, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
    """The refusal (code, message) for a call to `method` with `metadata`, or None to let it through."""
    if method.startswith(ADMIN_PREFIX):
        if policy.admin_token:
            return check_token(bearer_token(metadata), policy.admin_token, "admin")
        if policy.insecure_admin:
            return None
        return (
            grpc.StatusCode.PERMISSION_DENIED,
            "admin calls are disabled: set ADAPTERSERVE_ADMIN_TOKEN on the server (or start it with --insecure-admin)",
        )
    if method.startswith(GENERATION_PREFIX) and policy.generate_token:
        return check_token(bearer_token(metadata), policy.generate_token, "generation")
    return None


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
