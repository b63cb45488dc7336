"""From TrainSettings to a trainable model: the method table's PEFT config applied with get_peft_model
(or, for a method PEFT lacks, the table's own `wrap`).

`sft` trains every weight of the base (no PEFT); `qlora` is LoRA on a bitsandbytes nf4 base (the
caller loads the base quantized, see `base_quantization`). Prompt-learning methods (prompt tuning,
P-tuning, prefix tuning) add virtual tokens; the others wrap linear layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from adapterserve.training.kbit import keep_4bit_trainable
from adapterserve.training.method_table import TRAINING_METHODS
from adapterserve.training.settings import PROMPT_LEARNING_METHODS, TrainSettings

log = logging.getLogger(__name__)

# PEFT's peft_type for each method ("full-model" for SFT, which saves a whole model).
PEFT_TYPES: dict[str, str] = {m.name: m.peft_type for m in TRAINING_METHODS.values()}


def base_quantization(method: str) -> str:
    """How the base must be loaded for `method`: nf4 for QLoRA, unquantized for everything else."""
    return TRAINING_METHODS[method].quantize


def peft_config_for(
    settings: TrainSettings, *, total_steps: int, task_type: str = "CAUSAL_LM", base_path: str | None = None
) -> Any | None:
    """The PEFT config for `settings.method` (None for sft and for methods PEFT lacks).

    total_steps: optimizer steps of the run (AdaLoRA plans its rank budget over them).
    base_path: a directory holding the base's tokenizer (prompt tuning initialised from text).
    """
    row = TRAINING_METHODS[settings.method]
    if row.peft_config is None:
        return None
    config = row.peft_config(settings, total_steps, base_path)
    config.task_type = task_type
    return config


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def count_parameters(model: Any) -> ParameterCount:
    """Trainable and total parameters, counting each bitsandbytes 4-bit parameter as its real element
    count (its storage packs two values per byte), and shared (tied) tensors once."""
    trainable = total = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel()
        if n and param.__class__.__name__ == "Params4bit":
            n = _params4bit_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return ParameterCount(trainable=trainable, total=total)


def _params4bit_numel(param: Any) -> int:
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    if shape is not None:
        n = 1
        for dim in shape:
            n *= int(dim)
        return n
    return param.numel() * 2  # packed uint8 storage, two 4-bit values per element


def prepare_trainable_model(
    model: Any, settings: TrainSettings, *, total_steps: int, base_path: str | None
) -> Any:
    """Turn a loaded (frozen) base model into the model the trainer optimises.

    sft: the base itself with every weight trainable. Otherwise get_peft_model with the method's config
    (QLoRA first goes through prepare_model_for_kbit_training). The base model object is modified.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if settings.method == "sft":
        model.requires_grad_(True)
        model.train()
        return model
    row = TRAINING_METHODS[settings.method]
    if row.wrap is not None:  # a method PEFT lacks: this project's own module
        wrapped = row.wrap(model, settings)
        wrapped.train()
        return wrapped
    config = peft_config_for(settings, total_steps=total_steps, base_path=base_path)
    if settings.method == "qlora":
        on_cuda = next(model.parameters()).device.type == "cuda"
        # Gradient checkpointing saves GPU memory; on a CPU it only costs time.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=on_cuda)
        keep_4bit_trainable(model)
    peft_model = get_peft_model(model, config)
    if settings.method in PROMPT_LEARNING_METHODS:
        log.info("%s: %d virtual tokens", settings.method, settings.num_virtual_tokens)
    peft_model.train()
    return peft_model
