"""Training to convergence: stop when the validation loss stops improving (a plateau rule).

Every `every` optimizer steps the Trainer evaluates the loss on records held out of the training file;
a check that lowers the best loss by more than `min_delta` (a fraction of the best) and by more than
`min_abs_delta` (a loss that decays towards 0 keeps falling by a fixed fraction forever) resets the count,
any other check adds one; `patience` checks in a row without improvement stop the run. `max_steps` is
the cap. The model is kept as it is at the stop (no checkpoint is reloaded): the last checks were
within `min_delta` of the best by construction, or the run hit the cap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

STOP_PLATEAU = "plateau"
STOP_CAP = "max_steps"
STOP_PLANNED = "planned_steps"


@dataclass
class PlateauRule:
    patience: int
    min_delta: float  # relative
    min_abs_delta: float = 0.0
    best: float | None = None
    best_step: int = 0
    bad_checks: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)

    def observe(self, step: int, loss: float) -> bool:
        """Record one check; True when the run should stop."""
        self.history.append((step, loss))
        if self.best is None or loss < min(
            self.best * (1.0 - self.min_delta), self.best - self.min_abs_delta
        ):
            self.best, self.best_step, self.bad_checks = loss, step, 0
            return False
        self.best = min(self.best, loss)
        self.bad_checks += 1
        return self.bad_checks >= self.patience


def plateau_callback(rule: PlateauRule, stopped: list[int]) -> Any:
    """A Trainer callback applying `rule` to each evaluation's eval_loss; appends the stop step."""
    from transformers import TrainerCallback

    class Plateau(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001
            if not metrics or "eval_loss" not in metrics:
                return control
            step = int(state.global_step)
            if rule.observe(step, float(metrics["eval_loss"])):
                log.info(
                    "validation loss plateaued (best %.4f at step %d, %d checks without a %.0f%% gain): "
                    "stopping at step %d",
                    rule.best,
                    rule.best_step,
                    rule.bad_checks,
                    100 * rule.min_delta,
                    step,
                )
                stopped.append(step)
                control.should_training_stop = True
            return control

    return Plateau()
