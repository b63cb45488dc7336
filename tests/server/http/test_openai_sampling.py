"""logprobs, echo, n, penalties, logit_bias and min_tokens through the real `openai` package, checked
against the gRPC API (Score) of the same server."""

from __future__ import annotations

import math

import openai
import pytest

from adapterserve import Client
from tests.server.http.conftest import GENERATE_TOKEN, SERVED_NAME

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def oai(http_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_server.http_url, api_key=GENERATE_TOKEN, max_retries=0)


@pytest.fixture(scope="module")
def grpc_client(http_server):
    with Client(http_server.target, token=GENERATE_TOKEN) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("model", [SERVED_NAME, "demo-lora"])
def test_completion_logprobs_equal_the_prefill_and_score_rpc(oai, grpc_client, tokenizer, model):
    adapter = None if model == SERVED_NAME else model
    got = oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    choice = got.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        # greedy: the chosen token is the most likely one (its text may be shared by other tokens: a
        # map keyed by text can hold fewer than 3 entries)
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(logprob, abs=1e-6)
    # the same tokens scored by a prefill (echo of prompt + generated ids: the Score path's code; the
    # tiny tokenizer does not re-tokenize every generated text to the same ids, so ids are sent)
    generated = grpc_client.generate(PROMPT, adapter=adapter, max_new_tokens=8, temperature=0).token_ids
    prompt_ids = tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    echoed = oai.completions.create(
        model=model, prompt=[*prompt_ids, *generated], max_tokens=0, echo=True, logprobs=0
    ).choices[0]
    assert echoed.logprobs.token_logprobs[-8:] == pytest.approx(lp.token_logprobs, abs=1e-4)
    score = grpc_client.score(PROMPT, choice.text, adapter=adapter)
    if list(score.token_ids) == list(generated):  # the text re-tokenizes to the same ids: Score directly
        assert lp.token_logprobs == pytest.approx(list(score.token_logprobs), abs=1e-4)


def test_echo_returns_the_prompt_logprobs_of_the_score_rpc(oai, grpc_client, tokenizer):
    continuation = " Paris, of course"
    score = grpc_client.score(PROMPT, continuation)
    ids = [*tokenizer(PROMPT, add_special_tokens=True)["input_ids"], *score.token_ids]
    got = oai.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    choice = got.choices[0]
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(ids) and choice.finish_reason == "length"
    assert choice.text.endswith(continuation.strip())
    n = len(score.token_ids)
    assert lp.token_logprobs[-n:] == pytest.approx(list(score.token_logprobs), abs=1e-4)
    # echo with generated tokens: the prompt first, then the completion (and its logprobs after the
    # prompt's, the same as without echo)
    args = dict(model=SERVED_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    echoed = oai.completions.create(**args, echo=True).choices[0]
    plain = oai.completions.create(**args).choices[0]
    assert echoed.text == PROMPT + plain.text
    assert echoed.logprobs.token_logprobs[-4:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)


def test_n_choices_seeded_and_streamed(oai):
    args = dict(
        model=SERVED_NAME, prompt=PROMPT, max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True}
    )
    many = oai.completions.create(**args, n=4, seed=7)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.usage.completion_tokens == 4 * 6  # usage counts every choice
    for i, choice in enumerate(many.choices):  # choice i = the request with seed 7 + i
        alone = oai.completions.create(**args, seed=7 + i)
        assert choice.text == alone.choices[0].text
    assert len({c.text for c in many.choices}) > 1
    stream = oai.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        n=3,
        temperature=1.0,
        seed=1,
        stream=True,
        logprobs=True,
        top_logprobs=2,
    )
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.logprobs is not None:
                assert all(len(e.top_logprobs) == 2 for e in c.logprobs.content)
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2}
    unary = oai.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        n=3,
        temperature=1.0,
        seed=1,
    )
    assert [c.message.content for c in unary.choices] == [texts[0], texts[1], texts[2]]


def test_chat_logprobs_shape(oai):
    got = oai.chat.completions.create(
        model="demo-lora",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
    )
    content = got.choices[0].logprobs.content
    assert content and all(len(e.top_logprobs) == 4 for e in content)
    for e in content:
        assert e.top_logprobs[0].token == e.token and e.logprob <= 0
        assert bytes(e.bytes).decode("utf-8") == e.token
        assert math.isclose(e.top_logprobs[0].logprob, e.logprob, abs_tol=1e-6)


