"""One request's state inside the engine: its adapter, sampler, detokenizer, cache row bookkeeping
(length, prefill progress) and output. EngineCore (core.py) moves Sequences through admission, prefill,
decode and retirement."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adapterserve.server.adapters.kind import HookSite
from adapterserve.server.adapters.slots import NO_ADAPTER
from adapterserve.server.engine.provider import ResolvedAdapter
from adapterserve.server.engine.row_sampler import RowSampler
from adapterserve.server.engine.structured import RowGrammar
from adapterserve.server.engine.text import TextTracker
from adapterserve.server.engine.types import GenerationRequest, TokenEvent, TokenLogprob

EventSink = Callable[[TokenEvent], None]


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    request: GenerationRequest
    resolved: ResolvedAdapter | None
    emit: EventSink
    sampler: RowSampler
    text: TextTracker
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # when it got a row (scheduler.Scheduler.admit)
    prefill_started_at: float | None = None  # when its first prefill chunk started (queue wait ends)
    # waiting for an adapter slot: requests admitted past it (those using resident adapters); at
    # max_batch_size admission turns FIFO until a slot frees for it (scheduler.Scheduler.admit)
    overtaken: int = 0
    slot: int = NO_ADAPTER
    length: int = 0  # cache positions filled (virtual prefix + prompt + generated so far)
    output: list[int] = field(default_factory=list)
    finished: bool = False
    first_token_at: float | None = None
    logits: list[torch.Tensor] | None = None  # per generated token, when capture is on (tests)
    prefill_inputs: torch.Tensor | None = None  # [n, H] virtual + prompt embeddings; None once prefilled
    prefill_start: int = 0  # cache position of the first prefill input (prefix tuning: after the prefix)
    prefill_done: int = 0  # prefill inputs already in the cache
    scores: list[float] = field(default_factory=list)  # scoring requests: log-probs found so far
    grammar: RowGrammar | None = None  # structured output (response_format): masks this row's logits
    # request.prompt_logprobs set: the prompt tokens' logprobs found so far (shared by a fork's choices)
    prompt_scores: list[TokenLogprob] = field(default_factory=list)
    # n > 1 (see fork.py): the choice this sequence samples; the first choice's sequence holds the others
    # until its prefill is done (they get rows, a copy of its KV and its last logits then)
    index: int = 0
    pending_choices: list[Sequence] = field(default_factory=list)
    parent: Sequence | None = None  # a forked choice: the sequence whose prefill it shares
    # a prefill job of this row runs on a worker (cpu/prefill_workers.py): its row keeps its KV blocks, its
    # adapter slot and its final event until the engine thread books the job
    in_flight: bool = False
    # prefix caching (prefix_cache.py): the keys of its full KV blocks so far, and how many it registered
    block_keys: list[bytes] = field(default_factory=list)

    @property
    def queue_wait(self) -> float | None:
        """Seconds from its arrival to its first prefill chunk (a forked choice: its first choice's)."""
        first = self if self.parent is None else self.parent
        if first.prefill_started_at is None:
            return None
        return first.prefill_started_at - first.arrival

    @property
    def scores_prompt(self) -> bool:
        """Whether its prefill keeps every position's state (scoring or prompt logprobs)."""
        return bool(self.request.score_tokens) or self.request.prompt_logprobs is not None

    @property
    def prefill_remaining(self) -> int:
        return 0 if self.prefill_inputs is None else self.prefill_inputs.shape[0] - self.prefill_done

    @property
    def hook(self) -> HookSite | None:
        """How this request's adapter is applied (None: no adapter)."""
        return None if self.resolved is None else self.resolved.adapter.handler.hook

    @property
    def virtual_tokens(self) -> int:
        if self.resolved is None:
            return 0
        return self.resolved.adapter.info.num_virtual_tokens or 0

    @property
    def kv_tokens(self) -> int:
        """Cache positions this request can fill: virtual + prompt (+ max_new_tokens unless it only scores)."""
        new = 0 if self.request.score_tokens else self.request.sampling.max_new_tokens
        return self.virtual_tokens + len(self.request.prompt_ids) + new

    @property
    def slot_key(self) -> tuple[str, int] | None:
        """(name, version) of the device slot this request needs; None when it needs none."""
        if self.resolved is None or self.hook == HookSite.PROMPT:
            return None
        return (self.resolved.name, self.resolved.version)
