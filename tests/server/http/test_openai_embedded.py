"""The OpenAI API's sampling features on the embedded model (SmolLM2-135M-Instruct) through the real
`openai` package: logprobs equal the Score RPC's, echo returns the prompt's, n=4 from one request, and a strong
frequency penalty stops a repetition."""

from __future__ import annotations

from collections import Counter

import openai
import pytest

from adapterserve import Client
from tests.helpers.server_process import start_server

BASE = "smollm2"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("embedded-store") / "store"
    proc = start_server(
        smollm2_dir, store, extra_args=("--http-port", "0", "--served-model-name", BASE, "--demo-adapters")
    )
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(server.target) as client:
        yield client


@pytest.mark.parametrize("model", [BASE, "demo-lora"])
def test_logprobs_and_echo_equal_the_score_rpc(oai, grpc_client, model):
    adapter = None if model == BASE else model
    choice = oai.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2
    ).choices[0]
    score = grpc_client.score(PROMPT, choice.text, adapter=adapter)
    generated = grpc_client.generate(PROMPT, adapter=adapter, max_new_tokens=8, temperature=0).token_ids
    assert list(score.token_ids) == list(generated)  # the text re-tokenizes to the generated ids
    assert choice.logprobs.token_logprobs == pytest.approx(list(score.token_logprobs), abs=1e-4)
    echoed = oai.completions.create(
        model=model, prompt=PROMPT + choice.text, max_tokens=0, echo=True, logprobs=1
    ).choices[0]
    assert echoed.text == PROMPT + choice.text
    assert echoed.logprobs.token_logprobs[0] is None
    n = len(score.token_ids)
    assert echoed.logprobs.token_logprobs[-n:] == pytest.approx(list(score.token_logprobs), abs=1e-4)


def test_four_choices_and_a_frequency_penalty(oai):
    many = oai.completions.create(model=BASE, prompt=PROMPT, max_tokens=8, n=4, temperature=1.0, seed=11)
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and len({c.text for c in many.choices}) > 1
    prompt = "Repeat the word forever: hello hello hello hello hello hello"
    args = dict(model=BASE, prompt=prompt, max_tokens=24, temperature=0, logprobs=0)
    plain = oai.completions.create(**args).choices[0].logprobs.tokens
    penalized = oai.completions.create(**args, frequency_penalty=2.0).choices[0].logprobs.tokens
    top_plain = Counter(plain).most_common(1)[0][1]
    assert top_plain >= 6  # the model repeats itself
    assert Counter(penalized).most_common(1)[0][1] < top_plain