def test_penalties_and_bias_change_the_text_as_openai_documents(oai, tokenizer):
    args = dict(model=SERVED_NAME, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0)
    args["extra_body"] = {"ignore_eos": True}
    token = tokenizer.convert_tokens_to_ids("jo")  # a token of its own text
    text = tokenizer.decode([token])

    def count(**kw) -> int:
        return oai.completions.create(**args, **kw).choices[0].logprobs.tokens.count(text)

    assert count() < 24
    assert count(logit_bias={str(token): 100}) == 24  # +100 forces it
    assert count(logit_bias={str(token): -100}) == 0  # -100 bans it
    biased = {str(token): 4.0}
    assert count(logit_bias=biased) == 24  # favoured: greedy repeats it
    # the presence penalty lowers it once (it was generated): a small one keeps the repetition; the
    # frequency penalty grows with each repetition and ends it, as OpenAI documents
    assert count(logit_bias=biased, presence_penalty=0.5) == 24
    assert count(logit_bias=biased, frequency_penalty=1.0) <= 8
    assert count(logit_bias=biased, presence_penalty=2.0) < 24


def test_min_tokens_and_refusals(oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=4, n=99)
    assert "max_n" in str(err.value) or "n:" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        oai.completions.create(model=SERVED_NAME, prompt=PROMPT, presence_penalty=3)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        oai.completions.create(model=SERVED_NAME, prompt=PROMPT, logit_bias={"x": 1})
    with pytest.raises(openai.BadRequestError, match="max_logprobs"):
        oai.completions.create(model=SERVED_NAME, prompt=PROMPT, logprobs=50)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        oai.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "x"}], top_logprobs=2
        )
    with pytest.raises(openai.BadRequestError, match="echo"):
        oai.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=0)
    got = oai.completions.create(
        model=SERVED_NAME, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"min_tokens": 8}
    )
    assert got.usage.completion_tokens == 8


def test_grpc_and_sdk_carry_the_same_features(oai, grpc_client, http_server):
    import asyncio

    from adapterserve import AsyncClient, InvalidArgument

    result = grpc_client.generate(PROMPT, max_new_tokens=5, temperature=0, logprobs=2, prompt_logprobs=1)
    assert [e.token_id for e in result.logprobs] == result.token_ids
    assert all(len(e.top) == 2 and e.top[0][0] == e.token_id for e in result.logprobs)
    assert len(result.prompt_logprobs) == result.prompt_tokens - 1
    http = oai.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    assert [e.logprob for e in result.logprobs] == pytest.approx(
        http.choices[0].logprobs.token_logprobs, abs=1e-5
    )

    many = grpc_client.generate(PROMPT, max_new_tokens=4, temperature=1.0, seed=3, n=3, ignore_eos=True)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.text == many.choices[0].text and many.token_ids == many.choices[0].token_ids
    alone = grpc_client.generate(PROMPT, max_new_tokens=4, temperature=1.0, seed=5, ignore_eos=True)
    assert many.choices[2].token_ids == alone.token_ids  # choice 2 = seed 3 + 2
    chunks = list(grpc_client.stream(PROMPT, max_new_tokens=4, temperature=1.0, seed=3, n=3, ignore_eos=True))
    for choice in many.choices:
        assert [t for c in chunks if c.choice == choice.index for t in c.token_ids] == choice.token_ids
    assert sum(c.is_last for c in chunks) == 3

    eos_banned = grpc_client.generate(
        PROMPT, max_new_tokens=6, temperature=0, min_tokens=6, logit_bias={result.token_ids[0]: -100.0}
    )
    assert eos_banned.generated_tokens == 6 and eos_banned.token_ids[0] != result.token_ids[0]
    with pytest.raises(InvalidArgument, match="frequency_penalty"):
        grpc_client.generate(PROMPT, frequency_penalty=5.0)
    with pytest.raises(InvalidArgument, match="max_n"):
        grpc_client.generate(PROMPT, n=100)
    assert grpc_client.server_info().limits.max_n == 8

    async def run_async():
        async with AsyncClient(http_server.target, token=GENERATE_TOKEN) as client:
            return await client.generate(PROMPT, max_new_tokens=5, temperature=0, logprobs=2)

    assert asyncio.run(run_async()).logprobs == result.logprobs


def test_streamed_completion_logprobs_and_echo_equal_the_unary_reply(oai):
    args = dict(model="demo-ia3", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=True)
    unary = oai.completions.create(**args).choices[0]
    text, tokens, values, offsets = "", [], [], []
    for chunk in oai.completions.create(**args, stream=True):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                values += choice.logprobs.token_logprobs
                offsets += choice.logprobs.text_offset
    assert text == unary.text and text.startswith(PROMPT)
    assert tokens == unary.logprobs.tokens and offsets == unary.logprobs.text_offset
    assert values[0] is None and values[1:] == pytest.approx(unary.logprobs.token_logprobs[1:], abs=1e-6)
