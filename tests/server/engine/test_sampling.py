"""The batched sampler against a plain per-row reference: greedy limits, the repetition penalty as in
transformers, the distribution of the draws, and seeded rows independent of the rest of the batch."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from adapterserve.server.engine.row_sampler import RowSampler
from adapterserve.server.engine.sampling import apply_repetition_penalty, filter_thresholds, sample_rows
from adapterserve.server.engine.types import SamplingParams

CPU = torch.device("cpu")


def _sampler(prompt=(1, 2, 3), **params) -> RowSampler:
    return RowSampler.create(SamplingParams(**params), prompt, CPU)


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row, the straightforward way: softmax(logits / T) restricted to top-k (ties kept), then to
    the nucleus (a token stays when the mass strictly above it is <= top_p), renormalized."""
    x = logits.double() / temperature
    if 0 < top_k < x.numel():
        x = x.masked_fill(x < torch.topk(x, top_k).values[-1], float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        above = torch.stack([probs[x > v].sum() for v in x])
        probs = torch.where(above <= top_p, probs, 0.0)
    return probs / probs.sum()


def _logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_limits_equal_the_argmax():
    logits = _logits(6, 500, 0)
    top = logits.argmax(dim=-1).tolist()
    assert sample_rows(logits, [_sampler() for _ in range(6)]) == top
    assert sample_rows(logits, [_sampler(temperature=1.5, top_k=1) for _ in range(6)]) == top
    assert sample_rows(logits, [_sampler(temperature=1.5, top_p=1e-6) for _ in range(6)]) == top
    mixed = [
        _sampler(temperature=2.0, top_k=1, seed=3),
        _sampler(),
        _sampler(temperature=0.7, top_p=1e-6),
        _sampler(temperature=1.0, top_k=1, top_p=0.5, seed=4),
        _sampler(temperature=0.9, top_k=40, top_p=1e-6),
        _sampler(),
    ]
    assert sample_rows(logits, mixed) == top


def test_repetition_penalty_matches_transformers():
    logits = _logits(3, 64, 1)
    seen_ids = [[0, 5, 7, 7, 63], [1, 2, 3], [10, 20, 30, 40]]
    penalties = [1.3, 0.7, 2.0]
    seen = torch.zeros(3, 64, dtype=torch.bool)
    for row, ids in enumerate(seen_ids):
        seen[row, ids] = True
    ours = apply_repetition_penalty(logits, seen, torch.tensor(penalties))
    for row, (ids, penalty) in enumerate(zip(seen_ids, penalties, strict=True)):
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row : row + 1], theirs)


def test_penalized_greedy_rows_follow_transformers_over_steps():
    """Temperature 0 with a penalty: each step is the argmax of transformers' penalized logits over the
    prompt + the tokens so far (the seen masks are updated in place, step after step)."""
    prompts = [(4, 9), (1,), (2, 3, 5)]
    samplers = [_sampler(p, repetition_penalty=r) for p, r in zip(prompts, (1.5, 3.0, 1.2), strict=True)]
    history = [list(p) for p in prompts]
    for step in range(6):
        logits = _logits(3, 16, 100 + step)
        logits[:, 7] = 5.0  # a favourite that the penalty has to push down once seen
        expected = []
        for row, sampler in enumerate(samplers):
            processor = RepetitionPenaltyLogitsProcessor(sampler.params.repetition_penalty)
            penalized = processor(torch.tensor([history[row]]), logits[row : row + 1].clone())
            expected.append(int(penalized.argmax()))
        got = sample_rows(logits, samplers)
        assert got == expected
        for row, token in enumerate(got):
            history[row].append(token)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.8, 6, 0.75)],
)
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
    """2,000 seeded rows (deterministic, so this cannot flake) against the reference distribution."""
    vocab, draws = 10, 2000
    logits = torch.tensor([2.0, 1.5, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0])
    samplers = [
        _sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=1000 + i) for i in range(draws)
    ]
    tokens = sample_rows(logits.expand(draws, vocab), samplers)
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double()
    expected = reference_probs(logits, temperature, top_k, top_p) * draws
    assert torch.all(counts[expected == 0] == 0), "a filtered-out token was drawn"
    live = expected > 0
    chi2 = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
    # <= 9 degrees of freedom; P(chi2 > 40) < 1e-5 for a correct sampler
    assert chi2 < 40, (chi2, counts.tolist(), expected.tolist())


