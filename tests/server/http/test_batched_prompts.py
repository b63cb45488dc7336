"""/v1/completions with a list of prompts (strings or token-id lists), against the real server: each
prompt of the list gives exactly what it gives alone, at index prompt_i * n + j, with usage summed."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.http.conftest import GENERATE_TOKEN, SERVED_NAME
from tests.server.http.test_plain_http import assert_openai_error

AUTH = {"Authorization": f"Bearer {GENERATE_TOKEN}"}
PROMPTS = ["The capital of France is", "Hello", "One two three four five six"]


@pytest.fixture(scope="module")
def http(http_server):
    with httpx.Client(base_url=http_server.http_url, headers=AUTH, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def complete(http: httpx.Client, **body) -> dict:
    response = http.post("/completions", json={"model": SERVED_NAME, **body})
    assert response.status_code == 200, response.text
    return response.json()


def assert_same_choices(got: list[dict], want: list[dict]) -> None:
    """The same text, finish reason and logprob tokens (indices aside); logprobs equal to float error
    (rows batched together run other matrix shapes than one row alone)."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a["text"], a["finish_reason"]) == (b["text"], b["finish_reason"])
        if b["logprobs"] is None:
            assert a["logprobs"] is None
            continue
        lp, want_lp = a["logprobs"], b["logprobs"]
        assert lp["tokens"] == want_lp["tokens"] and lp["text_offset"] == want_lp["text_offset"]
        assert [v is None for v in lp["token_logprobs"]] == [v is None for v in want_lp["token_logprobs"]]
        got_values = [v for v in lp["token_logprobs"] if v is not None]
        assert got_values == pytest.approx([v for v in want_lp["token_logprobs"] if v is not None], abs=1e-4)
        for top, want_top in zip(lp["top_logprobs"], want_lp["top_logprobs"], strict=True):
            assert (top is None) == (want_top is None)
            if top is not None:
                assert set(top) == set(want_top)
                assert list(top.values()) == pytest.approx([want_top[k] for k in top], abs=1e-4)


@pytest.mark.parametrize("model", [SERVED_NAME, "demo-lora", "demo-prefix", "demo-prompt"])
def test_each_greedy_prompt_of_a_list_equals_the_prompt_alone(http, model):
    args = dict(model=model, max_tokens=6, temperature=0, logprobs=2)
    batch = complete(http, prompt=PROMPTS, **args)
    alone = [complete(http, prompt=p, **args) for p in PROMPTS]
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
    assert_same_choices(batch["choices"], [a["choices"][0] for a in alone])
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert batch["usage"][key] == sum(a["usage"][key] for a in alone)


def test_n_choices_with_a_seed_per_prompt_index_and_usage(http):
    args = dict(max_tokens=8, temperature=1.0, seed=1234, n=3)
    batch = complete(http, prompt=PROMPTS[:2], **args)
    alone = [complete(http, prompt=p, **args) for p in PROMPTS[:2]]
    assert [c["index"] for c in batch["choices"]] == list(range(6))  # prompt_i * n + j
    for i, reply in enumerate(alone):
        assert_same_choices(batch["choices"][i * 3 : i * 3 + 3], reply["choices"])
    # prompt tokens once per prompt (not per choice), completion tokens of every choice
    assert batch["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert batch["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    # the choices sampled: not all equal (the seed differs per choice)
    assert len({c["text"] for c in batch["choices"][:3]}) > 1


def test_token_id_lists_equal_their_text_prompts(http, tokenizer):
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    by_ids = complete(http, prompt=ids, max_tokens=5, temperature=0)
    by_text = complete(http, prompt=PROMPTS, max_tokens=5, temperature=0)
    assert_same_choices(by_ids["choices"], by_text["choices"])
    assert by_ids["usage"] == by_text["usage"]
    # echo repeats each choice's own prompt (token ids decoded)
    echoed = complete(http, prompt=ids, max_tokens=2, temperature=0, echo=True)
    plain = complete(http, prompt=ids, max_tokens=2, temperature=0)
    for choice, prompt_ids, alone in zip(echoed["choices"], ids, plain["choices"], strict=True):
        assert choice["text"] == tokenizer.decode(prompt_ids) + alone["text"]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_lm_eval_scoring_list_equals_each_prompt_alone(http, tokenizer, max_tokens):
    """lm-evaluation-harness's loglikelihood requests: token-id lists with echo and logprobs (max_tokens
    0 or 1), one of them a single token (nothing to score)."""
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in PROMPTS] + [[5]]
    args = dict(max_tokens=max_tokens, temperature=0, echo=True, logprobs=1)
    batch = complete(http, prompt=ids, **args)
    alone = [complete(http, prompt=p, **args) for p in ids]
    assert len(batch["choices"]) == len(ids)
    assert_same_choices(batch["choices"], [reply["choices"][0] for reply in alone])
    for got, prompt_ids in zip(batch["choices"], ids, strict=True):
        assert got["finish_reason"] == "length" and got["logprobs"]["token_logprobs"][0] is None
        assert len(got["logprobs"]["tokens"]) == len(prompt_ids) + max_tokens
    assert batch["usage"]["prompt_tokens"] == sum(len(p) for p in ids)


