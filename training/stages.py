"""What differs between the stages pt, sft and dpo: how training data is read, and how the base and
the trained output are evaluated on `--eval` (manifest fields). Everything else is shared (train.py).

  stage  training data                          --eval scores (base before, output after)
  pt     raw text packed in blocks (data_pt)     held-out perplexity (perplexity.py)
  sft    prompt/completion or chat (data)        greedy exact match / token F1 (evaluate.py)
  dpo    preference pairs (preference)           preference accuracy and mean margin
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterserve.training.data import SupervisedDataset, load_eval_data, load_training_data, split_validation
from adapterserve.training.data_pt import load_pretraining_data
from adapterserve.training.evaluate import EvalResult, RunEvaluator, new_tokens_for
from adapterserve.training.perplexity import ScoreEvaluator, ScoreItem, eval_items, perplexity_metrics
from adapterserve.training.preference import (
    PreferencePair,
    answer_ids,
    margins_from_scores,
    prompt_ids,
    read_pairs,
)
from adapterserve.training.settings import TrainSettings


@dataclass
class StageData:
    dataset: SupervisedDataset | None  # pt, sft
    pairs: list[PreferencePair] | None  # dpo
    validation: SupervisedDataset | None

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else len(self.dataset or [])


def load_stage_data(settings: TrainSettings, path: str | Path, tokenizer: Any) -> StageData:
    if settings.stage == "dpo":
        return StageData(dataset=None, pairs=read_pairs(path), validation=None)
    if settings.stage == "pt":
        dataset = load_pretraining_data(path, tokenizer, settings.max_length)
    else:
        dataset = load_training_data(path, tokenizer, settings.max_length)
    dataset, validation = split_validation(dataset, settings.val_size, settings.seed)
    return StageData(dataset=dataset, pairs=None, validation=validation)


class StageEvaluator:
    """Evaluates the base (`before`) and the saved output (`after`); returns manifest fields."""

    def __init__(self, settings: TrainSettings, base: Any, eval_file: str | Path) -> None:
        self.stage = settings.stage
        tokenizer = base.tokenizer
        self.sft: RunEvaluator | None = None
        self.scorer: ScoreEvaluator | None = None
        self.sft_base: EvalResult | None = None
        self.sft_output: EvalResult | None = None
        if self.stage == "sft":
            examples = load_eval_data(eval_file, tokenizer, settings.eval_limit)
            max_new = new_tokens_for(examples, tokenizer, settings.eval_max_new_tokens)
            self.sft = RunEvaluator(base, examples, max_new, settings.eval_backend)
            self.size = len(examples)
        elif self.stage == "pt":
            items = eval_items(eval_file, tokenizer, settings.max_length, settings.eval_limit)
            self.scorer = ScoreEvaluator(base, items, settings.eval_backend)
            self.size = len(items)
        else:
            pairs = read_pairs(eval_file, settings.eval_limit)
            items: list[ScoreItem] = []
            for p in pairs:
                head = prompt_ids(tokenizer, p)
                items += [(head, answer_ids(tokenizer, p.chosen)), (head, answer_ids(tokenizer, p.rejected))]
            self.scorer = ScoreEvaluator(base, items, settings.eval_backend)
            self.size = len(pairs)

    @property
    def backend(self) -> str:
        return self.sft.backend if self.sft is not None else self.scorer.backend  # type: ignore[union-attr]

    def _fields(self, scores: list[list[float]], which: str) -> dict[str, Any]:
        backend = self.backend
        if self.stage == "pt":
            return {f"eval_{which}_perplexity": perplexity_metrics(scores, backend)}
        sums = [sum(s) for s in scores]
        return {f"eval_{which}_preference": margins_from_scores(sums[0::2], sums[1::2], backend)}

    def before(self) -> dict[str, Any]:
        if self.sft is not None:
            self.sft_base = self.sft.evaluate_base()
            self.sft.release()
            return {"eval_base": self.sft_base.metrics}
        assert self.scorer is not None
        fields = self._fields(self.scorer.score_base(), "base")
        self.scorer.release()
        return fields

    def after(self, out_dir: Path, method: str, model: Any) -> dict[str, Any]:
        if self.sft is not None:
            self.sft_output = self.sft.evaluate_output(out_dir, method, model)
            return {"eval_adapter": self.sft_output.metrics}
        assert self.scorer is not None
        return self._fields(self.scorer.score_output(out_dir, method, model), "adapter")
