"""What the server log says when a call ends in an error: an expected answer (GetAdapter's NOT_FOUND, which
the SDK asks before every upload of a new name) is no failure; a client error is one line at INFO; a bug
is logged with its traceback and a reference the client also gets."""

from __future__ import annotations

import logging

import grpc
import pytest

from adapterserve.server.api.grpc.errors import map_errors
from adapterserve.server.errors import NotFoundError
from adapterserve.v1 import admin_pb2, admin_pb2_grpc

LOGGER = "adapterserve.server.api.grpc.errors"


class Aborted(Exception):
    pass


class FakeContext:
    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message
        raise Aborted


class Servicer:
    @map_errors(answers=frozenset({"NOT_FOUND"}))
    async def Lookup(self, request, context):
        raise NotFoundError("adapter 'free-name' not found")

    @map_errors
    async def Generate(self, request, context):
        raise NotFoundError("adapter 'typo' not found")

    @map_errors
    async def Broken(self, request, context):
        raise RuntimeError("a bug")

    @map_errors(answers=frozenset({"NOT_FOUND"}))
    async def Stream(self, request, context):
        yield 1
        raise NotFoundError("gone")


async def _call(method, caplog) -> tuple[FakeContext, list[logging.LogRecord]]:
    context = FakeContext()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOGGER), pytest.raises(Aborted):
        result = method(None, context)
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    return context, [r for r in caplog.records if r.name == LOGGER]


async def test_an_expected_not_found_is_an_answer_logged_at_debug(caplog):
    context, records = await _call(Servicer().Lookup, caplog)
    assert context.code is grpc.StatusCode.NOT_FOUND and "free-name" in context.message
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.DEBUG, "Servicer.Lookup answered NOT_FOUND: adapter 'free-name' not found")
    ]
    context, records = await _call(Servicer().Stream, caplog)  # streams too
    assert context.code is grpc.StatusCode.NOT_FOUND and [r.levelno for r in records] == [logging.DEBUG]


async def test_other_client_errors_stay_at_info_and_bugs_at_error(caplog):
    context, records = await _call(Servicer().Generate, caplog)
    assert context.code is grpc.StatusCode.NOT_FOUND
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.INFO, "Servicer.Generate failed: NOT_FOUND adapter 'typo' not found")
    ]
    context, records = await _call(Servicer().Broken, caplog)
    assert context.code is grpc.StatusCode.INTERNAL and "(ref " in context.message
    assert [r.levelno for r in records] == [logging.ERROR]


async def test_probing_a_free_name_over_grpc_logs_no_failure(served, caplog):
    """What the SDK does before uploading a new name (Client.upload_adapter): GetAdapter, NOT_FOUND."""
    admin = admin_pb2_grpc.AdminStub(served.channel)
    caplog.clear()
    with caplog.at_level(logging.INFO), pytest.raises(grpc.aio.AioRpcError) as info:
        await admin.GetAdapter(admin_pb2.GetAdapterRequest(name="new-name"), metadata=served.admin_md())
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert [r.getMessage() for r in caplog.records if "GetAdapter" in r.getMessage()] == []
