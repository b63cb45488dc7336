"""What `Client` and `AsyncClient` share apart from their I/O.

`ClientBase` makes the connection, the channel (blocking `grpc` or `grpc.aio`, the subclass's
`_grpc`) and the stubs, and routes a `convert.Call` to its stub method and token. What each call
sends and how its reply reads is built by convert.py; the two clients only perform the calls
(blocking, or awaited) and keep their own loops (streaming, upload, polling).

`takes_arguments_of` lets one parameter list serve several methods: `generate` and `stream` of both
clients take `convert.generate_call`'s parameters, so a new sampling parameter is added there only.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

from adapterserve import convert, health
from adapterserve.connection import DEFAULT_TIMEOUT_S, Connection, Tls, resolve_target
from adapterserve.convert import Call
from adapterserve.errors import AdapterServeError, from_rpc_error
from adapterserve.retry import GENERATION_CODES, READ_CODES, Attempts, RetryPolicy
from adapterserve.upload import ProgressCallback, ProgressTracker, UploadFile
from adapterserve.v1 import admin_pb2, admin_pb2_grpc, generation_pb2_grpc

P = ParamSpec("P")
R = TypeVar("R")
Metadata = tuple[tuple[str, str], ...]


def takes_arguments_of(
    spec: Callable[P, Any],
) -> Callable[[Callable[..., R]], Callable[Concatenate[Any, P], R]]:
    """Give a method written `(self, *args, **kwargs)`, which passes its arguments on to `spec`,
    the parameters of `spec` after `self`: for `inspect.signature`, `help()`, `typing.get_type_hints`
    and type checkers. The method keeps its own name, docstring, return type and kind (a coroutine
    function stays one); an argument `spec` does not take raises TypeError when `spec` is called."""
    spec_params = list(inspect.signature(spec).parameters.values())
    spec_hints = {k: v for k, v in typing.get_type_hints(spec).items() if k != "return"}

    def decorate(method: Callable[..., R]) -> Callable[Concatenate[Any, P], R]:
        own = inspect.signature(method)
        kinds = [p.kind for p in own.parameters.values()]
        if kinds != [
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ]:
            raise TypeError(f"{method.__qualname__}: expected (self, *args, **kwargs), got {own}")
        self_param = next(iter(own.parameters.values()))
        returns = typing.get_type_hints(method)["return"]
        method.__signature__ = own.replace(parameters=[self_param, *spec_params])  # type: ignore[attr-defined]
        method.__annotations__ = {**spec_hints, "return": returns}
        return method

    return decorate


class ClientBase:
    """The connection, channel and stubs of a client; subclasses set `_grpc` and perform the calls."""

    _grpc: ClassVar[Any]  # the module whose secure_channel/insecure_channel make the channel

    def __init__(
        self,
        target: str | None = None,
        *,
        admin_token: str | None = None,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        tls: Tls = None,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.connection = Connection(
            target=resolve_target(target),
            admin_token=admin_token,
            token=token,
            timeout=timeout,
            tls=tls,
            retry=retry or RetryPolicy(),
            options=tuple(options),
        )
        creds = self.connection.credentials()
        opts = self.connection.channel_options()
        self._channel = (
            self._grpc.secure_channel(self.connection.target, creds, options=opts)
            if creds is not None
            else self._grpc.insecure_channel(self.connection.target, options=opts)
        )
        self._generation = generation_pb2_grpc.GenerationStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._chunk_limit: int | None = None  # the server's upload_chunk_bytes, asked on first upload
        self._health = self._channel.unary_unary(
            health.CHECK_METHOD,
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )

    @property
    def target(self) -> str:
        return self.connection.target

    def _timeout(self, timeout: float | None) -> float | None:
        return self.connection.timeout if timeout is None else timeout

    def _route(self, call: Call[Any]) -> tuple[Callable[..., Any], Metadata, float | None]:
        """The stub method, the metadata (which token) and the deadline of `call`."""
        stub: Any = self._admin if call.admin else self._generation
        meta = self.connection.admin_metadata() if call.admin else self.connection.generation_metadata()
        return getattr(stub, call.method), meta, self._timeout(call.timeout)

    @staticmethod
    def _stream_retry_wait(attempts: Attempts, rpc_err: Exception, chunks_seen: int) -> float:
        """Seconds to wait before retrying a broken stream; raises its error instead once a chunk has
        arrived, for a code other than UNAVAILABLE and RESOURCE_EXHAUSTED, or when the policy is spent."""
        err = from_rpc_error(rpc_err)
        wait = attempts.next_wait(err, GENERATION_CODES) if chunks_seen == 0 else None
        if wait is None:
            raise err from None
        return wait


class UploadAttempts:
    """The attempts of one `upload_adapter` call: each sends the whole adapter again (a header, then
    every file's chunks), and a failed one is retried on UNAVAILABLE only while no file byte of it
    had left the client (see retry.py)."""

    def __init__(
        self,
        files: list[UploadFile],
        name: str,
        overwrite: bool,
        description: str | None,
        chunk_bytes: int,
        progress: ProgressCallback | None,
        policy: RetryPolicy,
    ) -> None:
        self._header = (name, overwrite, description)
        self._files = files
        self._chunk_bytes = chunk_bytes
        self._progress = progress
        self._total = sum(f.size for f in files)
        self._attempts = Attempts(policy)
        self._tracker = ProgressTracker(self._total, progress)

    def messages(self) -> Iterator[admin_pb2.UploadAdapterRequest]:
        """The messages of a new attempt (its progress starts again from zero)."""
        self._tracker = ProgressTracker(self._total, self._progress)
        name, overwrite, description = self._header
        return convert.upload_messages(
            self._files, name, overwrite, description, self._chunk_bytes, self._tracker
        )

    def retry_wait(self, err: AdapterServeError) -> float | None:
        """Seconds to wait before the next attempt after `err`, or None when `err` must be raised."""
        if self._tracker.sent_bytes:
            return None
        return self._attempts.next_wait(err, READ_CODES)
