"""Training to convergence: the plateau rule, and a run that stops on it before its cap."""

from __future__ import annotations

import pytest

from adapterserve.training import TrainSettings, train
from adapterserve.training.convergence import PlateauRule
from adapterserve.training.output import read_manifest


def test_plateau_rule_counts_checks_without_a_real_gain():
    rule = PlateauRule(patience=2, min_delta=0.1)
    assert not rule.observe(10, 1.0)
    assert not rule.observe(20, 0.5)  # a real gain resets
    assert not rule.observe(30, 0.48)  # < 10% better: one bad check (but the best is kept)
    assert rule.best == pytest.approx(0.48)
    assert rule.observe(40, 0.47)  # second check without a 10% gain: stop
    assert rule.best_step == 20


def test_plateau_rule_needs_an_absolute_gain_near_zero():
    rule = PlateauRule(patience=2, min_delta=0.1, min_abs_delta=0.01)
    for step, loss in [(10, 0.02), (20, 0.005)]:
        assert not rule.observe(step, loss)  # 0.015 better: a gain
    assert not rule.observe(30, 0.002)  # 60% better, but only 0.003: no gain
    assert rule.observe(40, 0.001)


def test_settings_refuse_early_stopping_without_validation_or_cap():
    with pytest.raises(ValueError, match="val-size"):
        TrainSettings(method="lora", early_stop_patience=2, max_steps=10)
    with pytest.raises(ValueError, match="max-steps"):
        TrainSettings(method="lora", early_stop_patience=2, val_size=4)


def test_run_stops_when_the_validation_loss_plateaus(fresh_base, pc_file, tmp_path):
    # 8 records (4 distinct pairs twice): held-out records repeat training ones, so the validation loss
    # falls fast and then flattens; the cap is far away.
    settings = TrainSettings(
        method="lora",
        max_steps=400,
        batch_size=4,
        learning_rate=1e-2,
        lr_schedule="constant",
        val_size=2,
        early_stop_patience=3,
        early_stop_every=5,
        early_stop_min_delta=0.05,
    )
    result = train(settings, pc_file, tmp_path / "a", base=fresh_base)
    m = read_manifest(tmp_path / "a")
    assert m.stop_reason == "plateau" and m.steps < 400
    assert m.val_examples == 2 and m.train_examples == 6
    val = [loss for _, loss in m.val_losses]
    assert [step for step, _ in m.val_losses] == list(range(5, m.steps + 1, 5))
    assert min(val) < 0.9 * val[0]  # it did learn before stopping
    assert result.loop.steps == m.steps
    assert m.peak_memory_bytes and m.peak_memory_bytes > 0 and m.peak_memory_measure == "process_peak_rss"
