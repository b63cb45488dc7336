"""`--stage dpo`: TRL's DPOTrainer over the PEFT model this module prepared.

The reference policy is the base model with the adapter disabled (TRL does this for a PeftModel given
with `ref_model=None`), so no second copy of the model is loaded; full fine-tuning is refused for this
stage in TrainSettings. The adapter trains like any other and is saved, evaluated and uploaded the same
way. TRL is an optional dependency (`pip install adapterserve[train]`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import torch

from adapterserve.training.errors import SettingsError
from adapterserve.training.kbit import keep_4bit_trainable
from adapterserve.training.loop import LoopResult, _callbacks, trainer_arguments
from adapterserve.training.preference import PreferencePair, prompt_text
from adapterserve.training.settings import TrainSettings
from adapterserve.training.step_loss import with_step_losses

log = logging.getLogger(__name__)


def _trl() -> Any:
    try:
        import trl
    except ImportError:
        raise SettingsError(
            "--stage dpo needs TRL: pip install 'adapterserve[train]' (or pip install 'trl>=1.16,<2')"
        ) from None
    return trl


def planned_dpo_steps(settings: TrainSettings, num_pairs: int) -> int:
    from adapterserve.training.loop import planned_steps

    return planned_steps(settings, num_pairs)


def run_dpo(
    model: Any, pairs: list[PreferencePair], settings: TrainSettings, *, tokenizer: Any, device: torch.device
) -> tuple[Any, LoopResult]:
    """Train with DPO on `pairs` for the planned steps; returns (the trained PeftModel, the loop result).

    `model` is the PeftModel prepare_trainable_model made (its trainable count is the run's). TRL gets
    the base model and that adapter's config: given a PeftModel it would add a frozen "ref" copy of the
    adapter as reference, given the config it wraps the base itself and computes the reference with
    the adapter disabled, which is the base model.
    """
    trl = _trl()
    from datasets import Dataset

    config = model.peft_config["default"]
    base_model = model.unload()  # the base's layers restored, nothing merged (the adapter is fresh)
    records = [
        {"prompt": prompt_text(tokenizer, p), "chosen": p.chosen, "rejected": p.rejected} for p in pairs
    ]
    steps = planned_dpo_steps(settings, len(records))
    result = LoopResult(steps=0, epochs=0.0, seconds=0.0)
    with tempfile.TemporaryDirectory(prefix="adapterserve-dpo-") as scratch:
        args = trl.DPOConfig(
            **trainer_arguments(settings, device, scratch, steps),
            dataloader_num_workers=0,
            beta=settings.dpo_beta,
            # TRL turns activation checkpointing on by default; the SFT/pt loop does not use it, and
            # it re-runs every forward pass in the backward (about a third more time per step).
            gradient_checkpointing=False,
            max_length=settings.max_length,
            truncation_mode="keep_end",
        )
        trainer = with_step_losses(trl.DPOTrainer)(
            model=base_model,
            peft_config=config,
            ref_model=None,
            args=args,
            train_dataset=Dataset.from_list(records),
            processing_class=tokenizer,
            callbacks=_callbacks(settings, result),
        )
        trainer.step_losses = result.step_losses
        model = trainer.model
        if restored := keep_4bit_trainable(model):
            log.info("restored the trainable layout of %d CPU-repacked 4-bit layers", restored)
        start = time.perf_counter()
        output = trainer.train()
        result.seconds = time.perf_counter() - start
        result.steps = int(trainer.state.global_step)
        result.epochs = float(trainer.state.epoch or 0.0)
        result.train_loss = float(output.training_loss)
    model.eval()
    return model, result
