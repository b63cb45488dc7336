"""The one place where exceptions become gRPC status codes (what they mean: ../errors.py).

`ServeError` subclasses carry their code name (`grpc_code`) and a message meant for the client. A
device out-of-memory error fails only the request that hit it (RESOURCE_EXHAUSTED). Anything else is a
bug: the client gets INTERNAL with an opaque reference and the details go to the server log.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from adapterserve.server.api.errors import OOM_MESSAGE, is_out_of_memory
from adapterserve.server.errors import ServeError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the client-facing message for an exception (no logging)."""
    if isinstance(exc, ServeError):
        code = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
        return code, str(exc) or type(exc).__name__
    if is_out_of_memory(exc):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, OOM_MESSAGE
    return grpc.StatusCode.INTERNAL, "internal server error"


def to_status(
    exc: BaseException, method: str, answers: frozenset[str] = frozenset()
) -> tuple[grpc.StatusCode, str]:
    """Like `status_of`, and logs: bugs with their traceback and a reference the client also gets; a
    code in `answers` (an expected answer of `method`, not a failure) at DEBUG, other client errors at
    INFO."""
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL and not isinstance(exc, ServeError):
        ref = uuid.uuid4().hex[:12]
        log.error("internal error in %s (ref %s)", method, ref, exc_info=exc)
        return code, f"{message} (ref {ref})"
    if is_out_of_memory(exc):
        log.warning("out of memory in %s; the request failed, the server keeps serving", method)
    elif code.name in answers:
        log.debug("%s answered %s: %s", method, code.name, message)
    else:
        log.info("%s failed: %s %s", method, code.name, message)
    return code, message


async def abort_for(
    context: grpc.aio.ServicerContext, exc: BaseException, method: str, answers: frozenset[str] = frozenset()
) -> None:
    """Abort the call with the status that `exc` maps to (raises grpc's AbortError)."""
    code, message = to_status(exc, method, answers)
    await context.abort(code, message)


def map_errors(fn: F | None = None, *, answers: frozenset[str] = frozenset()) -> Any:
    """Decorate a grpc.aio servicer method (coroutine or async generator) so that exceptions map to statuses.

    Aborts raised by `context.abort` and cancellation pass through untouched. `answers`: status code
    names that are an expected answer of the method rather than a failure, logged at DEBUG (GetAdapter's
    NOT_FOUND: the SDK asks it whether a name is free before every upload). Use as `@map_errors` or
    `@map_errors(answers=frozenset({"NOT_FOUND"}))`.
    """
    if fn is None:
        return functools.partial(map_errors, answers=answers)
    method = fn.__qualname__

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(
            self: Any, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                async for item in fn(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort_for(context, exc, method, answers)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_for(context, exc, method, answers)

    return unary_wrapper  # type: ignore[return-value]
