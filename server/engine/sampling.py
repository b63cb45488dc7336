"""Per-row sampling: repetition penalty, temperature, top-k, top-p, seeded generators, greedy at T=0."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterserve.server.engine.types import SamplingParams


@dataclass
class RowSampler:
    """Sampling state of one request: its params, its generator (seeded = reproducible), seen tokens."""

    params: SamplingParams
    generator: torch.Generator | None
    seen: set[int]  # prompt + generated token ids, for the repetition penalty

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: tuple[int, ...], device: torch.device) -> RowSampler:
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=device)
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
        return cls(params=params, generator=generator, seen=set(prompt_ids))


def apply_repetition_penalty(logits: torch.Tensor, seen: set[int], penalty: float) -> torch.Tensor:
    """As transformers' RepetitionPenaltyLogitsProcessor: divide positive, multiply negative logits."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(seen), dtype=torch.long, device=logits.device)
    picked = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V]. Tokens outside the top-k / nucleus get -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the first token always
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_rows(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """logits: [B, V] -> one next token per row."""
    greedy = [
        i for i, s in enumerate(samplers) if s.params.temperature <= 0 and s.params.repetition_penalty == 1.0
    ]
    out: list[int] = [0] * len(samplers)
    if greedy:
        # all-greedy batches (the common case) take the argmax in place; a subset needs its rows
        rows = logits if len(greedy) == len(samplers) else logits[greedy]
        picked = rows.argmax(dim=-1).tolist()
        for i, token in zip(greedy, picked, strict=True):
            out[i] = token
    greedy_set = set(greedy)
    for i, sampler in enumerate(samplers):
        if i in greedy_set:
            continue
        p = sampler.params
        row = apply_repetition_penalty(logits[i], sampler.seen, p.repetition_penalty)
        if p.temperature <= 0:
            out[i] = int(row.argmax())
            continue
        row = filter_top_k_top_p(row / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        out[i] = int(torch.multinomial(probs, 1, generator=sampler.generator))
    for i, sampler in enumerate(samplers):
        sampler.seen.add(out[i])
    return out
