"""Held-out perplexity (`--stage pt --eval FILE`), scored by the server's engine (its scoring requests,
the same code as the Score RPC) or by PEFT forward passes of the trained model (`--eval-backend peft`).

`ScoreEvaluator` is shared with the preference evaluation (training/preference.py). Each held-out
document is scored on its own (cut into blocks of max_length tokens): every token but a
block's first is predicted from the tokens before it in the block. Perplexity = exp(-sum of log-probs /
tokens predicted), over the whole file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from adapterserve.training.data_pt import document_ids, pack_blocks, read_documents


class PerplexityMetrics(BaseModel):
    perplexity: float
    mean_logprob: float
    tokens: int  # tokens predicted
    blocks: int
    backend: str


ScoreItem = tuple[list[int], list[int]]  # (prompt ids, continuation ids)


def eval_items(path: str | Path, tokenizer: Any, max_length: int, limit: int | None) -> list[ScoreItem]:
    """Held-out text as scoring items: each document's blocks, the first token as the prompt."""
    docs = read_documents(path)[:limit] if limit else read_documents(path)
    blocks = [b for doc in docs for b in pack_blocks(document_ids(tokenizer, doc), max_length)]
    return [(b[:1], b[1:]) for b in blocks]


def perplexity_metrics(scores: Sequence[Sequence[float]], backend: str) -> PerplexityMetrics:
    total = math.fsum(v for s in scores for v in s)
    count = sum(len(s) for s in scores)
    mean = total / count
    return PerplexityMetrics(
        perplexity=math.exp(-mean), mean_logprob=mean, tokens=count, blocks=len(scores), backend=backend
    )


@torch.inference_mode()
def forward_scores(model: Any, items: Sequence[ScoreItem]) -> list[list[float]]:
    """Log-probs of each item's continuation by one full forward pass of `model` (base or PeftModel)."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for prompt, continuation in items:
            ids = torch.tensor([list(prompt) + list(continuation)], device=device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -ids.shape[1] :]
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # [S, V]
            n = len(prompt)
            targets = ids[0, n:, None]
            out.append(logprobs[n - 1 : -1].gather(1, targets)[:, 0].tolist())
    finally:
        if was_training:
            model.train()
    return out


class ScoreEvaluator:
    """Log-likelihoods of (prompt, continuation) token items, for the base before training and the
    saved output after it: by the server's engine over a second copy of the base (the saved adapter
    loaded from its directory; for sft the saved model served as a base), or by PEFT forward passes."""

    def __init__(self, base: Any, items: list[ScoreItem], backend: str) -> None:
        self.backend = "engine" if backend == "auto" else backend
        self.base = base
        self.items = items
        self._engine: Any = None

    def _new_engine(self, base: Any) -> Any:
        from adapterserve.server.engine.offline import OfflineEngine
        from adapterserve.server.settings import CpuSettings, EngineSettings

        longest = max(len(p) + len(c) for p, c in self.items)
        rows = min(EngineSettings().max_batch_size, len(self.items))
        # CPU linears left unpacked (torch): packed copies would not see weights that training changes later
        cpu = CpuSettings(linear="torch")
        return OfflineEngine(base, EngineSettings(max_seq_len=longest + 256, max_batch_size=rows, cpu=cpu))

    def score_base(self) -> list[list[float]]:
        from adapterserve.training.evaluate import reload_base

        if self.backend == "engine":
            self._engine = self._new_engine(reload_base(self.base))
            return [list(s) for s in self._engine.score(self.items)]
        return forward_scores(self.base.model, self.items)

    def release(self) -> None:
        """Drop the engine (its base copy and KV cache) while training runs."""
        self._engine = None

    def score_output(self, out_dir: Path, method: str, trained_model: Any) -> list[list[float]]:
        from adapterserve.training.evaluate import reload_base

        if self.backend != "engine":
            return forward_scores(trained_model, self.items)
        if method == "sft":
            from adapterserve.server.model.loading import load_base_model

            served = load_base_model(out_dir, quantize="none", device=str(self.base.device))
            return [list(s) for s in self._new_engine(served).score(self.items)]
        if self._engine is None:
            self._engine = self._new_engine(reload_base(self.base))
        self._engine.add_adapter("trained", out_dir)
        return [list(s) for s in self._engine.score(self.items, adapter="trained")]
