"""The Generation service over real gRPC channels, on the engine double (in-process)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from adapterserve.v1 import generation_pb2, generation_pb2_grpc
from tests.server.api.conftest import wait_until

pytestmark = pytest.mark.timeout(60)


def req(**kw) -> generation_pb2.GenerateRequest:
    kw.setdefault("prompt", "The capital of France is")
    sampling = kw.pop("sampling", generation_pb2.SamplingParams(max_new_tokens=3))
    return generation_pb2.GenerateRequest(sampling=sampling, **kw)


async def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details()


async def test_generate_unary(served, tiny_tokenizer):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    reply = await stub.Generate(req(request_id="r-1"))
    assert reply.request_id == "r-1"
    assert reply.text == "t10 t11 t12 "
    assert list(reply.token_ids) == [10, 11, 12]
    assert reply.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert reply.generated_tokens == 3
    assert reply.prompt_tokens == len(tiny_tokenizer("The capital of France is")["input_ids"])
    assert 0 < reply.timing.time_to_first_token_s <= reply.timing.total_s
    submitted = served.engine.submitted[-1]
    assert submitted.adapter is None and submitted.sampling.max_new_tokens == 3


async def test_stream_chunks_in_order_and_last_carries_counts(served):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    chunks = [
        c async for c in stub.GenerateStream(req(sampling=generation_pb2.SamplingParams(max_new_tokens=4)))
    ]
    assert [list(c.token_ids) for c in chunks] == [[10], [11], [12], [13]]
    assert all(c.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].generated_tokens == 4 and chunks[-1].prompt_tokens > 0
    assert "".join(c.text for c in chunks) == "t10 t11 t12 t13 "
    assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id


async def test_chat_messages_use_the_chat_template(served, tiny_tokenizer):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    chat = generation_pb2.ChatMessages(
        messages=[generation_pb2.ChatMessage(role="user", content="What is the capital of France?")]
    )
    reply = await stub.Generate(generation_pb2.GenerateRequest(messages=chat))
    expected = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert tuple(served.engine.submitted[-1].prompt_ids) == tuple(expected)
    assert reply.prompt_tokens == len(expected)
    assert reply.generated_tokens == 32  # unset max_new_tokens: min(64, the limit 32)


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"sampling": generation_pb2.SamplingParams(max_new_tokens=33)}, "max_new_tokens"),
        ({"sampling": generation_pb2.SamplingParams(max_new_tokens=0)}, "max_new_tokens"),
        ({"sampling": generation_pb2.SamplingParams(top_p=0.0)}, "top_p"),
        ({"sampling": generation_pb2.SamplingParams(temperature=-1)}, "temperature"),
        ({"sampling": generation_pb2.SamplingParams(repetition_penalty=0.0)}, "repetition_penalty"),
        ({"sampling": generation_pb2.SamplingParams(stop=["a", "b", "c"])}, "stop"),
        ({"prompt": "hello world " * 200}, "max_prompt_tokens"),
        ({"request_id": "bad id with spaces"}, "request_id"),
    ],
)
async def test_invalid_arguments_name_the_field(served, request_kw, field):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    code, details = await code_of(stub.Generate(req(**request_kw)))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert field in details


async def test_missing_input_is_invalid_argument(served):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    code, details = await code_of(stub.Generate(generation_pb2.GenerateRequest()))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "prompt" in details


async def test_unknown_adapter_is_not_found(served):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    code, details = await code_of(stub.Generate(req(adapter="nope")))
    assert code is grpc.StatusCode.NOT_FOUND and "nope" in details
    code, _ = await code_of(_first(stub.GenerateStream(req(adapter="nope"))))
    assert code is grpc.StatusCode.NOT_FOUND


async def _first(stream):
    async for item in stream:
        return item


async def test_queue_full_is_resource_exhausted(served):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    served.engine.max_queue = 0
    code, details = await code_of(stub.Generate(req()))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in details


async def test_out_of_memory_fails_one_request_and_server_keeps_serving(served):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    code, details = await code_of(stub.Generate(req(adapter="oom")))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "out of memory" in details
    reply = await stub.Generate(req())
    assert reply.generated_tokens == 3


async def test_bug_is_internal_without_details(served):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    code, details = await code_of(stub.Generate(req(adapter="boom")))
    assert code is grpc.StatusCode.INTERNAL
    assert "secret detail" not in details and "ref" in details


async def test_client_cancel_frees_the_engine_request(served):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    served.engine.step_s = 0.05
    call = stub.GenerateStream(
        req(request_id="to-cancel", sampling=generation_pb2.SamplingParams(max_new_tokens=30))
    )
    first = await call.read()
    assert list(first.token_ids) == [10]
    call.cancel()
    await wait_until(lambda: "to-cancel" in served.engine.cancelled, timeout=5)
    assert "to-cancel" not in served.engine.running


async def test_deadline_frees_the_engine_request(served):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    served.engine.step_s = 0.05
    code, _ = await code_of(
        stub.Generate(
            req(request_id="late", sampling=generation_pb2.SamplingParams(max_new_tokens=30)), timeout=0.3
        )
    )
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until(lambda: "late" in served.engine.cancelled, timeout=5)
    assert not served.engine.running


async def test_concurrent_stream_limit(served):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    served.engine.step_s = 0.05
    long = generation_pb2.SamplingParams(max_new_tokens=30)
    calls = [stub.GenerateStream(req(sampling=long)) for _ in range(8)]
    for call in calls:
        await call.read()
    code, details = await code_of(stub.Generate(req()))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_streams" in details
    for call in calls:
        call.cancel()
    await wait_until(lambda: not served.engine.running, timeout=5)
    assert (await stub.Generate(req())).generated_tokens == 3


async def test_server_info(served):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    info = await stub.GetServerInfo(generation_pb2.GetServerInfoRequest())
    assert info.base_model == "fake"


async def test_many_concurrent_clients_get_their_own_results(served):
    stub = generation_pb2_grpc.GenerationStub(served.channel)
    replies = await asyncio.gather(
        *[
            stub.Generate(
                req(request_id=f"c{i}", sampling=generation_pb2.SamplingParams(max_new_tokens=1 + i % 4))
            )
            for i in range(8)
        ]
    )
    for i, reply in enumerate(replies):
        assert reply.request_id == f"c{i}"
        assert reply.generated_tokens == 1 + i % 4
