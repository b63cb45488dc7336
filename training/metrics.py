"""Exact-match and token-level metrics of generated text against references (SQuAD-style F1)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from pydantic import BaseModel, Field

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+|[^\w\s]")


def normalize(text: str) -> str:
    """Trim and collapse whitespace (case and punctuation are kept: they are part of the task)."""
    return _SPACE.sub(" ", text).strip()


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens, e.g. '{"a": 1}' -> ['{', '"', 'a', '"', ':', '1', '}']."""
    return _WORD.findall(text.lower())


def exact_match(prediction: str, reference: str) -> float:
    return 1.0 if normalize(prediction) == normalize(reference) else 0.0


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of precision and recall of word tokens (bag of words, multiplicity counted)."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return 1.0 if pred == ref else 0.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class EvalMetrics(BaseModel):
    """Averages over an eval set, in [0, 1]."""

    exact_match: float
    token_f1: float
    examples: int
    backend: str


def score(predictions: Sequence[str], references: Sequence[str], backend: str) -> EvalMetrics:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    em = sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True))
    f1 = sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True))
    return EvalMetrics(
        exact_match=em / n if n else 0.0, token_f1=f1 / n if n else 0.0, examples=n, backend=backend
    )


class ImportanceSamplingStep(BaseModel):
    """TRL's importance-sampling log of one logged step (means over the steps since the last log)."""

    step: int
    ratio_min: float  # the ratio trainer / server probability, after the clip or mask
    ratio_mean: float
    ratio_max: float
    logp_difference_mean: float  # mean |trainer - server| logprob of the sampled tokens
    logp_difference_max: float


class GrpoReport(BaseModel):
    """What a --stage grpo run measured: rewards, rollouts through the server, in-place pushes."""

    rollout_server: str  # host:port, or "in-process"
    adapter: str  # the adapter's name on that server
    final_version: int  # the version the server serves at the end (written to its store)
    reward_curve: list[tuple[int, float]]  # (step, mean reward of that step's rollouts) as TRL logs it
    eval_base_reward: float | None = None  # held-out mean reward, greedy, base model
    eval_adapter_reward: float | None = None  # the same with the trained adapter
    rollout_completions: int
    rollout_tokens: int
    rollout_seconds: float
    rollout_tokens_per_second: float
    pushes: int  # in-place weight updates
    push_seconds_p50: float | None = None  # one push (serialise, send, validate, new version), median
    importance_sampling: str | None = None  # TRL's mode of the correction; None: off
    importance_sampling_curve: list[ImportanceSamplingStep] = Field(default_factory=list)
