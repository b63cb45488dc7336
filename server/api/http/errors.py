"""OpenAI's error shape and the mapping from the server's exceptions to HTTP statuses.

Every refusal is `{"error": {"message", "type", "param", "code"}}` with the status OpenAI's clients
expect (the `openai` package turns 400/401/403/404/429 into BadRequestError, AuthenticationError,
PermissionDeniedError, NotFoundError and RateLimitError). The gRPC status code names of
`adapterserve.server.errors` stay the one source: this module only translates them.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from adapterserve.server.api.errors import is_out_of_memory
from adapterserve.server.errors import ServeError

log = logging.getLogger(__name__)

# gRPC status code name -> (HTTP status, OpenAI error type)
_BY_CODE: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled"),
    "UNAVAILABLE": (503, "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout"),
    "INTERNAL": (500, "internal_error"),
}


@dataclass
class OpenAIError(Exception):
    """A refusal in OpenAI's shape. `grpc_code` is the matching gRPC status name (for metrics)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    grpc_code: str = "INVALID_ARGUMENT"

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def of_code(cls, grpc_code: str, message: str, *, code: str | None = None, param: str | None = None):
        status, kind = _BY_CODE.get(grpc_code, (500, "internal_error"))
        return cls(status, message, kind, code=code, param=param, grpc_code=grpc_code)

    @classmethod
    def model_not_found(cls, model: str, detail: str = "") -> OpenAIError:
        """404 for an unknown model; `detail` (e.g. the adapter sources tried) is appended when given."""
        return cls.of_code(
            "NOT_FOUND",
            f"The model {model!r} does not exist: it is neither the base model's served name nor a "
            "stored adapter (GET /v1/models lists them)" + (f"; {detail}" if detail else ""),
            code="model_not_found",
            param="model",
        )


def to_openai_error(exc: BaseException, where: str) -> OpenAIError:
    """The OpenAIError for any exception; bugs are logged with a reference the client also gets."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ServeError):
        message = str(exc) or type(exc).__name__
        param = "response_format" if message.startswith("response_format") else None
        return OpenAIError.of_code(exc.grpc_code, message, param=param)
    if is_out_of_memory(exc):
        log.warning("out of memory in %s; the request failed, the server keeps serving", where)
        return OpenAIError.of_code(
            "RESOURCE_EXHAUSTED", "device out of memory while serving this request; retry later"
        )
    ref = uuid.uuid4().hex[:12]
    log.error("internal error in %s (ref %s)", where, ref, exc_info=exc)
    return OpenAIError.of_code("INTERNAL", f"internal server error (ref {ref})")
