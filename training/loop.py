"""The training loop: transformers' Trainer (progress bar, schedules, accumulation) over our dataset.

AdaLoRA's rank reallocation runs in a Trainer callback after every optimizer step (PEFT's
`update_and_allocate`, which reads the gradients before they are zeroed).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterserve.training.convergence import (
    STOP_CAP,
    STOP_PLANNED,
    STOP_PLATEAU,
    PlateauRule,
    plateau_callback,
)
from adapterserve.training.data import PadCollator, SupervisedDataset
from adapterserve.training.kbit import keep_4bit_trainable
from adapterserve.training.settings import TrainSettings
from adapterserve.training.step_loss import StepLosses, step_loss_callbacks, with_step_losses

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    steps: int
    epochs: float
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, logged mean loss)
    step_losses: StepLosses = field(default_factory=StepLosses)  # every optimizer step's own loss
    train_loss: float | None = None  # the Trainer's mean loss over the whole run
    stop_reason: str = STOP_PLANNED  # planned_steps, or with early stopping: plateau / max_steps
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)

    @property
    def final_loss(self) -> float | None:
        """The last optimizer step's loss (not the last *logged* mean, which can be step 1's)."""
        if self.step_losses.last is not None:
            return self.step_losses.last
        return self.losses[-1][1] if self.losses else None


def planned_steps(settings: TrainSettings, num_examples: int) -> int:
    """Optimizer steps the run will take (the Trainer gets this number as max_steps)."""
    if settings.max_steps is not None:
        return settings.max_steps
    batches_per_epoch = math.ceil(num_examples / settings.batch_size)
    updates_per_epoch = max(1, batches_per_epoch // settings.grad_accum)
    return max(1, math.ceil(settings.epochs * updates_per_epoch))


def use_bf16(settings: TrainSettings, device: torch.device) -> bool:
    if settings.bf16 is not None:
        return settings.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def optimizer_name(settings: TrainSettings, device: torch.device) -> str:
    """QLoRA's paged 8-bit AdamW needs CUDA; everything else (and QLoRA on CPU) uses torch AdamW."""
    if settings.method == "qlora":
        if device.type == "cuda":
            return "paged_adamw_8bit"
        log.warning("qlora on %s: no paged 8-bit optimizer without CUDA; using torch AdamW", device.type)
    return "adamw_torch"


def trainer_arguments(
    settings: TrainSettings, device: torch.device, output_dir: str, steps: int
) -> dict[str, Any]:
    """The transformers TrainingArguments every stage shares (SFT/pt here, DPO through TRL's DPOConfig)."""
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.resolved_learning_rate(),
        lr_scheduler_type=settings.lr_schedule,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        optim=optimizer_name(settings, device),
        bf16=use_bf16(settings, device),
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        use_cpu=device.type == "cpu",
    )


def _callbacks(settings: TrainSettings, result: LoopResult) -> list[Any]:
    from transformers import TrainerCallback

    class LossHistory(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                result.losses.append((int(state.global_step), float(logs["loss"])))

    class AdaLoraAllocation(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
            kwargs["model"].base_model.update_and_allocate(state.global_step)

    callbacks: list[Any] = [LossHistory(), *step_loss_callbacks(result.step_losses)]
    if settings.method == "adalora":
        callbacks.append(AdaLoraAllocation())
    return callbacks


def validation_arguments(settings: TrainSettings, has_validation: bool) -> dict[str, Any]:
    """TrainingArguments for the validation-loss checks (none without a validation set)."""
    if not has_validation:
        return {}
    return {
        "eval_strategy": "steps",
        "eval_steps": settings.early_stop_every,
        "per_device_eval_batch_size": max(settings.batch_size, 16),
        "prediction_loss_only": True,
    }


def run_training(
    model: Any,
    dataset: SupervisedDataset,
    settings: TrainSettings,
    *,
    pad_id: int,
    device: torch.device,
    validation: SupervisedDataset | None = None,
) -> LoopResult:
    """Train `model` in place on `dataset` for planned_steps(settings, len(dataset)) optimizer steps
    (with `settings.early_stop_patience`: until the loss on `validation` plateaus, at most that many)."""
    from transformers import Trainer, TrainingArguments

    steps = planned_steps(settings, len(dataset))
    if restored := keep_4bit_trainable(model):
        log.info("restored the trainable layout of %d CPU-repacked 4-bit layers", restored)
    result = LoopResult(steps=0, epochs=0.0, seconds=0.0)
    has_validation = validation is not None and len(validation) > 0
    callbacks = _callbacks(settings, result)
    rule = stopped = None
    if settings.early_stop_patience is not None and has_validation:
        rule = PlateauRule(
            settings.early_stop_patience, settings.early_stop_min_delta, settings.early_stop_min_abs_delta
        )
        stopped = []
        callbacks.append(plateau_callback(rule, stopped))
    with tempfile.TemporaryDirectory(prefix="adapterserve-train-") as scratch:
        args = TrainingArguments(
            **trainer_arguments(settings, device, scratch, steps),
            remove_unused_columns=False,
            label_names=["labels"],
            dataloader_num_workers=0,
            disable_tqdm=False,
            **validation_arguments(settings, has_validation),
        )
        trainer = with_step_losses(Trainer)(
            model=model,
            args=args,
            train_dataset=dataset,
            eval_dataset=validation if has_validation else None,
            data_collator=PadCollator(pad_id),
            callbacks=callbacks,
        )
        trainer.step_losses = result.step_losses
        start = time.perf_counter()
        output = trainer.train()
        result.seconds = time.perf_counter() - start
        result.steps = int(trainer.state.global_step)
        result.epochs = float(trainer.state.epoch or 0.0)
        result.train_loss = float(output.training_loss)
        if rule is not None:
            result.val_losses = list(rule.history)
            result.stop_reason = STOP_PLATEAU if stopped else STOP_CAP
        log.info(
            "trained %d steps in %.1f s (train loss %.4f)", result.steps, result.seconds, output.training_loss
        )
    model.eval()
    return result


@torch.no_grad()
def batch_loss(model: Any, batch: dict[str, torch.Tensor]) -> float:
    """Mean loss of `model` on one collated batch, in eval mode (no dropout)."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(**{k: v.to(device) for k, v in batch.items()})
        return float(out.loss)
    finally:
        if was_training:
            model.train()
