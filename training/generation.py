"""Greedy generation for evaluation, behind one small interface.

`GenerationBackend.generate(prompts, max_new_tokens)` returns the generated token ids per prompt
(stopping at EOS, which is not included). Two backends:

- `EngineBackend`: the server's own engine (adapterserve.server.engine.offline.OfflineEngine), so
  that numbers from training and from serving agree. The default.
- `ForwardGreedyBackend`: a model (base or PeftModel) decoded greedily by plain full forward passes
  with no KV cache. Not `PeftModel.generate`: with transformers 5.24 and peft 0.21.2 it silently drops
  prefix tuning's key/value prefix (see shared/DESIGN.md). Prompts of equal length share a batch, so
  no padding ever shifts positions and the result equals one-at-a-time decoding.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

import torch


class GenerationBackend(Protocol):
    """Greedy decoding of token-id prompts with one fixed model or adapter."""

    name: str

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]: ...


class ForwardGreedyBackend:
    """Greedy decoding by repeated full forward passes (exact, slow: fine for eval sets of tens)."""

    def __init__(
        self, model: Any, eos_token_ids: int | frozenset[int], *, batch_size: int = 16, name: str = "peft"
    ) -> None:
        self.model = model
        self.eos_token_ids = frozenset([eos_token_ids]) if isinstance(eos_token_ids, int) else eos_token_ids
        self.batch_size = batch_size
        self.name = name

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _decode_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        device = self._device()
        ids = torch.tensor(prompts, dtype=torch.long, device=device)  # [B, S] (all the same length)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # [B]
        out: list[list[int]] = [[] for _ in prompts]
        for _ in range(max_new_tokens):
            mask = torch.ones_like(ids)
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # [B, (V +) S, vocab]
            next_ids = logits[:, -1, :].argmax(dim=-1)  # [B]
            for row in range(len(prompts)):
                if done[row]:
                    continue
                token = int(next_ids[row])
                if token in self.eos_token_ids:
                    done[row] = True
                else:
                    out[row].append(token)
            if bool(done.all()):
                break
            ids = torch.cat([ids, next_ids[:, None]], dim=1)  # [B, S+1]
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        was_training = bool(getattr(self.model, "training", False))
        self.model.eval()
        try:
            by_length: dict[int, list[int]] = defaultdict(list)
            for index, prompt in enumerate(prompts):
                by_length[len(prompt)].append(index)
            results: list[list[int]] = [[] for _ in prompts]
            for indices in by_length.values():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    decoded = self._decode_batch([list(prompts[i]) for i in chunk], max_new_tokens)
                    for i, tokens in zip(chunk, decoded, strict=True):
                        results[i] = tokens
            return results
        finally:
            if was_training:
                self.model.train()


class EngineBackend:
    """The server's engine run offline: the generation code that serves requests, KV cache and all.

    engine: an OfflineEngine (it wraps its base model's linears in place, so its base must be one that
    no PEFT model wraps). adapter: a name registered with engine.add_adapter, or None for the base.
    """

    def __init__(self, engine: Any, adapter: str | None = None, *, name: str = "engine") -> None:
        self.engine = engine
        self.adapter = adapter
        self.name = name

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        from adapterserve.server.engine.types import FinishReason

        requests = [
            self.engine.request(list(p), adapter=self.adapter, max_new_tokens=max_new_tokens, temperature=0.0)
            for p in prompts
        ]
        outputs = []
        for result in self.engine.generate(requests):
            if result.error is not None:
                raise result.error
            tokens = list(result.token_ids)
            if result.finish_reason == FinishReason.EOS and tokens:
                tokens = tokens[:-1]  # the engine reports the EOS token; the text never contains it
            outputs.append(tokens)
        return outputs
