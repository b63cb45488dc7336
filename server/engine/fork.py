"""n choices from one prefill (GenerationRequest.n > 1).

The request's first sequence (choice 0) is the only one queued and prefilled. Its other choices wait
on it (`Sequence.pending_choices`), but admission already counts their rows and KV tokens (they are
promised: nothing admitted later can take them). When choice 0's prompt is complete, each other
choice takes a row at the end of the batch, reserves its own KV blocks, gets a copy of choice 0's
cache positions (the prompt, and the virtual tokens / prefix of its adapter: one block copy per layer,
no forward) and of its prompt logprobs, and takes a reference on choice 0's adapter slot. All n then
sample their first token from the same last-position logits, each with its own sampler (seed + i when
the request has a seed, so choice i is reproducible on its own), and decode as independent rows.

The blocks are copied, not shared: a shared, copy-on-write prompt would save memory but not compute;
the prefill (the compute) is what is shared here.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from adapterserve.server.engine.sampling import RowSampler
from adapterserve.server.engine.sequence import Sequence
from adapterserve.server.engine.text import TextTracker

if TYPE_CHECKING:
    from adapterserve.server.engine.core import EngineCore

SEED_MODULUS = 1 << 64


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i's seed: the request's seed + i (mod 2^64); None stays None."""
    return None if seed is None else (seed + index) % SEED_MODULUS


def make_choices(core: EngineCore, first: Sequence) -> None:
    """Give `first` (choice 0 of a request with n > 1) its n - 1 other choices, pending."""
    request = first.request
    for i in range(1, request.n):
        params = dataclasses.replace(request.sampling, seed=choice_seed(request.sampling.seed, i))
        child_request = dataclasses.replace(request, sampling=params)
        first.pending_choices.append(
            Sequence(
                request=child_request,
                resolved=first.resolved,
                emit=first.emit,
                sampler=RowSampler.create(params, request.prompt_ids, core.device, tuple(core.eos_ids)),
                text=TextTracker(
                    core.base.tokenizer,
                    params.stop,
                    frozenset() if params.ignore_eos else core.eos_ids,
                    stop_after=params.min_tokens,
                ),
                logits=[] if core.capture_logits else None,
                index=i,
                parent=first,
                # a grammar matcher keeps state: each choice has its own (structured.py)
                grammar=None if request.structured is None else core.grammars.row(request.structured),
            )
        )


def fork(core: EngineCore, first: Sequence) -> list[Sequence]:
    """`first`'s prefill is complete: its pending choices take rows, a copy of its KV cache positions
    and its adapter slot. Returns them (they sample from `first`'s logits next)."""
    choices, first.pending_choices = first.pending_choices, []
    src = core.running.index(first)
    for child in choices:
        row = len(core.running)
        core.cache.reserve(row, child.kv_tokens)  # promised at admission: the blocks are free
        core.running.append(child)
        core.cache.copy_row(src, row, first.length)
        child.length = first.length
        child.prefill_start = first.prefill_start
        child.prefill_done = first.prefill_done
        child.prompt_scores = first.prompt_scores
        key = child.slot_key
        if key is not None and child.resolved is not None:
            slot = core.bank.acquire(key, child.resolved.adapter)  # resident (choice 0 holds it): a hit
            assert slot is not None
            child.slot = slot
    core.forked_choices += len(choices)
    return choices
