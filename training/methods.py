"""From TrainSettings to a trainable model: the PEFT config of each method, applied with get_peft_model.

`sft` trains every weight of the base (no PEFT); `qlora` is LoRA on a bitsandbytes nf4 base (the
caller loads the base quantized, see `base_quantization`). Prompt-learning methods (prompt tuning,
P-tuning, prefix tuning) add virtual tokens; the others wrap linear layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from adapterserve.training.errors import SettingsError
from adapterserve.training.kbit import keep_4bit_trainable
from adapterserve.training.settings import PROMPT_LEARNING_METHODS, TrainSettings

log = logging.getLogger(__name__)

# PEFT's peft_type for each method ("full-model" for SFT, which saves a whole model).
PEFT_TYPES: dict[str, str] = {
    "sft": "full-model",
    "lora": "LORA",
    "qlora": "LORA",
    "adalora": "ADALORA",
    "ia3": "IA3",
    "prompt-tuning": "PROMPT_TUNING",
    "p-tuning": "P_TUNING",
    "prefix-tuning": "PREFIX_TUNING",
}


def base_quantization(method: str) -> str:
    """How the base must be loaded for `method`: nf4 for QLoRA, unquantized for everything else."""
    return "nf4" if method == "qlora" else "none"


def peft_config_for(
    settings: TrainSettings, *, total_steps: int, task_type: str = "CAUSAL_LM", base_path: str | None = None
) -> Any | None:
    """The PEFT config for `settings.method` (None for sft).

    total_steps: optimizer steps of the run (AdaLoRA plans its rank budget over them).
    base_path: a directory holding the base's tokenizer (prompt tuning initialised from text).
    """
    from peft import (
        AdaLoraConfig,
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptEncoderReparameterizationType,
        PromptTuningConfig,
        PromptTuningInit,
    )

    s = settings
    method = s.method
    if method == "sft":
        return None
    if method in ("lora", "qlora"):
        return LoraConfig(
            task_type=task_type,
            r=s.rank,
            lora_alpha=s.alpha,
            lora_dropout=s.dropout,
            target_modules=s.resolved_lora_targets(),
            bias="none",
            use_dora=s.use_dora,
        )
    if method == "adalora":
        tinit, tfinal = s.resolved_adalora_schedule(total_steps)
        if tinit >= total_steps - tfinal:
            raise SettingsError(
                f"AdaLoRA needs a rank-budgeting phase: tinit ({tinit}) must be < total steps ({total_steps})"
                f" - tfinal ({tfinal}); train longer or lower --adalora-tinit/--adalora-tfinal"
            )
        return AdaLoraConfig(
            task_type=task_type,
            init_r=s.adalora_init_r,
            target_r=s.rank,
            lora_alpha=s.alpha,
            lora_dropout=s.dropout,
            target_modules=s.resolved_lora_targets(),
            tinit=tinit,
            tfinal=tfinal,
            deltaT=s.adalora_delta_t,
            beta1=s.adalora_beta1,
            beta2=s.adalora_beta2,
            orth_reg_weight=s.adalora_orth_reg_weight,
            total_step=total_steps,
        )
    if method == "ia3":
        kwargs: dict[str, Any] = {}
        if s.target_modules is not None:
            kwargs["target_modules"] = list(s.target_modules)
            # Without an explicit list, treat a target named like a feed-forward output as feed-forward.
            kwargs["feedforward_modules"] = list(
                s.feedforward_modules or [m for m in s.target_modules if m in ("down_proj", "fc2", "wo")]
            )
        elif s.feedforward_modules is not None:
            raise SettingsError("--feedforward-modules needs --target-modules too (IA3)")
        return IA3Config(task_type=task_type, **kwargs)
    if method == "prompt-tuning":
        if s.init_text is not None:
            if base_path is None:
                raise SettingsError("prompt tuning from text needs the base model's tokenizer directory")
            return PromptTuningConfig(
                task_type=task_type,
                num_virtual_tokens=s.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=s.init_text,
                tokenizer_name_or_path=base_path,
            )
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=s.num_virtual_tokens)
    if method == "p-tuning":
        encoder = (
            PromptEncoderReparameterizationType.MLP
            if s.encoder_type == "mlp"
            else PromptEncoderReparameterizationType.LSTM
        )
        kwargs = {"encoder_hidden_size": s.encoder_hidden_size} if s.encoder_hidden_size else {}
        return PromptEncoderConfig(
            task_type=task_type,
            num_virtual_tokens=s.num_virtual_tokens,
            encoder_reparameterization_type=encoder,
            **kwargs,
        )
    if method == "prefix-tuning":
        return PrefixTuningConfig(
            task_type=task_type,
            num_virtual_tokens=s.num_virtual_tokens,
            prefix_projection=s.prefix_projection,
            **({"encoder_hidden_size": s.encoder_hidden_size} if s.encoder_hidden_size else {}),
        )
    raise AssertionError(f"unhandled method {method!r}")  # TrainSettings restricts the values


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
