"""`generate_batch` (the GenerateBatch RPC) of both SDK clients against the real server: one result per
prompt, each what `generate` gives for that prompt alone; refusals before anything is queued."""

from __future__ import annotations

import inspect
import typing

import grpc
import pytest

from adapterserve import AsyncClient, InvalidArgument, NotFound
from adapterserve import convert as sdk_convert
from adapterserve.v1 import generation_pb2, generation_pb2_grpc

PROMPTS = ["The capital of France is", "Hello", "One two three four"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def same(result, alone) -> None:
    assert (result.text, result.token_ids, result.finish_reason) == (
        alone.text,
        alone.token_ids,
        alone.finish_reason,
    )
    assert result.prompt_tokens == alone.prompt_tokens
    assert [(c.index, c.text, c.token_ids) for c in result.choices] == [
        (c.index, c.text, c.token_ids) for c in alone.choices
    ]


def test_the_batch_call_takes_every_parameter_of_generate():
    batch = inspect.signature(sdk_convert.generate_batch_call).parameters
    one = inspect.signature(sdk_convert.generate_call).parameters
    own = {"prompts"}
    left_out = {"prompt", "messages", "request_id"}  # a batch's prompts; ids are the server's
    assert [n for n in batch if n not in own] == [n for n in one if n not in left_out]
    for name in batch.keys() - own:
        assert (batch[name].default, batch[name].kind) == (one[name].default, one[name].kind), name
    hints_batch = typing.get_type_hints(sdk_convert.generate_batch_call)
    hints_one = typing.get_type_hints(sdk_convert.generate_call)
    assert {k: hints_batch[k] for k in batch.keys() - own} == {k: hints_one[k] for k in batch.keys() - own}


def test_each_prompt_gives_what_it_gives_alone(client, tokenizer):
    ids = tokenizer(PROMPTS[1], add_special_tokens=True)["input_ids"]
    prompts = [PROMPTS[0], ids, PROMPTS[2]]
    results = client.generate_batch(prompts, max_new_tokens=6, logprobs=1)
    assert len(results) == 3
    for result, prompt in zip(results, PROMPTS, strict=True):
        same(result, client.generate(prompt, max_new_tokens=6, logprobs=1))
        assert len(result.logprobs) == len(result.token_ids)
    assert len({r.request_id for r in results}) == 3

    sampled = client.generate_batch(PROMPTS[:2], max_new_tokens=6, temperature=1.0, seed=11, n=2)
    for result, prompt in zip(sampled, PROMPTS[:2], strict=True):
        assert len(result.choices) == 2
        same(result, client.generate(prompt, max_new_tokens=6, temperature=1.0, seed=11, n=2))


async def test_the_async_client_gives_the_same(server, client):
    async with AsyncClient(server.target, timeout=30) as aclient:
        results = await aclient.generate_batch(PROMPTS, max_new_tokens=5, adapter=None)
    for result, alone in zip(results, client.generate_batch(PROMPTS, max_new_tokens=5), strict=True):
        same(result, alone)


def test_a_bad_batch_is_refused_whole(client):
    with pytest.raises(InvalidArgument, match="at least one prompt"):
        client.generate_batch([])
    with pytest.raises(InvalidArgument, match="prompts"):
        client.generate_batch("not a list")
    with pytest.raises(InvalidArgument, match=r"requests\[1\]\.prompt"):
        client.generate_batch(["Hello", ""])
    with pytest.raises(InvalidArgument, match="max_batch_rows=256"):
        client.generate_batch(["Hello"] * 65, n=4)
    with pytest.raises(NotFound):
        client.generate_batch(["Hello", "Hi"], adapter="no-such-adapter")
    limits = client.server_info().limits
    assert (limits.max_batch_rows, limits.max_batch_tokens) == (256, 65536)


def test_a_batch_names_one_adapter_and_distinct_ids(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        mixed = generation_pb2.GenerateBatchRequest(
            requests=[
                generation_pb2.GenerateRequest(prompt="a"),
                generation_pb2.GenerateRequest(prompt="b", adapter="x"),
            ]
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.GenerateBatch(mixed)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "same adapter" in caught.value.details()
        twice = generation_pb2.GenerateBatchRequest(
            requests=[generation_pb2.GenerateRequest(prompt="a", request_id="r")] * 2
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.GenerateBatch(twice)
        assert "requests[1].request_id" in caught.value.details()
        named = generation_pb2.GenerateBatchRequest(
            requests=[
                generation_pb2.GenerateRequest(prompt="a", request_id="job"),
                generation_pb2.GenerateRequest(
                    prompt="b", sampling=generation_pb2.SamplingParams(max_new_tokens=3)
                ),
            ]
        )
        reply = stub.GenerateBatch(named)
        assert [r.request_id for r in reply.responses] == ["job", "job-1"]
        assert reply.prompt_tokens == sum(r.prompt_tokens for r in reply.responses)
        assert reply.generated_tokens == sum(r.generated_tokens for r in reply.responses)
        assert reply.responses[1].generated_tokens <= 3
        assert all(0 <= r.timing.time_to_first_token_s <= r.timing.total_s for r in reply.responses)


def collect(pairs) -> dict[int, dict[int, list]]:
    """position -> choice -> that choice's chunks, in order."""
    out: dict[int, dict[int, list]] = {}
    for position, chunk in pairs:
        out.setdefault(position, {}).setdefault(chunk.choice, []).append(chunk)
    return out


def test_stream_batch_gives_each_prompt_its_stream_alone(client):
    args = dict(max_new_tokens=6, temperature=1.0, seed=5, n=2, logprobs=1)
    pairs = list(client.stream_batch(PROMPTS, **args))
    assert [chunk.index for _, chunk in pairs] == list(range(len(pairs)))
    streams = collect(pairs)
    assert sorted(streams) == [0, 1, 2]
    for position, prompt in enumerate(PROMPTS):
        alone = client.generate(prompt, **args)
        for choice, want in enumerate(alone.choices):
            chunks = streams[position][choice]
            assert [c.finish_reason is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
            assert "".join(c.text for c in chunks) == want.text
            assert [t for c in chunks for t in c.token_ids] == want.token_ids
            last = chunks[-1]
            assert last.prompt_tokens == alone.prompt_tokens
            assert last.generated_tokens == len(want.token_ids)
            assert (
                last.timings is not None and 0 <= last.timings.time_to_first_token_s <= last.timings.total_s
            )
            assert len({c.request_id for c in chunks}) == 1


async def test_async_stream_batch_and_an_early_close(server, client):
    want = collect(client.stream_batch(PROMPTS, max_new_tokens=5))
    async with AsyncClient(server.target, timeout=30) as aclient:
        got = collect([pair async for pair in aclient.stream_batch(PROMPTS, max_new_tokens=5)])
        assert {p: {c: "".join(x.text for x in v) for c, v in d.items()} for p, d in got.items()} == {
            p: {c: "".join(x.text for x in v) for c, v in d.items()} for p, d in want.items()
        }
        stream = aclient.stream_batch(PROMPTS, max_new_tokens=40, ignore_eos=True)
        await anext(stream)
        await stream.aclose()  # cancels the call (the server cancels every prompt of it)
        with pytest.raises(InvalidArgument, match=r"requests\[2\]"):
            async for _ in aclient.stream_batch(["a", "b", ""]):
                pass
