"""One request's sampling state (`RowSampler`): its params, its generator, the tokens it has seen and
generated; what sampling.py draws with and logits_processing.py's processors read and update."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterserve.server.engine.types import SamplingParams


@dataclass(eq=False)
class RowSampler:
    """Sampling state of one request: its params, its generator (seeded requests only), seen tokens."""

    params: SamplingParams
    generator: torch.Generator | None  # a seeded request's own generator; None: the shared one
    prompt_ids: tuple[int, ...] = ()
    # [V] bool on the logits' device: prompt + generated ids, for the repetition penalty. Built at the
    # row's first step (when V is known), then a view into the last step's stacked masks.
    seen: torch.Tensor | None = None
    # OpenAI's processors (logits_processing.py): the EOS ids min_tokens masks (empty with ignore_eos),
    # tokens generated so far, and a [V] float32 count of them on the logits' device (penalty rows).
    eos_ids: tuple[int, ...] = ()
    generated: int = 0
    counts: torch.Tensor | None = None

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_ids: tuple[int, ...],
        device: torch.device,
        eos_ids: tuple[int, ...] = (),
    ) -> RowSampler:
        generator = None
        if params.temperature > 0 and params.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        eos = () if params.ignore_eos else tuple(eos_ids)
        return cls(params=params, generator=generator, prompt_ids=tuple(prompt_ids), eos_ids=eos)

    @property
    def greedy(self) -> bool:
        """The plain argmax applies (no temperature, no penalty, no OpenAI processor)."""
        return self.params.temperature <= 0 and self.params.repetition_penalty == 1.0 and not self.processed

    @property
    def penalized(self) -> bool:
        return self.params.repetition_penalty != 1.0

    @property
    def counts_penalized(self) -> bool:
        """OpenAI's presence or frequency penalty applies (the row keeps `counts`)."""
        p = self.params
        return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    @property
    def processed(self) -> bool:
        """Whether any OpenAI processor applies to this row (it then leaves the plain greedy path)."""
        p = self.params
        return self.counts_penalized or bool(p.logit_bias) or (p.min_tokens > 0 and bool(self.eos_ids))
