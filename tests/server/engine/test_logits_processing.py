"""OpenAI's presence/frequency penalties, logit_bias, min_tokens and per-row logprobs in the batched
sampler, against a straightforward per-row reference over several steps, in batches that mix them with
plain greedy rows, repetition-penalty rows and sampled rows."""

from __future__ import annotations

import torch

from adapterserve.server.engine.row_sampler import RowSampler
from adapterserve.server.engine.sampling import sample_rows, sample_step
from adapterserve.server.engine.types import SamplingParams

CPU = torch.device("cpu")
EOS = (3, 11)


def _sampler(prompt=(1, 2), **params) -> RowSampler:
    return RowSampler.create(SamplingParams(**params), prompt, CPU, EOS)


def _logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def reference_choice(logits: torch.Tensor, params: SamplingParams, generated: list[int]) -> int:
    """One greedy row the plain way: penalties over its generated tokens, bias, EOS masked before
    min_tokens, argmax."""
    x = logits.double().clone()
    for token in set(generated):
        x[token] -= params.presence_penalty + params.frequency_penalty * generated.count(token)
    for token, bias in params.logit_bias:
        x[token] += bias
    if len(generated) < params.min_tokens and not params.ignore_eos:
        x[list(EOS)] = float("-inf")
    return int(x.argmax())


def test_penalties_bias_and_min_tokens_follow_the_reference_over_steps():
    vocab = 24
    params = [
        SamplingParams(frequency_penalty=8.0),
        SamplingParams(),  # a plain greedy row in the same batch
        SamplingParams(presence_penalty=1.5, frequency_penalty=-0.3),
        SamplingParams(logit_bias=((5, 4.0), (6, -100.0))),
        SamplingParams(min_tokens=4, logit_bias=((3, 50.0),)),  # EOS favoured but masked 4 steps
        SamplingParams(min_tokens=4, ignore_eos=True, logit_bias=((3, 50.0),)),  # ignore_eos: no mask
        SamplingParams(presence_penalty=0.5, logit_bias=((7, 2.0),), min_tokens=2),
    ]
    samplers = [RowSampler.create(p, (1, 2), CPU, EOS) for p in params]
    history: list[list[int]] = [[] for _ in params]
    for step in range(8):
        logits = _logits(len(params), vocab, 10 + step)
        logits[:, 9] = 15.0  # a favourite the penalties must push down once generated
        before = logits.clone()
        got = sample_rows(logits, samplers)
        torch.testing.assert_close(logits, before)  # the model's logits are never changed in place
        want = [reference_choice(logits[i], p, history[i]) for i, p in enumerate(params)]
        assert got == want, step
        for h, token in zip(history, got, strict=True):
            h.append(token)
    assert history[1] == [9] * 8  # no penalty: the favourite every step
    assert history[0].count(9) < 8  # the frequency penalty stopped the repetition
    assert 3 not in history[4][:4] and history[4][4] == 3  # EOS from step min_tokens on
    assert history[5][0] == 3
    assert 6 not in sum(history, [])


def test_strong_frequency_penalty_never_repeats_a_token():
    sampler = _sampler(frequency_penalty=100.0)
    out = []
    for step in range(20):
        logits = _logits(1, 64, step)
        logits[0, 9] = 30.0
        out += sample_rows(logits, [sampler])
    assert len(set(out)) == len(out)


def test_sampled_rows_with_processors_keep_their_support():
    """At a temperature, a -100 bias and the EOS mask still exclude their tokens from the draw."""
    samplers = [_sampler(temperature=1.0, seed=i, logit_bias=((0, -100.0),), min_tokens=50) for i in range(4)]
    for _step in range(30):
        logits = torch.zeros(4, 16)
        logits[:, 0] = 5.0
        logits[:, list(EOS)] = 5.0
        for token in sample_rows(logits, samplers):
            assert token not in (0, *EOS)


def test_logprobs_are_the_raw_log_softmax_of_the_chosen_token_and_its_top_k():
    logits = _logits(5, 40, 3)
    samplers = [
        _sampler(logprobs=3),
        _sampler(),
        _sampler(temperature=0.8, seed=1, logprobs=0),
        _sampler(frequency_penalty=1.0, logit_bias=((1, 9.0),), logprobs=5),
        _sampler(temperature=1.2, logprobs=2),
    ]
    tokens, logprobs = sample_step(logits, samplers)
    raw = torch.log_softmax(logits.double(), dim=-1)
    assert logprobs[1] is None
    for row, k in ((0, 3), (2, 0), (3, 5), (4, 2)):
        lp = logprobs[row]
        assert lp is not None and lp.token_id == tokens[row]
        assert abs(lp.logprob - float(raw[row, tokens[row]])) < 1e-5
        top = torch.topk(raw[row], k)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == [float(v) for v in top.values] or all(
            abs(a - float(b)) < 1e-5 for (_, a), b in zip(lp.top, top.values, strict=True)
        )
    assert tokens[3] == 1  # the bias chose the token; its logprob is still the raw model's
    assert logprobs[3].logprob < logprobs[3].top[0][1] or logprobs[3].top[0][0] == 1


def test_an_all_greedy_step_with_logprobs_matches_argmax():
    logits = _logits(3, 30, 8)
    tokens, logprobs = sample_step(logits, [_sampler(logprobs=1) for _ in range(3)])
    assert tokens == logits.argmax(dim=-1).tolist()
    assert all(lp is not None and lp.top[0][0] == t for lp, t in zip(logprobs, tokens, strict=True))


def test_logprobs_at_temperature_are_those_of_the_scaled_logits():
    logits = _logits(4, 40, 5)
    logits[1] = logits[0]
    samplers = [
        _sampler(temperature=0.5, seed=1, logprobs=2, logprobs_at_temperature=True),
        _sampler(temperature=0.5, seed=1, logprobs=2),  # the same row without: the raw distribution
        _sampler(logprobs=1, logprobs_at_temperature=True),  # greedy: nothing to scale by, raw
        _sampler(temperature=2.0, seed=3, logprobs=0, logprobs_at_temperature=True),
    ]
    tokens, logprobs = sample_step(logits, samplers)
    assert tokens[0] == tokens[1]  # the flag changes what is reported, not what is drawn
    for row, temperature in ((0, 0.5), (1, 1.0), (2, 1.0), (3, 2.0)):
        want = torch.log_softmax(logits[row].double() / temperature, dim=-1)
        lp = logprobs[row]
        assert lp is not None and abs(lp.logprob - float(want[tokens[row]])) < 1e-5, row
        for token, value in lp.top:
            assert abs(value - float(want[token])) < 1e-5, row
    assert abs(logprobs[0].logprob - logprobs[1].logprob) > 1e-3
