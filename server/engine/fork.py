"""n choices from one prefill (GenerationRequest.n > 1).

The request's first sequence (choice 0) is the only one queued and prefilled. Its other choices wait
on it (`Sequence.pending_choices`), but admission already counts their rows and KV tokens (they are
promised: nothing admitted later can take them). When choice 0's prompt is complete, each other
choice takes a row at the end of the batch, reserves its own KV blocks, gets choice 0's cache positions
(the prompt, and the virtual tokens / prefix of its adapter; no forward) and its prompt logprobs, and takes a reference on choice 0's adapter slot. All n then
sample their first token from the same last-position logits, each with its own sampler (seed + i when
the request has a seed, so choice i is reproducible on its own), and decode as independent rows.

On the paged cache the full blocks are shared, copy-on-write (a choice gives back the blocks it reserved
for them), and only the partly filled last block is copied; the dense cache copies the positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from adapterserve.server.adapters.slots import AdapterBank
from adapterserve.server.engine.batch import Batch
from adapterserve.server.engine.sequence import Sequence
from adapterserve.server.engine.types import GenerationRequest

SEED_MODULUS = 1 << 64

# a choice's sequence for (its request, its index, the first choice's sequence): EngineCore.new_sequence's
ChoiceFactory = Callable[[GenerationRequest, int, Sequence], Sequence]


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i's seed: the request's seed + i (mod 2^64); None stays None."""
    return None if seed is None else (seed + index) % SEED_MODULUS


def make_choices(first: Sequence, make: ChoiceFactory) -> None:
    """Give `first` (choice 0 of a request with n > 1) its n - 1 other choices, pending."""
    request = first.request
    for i in range(1, request.n):
        params = dataclasses.replace(request.sampling, seed=choice_seed(request.sampling.seed, i))
        first.pending_choices.append(make(dataclasses.replace(request, sampling=params), i, first))


def fork(batch: Batch, bank: AdapterBank, first: Sequence) -> list[Sequence]:
    """`first`'s prefill is complete: its pending choices take rows, a copy of its KV cache positions
    and its adapter slot. Returns them (they sample from `first`'s logits next)."""
    choices, first.pending_choices = first.pending_choices, []
    src = batch.row_of(first)
    for child in choices:
        row = len(batch.running)
        batch.cache.reserve(row, child.kv_tokens)  # promised at admission: the blocks are free
        batch.append(child)
        batch.cache.copy_row(src, row, first.length)
        child.length = first.length
        child.prefill_start = first.prefill_start
        child.prefill_done = first.prefill_done
        child.prompt_scores = first.prompt_scores
        key = child.slot_key
        if key is not None and child.resolved is not None:
            slot = bank.acquire(key, child.resolved.adapter)  # resident (choice 0 holds it): a hit
            assert slot is not None
            child.slot = slot
    return choices
