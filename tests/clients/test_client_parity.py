"""`Client` and `AsyncClient` put the same bytes on the wire for the same arguments, and offer the same
methods with the same parameters: drift between the two SDKs fails here.

A recording gRPC server in this process (a test double: it answers every call with a fixed reply) keeps
the raw request bytes of each Generate, GenerateStream and Score call. The argument tables cover every
parameter of `generate`/`stream` and `score` (checked against the methods' signatures, so a new
parameter must be added to a table).
"""

from __future__ import annotations

import asyncio
import inspect
import typing
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from adapterserve import AsyncClient, ChatMessage, Client, InvalidArgument, RetryPolicy
from adapterserve.fields import UINT64_MAX
from adapterserve.v1 import generation_pb2

SERVICE = "adapterserve.v1.Generation"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
CHAT = [{"role": "system", "content": "be brief"}, ChatMessage(role="user", content="hi")]

# (positional arguments, keyword arguments) of generate/stream; every parameter appears at least once.
GENERATE_CASES: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    (("hi",), {}),
    (("hi",), {"adapter": "my-lora"}),
    ((), {"messages": CHAT}),
    ((CHAT,), {}),  # a list as the prompt is a chat
    (("hi",), {"max_new_tokens": 7}),
    (("hi",), {"temperature": 0.7, "top_p": 0.9, "top_k": 40}),
    (("hi",), {"repetition_penalty": 1.2}),
    (("hi",), {"seed": UINT64_MAX}),
    (("hi",), {"stop": "\n"}),
    (("hi",), {"stop": ["a", "b"]}),
    (("hi",), {"ignore_eos": True}),
    (("hi",), {"presence_penalty": 0.5, "frequency_penalty": -0.5}),
    (("hi",), {"logit_bias": {5: -100.0, 7: 2.5}}),
    (("hi",), {"min_tokens": 3}),
    (("hi",), {"logprobs": 0}),
    (("hi",), {"logprobs": 5, "prompt_logprobs": 2}),
    (("hi",), {"temperature": 0.7, "logprobs": 0, "logprobs_at_temperature": True}),
    (("hi",), {"n": 3, "temperature": 1.0, "seed": 7}),
    (("hi",), {"request_id": "req-1"}),
    (("hi",), {"response_format": "json_object"}),
    (("hi",), {"json_schema": SCHEMA}),
    (("hi",), {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}),
    (("hi",), {"timeout": 5.0}),  # the deadline only: the request is the default one
]
SCORE_CASES: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    (("The capital of France is", " Paris."), {}),
    (("The capital of France is",), {"continuation": " Paris.", "adapter": "my-lora"}),
    ((), {"messages": CHAT, "continuation": " ok"}),
    ((CHAT, " ok"), {"request_id": "score-1"}),
    (("x", "y"), {"timeout": 5.0}),
]
# Refused before anything is sent, the same way by both clients.
BAD_GENERATE_CASES: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((), {}),
    (("hi",), {"messages": CHAT}),
    (("hi",), {"n": -1}),
    (("hi",), {"stop": ["ok", 3]}),
    (("hi",), {"seed": UINT64_MAX + 1}),
    (("hi",), {"response_format": "text", "json_schema": SCHEMA}),
    (("hi",), {"logit_bias": {-1: 1.0}}),
    ((), {"messages": [{"content": "no role"}]}),
]


