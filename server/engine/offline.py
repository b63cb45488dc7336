"""The engine without a server: submit a list of requests, step until all finish, get results.

Used by the training module's evaluation, the benchmark and tests, so that numbers from training and
from serving come from the same generation code.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterserve.server.adapters.loader import LoadedAdapter
from adapterserve.server.engine.core import EngineCore, Sequence
from adapterserve.server.engine.provider import ResolvedAdapter, StaticAdapterProvider
from adapterserve.server.engine.types import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from adapterserve.server.model.loading import LoadedBase
from adapterserve.server.settings import EngineSettings


@dataclass
class GenerationResult:
    request_id: str
    adapter: str | None
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    error: BaseException | None = None
    logits: list[torch.Tensor] | None = None  # [V] per generated token (capture_logits=True)
    logprobs: tuple[float, ...] = ()  # scoring requests: log-probs of the scored tokens
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # SamplingParams.logprobs set
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # GenerationRequest.prompt_logprobs set
    # n > 1: every choice's result, in index order (choices[0] is this result's own choice)
    choices: list[GenerationResult] = field(default_factory=list)


class OfflineEngine:
    """Synchronous front of EngineCore. Wraps the base model's linears in place (once per model)."""

    def __init__(
        self, base: LoadedBase, settings: EngineSettings | None = None, *, capture_logits: bool = False
    ):
        self.base = base
        self.settings = settings or EngineSettings()
        self.core = EngineCore(base, self.settings, capture_logits=capture_logits)
        self.adapters = StaticAdapterProvider(base.spec, self.settings)
        self._ids = itertools.count()

    def add_adapter(self, name: str, source: Path | LoadedAdapter) -> ResolvedAdapter:
        return self.adapters.add(name, source)

    def request(
        self, prompt_ids: list[int] | tuple[int, ...], adapter: str | None = None, **sampling
    ) -> GenerationRequest:
        return GenerationRequest(
            request_id=f"offline-{next(self._ids)}",
            prompt_ids=tuple(prompt_ids),
            adapter=adapter,
            sampling=SamplingParams(**sampling),
        )

    def submit(self, request: GenerationRequest, sink: list[TokenEvent]) -> Sequence:
        resolved = self.adapters.resolve(request.adapter) if request.adapter else None
        seq = self.core.new_sequence(request, resolved, sink.append)
        self.core.add(seq)
        return seq

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run all requests together (continuous batching) and return their results in order."""
        sinks: list[list[TokenEvent]] = [[] for _ in requests]
        seqs = [self.submit(r, sink) for r, sink in zip(requests, sinks, strict=True)]
        while self.core.has_work():
            self.core.step()
        return [self._result(seq, sink) for seq, sink in zip(seqs, sinks, strict=True)]

    @classmethod
    def _result(cls, seq: Sequence, events: list[TokenEvent]) -> GenerationResult:
        if seq.request.n > 1:
            choices = [cls._one(seq, [e for e in events if e.index == i]) for i in range(seq.request.n)]
            return dataclasses.replace(choices[0], choices=choices)
        return cls._one(seq, events)

    @staticmethod
    def _one(seq: Sequence, events: list[TokenEvent]) -> GenerationResult:
        last = events[-1]
        return GenerationResult(
            request_id=seq.request.request_id,
            adapter=seq.request.adapter,
            token_ids=[t for ev in events for t in ev.token_ids],
            text="".join(ev.text for ev in events),
            finish_reason=last.finish_reason or FinishReason.ERROR,
            prompt_tokens=len(seq.request.prompt_ids),
            error=last.error,
            logits=seq.logits,
            logprobs=last.logprobs,
            token_logprobs=[lp for ev in events for lp in ev.token_logprobs],
            prompt_logprobs=next((ev.prompt_logprobs for ev in events if ev.prompt_logprobs), ()),
        )

    def score(
        self, pairs: list[tuple[list[int], list[int]]], adapter: str | None = None
    ) -> list[tuple[float, ...]]:
        """Log-probabilities of each continuation's tokens after its prompt: for (prompt_ids,
        continuation_ids) pairs, run as scoring requests together (continuous batching)."""
        requests = [
            GenerationRequest(
                request_id=f"offline-{next(self._ids)}",
                prompt_ids=tuple(prompt) + tuple(continuation),
                adapter=adapter,
                score_tokens=len(continuation),
            )
            for prompt, continuation in pairs
        ]
        results = []
        for result in self.generate(requests):
            if result.error is not None:
                raise result.error
            results.append(result.logprobs)
        return results
