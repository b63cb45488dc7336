"""The client's exception hierarchy, mapped one-to-one from gRPC status codes.

Every error the SDK raises is an `AdapterServeError`. A failed RPC becomes the subclass that matches
its status code and carries the server's message (`err.message`) and the code (`err.code`, the name
of a `grpc.StatusCode` member such as "NOT_FOUND"). Errors found before anything is sent (an adapter
directory holding pickle files, a prompt and chat messages both given) are `InvalidArgument` or
`AdapterRefused` with `code` set to "INVALID_ARGUMENT" too, so a caller handles both the same way.

This module does not import grpc, so it is cheap to import anywhere.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AdapterServeError(Exception):
    """Base of every SDK error.

    Attributes:
        message: the server's message (or the local reason), without the status code prefix.
        code: the gRPC status code name, e.g. "UNAVAILABLE"; "UNKNOWN" when there is none.
        details: the raw `grpc.RpcError` (or None for errors raised locally).
    """

    status_code: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.status_code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class Cancelled(AdapterServeError):
    """The call was cancelled (by this client or by the server)."""

    status_code = "CANCELLED"


class UnknownError(AdapterServeError):
    """The server answered with an unknown status."""

    status_code = "UNKNOWN"


class InvalidArgument(AdapterServeError):
    """A request field is wrong; the message names the field."""

    status_code = "INVALID_ARGUMENT"


class AdapterRefused(InvalidArgument):
    """An adapter directory was refused before upload (pickle files, missing config, ...)."""


class DeadlineExceeded(AdapterServeError):
    """The call's deadline (the client's `timeout`) passed before the server answered."""

    status_code = "DEADLINE_EXCEEDED"


class NotFound(AdapterServeError):
    """An unknown adapter name."""

    status_code = "NOT_FOUND"


class AlreadyExists(AdapterServeError):
    """An adapter name is taken and overwrite was not asked for."""

    status_code = "ALREADY_EXISTS"


class PermissionDenied(AdapterServeError):
    """A token was sent but it is wrong (or admin is disabled on the server)."""

    status_code = "PERMISSION_DENIED"


class ResourceExhausted(AdapterServeError):
    """The server's queue is full, a size limit was passed, or device memory ran out for this call."""

    status_code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(AdapterServeError):
    """The call is valid but the server's state does not allow it (e.g. adapter for another base)."""

    status_code = "FAILED_PRECONDITION"


class Aborted(AdapterServeError):
    """The server aborted the call (a concurrent change)."""

    status_code = "ABORTED"


class OutOfRange(AdapterServeError):
    """A value was past the server's valid range."""

    status_code = "OUT_OF_RANGE"


class Unimplemented(AdapterServeError):
    """The server does not implement this RPC (version mismatch)."""

    status_code = "UNIMPLEMENTED"


class Internal(AdapterServeError):
    """A server bug; the details are in the server's log, not in the reply."""

    status_code = "INTERNAL"


class Unavailable(AdapterServeError):
    """The server cannot be reached, is still starting, or is draining."""

    status_code = "UNAVAILABLE"


class DataLoss(AdapterServeError):
    """Unrecoverable data loss or corruption."""

    status_code = "DATA_LOSS"


class Unauthenticated(AdapterServeError):
    """No token was sent where one is required."""

    status_code = "UNAUTHENTICATED"


_BY_CODE: dict[str, type[AdapterServeError]] = {
    cls.status_code: cls
    for cls in (
        Cancelled,
        UnknownError,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_class_for(code_name: str) -> type[AdapterServeError]:
    """The exception class for a status code name ("NOT_FOUND" -> NotFound); unknown -> UnknownError."""
    return _BY_CODE.get(code_name, UnknownError)


def from_rpc_error(err: Any) -> AdapterServeError:
    """Translate a `grpc.RpcError` (sync or `grpc.aio.AioRpcError`) into the matching SDK error.

    Duck-typed on `.code()` and `.details()` so this module needs no grpc import.
    """
    try:
        code = err.code()
        code_name = getattr(code, "name", str(code))
    except Exception:  # an RpcError without a status (should not happen)
        code_name = "UNKNOWN"
    try:
        message = err.details() or ""
    except Exception:
        message = str(err)
    cls = error_class_for(code_name)
    return cls(message, code=code_name, details=err)
