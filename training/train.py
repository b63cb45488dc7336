"""One training run, end to end: load base, read data, evaluate the base, train, save, evaluate, manifest."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterserve.training.data import file_sha256
from adapterserve.training.errors import SettingsError
from adapterserve.training.evaluate import EvalResult
from adapterserve.training.loop import LoopResult, planned_steps, run_training
from adapterserve.training.memory import PeakMemoryMeter
from adapterserve.training.method_table import TRAINING_METHODS
from adapterserve.training.methods import (
    PEFT_TYPES,
    ParameterCount,
    base_quantization,
    count_parameters,
    prepare_trainable_model,
)
from adapterserve.training.output import (
    TrainManifest,
    check_out_dir,
    directory_bytes,
    save_adapter,
    save_full_model,
    stored_parameters,
    write_manifest,
)
from adapterserve.training.settings import TrainSettings
from adapterserve.training.stages import StageEvaluator, load_stage_data

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out_dir: Path
    manifest_path: Path
    manifest: TrainManifest
    loop: LoopResult
    params: ParameterCount
    model: Any  # the trained model in memory (PeftModel, or the whole model for sft), eval mode
    eval_base: EvalResult | None
    eval_adapter: EvalResult | None


def load_base_for(settings: TrainSettings) -> Any:
    """The base as `settings.method` needs it: nf4 for QLoRA, fp32 weights for full SFT."""
    from adapterserve.server.model.loading import load_base_model

    quantize = base_quantization(settings.method)
    dtype = "float32" if settings.method == "sft" else "auto"
    base = load_base_model(settings.base_model, quantize=quantize, dtype=dtype, device=settings.device)
    if settings.method == "qlora" and base.device.type != "cuda":
        log.warning(
            "qlora without CUDA: training LoRA over bitsandbytes' CPU 4-bit (nf4) base; "
            "slower than fp32 LoRA on a CPU, and no paged optimizer"
        )
    return base


def manifest_fields(
    settings, base, params, out: Path, train_file: Path, eval_file: Path | None, examples: int, loop
) -> dict[str, Any]:
    """The TrainManifest fields every stage writes the same way: what was trained on which base, the
    output's size, the data's files and digests, the loop's figures, the settings and versions."""
    return dict(
        stage=settings.stage,
        method=settings.method,
        peft_type=PEFT_TYPES[settings.method],
        base_model=base.source,
        base_fingerprint=base.fingerprint,
        base_quantize=base.quantize,
        trainable_parameters=params.trainable,
        total_parameters=params.total,
        trainable_percent=round(params.percent, 6),
        stored_parameters=stored_parameters(out),
        bytes_on_disk=directory_bytes(out),
        train_data=str(train_file),
        train_data_sha256=file_sha256(train_file),
        train_examples=examples,
        eval_data=str(eval_file) if eval_file is not None else None,
        eval_data_sha256=file_sha256(eval_file) if eval_file is not None else None,
        steps=loop.steps,
        epochs=round(loop.epochs, 4),
        train_seconds=round(loop.seconds, 2),
        final_loss=loop.final_loss,
        mean_train_loss=loop.train_loss,
        stop_reason=loop.stop_reason,
        settings=settings.model_dump(mode="json"),
        versions=_versions(),
    )


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("adapterserve", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def _unwrapped(peft_model: Any, method: str) -> Any:
    """The base model without the trained adapter (layers restored, nothing merged)."""
    from adapterserve.training.settings import PROMPT_LEARNING_METHODS

    if method in PROMPT_LEARNING_METHODS:
        return peft_model.get_base_model()
    return peft_model.unload()


def train(
    settings: TrainSettings,
    train_file: str | Path,
    out_dir: str | Path,
    *,
    eval_file: str | Path | None = None,
    base: Any | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train `settings.method` on `train_file`, save to `out_dir` (+ `<out_dir>.manifest.json`).

    base: a LoadedBase to train on (it is modified: adapters are injected, or for sft its weights
    trained); None loads `settings.base_model` as the method needs it.
    """
    if settings.stage == "grpo":  # online RL against a server: its own pipeline (grpo_train.py)
        from adapterserve.training.grpo_train import train_grpo

        return train_grpo(settings, train_file, out_dir, eval_file=eval_file, base=base, overwrite=overwrite)
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    if base is None:
        base = load_base_for(settings)
    elif settings.method == "qlora" and base.quantize != "nf4":
        raise SettingsError("qlora trains over an nf4-quantized base; load it with quantize='nf4'")
    tokenizer = base.tokenizer
    data = load_stage_data(settings, train_file, tokenizer)
    evaluator = StageEvaluator(settings, base, eval_file) if eval_file is not None else None
    eval_fields: dict[str, Any] = {}
    if evaluator is not None:
        log.info("evaluating the base model on %d examples (%s)", evaluator.size, evaluator.backend)
        eval_fields.update(evaluator.before())

    steps = planned_steps(settings, len(data))
    from transformers import set_seed

    set_seed(settings.seed)  # adapter initialisation draws from the global RNG
    model = prepare_trainable_model(
        base.model, settings, total_steps=steps, base_path=getattr(base.model.config, "_name_or_path", None)
    )
    params = count_parameters(model)
    log.info(
        "%s: %s trainable of %s parameters (%.4f%%)",
        settings.method,
        f"{params.trainable:,}",
        f"{params.total:,}",
        params.percent,
    )
    with PeakMemoryMeter(base.device) as meter:
        if data.pairs is not None:
            from adapterserve.training.dpo import run_dpo

            model, loop = run_dpo(model, data.pairs, settings, tokenizer=tokenizer, device=base.device)
        else:
            assert data.dataset is not None
            loop = run_training(
                model,
                data.dataset,
                settings,
                pad_id=tokenizer.pad_token_id,
                device=base.device,
                validation=data.validation,
            )
    peak = meter.result

    if settings.method == "sft":
        save_full_model(model, tokenizer, out)
        served_model = model
    else:
        save_adapter(model, out, base_label=base.source)
        # Measure what was saved: reload the adapter from disk onto the restored base.
        reload = TRAINING_METHODS[settings.method].reload
        if reload is None:
            from peft import PeftModel

            served_model = PeftModel.from_pretrained(_unwrapped(model, settings.method), str(out))
        else:
            served_model = reload(_unwrapped(model, settings.method), out)
        model = served_model
    model.eval()

    if evaluator is not None:
        log.info(
            "evaluating the trained %s on %d examples (%s)",
            settings.method,
            evaluator.size,
            evaluator.backend,
        )
        eval_fields.update(evaluator.after(out, settings.method, served_model))

    manifest = TrainManifest(
        format="full-model" if settings.method == "sft" else "peft-adapter",
        **manifest_fields(settings, base, params, out, train_file, eval_file, len(data), loop),
        val_examples=len(data.validation) if data.validation is not None else 0,
        val_losses=loop.val_losses or None,
        peak_memory_bytes=peak.bytes if peak else None,
        peak_memory_measure=peak.measure if peak else None,
        **eval_fields,
    )
    path = write_manifest(manifest, out)
    log.info("wrote %s (%d bytes) and %s", out, manifest.bytes_on_disk, path)
    return TrainResult(
        out_dir=out,
        manifest_path=path,
        manifest=manifest,
        loop=loop,
        params=params,
        model=model,
        eval_base=evaluator.sft_base if evaluator is not None else None,
        eval_adapter=evaluator.sft_output if evaluator is not None else None,
    )
