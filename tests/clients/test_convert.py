"""SDK arguments become the documented wire messages, and wire replies become typed results."""

from __future__ import annotations

import pytest

from adapterserve import ChatMessage, FinishReason, GenerateResult, InvalidArgument, StreamChunk
from adapterserve.convert import build_generate_request
from adapterserve.replies import chunk_from_proto, result_from_proto
from adapterserve.v1 import generation_pb2


def test_prompt_request_with_sampling():
    req = build_generate_request(
        "hi", None, "my-lora", max_new_tokens=5, temperature=0.5, top_p=0.9, top_k=3, seed=7, stop="\n"
    )
    assert req.WhichOneof("input") == "prompt" and req.prompt == "hi"
    assert req.adapter == "my-lora"
    s = req.sampling
    assert (s.max_new_tokens, s.top_k, s.seed, list(s.stop)) == (5, 3, 7, ["\n"])
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9)
    assert not s.HasField("repetition_penalty")
    assert not s.logprobs_at_temperature
    scaled = build_generate_request(
        "hi", None, None, temperature=0.7, logprobs=0, logprobs_at_temperature=True
    )
    assert scaled.sampling.logprobs_at_temperature and scaled.sampling.logprobs == 0


def test_defaults_leave_optional_fields_unset():
    req = build_generate_request("hi", None, None)
    assert req.adapter == ""
    assert not req.sampling.HasField("max_new_tokens") and not req.sampling.HasField("seed")


def test_messages_from_dicts_models_or_a_list_prompt():
    msgs = [{"role": "system", "content": "be brief"}, ChatMessage(role="user", content="hi")]
    a = build_generate_request(None, msgs, None)
    b = build_generate_request(msgs, None, None)
    assert a == b
    assert [(m.role, m.content) for m in a.messages.messages] == [("system", "be brief"), ("user", "hi")]


def test_exactly_one_input():
    with pytest.raises(InvalidArgument):
        build_generate_request(None, None, None)
    with pytest.raises(InvalidArgument):
        build_generate_request("hi", [{"role": "user", "content": "x"}], None)
    with pytest.raises(InvalidArgument, match="role"):
        build_generate_request(None, [{"content": "x"}], None)


def test_result_and_chunks_add_up():
    reply = generation_pb2.GenerateResponse(
        request_id="r1",
        text="ab",
        token_ids=[1, 2],
        finish_reason=generation_pb2.FINISH_REASON_EOS,
        prompt_tokens=3,
        generated_tokens=2,
        timing=generation_pb2.Timing(time_to_first_token_s=0.1, total_s=0.2),
    )
    result = result_from_proto(reply)
    assert result.finish_reason is FinishReason.EOS and result.token_ids == [1, 2]
    assert result.timings.total_s == pytest.approx(0.2)
    first = chunk_from_proto(
        generation_pb2.GenerateStreamResponse(request_id="r1", text="a", token_ids=[1]), 0
    )
    last = chunk_from_proto(
        generation_pb2.GenerateStreamResponse(
            request_id="r1",
            text="b",
            token_ids=[2],
            finish_reason=generation_pb2.FINISH_REASON_EOS,
            prompt_tokens=3,
            generated_tokens=2,
            timing=reply.timing,
        ),
        1,
    )
    assert not first.is_last and first.timings is None and last.is_last
    assert GenerateResult.from_chunks([first, last]) == result.model_copy(update={"adapter": ""})
    with pytest.raises(ValueError):
        GenerateResult.from_chunks([first])
    assert isinstance(first, StreamChunk)
