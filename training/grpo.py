"""`--stage grpo`: online RL with TRL's GRPOTrainer; rollouts sampled by an adapterserve server.

TRL does the RL: group-relative advantages, the clipped policy loss, the optimizer step. This module
gives it a `rollout_func` that asks the server (rollouts.py) for `num_generations` completions of each
prompt with their log-probabilities at the sampling temperature, sampled by the engine in its continuous
batch under the adapter being trained, and an `AdapterPush` that TRL calls before a rollout once an
optimizer step has passed (grpo_trainer.py), which pushes the adapter's weights into the server in
place, so that the rollouts are sampled by the policy being optimised. The server's per-token logprobs
are TRL's sampling logprobs: with `--importance-sampling-correction` (the default) TRL weights the loss
by the ratio of the trainer's probability of each sampled token to the server's (grpo_trainer.py).

Prompt records (JSONL): `prompt` (text, or chat messages rendered with the base's chat template) plus the
fields the rewards read (`answer`, `pattern`, `schema`, or anything a `module:function` reward takes).
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adapterserve.training.errors import SettingsError, TrainingError
from adapterserve.training.grpo_history import GrpoHistory
from adapterserve.training.loop import LoopResult, _callbacks, trainer_arguments
from adapterserve.training.metrics import GrpoReport
from adapterserve.training.rewards import RewardFunc
from adapterserve.training.rollouts import RolloutClient, RolloutSampling
from adapterserve.training.settings import TrainSettings
from adapterserve.training.step_loss import with_step_losses

log = logging.getLogger(__name__)


def read_prompts(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Prompt records of a JSONL file: each an object with `prompt` (text or chat messages)."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise SettingsError(f"{path}:{number}: not JSON ({err})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
            raise SettingsError(f"{path}:{number}: needs a non-empty 'prompt' (text or chat messages)")
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise SettingsError(f"{path}: no prompt records")
    return records


def prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """The token ids the server samples from: a chat rendered with the chat template, text as is."""
    if isinstance(prompt, list):
        rendered = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return [int(i) for i in rendered["input_ids"]]
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors named as PEFT saves them (what the server stores and updates)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def _groups(prompts: Sequence[Any]) -> list[tuple[Any, int]]:
    """Runs of equal consecutive prompts as (prompt, count): TRL repeats each prompt once per generation."""
    groups: list[tuple[Any, int]] = []
    for prompt in prompts:
        if groups and groups[-1][0] == prompt:
            groups[-1] = (prompt, groups[-1][1] + 1)
        else:
            groups.append((prompt, 1))
    return groups


def mean_reward(
    client: RolloutClient,
    tokenizer: Any,
    records: list[dict[str, Any]],
    rewards: list[RewardFunc],
    *,
    adapter: str,
    max_new_tokens: int,
) -> float:
    """The mean summed reward of greedy completions of `records` (held-out score) through the server."""
    greedy = RolloutSampling(max_new_tokens=max_new_tokens, temperature=0.0)
    ids = [prompt_ids(tokenizer, r["prompt"]) for r in records]
    sampled = client.sample([(i, 1) for i in ids], adapter=adapter, sampling=greedy)
    texts = [tokenizer.decode(group[0].token_ids, skip_special_tokens=True) for group in sampled]
    columns: dict[str, Any] = {k: [r.get(k) for r in records] for k in records[0] if k != "prompt"}
    columns["completion_ids"] = [group[0].token_ids for group in sampled]
    prompts = [r["prompt"] for r in records]
    total = [0.0] * len(records)
    for reward in rewards:
        for i, value in enumerate(reward(prompts, texts, **columns)):
            total[i] += float(value) if value is not None else 0.0
    return sum(total) / len(total)


class ServerRollouts:
    """TRL's `rollout_func` over a RolloutClient: each prompt's group of completions with their logprobs."""

    def __init__(self, client: RolloutClient, tokenizer: Any) -> None:
        self.client, self.tokenizer = client, tokenizer

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        groups = _groups(prompts)
        ids = [prompt_ids(self.tokenizer, p) for p, _ in groups]
        sampled = self.client.sample(list(zip(ids, (n for _, n in groups), strict=True)))
        out: dict[str, Any] = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        for prompt, group in zip(ids, sampled, strict=True):
            for completion in group:
                out["prompt_ids"].append(prompt)
                out["completion_ids"].append(completion.token_ids)
                out["logprobs"].append(completion.logprobs)
        return out


class AdapterPush:
    """The trainer's weight sync: the adapter's current weights into the server, in place."""

    def __init__(self, client: RolloutClient, model: Any) -> None:
        self.client, self.model = client, model

    def sync_weights(self) -> None:
        version = self.client.push(adapter_state(self.model))
        log.debug("pushed version %d", version)


def _trl() -> Any:
    try:
        import trl
    except ImportError:
        raise SettingsError(
            "--stage grpo needs TRL: pip install 'adapterserve[train]' (or pip install 'trl>=1.16,<2')"
        ) from None
    return trl


def run_grpo(
    model: Any,
    records: list[dict[str, Any]],
    rewards: list[RewardFunc],
    settings: TrainSettings,
    *,
    tokenizer: Any,
    device: torch.device,
    client: RolloutClient,
    steps: int,
) -> tuple[Any, LoopResult, GrpoHistory]:
    """Train `model` (a PeftModel) with GRPO for `steps` optimizer steps; the server at `client` samples
    every rollout and gets the weights after every step. Returns (model, loop result, what TRL logged)."""
    trl = _trl()
    from datasets import Dataset

    from adapterserve.training.grpo_trainer import ServerRolloutTrainer

    result = LoopResult(steps=0, epochs=0.0, seconds=0.0)
    history = GrpoHistory()
    with tempfile.TemporaryDirectory(prefix="adapterserve-grpo-") as scratch:
        args = trl.GRPOConfig(
            **{**trainer_arguments(settings, device, scratch, steps), "logging_first_step": False},
            logging_strategy="steps",
            dataloader_num_workers=0,
            num_generations=settings.num_generations,
            max_completion_length=settings.max_new_tokens,
            temperature=settings.temperature,
            beta=settings.grpo_beta,
            gradient_checkpointing=False,
            remove_unused_columns=False,
            shuffle_dataset=True,
            # the server samples without dropout: the trainer's logprobs must be that policy's, or
            # the importance-sampling ratio measures dropout noise (|log ratio| up to 5 on the tiny
            # model at LoRA dropout 0.05)
            disable_dropout=True,
            vllm_importance_sampling_correction=settings.importance_sampling_correction,
            vllm_importance_sampling_mode=settings.importance_sampling_mode,
            vllm_importance_sampling_clip_min=settings.importance_sampling_clip_min,
            vllm_importance_sampling_clip_max=settings.importance_sampling_clip_max,
        )
        trainer = with_step_losses(ServerRolloutTrainer)(
            model=model,
            reward_funcs=rewards,
            args=args,
            train_dataset=Dataset.from_list(records),
            processing_class=tokenizer,
            rollout_func=ServerRollouts(client, tokenizer),
            callbacks=[*_callbacks(settings, result), history.callback()],
            sync=AdapterPush(client, model),
        )
        trainer.step_losses = result.step_losses
        start = time.perf_counter()
        output = trainer.train()
        result.seconds = time.perf_counter() - start
        result.steps = int(trainer.state.global_step)
        result.epochs = float(trainer.state.epoch or 0.0)
        result.train_loss = float(output.training_loss)
        model = trainer.model
    model.eval()
    return model, result, history


def grpo_report(
    client: RolloutClient,
    history: GrpoHistory,
    settings: TrainSettings,
    *,
    target: str,
    adapter: str,
    final_version: int,
    eval_base: float | None,
    eval_adapter: float | None,
) -> GrpoReport:
    stats = client.stats
    pushes = stats.push_seconds
    return GrpoReport(
        rollout_server=target,
        adapter=adapter,
        final_version=final_version,
        reward_curve=history.rewards,
        eval_base_reward=eval_base,
        eval_adapter_reward=eval_adapter,
        rollout_completions=stats.completions,
        rollout_tokens=stats.completion_tokens,
        rollout_seconds=round(stats.rollout_seconds, 3),
        rollout_tokens_per_second=round(stats.tokens_per_second, 2),
        pushes=len(pushes),
        push_seconds_p50=round(statistics.median(pushes), 4) if pushes else None,
        importance_sampling=(
            settings.importance_sampling_mode if settings.importance_sampling_correction else None
        ),
        importance_sampling_curve=history.importance,
    )


def check_served(client: RolloutClient, version: int) -> None:
    """The server serves `version` of the adapter now (what the last push returned)."""
    served = client.admin.get_adapter(client.adapter).version
    if served != version:
        raise TrainingError(
            f"the server serves version {served} of {client.adapter!r}, not the pushed version {version}"
        )
