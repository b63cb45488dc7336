"""What TRL logs during a GRPO run, kept for the run's report: rewards and importance-sampling ratios."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapterserve.training.metrics import ImportanceSamplingStep

_RATIO = "sampling/importance_sampling_ratio/"
_DIFFERENCE = "sampling/sampling_logp_difference/"


@dataclass
class GrpoHistory:
    """Per logged step: the mean reward, and TRL's importance-sampling ratio when the correction runs."""

    rewards: list[tuple[int, float]] = field(default_factory=list)
    importance: list[ImportanceSamplingStep] = field(default_factory=list)

    def record(self, step: int, logs: dict[str, Any]) -> None:
        if "reward" in logs:
            self.rewards.append((step, float(logs["reward"])))
        if _RATIO + "mean" in logs:
            self.importance.append(
                ImportanceSamplingStep(
                    step=step,
                    ratio_min=float(logs[_RATIO + "min"]),
                    ratio_mean=float(logs[_RATIO + "mean"]),
                    ratio_max=float(logs[_RATIO + "max"]),
                    logp_difference_mean=float(logs[_DIFFERENCE + "mean"]),
                    logp_difference_max=float(logs[_DIFFERENCE + "max"]),
                )
            )

    def callback(self) -> Any:
        from transformers import TrainerCallback

        history = self

        class Record(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
                if logs:
                    history.record(int(state.global_step), logs)

        return Record()
