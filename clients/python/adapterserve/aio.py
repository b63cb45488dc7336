"""`AsyncClient`: the asyncio Python SDK (grpc.aio), mirroring `Client` method for method.

    from adapterserve import AsyncClient

    async with AsyncClient("127.0.0.1:50051") as client:
        async for chunk in client.stream("Once upon a time", max_new_tokens=32):
            print(chunk.text, end="", flush=True)

Create it inside a running event loop (a grpc.aio channel belongs to the loop it was made in).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from adapterserve import convert, health
from adapterserve.connection import DEFAULT_TIMEOUT_S, Connection, Tls, resolve_target
from adapterserve.errors import (
    AdapterServeError,
    NotFound,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)
from adapterserve.models import (
    AdapterInfo,
    GenerateResult,
    HealthStatus,
    ScoreResult,
    ServerInfo,
    StreamChunk,
    UploadResult,
)
from adapterserve.names import check_adapter_name, name_taken
from adapterserve.retry import GENERATION_CODES, READ_CODES, Attempts, RetryPolicy, acall_with_retry
from adapterserve.upload import ProgressCallback, ProgressTracker, choose_chunk_bytes, collect_adapter_files
from adapterserve.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

T = TypeVar("T")
_NO_CODES: frozenset[str] = frozenset()


async def _rpc(fn: Callable[[], Awaitable[T]]) -> T:
    """Await one gRPC call, turning grpc.RpcError into the matching AdapterServeError."""
    try:
        return await fn()
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


class AsyncClient:
    """An asyncio client; same arguments and methods as `Client`, each one a coroutine.

    `stream()` returns an async iterator (`async for chunk in client.stream(...)`).
    Use `async with AsyncClient(...) as client:` or `await client.close()`.
    """

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
            grpc.aio.secure_channel(self.connection.target, creds, options=opts)
            if creds is not None
            else grpc.aio.insecure_channel(self.connection.target, options=opts)
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

    # -- lifecycle -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.connection.timeout if timeout is None else timeout

    # -- generation ------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | Sequence[convert.MessageLike] | None = None,
        *,
        messages: Sequence[convert.MessageLike] | None = None,
        adapter: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        ignore_eos: bool = False,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        min_tokens: int = 0,
        logprobs: int | None = None,
        n: int = 1,
        prompt_logprobs: int | None = None,
        request_id: str | None = None,
        response_format: str | Mapping[str, Any] | None = None,
        json_schema: Mapping[str, Any] | str | None = None,
        timeout: float | None = None,
    ) -> GenerateResult:
        """See `Client.generate`."""
        request = convert.build_generate_request(
            prompt,
            messages,
            adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logit_bias=logit_bias,
            min_tokens=min_tokens,
            logprobs=logprobs,
            n=n,
            prompt_logprobs=prompt_logprobs,
            request_id=request_id,
            response_format=response_format,
            json_schema=json_schema,
        )
        meta = self.connection.generation_metadata()
        deadline = self._timeout(timeout)
        reply = await acall_with_retry(
            lambda: _rpc(lambda: self._generation.Generate(request, timeout=deadline, metadata=meta)),
            self.connection.retry,
            GENERATION_CODES,
        )
        return convert.result_from_proto(reply)

    async def score(
        self,
        prompt: str | Sequence[convert.MessageLike] | None = None,
        continuation: str = "",
        *,
        messages: Sequence[convert.MessageLike] | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ScoreResult:
        """See `Client.score`."""
        request = convert.build_score_request(prompt, messages, continuation, adapter, request_id)
        meta = self.connection.generation_metadata()
        deadline = self._timeout(timeout)
        reply = await acall_with_retry(
            lambda: _rpc(lambda: self._generation.Score(request, timeout=deadline, metadata=meta)),
            self.connection.retry,
            GENERATION_CODES,
        )
        return convert.score_from_proto(reply)

    def stream(
        self,
        prompt: str | Sequence[convert.MessageLike] | None = None,
        *,
        messages: Sequence[convert.MessageLike] | None = None,
        adapter: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        ignore_eos: bool = False,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        min_tokens: int = 0,
        logprobs: int | None = None,
        n: int = 1,
        prompt_logprobs: int | None = None,
        request_id: str | None = None,
        response_format: str | Mapping[str, Any] | None = None,
        json_schema: Mapping[str, Any] | str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """See `Client.stream`: `async for chunk in client.stream(...)`. Leaving the loop early cancels
        the call once the iterator is closed (`await it.aclose()` closes it at once)."""
        request = convert.build_generate_request(
            prompt,
            messages,
            adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logit_bias=logit_bias,
            min_tokens=min_tokens,
            logprobs=logprobs,
            n=n,
            prompt_logprobs=prompt_logprobs,
            request_id=request_id,
            response_format=response_format,
            json_schema=json_schema,
        )
        return self._stream(request, self._timeout(timeout))

    async def _stream(
        self, request: generation_pb2.GenerateRequest, deadline: float | None
    ) -> AsyncIterator[StreamChunk]:
        meta = self.connection.generation_metadata()
        attempts = Attempts(self.connection.retry)
        index = 0
        while True:
            call = self._generation.GenerateStream(request, timeout=deadline, metadata=meta)
            try:
                async for message in call:
                    yield convert.chunk_from_proto(message, index)
                    index += 1
                return
            except grpc.RpcError as rpc_err:
                err = from_rpc_error(rpc_err)
                wait = attempts.next_wait(err, GENERATION_CODES) if index == 0 else None
                if wait is None:
                    raise err from None
            finally:
                call.cancel()
            await asyncio.sleep(wait)

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """See `Client.server_info`."""
        meta = self.connection.generation_metadata()
        deadline = self._timeout(timeout)
        reply = await acall_with_retry(
            lambda: _rpc(
                lambda: self._generation.GetServerInfo(
                    generation_pb2.GetServerInfoRequest(), timeout=deadline, metadata=meta
                )
            ),
            self.connection.retry,
            READ_CODES,
        )
        return convert.server_info_from_proto(reply)

    # -- admin -----------------------------------------------------------------------------------

    async def _admin_call(
        self, method: Callable[..., Awaitable[T]], request: Any, codes: frozenset[str], timeout: float | None
    ) -> T:
        meta = self.connection.admin_metadata()
        deadline = self._timeout(timeout)
        return await acall_with_retry(
            lambda: _rpc(lambda: method(request, timeout=deadline, metadata=meta)),
            self.connection.retry,
            codes,
        )

    async def _server_chunk_limit(self) -> int | None:
        """The server's upload chunk limit, asked once; None when it cannot be asked."""
        if self._chunk_limit is None:
            try:  # one attempt, no retries: the upload's own retry policy covers an unreachable server
                reply = await _rpc(
                    lambda: self._generation.GetServerInfo(
                        generation_pb2.GetServerInfoRequest(),
                        timeout=self._timeout(None),
                        metadata=self.connection.generation_metadata(),
                    )
                )
            except AdapterServeError:
                return None
            self._chunk_limit = convert.server_info_from_proto(reply).limits.upload_chunk_bytes
        return self._chunk_limit

    async def upload_adapter(
        self,
        path: str | Path,
        name: str,
        *,
        overwrite: bool = False,
        description: str | None = None,
        progress: ProgressCallback | None = None,
        chunk_bytes: int | None = None,
        timeout: float | None = None,
    ) -> UploadResult:
        """See `Client.upload_adapter`."""
        files = collect_adapter_files(path)
        check_adapter_name(name)
        if not overwrite:  # a taken name is refused before the first byte (the server checks again)
            try:
                await self.get_adapter(name, timeout=timeout)
            except (NotFound, Unimplemented):  # free, or a server without GetAdapter
                pass
            else:
                raise name_taken(name)
        if chunk_bytes is None:  # the default, capped by the server's own chunk limit
            chunk_bytes = choose_chunk_bytes(None, await self._server_chunk_limit())
        total = sum(f.size for f in files)
        meta = self.connection.admin_metadata()
        deadline = self._timeout(timeout)
        attempts = Attempts(self.connection.retry)
        while True:
            tracker = ProgressTracker(total, progress)
            messages = convert.upload_messages(files, name, overwrite, description, chunk_bytes, tracker)
            try:
                reply = await _rpc(lambda m=messages: self._stream_upload(m, deadline, meta))
                return convert.upload_result_from_proto(reply)
            except AdapterServeError as err:
                wait = attempts.next_wait(err, READ_CODES) if tracker.sent_bytes == 0 else None
                if wait is None:
                    raise
            await asyncio.sleep(wait)

    async def _stream_upload(self, messages: Any, deadline: float | None, meta: Any) -> Any:
        """Write the upload messages on one call. When the server ends the call early (a refusal
        after the header, a size cap), the next write fails: stop writing and report the server's
        own status instead of the transport's."""
        call = self._admin.UploadAdapter(timeout=deadline, metadata=meta)
        for message in messages:
            if call.done():
                break
            try:
                await call.write(message)
            except (grpc.aio.UsageError, asyncio.InvalidStateError, grpc.RpcError):
                break
        else:
            try:
                await call.done_writing()
            except (grpc.aio.UsageError, asyncio.InvalidStateError):
                pass
        return await call

    async def list_adapters(
        self, *, name_prefix: str = "", page_size: int = 0, timeout: float | None = None
    ) -> list[AdapterInfo]:
        """See `Client.list_adapters` (follows paging)."""
        out: list[AdapterInfo] = []
        token = ""
        while True:
            request = admin_pb2.ListAdaptersRequest(
                page_size=page_size, page_token=token, name_prefix=name_prefix
            )
            reply = await self._admin_call(self._admin.ListAdapters, request, READ_CODES, timeout)
            out.extend(convert.adapter_from_proto(a) for a in reply.adapters)
            token = reply.next_page_token
            if not token:
                return out

    async def get_adapter(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """See `Client.get_adapter`."""
        reply = await self._admin_call(
            self._admin.GetAdapter, admin_pb2.GetAdapterRequest(name=name), READ_CODES, timeout
        )
        return convert.adapter_from_proto(reply.adapter)

    async def delete_adapter(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """See `Client.delete_adapter` (never retried)."""
        reply = await self._admin_call(
            self._admin.DeleteAdapter, admin_pb2.DeleteAdapterRequest(name=name), _NO_CODES, timeout
        )
        return convert.adapter_from_proto(reply.adapter)

    async def pin(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """See `Client.pin`."""
        reply = await self._admin_call(
            self._admin.PinAdapter, admin_pb2.PinAdapterRequest(name=name), READ_CODES, timeout
        )
        return convert.adapter_from_proto(reply.adapter)

    async def unpin(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """See `Client.unpin`."""
        reply = await self._admin_call(
            self._admin.UnpinAdapter, admin_pb2.UnpinAdapterRequest(name=name), READ_CODES, timeout
        )
        return convert.adapter_from_proto(reply.adapter)

    # -- health ----------------------------------------------------------------------------------

    async def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """See `Client.health`."""
        data = await _rpc(
            lambda: self._health(health.encode_request(service), timeout=self._timeout(timeout))
        )
        return HealthStatus(service=service, status=health.decode_status(data))

    async def wait_until_serving(self, timeout: float = 60.0, interval: float = 0.2) -> HealthStatus:
        """See `Client.wait_until_serving`."""
        deadline = time.monotonic() + timeout
        last = "unreachable"
        while True:
            try:
                status = await self.health(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                if status.serving:
                    return status
                last = status.status
            except AdapterServeError as err:
                last = str(err)
            if time.monotonic() >= deadline:
                raise Unavailable(f"{self.target} not serving after {timeout:.0f} s (last: {last})")
            await asyncio.sleep(interval)
