"""A list of prompts on the embedded model (SmolLM2-135M-Instruct) through the real `openai` package:
greedy text per prompt as alone, and lm-evaluation-harness's multiple-choice requests (token-id lists,
echo, logprobs) scoring and ranking the choices as one request per prompt does."""

from __future__ import annotations

import openai
import pytest

from tests.helpers.server_process import start_server

pytestmark = pytest.mark.smollm2

BASE = "smollm2"
QUESTIONS = ["What is the capital of France?", "What is the capital of Japan?"]
CHOICES = [" Paris", " Berlin", " Tokyo", " Rome"]


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("embedded-batch-store") / "store"
    proc = start_server(
        smollm2_dir, store, extra_args=("--http-port", "0", "--served-model-name", BASE, "--demo-adapters")
    )
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("model", [BASE, "demo-lora"])
def test_greedy_text_per_prompt_is_the_prompt_alone(oai, model):
    prompts = [f"Question: {q}\nAnswer:" for q in QUESTIONS] + ["Once upon a time"]
    batch = oai.completions.create(model=model, prompt=prompts, max_tokens=12, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    for choice, prompt in zip(batch.choices, prompts, strict=True):
        alone = oai.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0]
        assert (choice.text, choice.finish_reason) == (alone.text, alone.finish_reason)


def test_multiple_choice_loglikelihoods_of_a_list_rank_as_one_request_each(oai, tokenizer):
    contexts = [tokenizer(f"Question: {q}\nAnswer:")["input_ids"] for q in QUESTIONS]
    requests = [
        ctx + tokenizer(c, add_special_tokens=False)["input_ids"] for ctx in contexts for c in CHOICES
    ]

    def loglikelihoods(replies: list) -> list[float]:
        out = []
        for choice, ids, ctx in zip(replies, requests, [c for c in contexts for _ in CHOICES], strict=True):
            values = choice.logprobs.token_logprobs
            assert len(values) == len(ids) + 1  # echo: the prompt, then the one generated token
            out.append(sum(values[len(ctx) : len(ids)]))
        return out

    args = dict(model=BASE, max_tokens=1, temperature=0, echo=True, logprobs=1)
    batched = loglikelihoods(oai.completions.create(prompt=requests, **args).choices)
    alone = loglikelihoods([oai.completions.create(prompt=r, **args).choices[0] for r in requests])
    assert batched == pytest.approx(alone, abs=1e-4)
    best = [max(range(len(CHOICES)), key=lambda i, q=q: batched[q * len(CHOICES) + i]) for q in range(2)]
    assert [CHOICES[i] for i in best] == [" Paris", " Tokyo"]
