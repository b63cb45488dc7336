"""The run's "final loss" is the last optimizer step's loss, even with fewer steps than --logging-steps."""

from __future__ import annotations

import pytest

from adapterserve.training import TrainSettings, train
from adapterserve.training.output import read_manifest


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_final_loss_is_the_last_steps_loss_not_the_first_logged(fresh_base, pc_file, tmp_path, grad_accum):
    # The user's case: default --logging-steps 10 and a shorter run; the Trainer logs only step 1.
    settings = TrainSettings(
        method="lora", max_steps=4, batch_size=8 // grad_accum, grad_accum=grad_accum, learning_rate=1e-2
    )
    assert settings.logging_steps == 10
    result = train(settings, pc_file, tmp_path / "a", base=fresh_base)
    per_step = result.loop.step_losses.steps
    assert [step for step, _ in per_step] == [1, 2, 3, 4]
    # Our per-step losses are the Trainer's own: their mean is its train_loss.
    assert sum(v for _, v in per_step) / 4 == pytest.approx(result.loop.train_loss, rel=1e-4)
    first, last = per_step[0][1], per_step[-1][1]
    assert last < first  # it learned, so reporting step 1 would be visibly wrong
    m = read_manifest(tmp_path / "a")
    assert m.final_loss == pytest.approx(last)
    assert m.mean_train_loss == pytest.approx(result.loop.train_loss)
    # The logged history now ends at the last step as well.
    assert result.loop.losses[0][0] == 1 and result.loop.losses[-1][0] == 4
