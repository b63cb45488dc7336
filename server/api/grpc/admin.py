"""The Admin service: upload (client stream), delete, list (paged), get, pin, unpin, in-place update.

Auth is checked before these methods run (gate.GateInterceptor). The upload stream is checked here
message by message (header first, chunk size, total size, file names) and handed to the catalog as
(file name, bytes) pairs; the catalog validates and stores atomically.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator

import grpc

from adapterserve.server.api.contracts import AdapterRecord
from adapterserve.server.api.grpc.convert import adapter_to_proto
from adapterserve.server.api.grpc.errors import map_errors, status_of
from adapterserve.server.api.grpc.updates import read_update_tensors
from adapterserve.server.api.lifecycle import Lifecycle
from adapterserve.server.api.metrics import ServerMetrics
from adapterserve.server.api.runtime import RuntimeRef
from adapterserve.server.errors import AdapterValidationError, InvalidArgumentError, ResourceExhaustedError
from adapterserve.server.settings import LimitSettings
from adapterserve.server.store.upload import UploadRequest, check_upload_filename
from adapterserve.v1 import admin_pb2, admin_pb2_grpc, types_pb2

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_TOKEN_PREFIX = "after:"


def encode_page_token(last_name: str) -> str:
    """An opaque token that resumes a listing after `last_name`."""
    return base64.urlsafe_b64encode((_TOKEN_PREFIX + last_name).encode()).decode()


def decode_page_token(token: str) -> str:
    """The name a page token resumes after; INVALID_ARGUMENT if it is not one of ours."""
    try:
        text = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith(_TOKEN_PREFIX):
        raise InvalidArgumentError("page_token: not a token returned by ListAdapters")
    return text[len(_TOKEN_PREFIX) :]


def page_of(
    records: list[AdapterRecord], page_size: int, page_token: str, name_prefix: str
) -> tuple[list[AdapterRecord], str, int]:
    """(this page's records, next page token or "", total matching) of name-ordered `records`."""
    if page_size > MAX_PAGE_SIZE:
        raise InvalidArgumentError(f"page_size: {page_size} is above {MAX_PAGE_SIZE}")
    size = page_size or DEFAULT_PAGE_SIZE
    matching = sorted((r for r in records if r.name.startswith(name_prefix)), key=lambda r: r.name)
    after = decode_page_token(page_token) if page_token else None
    rest = [r for r in matching if after is None or r.name > after]
    page = rest[:size]
    next_token = encode_page_token(page[-1].name) if len(rest) > size else ""
    return page, next_token, len(matching)


class _UploadCounter:
    """Counts the bytes an upload stream has delivered."""

    def __init__(self) -> None:
        self.received = 0


async def upload_chunks(
    messages: AsyncIterator[admin_pb2.UploadAdapterRequest], limits: LimitSettings, counter: _UploadCounter
) -> AsyncIterator[tuple[str, bytes]]:
    """(file name, bytes) pairs of the chunk messages after the header, each checked against the limits."""
    finished: set[str] = set()
    current: str | None = None
    async for message in messages:
        kind = message.WhichOneof("payload")
        if kind != "chunk":
            raise InvalidArgumentError("header: only the first message of an upload may be a header")
        chunk = message.chunk
        if chunk.filename != current:
            try:  # the store's own rule (it checks again for uploads that do not come through here)
                check_upload_filename(chunk.filename)
            except AdapterValidationError as exc:
                raise InvalidArgumentError(f"chunk.filename: {exc}") from None
            if chunk.filename in finished:
                raise InvalidArgumentError(
                    f"chunk.filename: {chunk.filename!r} was already finished; send each file's chunks in one run"
                )
            if current is not None:
                finished.add(current)
            current = chunk.filename
        if len(chunk.data) > limits.upload_chunk_bytes:
            raise ResourceExhaustedError(
                f"chunk.data: {len(chunk.data)} bytes, more than the limit upload_chunk_bytes={limits.upload_chunk_bytes}"
            )
        counter.received += len(chunk.data)
        if counter.received > limits.max_upload_bytes:
            raise ResourceExhaustedError(
                f"upload: more than the limit max_upload_bytes={limits.max_upload_bytes} bytes"
            )
        yield chunk.filename, bytes(chunk.data)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """grpc.aio servicer of adapterserve.v1.Admin."""

    def __init__(
        self, runtime: RuntimeRef, limits: LimitSettings, metrics: ServerMetrics, lifecycle: Lifecycle
    ) -> None:
        self._runtime = runtime
        self._limits = limits
        self._metrics = metrics
        self._lifecycle = lifecycle

    @map_errors
    async def UploadAdapter(
        self,
        request_iterator: AsyncIterator[admin_pb2.UploadAdapterRequest],
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.UploadAdapterResponse:
        counter = _UploadCounter()
        try:
            async with self._lifecycle.call():
                stream = aiter(request_iterator)
                first = await anext(stream, None)
                if first is None or first.WhichOneof("payload") != "header":
                    raise InvalidArgumentError("header: the first message of an upload must be a header")
                header = first.header
                request = UploadRequest(
                    name=header.name,
                    overwrite=header.overwrite,
                    description=header.description,
                    max_bytes=self._limits.max_upload_bytes,
                )
                result = await self._runtime.get().catalog.upload(
                    request, upload_chunks(stream, self._limits, counter)
                )
        except BaseException as exc:
            self._metrics.record_upload(
                status_of(exc)[0].name if isinstance(exc, Exception) else "CANCELLED", 0
            )
            raise
        self._metrics.record_upload("OK", counter.received)
        return admin_pb2.UploadAdapterResponse(
            adapter=adapter_to_proto(result.record), replaced=result.replaced, received_bytes=counter.received
        )

    @map_errors
    async def DeleteAdapter(
        self, request: admin_pb2.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DeleteAdapterResponse:
        async with self._lifecycle.call():
            record = await self._runtime.get().catalog.delete(request.name)
            if record is None:
                return admin_pb2.DeleteAdapterResponse(adapter=types_pb2.AdapterInfo(name=request.name))
            return admin_pb2.DeleteAdapterResponse(adapter=adapter_to_proto(record))

    @map_errors
    async def ListAdapters(
        self, request: admin_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAdaptersResponse:
        async with self._lifecycle.call():
            records = await self._runtime.get().catalog.list()
            page, next_token, total = page_of(
                records, request.page_size, request.page_token, request.name_prefix
            )
            return admin_pb2.ListAdaptersResponse(
                adapters=[adapter_to_proto(r) for r in page], next_page_token=next_token, total_count=total
            )

    @map_errors(answers=frozenset({"NOT_FOUND"}))  # a name probed before an upload: free is an answer
    async def GetAdapter(
        self, request: admin_pb2.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetAdapterResponse:
        async with self._lifecycle.call():
            return admin_pb2.GetAdapterResponse(
                adapter=adapter_to_proto(await self._runtime.get().catalog.get(request.name))
            )

    @map_errors
    async def PinAdapter(
        self, request: admin_pb2.PinAdapterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PinAdapterResponse:
        async with self._lifecycle.call():
            return admin_pb2.PinAdapterResponse(
                adapter=adapter_to_proto(await self._runtime.get().catalog.pin(request.name))
            )

    @map_errors
    async def UnpinAdapter(
        self, request: admin_pb2.UnpinAdapterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UnpinAdapterResponse:
        async with self._lifecycle.call():
            return admin_pb2.UnpinAdapterResponse(
                adapter=adapter_to_proto(await self._runtime.get().catalog.unpin(request.name))
            )

    @map_errors
    async def UpdateAdapter(
        self,
        request_iterator: AsyncIterator[admin_pb2.UpdateAdapterRequest],
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.UpdateAdapterResponse:
        async with self._lifecycle.call():
            stream = aiter(request_iterator)
            first = await anext(stream, None)
            if first is None or first.WhichOneof("payload") != "header":
                raise InvalidArgumentError("header: the first message of an update must be a header")
            header = first.header
            received = await read_update_tensors(stream, self._limits)
            outcome = await self._runtime.get().catalog.update(
                header.name, received.tensors, persist=header.persist
            )
            return admin_pb2.UpdateAdapterResponse(
                name=outcome.name,
                version=outcome.version,
                previous_version=outcome.previous_version,
                persisted_version=outcome.persisted_version,
                persisted=outcome.persisted,
                resident=outcome.resident,
                received_bytes=received.received_bytes,
            )

    @map_errors
    async def RefreshAdapter(
        self, request: admin_pb2.RefreshAdapterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RefreshAdapterResponse:
        async with self._lifecycle.call():
            record, changed = await self._runtime.get().catalog.refresh(request.name)
            return admin_pb2.RefreshAdapterResponse(adapter=adapter_to_proto(record), changed=changed)