def test_thresholds_keep_ties_and_the_reference_set():
    scaled = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0], [0.0, 1.0, 5.0, 1.0, 4.9, -1.0]])
    thr = filter_thresholds(scaled, [2, 0], [1.0, 0.5])
    kept = scaled >= thr
    assert kept[0].tolist() == [True, True, True, True, False, False]  # ties at the k-th value stay
    for row, (k, p) in enumerate([(2, 1.0), (0, 0.5)]):
        assert kept[row].tolist() == (reference_probs(scaled[row], 1.0, k, p) > 0).tolist()
    # the same thresholds whether the batch needs a full sort or a top-k window
    alone = filter_thresholds(scaled[:1], [2], [0.3])
    with_full_sort = filter_thresholds(scaled, [2, 0], [0.3, 0.5])
    assert torch.equal(alone, with_full_sort[:1])


def _batch_rows() -> list[dict]:
    return [
        dict(),
        dict(temperature=1.0),
        dict(temperature=0.5, top_k=3, repetition_penalty=1.4, seed=9),
        dict(temperature=1.2, top_p=0.6),  # forces a full sort
        dict(temperature=0.0, repetition_penalty=1.1),
        dict(temperature=2.0, top_k=200, top_p=0.95, seed=77),
    ]


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=1234),
        dict(temperature=1.0, seed=5),
        dict(temperature=0.6, top_p=0.8, seed=6),
        dict(temperature=1.4, top_k=7, seed=7),
    ],
)
def test_a_seeded_row_draws_the_same_tokens_alone_and_in_any_batch(params):
    vocab, steps = 300, 12
    # logits on a coarse grid (many exact ties, as bf16 logits have) that change every step
    steps_logits = [(_logits(8, vocab, 10 + s) * 4).round() / 4 for s in range(steps)]
    prompt = (3, 4, 5)

    def run(row: int, others: list[dict], mine: dict = params) -> list[int]:
        samplers = [_sampler(prompt, **o) for o in others]
        samplers.insert(row, _sampler(prompt, **mine))
        out = []
        for logits in steps_logits:
            batch = torch.cat([logits[:row], logits[7:8], logits[row : len(others)]])
            out.append(sample_rows(batch, samplers)[row])
        return out

    alone = run(0, [])
    assert len(set(alone)) > 1
    assert run(0, _batch_rows()) == alone
    assert run(3, _batch_rows()) == alone
    assert run(2, _batch_rows()[:4]) == alone
    assert run(0, [], {**params, "seed": params["seed"] + 1}) != alone


def test_unseeded_rows_share_one_draw_and_sample():
    logits = torch.zeros(64, 4)
    tokens = sample_rows(logits, [_sampler(temperature=1.0) for _ in range(64)])
    assert len(set(tokens)) > 1 and all(0 <= t < 4 for t in tokens)


def test_a_step_reads_the_device_once(monkeypatch):
    """No per-row int(): the chosen tokens come back in one .tolist(), nothing else is read."""
    samplers = [_sampler(prompt, **o) for prompt, o in zip([(1, 2)] * 6, _batch_rows(), strict=True)]
    reads = []
    real_tolist = torch.Tensor.tolist

    def tolist(self):
        reads.append(tuple(self.shape))
        return real_tolist(self)

    def forbidden(self, *args):
        raise AssertionError("a tensor was read on the host")

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    for name in ("item", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for step in range(3):
        sample_rows(_logits(6, 100, step), samplers)
    assert reads == [(6,)] * 3
