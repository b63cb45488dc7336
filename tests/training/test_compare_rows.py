"""The rows of `adapterserve train compare`: DoRA and LoRA-rank rows become the settings they name."""

from __future__ import annotations

from adapterserve.training.compare import method_row, rank_rows, settings_for
from adapterserve.training.settings import TrainSettings


def test_dora_row_is_the_served_dora_method():
    """DoRA is a method of its own (served by the engine): its row trains and scores it as such."""
    shared = TrainSettings(method="prompt-tuning", init_text="Answer:", max_steps=5)
    s = settings_for(method_row("dora"), shared)
    assert (s.method, s.use_dora, s.eval_backend, s.init_text) == ("dora", False, "auto", None)
    assert settings_for(method_row("prompt-tuning"), shared).init_text == "Answer:"


def test_rank_rows_keep_alpha_over_rank():
    shared = TrainSettings(method="lora", rank=8, alpha=16)
    rows = rank_rows([1, 2, 16], alpha_per_rank=shared.alpha / shared.rank)
    settings = [settings_for(r, shared) for r in rows]
    assert [r.label for r in rows] == ["lora r=1", "lora r=2", "lora r=16"]
    assert [(s.rank, s.alpha) for s in settings] == [(1, 2.0), (2, 4.0), (16, 32.0)]
