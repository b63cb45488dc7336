"""Evaluate a model or adapter on an eval file: greedy generation, then exact match and token F1."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapterserve.training.data import EvalExample
from adapterserve.training.generation import GenerationBackend
from adapterserve.training.metrics import EvalMetrics, score

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    metrics: EvalMetrics
    predictions: list[str]


def new_tokens_for(examples: Sequence[EvalExample], tokenizer: Any, cap: int) -> int:
    """Enough new tokens for the longest reference (+ a few), at most `cap`."""
    longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
    return max(1, min(cap, longest + 4))


def evaluate(
    backend: GenerationBackend, examples: Sequence[EvalExample], tokenizer: Any, *, max_new_tokens: int
) -> EvalResult:
    """Greedy-generate for every example and score the decoded text against the references."""
    outputs = backend.generate([e.prompt_ids for e in examples], max_new_tokens)
    predictions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
    metrics = score(predictions, [e.reference for e in examples], backend.name)
    log.info(
        "eval (%s): exact match %.3f, token F1 %.3f on %d examples",
        backend.name,
        metrics.exact_match,
        metrics.token_f1,
        metrics.examples,
    )
    return EvalResult(metrics=metrics, predictions=predictions)


_DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def reload_base(base: Any) -> Any:
    """A second, untouched copy of `base` (same source, quantization, dtype and device)."""
    from adapterserve.server.model.loading import load_base_model

    source = None if str(base.source).startswith("default:") else base.source
    return load_base_model(
        source,
        quantize=base.quantize,
        dtype=_DTYPE_NAMES.get(str(base.dtype), "auto"),
        device=str(base.device),
    )


class RunEvaluator:
    """Scores the base before training and the saved output after it, with one generation backend.

    engine: the server's OfflineEngine over a second copy of the base (the engine wraps its base's
    linears, and the training copy gets PEFT's layers), the saved adapter registered by its directory;
    for sft the saved whole model is served as a base. peft: full-forward greedy decoding of the
    training model itself (the base must then be evaluated before training modifies it).
    """

    def __init__(self, base: Any, examples: Sequence[EvalExample], max_new_tokens: int, backend: str) -> None:
        self.backend = "engine" if backend == "auto" else backend
        self.base = base
        self.examples = list(examples)
        self.max_new_tokens = max_new_tokens
        self._engine: Any = None

    def _new_engine(self, base: Any) -> Any:
        from adapterserve.server.engine.offline import OfflineEngine
        from adapterserve.server.settings import CpuSettings, EngineSettings

        longest = max(len(e.prompt_ids) for e in self.examples) + self.max_new_tokens
        # The KV cache is preallocated [layers, rows, heads, max_seq_len, dim]: size it to the eval set
        # (+ room for up to 256 virtual tokens), not to a serving default.
        rows = min(EngineSettings().max_batch_size, len(self.examples))
        # CPU linears left unpacked (torch): packed copies would not see weights that training changes later
        cpu = CpuSettings(linear="torch")
        return OfflineEngine(base, EngineSettings(max_seq_len=longest + 256, max_batch_size=rows, cpu=cpu))

    def release(self) -> None:
        """Drop the engine's base copy and KV cache (training then measures its own memory); the next
        evaluation loads them again."""
        self._engine = None

    def _run(self, backend: GenerationBackend) -> EvalResult:
        return evaluate(backend, self.examples, self.base.tokenizer, max_new_tokens=self.max_new_tokens)

    def evaluate_base(self) -> EvalResult:
        from adapterserve.server.model.loading import eos_token_ids
        from adapterserve.training.generation import EngineBackend, ForwardGreedyBackend

        if self.backend == "engine":
            self._engine = self._new_engine(reload_base(self.base))
            return self._run(EngineBackend(self._engine, None))
        eos = eos_token_ids(self.base.tokenizer, self.base.model)
        return self._run(ForwardGreedyBackend(self.base.model, eos))

    def evaluate_output(self, out_dir: Any, method: str, trained_model: Any) -> EvalResult:
        from adapterserve.server.model.loading import eos_token_ids
        from adapterserve.training.generation import EngineBackend, ForwardGreedyBackend

        if self.backend == "engine":
            if method == "sft":
                from adapterserve.server.model.loading import load_base_model

                served = load_base_model(out_dir, quantize="none", device=str(self.base.device))
                return self._run(EngineBackend(self._new_engine(served), None))
            if self._engine is None:
                self._engine = self._new_engine(reload_base(self.base))
            self._engine.add_adapter("trained", out_dir)
            return self._run(EngineBackend(self._engine, "trained"))
        eos = eos_token_ids(self.base.tokenizer, self.base.model)
        return self._run(ForwardGreedyBackend(trained_model, eos))
