"""`AsyncClient`: the asyncio Python SDK (grpc.aio), mirroring `Client` method for method.

    from adapterserve import AsyncClient

    async with AsyncClient("127.0.0.1:50051") as client:
        async for chunk in client.stream("Once upon a time", max_new_tokens=32):
            print(chunk.text, end="", flush=True)

Create it inside a running event loop (a grpc.aio channel belongs to the loop it was made in).
What each call sends and how its reply reads is shared with `Client` (convert.py, base.py); this
module awaits the calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc

from adapterserve import convert, health, replies
from adapterserve.base import ClientBase, UploadAttempts, takes_arguments_of
from adapterserve.errors import AdapterServeError, NotFound, Unavailable, Unimplemented, from_rpc_error
from adapterserve.models import (
    AdapterInfo,
    GenerateResult,
    HealthStatus,
    RefreshResult,
    ScoreResult,
    ServerInfo,
    StreamChunk,
    UpdateResult,
    UploadResult,
)
from adapterserve.names import check_adapter_name, name_taken
from adapterserve.retry import Attempts, acall_with_retry
from adapterserve.updates import encode_tensors, update_messages, update_result_from_proto
from adapterserve.upload import ProgressCallback, choose_chunk_bytes, collect_adapter_files

T = TypeVar("T")


async def _rpc(fn: Callable[[], Awaitable[T]]) -> T:
    """Await one gRPC call, turning grpc.RpcError into the matching AdapterServeError."""
    try:
        return await fn()
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


class AsyncClient(ClientBase):
    """An asyncio client; same arguments and methods as `Client`, each one a coroutine.

    `stream()` returns an async iterator (`async for chunk in client.stream(...)`).
    Use `async with AsyncClient(...) as client:` or `await client.close()`.
    """

    _grpc = grpc.aio

    # -- lifecycle -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, call: convert.Call[T]) -> T:
        """Make `call`, retried on its codes under the client's policy; its converted reply."""
        method, meta, deadline = self._route(call)
        reply = await acall_with_retry(
            lambda: _rpc(lambda: method(call.request, timeout=deadline, metadata=meta)),
            self.connection.retry,
            call.retry_codes,
        )
        return call.reply(reply)

    # -- generation ------------------------------------------------------------------------------

    @takes_arguments_of(convert.generate_call)
    async def generate(self, *args: Any, **kwargs: Any) -> GenerateResult:
        """See `Client.generate`."""
        return await self._unary(convert.generate_call(*args, **kwargs))

    @takes_arguments_of(convert.generate_batch_call)
    async def generate_batch(self, *args: Any, **kwargs: Any) -> list[GenerateResult]:
        """See `Client.generate_batch`."""
        return await self._unary(convert.generate_batch_call(*args, **kwargs))

    @takes_arguments_of(convert.score_call)
    async def score(self, *args: Any, **kwargs: Any) -> ScoreResult:
        """See `Client.score`."""
        return await self._unary(convert.score_call(*args, **kwargs))

    @takes_arguments_of(convert.generate_call)
    def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[StreamChunk]:
        """See `Client.stream`: `async for chunk in client.stream(...)`. Leaving the loop early cancels
        the call once the iterator is closed (`await it.aclose()` closes it at once)."""
        return self._stream(replace(convert.generate_call(*args, **kwargs), method="GenerateStream"))

    @takes_arguments_of(convert.generate_batch_call)
    def stream_batch(self, *args: Any, **kwargs: Any) -> AsyncIterator[replies.BatchChunk]:
        """See `Client.stream_batch`: `async for position, chunk in client.stream_batch(...)`."""
        call = replace(convert.generate_batch_call(*args, **kwargs), method="GenerateBatchStream")
        return self._stream(call, replies.batch_chunk_from_proto)

    async def _stream(
        self, call: convert.Call[Any], chunk: Callable[[Any, int], T] = replies.chunk_from_proto
    ) -> AsyncIterator[T]:
        method, meta, deadline = self._route(call)
        attempts = Attempts(self.connection.retry)
        index = 0
        while True:
            rpc = method(call.request, timeout=deadline, metadata=meta)
            try:
                async for message in rpc:
                    yield chunk(message, index)
                    index += 1
                return
            except grpc.RpcError as rpc_err:
                wait = self._stream_retry_wait(attempts, rpc_err, index)
            finally:
                rpc.cancel()
            await asyncio.sleep(wait)

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """See `Client.server_info`."""
        return await self._unary(convert.server_info_call(timeout))

    # -- admin -----------------------------------------------------------------------------------

    async def _server_chunk_limit(self) -> int | None:
        """The server's upload chunk limit, asked once; None when it cannot be asked."""
        if self._chunk_limit is None:
            try:  # one attempt, no retries: the upload's own retry policy covers an unreachable server
                info = await self._unary(replace(convert.server_info_call(None), retry_codes=frozenset()))
            except AdapterServeError:
                return None
            self._chunk_limit = info.limits.upload_chunk_bytes
        return self._chunk_limit

    async def _check_upload_target(self, name: str, overwrite: bool, timeout: float | None) -> None:
        """See `Client._check_upload_target`."""
        check_adapter_name(name)
        if overwrite:
            return
        try:
            await self.get_adapter(name, timeout=timeout)
        except (NotFound, Unimplemented):  # free, or a server without GetAdapter
            return
        raise name_taken(name)

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
        await self._check_upload_target(name, overwrite, timeout)
        if chunk_bytes is None:  # the default, capped by the server's own chunk limit
            chunk_bytes = choose_chunk_bytes(None, await self._server_chunk_limit())
        upload = UploadAttempts(
            files, name, overwrite, description, chunk_bytes, progress, self.connection.retry
        )
        meta = self.connection.admin_metadata()
        deadline = self._timeout(timeout)
        while True:
            messages = upload.messages()
            try:
                reply = await _rpc(lambda m=messages: self._stream_upload(m, deadline, meta))
                return replies.upload_result_from_proto(reply)
            except AdapterServeError as err:
                wait = upload.retry_wait(err)
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

    async def update_adapter(
        self,
        name: str,
        tensors: Mapping[str, Any],
        *,
        persist: bool = False,
        chunk_bytes: int | None = None,
        timeout: float | None = None,
    ) -> UpdateResult:
        """Replace the weights of stored adapter `name` in place with `tensors` (its state dict as PEFT
        saves it: every tensor, same names and shapes; torch tensors or numpy arrays of a float dtype).

        The reply's `version` is what requests get from now on (their results carry `adapter_version`);
        requests already running finish on their version. `persist` writes it to the server's store now.
        Never retried (each update is a new version)."""
        check_adapter_name(name)
        encoded = encode_tensors(tensors)
        if chunk_bytes is None:
            chunk_bytes = choose_chunk_bytes(None, await self._server_chunk_limit())
        messages = update_messages(name, encoded, persist=persist, chunk_bytes=chunk_bytes)
        meta = self.connection.admin_metadata()
        deadline = self._timeout(timeout)
        reply = await _rpc(lambda: self._admin.UpdateAdapter(messages, timeout=deadline, metadata=meta))
        return update_result_from_proto(reply)

    async def list_adapters(
        self, *, name_prefix: str = "", page_size: int = 0, timeout: float | None = None
    ) -> list[AdapterInfo]:
        """See `Client.list_adapters` (follows paging)."""
        out: list[AdapterInfo] = []
        token = ""
        while True:
            page, token = await self._unary(convert.list_page_call(name_prefix, page_size, token, timeout))
            out.extend(page)
            if not token:
                return out

    async def get_adapter(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """See `Client.get_adapter`."""
        return await self._unary(convert.adapter_call("GetAdapter", name, timeout))

    async def delete_adapter(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """See `Client.delete_adapter` (never retried)."""
        return await self._unary(convert.adapter_call("DeleteAdapter", name, timeout))

    async def pin(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """See `Client.pin`."""
        return await self._unary(convert.adapter_call("PinAdapter", name, timeout))

    async def unpin(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """See `Client.unpin`."""
        return await self._unary(convert.adapter_call("UnpinAdapter", name, timeout))

    async def refresh_adapter(self, name: str, *, timeout: float | None = None) -> RefreshResult:
        """See `Client.refresh_adapter`."""
        return await self._unary(convert.refresh_call(name, timeout))

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
