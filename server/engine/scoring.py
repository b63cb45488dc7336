"""Scoring requests: the log-probabilities of a prompt's last tokens, computed during its prefill.

A request with `score_tokens = n > 0` generates nothing. Its prefill runs as any other (chunked,
batched with other rows, with its adapter: LoRA/IA3 in the linears, prompt tuning's virtual tokens
spliced before the prompt, prefix tuning's K/V in the cache), but the engine keeps every position's
hidden state for it, and for each of the last n prompt tokens t it records
log softmax(logits at the input before t)[t]. This module holds the pure part: which positions of a
prefill chunk predict scored tokens, and their log-probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def scored_positions(
    chunk_start: int, chunk_len: int, virtual_inputs: int, prompt_len: int, score_tokens: int
) -> range:
    """Prefill-input indices inside [chunk_start, chunk_start + chunk_len) whose next-token logits
    predict a scored prompt token. Prompt token t sits at input index virtual_inputs + t (prompt
    tuning's virtual embeddings come first), so it is predicted by input virtual_inputs + t - 1."""
    first = virtual_inputs + (prompt_len - score_tokens) - 1
    last = virtual_inputs + prompt_len - 2  # the input before the prompt's last token
    lo, hi = max(chunk_start, first), min(chunk_start + chunk_len - 1, last)
    return range(lo, hi + 1)


def chunk_logprobs(
    head: Callable[[torch.Tensor], torch.Tensor],
    states: torch.Tensor,  # [chunk_len, H] final-norm states of this row's chunk
    chunk_start: int,
    virtual_inputs: int,
    prompt_ids: Sequence[int],
    score_tokens: int,
) -> list[float]:
    """Log-probabilities of the scored prompt tokens this chunk predicts, in prompt order."""
    positions = scored_positions(chunk_start, states.shape[0], virtual_inputs, len(prompt_ids), score_tokens)
    if not positions:
        return []
    index = torch.arange(positions.start - chunk_start, positions.stop - chunk_start, device=states.device)
    logits = head(states[index])  # [n, V] float32
    targets = torch.tensor(
        [prompt_ids[p - virtual_inputs + 1] for p in positions], dtype=torch.long, device=states.device
    )
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]  # [n]
    return [float(v) for v in logprobs.cpu()]
