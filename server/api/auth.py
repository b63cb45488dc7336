"""Bearer-token auth: who may call what, for both transports.

Admin calls need the admin token (`authorization: Bearer <token>`); generation calls need the
generation token when one is configured. Tokens are compared in constant time. Health checks and
reflection are always open. gRPC applies `decide` in its gate interceptor (grpc/gate.py, which also
refuses calls while starting or draining); HTTP applies it to the `Authorization` header
(http/service.bearer_refusal).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

import grpc

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
