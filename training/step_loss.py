"""The loss of every optimizer step, exactly, whatever `--logging-steps` is.

transformers' Trainer logs the mean loss of the steps since its last log, every `logging_steps`
steps (and the first step with `logging_first_step`). A run shorter than `logging_steps` therefore
logs only step 1, and "the last logged loss" is the first step's. `StepLossMixin` records what each
optimizer step's micro-batches returned (their sum is the step's loss on the Trainer's own scale), and
`FinalStepLog` makes the Trainer log at the last step too, so the loss history ends where training did.
Both work with any Trainer subclass (the SFT/PT Trainer, TRL's DPOTrainer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StepLosses:
    """Per optimizer step: (global step, loss). Filled by StepLossMixin + StepLossCallback."""

    steps: list[tuple[int, float]] = field(default_factory=list)
    _pending: torch.Tensor | None = None  # sum of this step's micro-batch losses so far

    def add_micro_batch(self, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        self._pending = value if self._pending is None else self._pending + value

    def close_step(self, global_step: int) -> None:
        if self._pending is not None:
            self.steps.append((global_step, float(self._pending)))
            self._pending = None

    @property
    def last(self) -> float | None:
        return self.steps[-1][1] if self.steps else None


class StepLossMixin:
    """Mix into a Trainer class (before it): `class T(StepLossMixin, Trainer)`; set `step_losses`."""

    step_losses: StepLosses

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        self.step_losses.add_micro_batch(loss)
        return loss


def with_step_losses(trainer_cls: type) -> type:
    """`trainer_cls` with StepLossMixin mixed in (a new class; the original is untouched)."""
    return type(f"StepLoss{trainer_cls.__name__}", (StepLossMixin, trainer_cls), {})


def step_loss_callbacks(losses: StepLosses) -> list[Any]:
    """Callbacks that close each optimizer step's loss and force a log at the last step."""
    from transformers import TrainerCallback

    class StepLossCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            losses.close_step(int(state.global_step))
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True  # the history's last point is the last step
            return control

    return [StepLossCallback()]