class _Recorder(grpc.GenericRpcHandler):
    """Answers Generation calls with fixed replies and keeps (method, raw request bytes)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        service, _, method = details.method.lstrip("/").partition("/")
        if service != SERVICE:
            return None
        if method == "Generate":
            return grpc.unary_unary_rpc_method_handler(self._generate)
        if method == "GenerateStream":
            return grpc.unary_stream_rpc_method_handler(self._stream)
        if method == "Score":
            return grpc.unary_unary_rpc_method_handler(self._score)
        return None

    def _generate(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.requests.append(("Generate", request))
        reply = generation_pb2.GenerateResponse(text="ok", finish_reason=generation_pb2.FINISH_REASON_STOP)
        return reply.SerializeToString()

    def _stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.requests.append(("GenerateStream", request))
        chunk = generation_pb2.GenerateStreamResponse(
            text="ok", finish_reason=generation_pb2.FINISH_REASON_STOP
        )
        yield chunk.SerializeToString()

    def _score(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.requests.append(("Score", request))
        return generation_pb2.ScoreResponse(continuation_tokens=1, logprob_sum=-1.0).SerializeToString()

    def take(self) -> list[tuple[str, bytes]]:
        out, self.requests = self.requests, []
        return out


@pytest.fixture(scope="module")
def recorder() -> Iterator[tuple[_Recorder, str]]:
    handler = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield handler, f"127.0.0.1:{port}"
    server.stop(None)


_NO_RETRY = RetryPolicy(max_attempts=1)


def _sync_sends(target: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with Client(target, retry=_NO_RETRY, timeout=10) as client:
        assert client.generate(*args, **kwargs).text == "ok"
        assert [c.text for c in client.stream(*args, **kwargs)] == ["ok"]


async def _async_sends(target: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    async with AsyncClient(target, retry=_NO_RETRY, timeout=10) as client:
        assert (await client.generate(*args, **kwargs)).text == "ok"
        assert [c.text async for c in client.stream(*args, **kwargs)] == ["ok"]


def _covered(cases: list[tuple[tuple[Any, ...], dict[str, Any]]], method: Any) -> set[str]:
    """The parameters of `method` that some case passes (positionally or by name)."""
    names = [n for n in inspect.signature(method).parameters if n != "self"]
    return {name for args, kwargs in cases for name in [*names[: len(args)], *kwargs]}


def test_the_tables_cover_every_parameter():
    for cls in (Client, AsyncClient):
        gen_params = set(inspect.signature(cls.generate).parameters) - {"self"}
        assert _covered(GENERATE_CASES, cls.generate) == gen_params
        assert set(inspect.signature(cls.stream).parameters) - {"self"} == gen_params
        assert _covered(SCORE_CASES, cls.score) == set(inspect.signature(cls.score).parameters) - {"self"}


@pytest.mark.parametrize(("args", "kwargs"), GENERATE_CASES, ids=lambda v: repr(v)[:40])
def test_sync_and_async_send_byte_identical_generate_requests(recorder, args, kwargs):
    handler, target = recorder
    handler.take()
    _sync_sends(target, args, kwargs)
    sync = handler.take()
    asyncio.run(_async_sends(target, args, kwargs))
    both = sync + handler.take()
    assert [method for method, _ in both] == ["Generate", "GenerateStream"] * 2
    assert len({request for _, request in both}) == 1, "the four calls sent different requests"
    # Each argument set reaches the wire: only the timeout leaves the request as the default one.
    _sync_sends(target, ("hi",), {})
    default = handler.take()[0][1]
    assert (both[0][1] == default) == (kwargs in ({}, {"timeout": 5.0}) and args == ("hi",))


@pytest.mark.parametrize(("args", "kwargs"), SCORE_CASES, ids=lambda v: repr(v)[:40])
def test_sync_and_async_send_byte_identical_score_requests(recorder, args, kwargs):
    handler, target = recorder
    handler.take()
    with Client(target, retry=_NO_RETRY, timeout=10) as client:
        assert client.score(*args, **kwargs).continuation_tokens == 1

    async def score() -> None:
        async with AsyncClient(target, retry=_NO_RETRY, timeout=10) as client:
            assert (await client.score(*args, **kwargs)).continuation_tokens == 1

    asyncio.run(score())
    sent = handler.take()
    assert [method for method, _ in sent] == ["Score", "Score"]
    assert sent[0][1] == sent[1][1]


@pytest.mark.parametrize(("args", "kwargs"), BAD_GENERATE_CASES, ids=lambda v: repr(v)[:40])
def test_both_refuse_bad_arguments_alike_before_sending(recorder, args, kwargs):
    handler, target = recorder
    handler.take()
    errors: list[str] = []
    with Client(target, retry=_NO_RETRY) as client:
        for call in (client.generate, client.stream):
            with pytest.raises(InvalidArgument) as err:
                call(*args, **kwargs)
            errors.append(str(err.value))

    async def refused() -> None:
        async with AsyncClient(target, retry=_NO_RETRY) as client:
            with pytest.raises(InvalidArgument) as err:
                await client.generate(*args, **kwargs)
            errors.append(str(err.value))
            with pytest.raises(InvalidArgument) as err:
                client.stream(*args, **kwargs)  # checked when called, like Client.stream
            errors.append(str(err.value))

    asyncio.run(refused())
    assert len(errors) == 4 and len(set(errors)) == 1, errors
    assert handler.take() == []


def _public(cls: type) -> dict[str, Any]:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}


STREAMS = {"stream", "stream_batch"}  # Iterator in Client, AsyncIterator in AsyncClient


def test_same_methods_parameters_and_types():
    sync, aio = _public(Client), _public(AsyncClient)
    assert sync.keys() == aio.keys()
    for name, method in sync.items():
        a, s = inspect.signature(aio[name]), inspect.signature(method)
        assert [(p.name, p.kind, p.default) for p in a.parameters.values()] == [
            (p.name, p.kind, p.default) for p in s.parameters.values()
        ], name
        hints_s, hints_a = typing.get_type_hints(method), typing.get_type_hints(aio[name])
        streams = name in STREAMS
        if not streams:  # Iterator vs AsyncIterator
            assert hints_s == hints_a, name
        else:
            assert {k: v for k, v in hints_s.items() if k != "return"} == {
                k: v for k, v in hints_a.items() if k != "return"
            }
        assert inspect.iscoroutinefunction(aio[name]) == (not streams), name
    assert inspect.signature(Client.__init__) == inspect.signature(AsyncClient.__init__)


def test_unknown_keyword_is_a_type_error_in_both():
    with Client("127.0.0.1:1") as client:
        with pytest.raises(TypeError, match="temprature"):
            client.generate("hi", temprature=0.5)

    async def call() -> None:
        async with AsyncClient("127.0.0.1:1") as client:
            with pytest.raises(TypeError, match="temprature"):
                await client.generate("hi", temprature=0.5)
            with pytest.raises(TypeError, match="temprature"):
                client.stream("hi", temprature=0.5)

    asyncio.run(call())