def test_stop_and_response_format_apply_to_every_prompt(http):
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string", "maxLength": 4}},
        "required": ["a"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    args = dict(max_tokens=24, temperature=0, response_format=fmt)
    batch = complete(http, prompt=PROMPTS, **args)
    alone = [complete(http, prompt=p, **args)["choices"][0] for p in PROMPTS]
    assert_same_choices(batch["choices"], alone)
    stops = complete(http, prompt=PROMPTS, max_tokens=12, temperature=0, stop=["e", "o"])
    alone = [complete(http, prompt=p, max_tokens=12, temperature=0, stop=["e", "o"]) for p in PROMPTS]
    assert_same_choices(stops["choices"], [reply["choices"][0] for reply in alone])
    for choice in stops["choices"]:
        assert "e" not in choice["text"] and "o" not in choice["text"]


def read_stream(http: httpx.Client, body: dict) -> tuple[dict[int, str], dict[int, str], dict | None]:
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    with http.stream("POST", "/completions", json={"model": SERVED_NAME, "stream": True, **body}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        frame = json.loads(line.removeprefix("data: "))
        if frame.get("usage"):
            assert frame["choices"] == []
            usage = frame["usage"]
        for choice in frame["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"] is not None:
                assert choice["index"] not in finishes
                finishes[choice["index"]] = choice["finish_reason"]
    return texts, finishes, usage


def test_a_streamed_list_carries_each_choice_index_and_the_usage_at_the_end(http):
    body = dict(prompt=PROMPTS, max_tokens=6, temperature=1.0, seed=7, n=2, echo=True)
    texts, finishes, usage = read_stream(http, {**body, "stream_options": {"include_usage": True}})
    unary = complete(http, **body)
    assert sorted(texts) == sorted(finishes) == list(range(6))
    assert [texts[i] for i in range(6)] == [c["text"] for c in unary["choices"]]
    assert [finishes[i] for i in range(6)] == [c["finish_reason"] for c in unary["choices"]]
    assert usage == unary["usage"]


@pytest.mark.parametrize(
    ("prompt", "named"),
    [
        ([], "empty"),
        (["a", 5], "not a mix"),
        ([[1, 2], "a"], "not a mix"),
        ([[1, 2], []], "prompt[1]"),
        (["Hello", ""], "prompt[1]"),
        ([[1, 2], [10**9]], "prompt[1]"),
        (["Hello"] * 129, "max_batch_rows"),  # 129 prompts x n 2 > 256 rows
    ],
)
def test_a_bad_list_is_refused_whole_with_a_400(http, prompt, named):
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": 2, "n": 2}
    message = assert_openai_error(http.post("/completions", json=body), 400)
    assert named in message
    assert http.post("/completions", json={**body, "stream": True}).status_code == 400


def test_a_too_long_prompt_of_a_list_names_its_position(http):
    body = {"model": SERVED_NAME, "prompt": ["Hello", "word " * 5000], "max_tokens": 2}
    message = assert_openai_error(http.post("/completions", json=body), 400)
    assert message.startswith("prompt[1]: ") and "max_prompt_tokens" in message
