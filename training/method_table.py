"""The training method table: one row per `adapterserve train --method`, the only place a method is named.

A row says which peft_type the method saves, its default learning rate, how the base is loaded, and how
the trainable model is built: a PEFT config (`peft_config(settings, total_steps, base_path)`, applied
with get_peft_model), or for a method PEFT lacks, `wrap(model, settings)` plus `reload(base, out_dir)`
(a module of this project that saves in PEFT's layout). No heavy imports at module level: the CLI and
TrainSettings read this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainingMethod:
    name: str
    peft_type: str  # what adapter_config.json says ("full-model" for sft, which saves a whole model)
    learning_rate: float  # default; moves the method within a few hundred steps on a small model
    peft_config: Callable[[Any, int, str | None], Any] | None = None  # (settings, total_steps, base_path)
    wrap: Callable[[Any, Any], Any] | None = None  # (base model, settings) -> trainable model
    reload: Callable[[Any, Any], Any] | None = None  # (unwrapped base, adapter dir) -> eval model
    quantize: str = "none"  # how the base is loaded for training
    prompt_learning: bool = False  # adds virtual tokens instead of wrapping linears


def _peft(method: str, **fields: Any) -> Any:
    from adapterserve.server.adapters.peft_configs import build_peft_config

    return build_peft_config(method, **fields)


def _lora(s: Any, total_steps: int, base_path: str | None, method: str = "lora") -> Any:
    return _peft(
        method,
        r=s.rank,
        lora_alpha=s.alpha,
        lora_dropout=s.dropout,
        target_modules=s.resolved_lora_targets(),
        bias="none",
        **({"use_dora": True} if getattr(s, "use_dora", False) else {}),  # --use-dora: QLoRA + DoRA
    )


def _adalora(s: Any, total_steps: int, base_path: str | None) -> Any:
    from adapterserve.training.errors import SettingsError

    tinit, tfinal = s.resolved_adalora_schedule(total_steps)
    if tinit >= total_steps - tfinal:
        raise SettingsError(
            f"AdaLoRA needs a rank-budgeting phase: tinit ({tinit}) must be < total steps ({total_steps})"
            f" - tfinal ({tfinal}); train longer or lower --adalora-tinit/--adalora-tfinal"
        )
    return _peft(
        "adalora",
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


def _ia3(s: Any, total_steps: int, base_path: str | None) -> Any:
    from adapterserve.training.errors import SettingsError

    kwargs: dict[str, Any] = {}
    if s.target_modules is not None:
        kwargs["target_modules"] = list(s.target_modules)
        # Without an explicit list, treat a target named like a feed-forward output as feed-forward.
        kwargs["feedforward_modules"] = list(
            s.feedforward_modules or [m for m in s.target_modules if m in ("down_proj", "fc2", "wo")]
        )
    elif s.feedforward_modules is not None:
        raise SettingsError("--feedforward-modules needs --target-modules too (IA3)")
    return _peft("ia3", **kwargs)


def _prompt_tuning(s: Any, total_steps: int, base_path: str | None) -> Any:
    from adapterserve.training.errors import SettingsError

    if s.init_text is None:
        return _peft("prompt-tuning", num_virtual_tokens=s.num_virtual_tokens)
    if base_path is None:
        raise SettingsError("prompt tuning from text needs the base model's tokenizer directory")
    return _peft(
        "prompt-tuning",
        num_virtual_tokens=s.num_virtual_tokens,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=s.init_text,
        tokenizer_name_or_path=base_path,
    )


def _p_tuning(s: Any, total_steps: int, base_path: str | None) -> Any:
    kwargs = {"encoder_hidden_size": s.encoder_hidden_size} if s.encoder_hidden_size else {}
    return _peft(
        "p-tuning",
        num_virtual_tokens=s.num_virtual_tokens,
        encoder_reparameterization_type=s.encoder_type.upper(),  # MLP or LSTM
        **kwargs,
    )


def _prefix_tuning(s: Any, total_steps: int, base_path: str | None) -> Any:
    return _peft(
        "prefix-tuning",
        num_virtual_tokens=s.num_virtual_tokens,
        prefix_projection=s.prefix_projection,
        **({"encoder_hidden_size": s.encoder_hidden_size} if s.encoder_hidden_size else {}),
    )


def _bottleneck_wrap(model: Any, settings: Any) -> Any:
    from adapterserve.training.bottleneck import wrap_for_training

    return wrap_for_training(model, settings)


def _bottleneck_reload(model: Any, path: Any) -> Any:
    from adapterserve.training.bottleneck import load_bottleneck

    return load_bottleneck(model, path)


_ROWS: tuple[TrainingMethod, ...] = (
    TrainingMethod("sft", "full-model", 5e-5),
    TrainingMethod("lora", "LORA", 1e-3, peft_config=_lora),
    TrainingMethod("qlora", "LORA", 1e-3, peft_config=_lora, quantize="nf4"),
    TrainingMethod("dora", "LORA", 1e-3, peft_config=lambda s, n, p: _lora(s, n, p, "dora")),
    TrainingMethod("adalora", "ADALORA", 2e-3, peft_config=_adalora),
    TrainingMethod("ia3", "IA3", 1e-2, peft_config=_ia3),
    TrainingMethod("bottleneck", "BOTTLENECK", 1e-3, wrap=_bottleneck_wrap, reload=_bottleneck_reload),
    TrainingMethod("prompt-tuning", "PROMPT_TUNING", 3e-2, peft_config=_prompt_tuning, prompt_learning=True),
    TrainingMethod("p-tuning", "P_TUNING", 3e-3, peft_config=_p_tuning, prompt_learning=True),
    TrainingMethod("prefix-tuning", "PREFIX_TUNING", 1e-2, peft_config=_prefix_tuning, prompt_learning=True),
)

TRAINING_METHODS: dict[str, TrainingMethod] = {row.name: row for row in _ROWS}
METHODS: tuple[str, ...] = tuple(TRAINING_METHODS)
