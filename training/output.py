"""What a training run leaves on disk.

- An adapter directory with exactly `adapter_config.json` + `adapter_model.safetensors` (what the
  server accepts as is; PEFT's README.md is not kept, and nothing pickled is ever written), or for
  `sft` a whole model directory (config, safetensors weights, tokenizer).
- A manifest JSON next to it, `<out>.manifest.json`, so the adapter directory itself stays exactly
  the two PEFT files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from adapterserve.training.errors import TrainingError
from adapterserve.training.metrics import EvalMetrics, GrpoReport
from adapterserve.training.perplexity import PerplexityMetrics
from adapterserve.training.preference import PreferenceMetrics

ADAPTER_FILES: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class TrainManifest(BaseModel):
    """Everything needed to know what an adapter is and how it was made."""

    format: str  # "peft-adapter" or "full-model"
    stage: str = "sft"  # pt, sft or dpo
    method: str
    peft_type: str
    base_model: str
    base_fingerprint: str
    base_quantize: str
    trainable_parameters: int
    total_parameters: int
    trainable_percent: float
    stored_parameters: int  # elements in the saved tensors (prompt encoders are folded away)
    bytes_on_disk: int
    train_data: str
    train_data_sha256: str
    train_examples: int
    eval_data: str | None = None
    eval_data_sha256: str | None = None
    steps: int
    epochs: float
    train_seconds: float
    final_loss: float | None = None  # the last optimizer step's loss
    mean_train_loss: float | None = None  # the Trainer's train_loss: mean over every step
    stop_reason: str | None = None  # planned_steps, plateau (validation loss) or max_steps (the cap)
    val_examples: int = 0  # records held out of train_data for the validation loss
    val_losses: list[tuple[int, float]] | None = None  # (step, validation loss) at each check
    peak_memory_bytes: int | None = None  # while training (see peak_memory_measure)
    peak_memory_measure: str | None = None  # cuda_max_allocated or process_peak_rss
    eval_base: EvalMetrics | None = None
    eval_adapter: EvalMetrics | None = None
    eval_base_perplexity: PerplexityMetrics | None = None  # --stage pt: held-out perplexity
    eval_adapter_perplexity: PerplexityMetrics | None = None
    eval_base_preference: PreferenceMetrics | None = None  # --stage dpo: held-out preference pairs
    eval_adapter_preference: PreferenceMetrics | None = None
    grpo: GrpoReport | None = None  # --stage grpo: rewards, rollouts and pushes
    settings: dict[str, Any]
    versions: dict[str, str]


def manifest_path(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}.manifest.json"


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise TrainingError(f"output directory {out_dir} is not empty (pass --overwrite to replace it)")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _relabel_config(config_path: Path, base_label: str) -> None:
    """Replace the local base/tokenizer paths PEFT records with the base's label (no machine paths in
    shared adapters; PEFT loads an inference-mode adapter onto a given model without them)."""
    config = json.loads(config_path.read_text())
    for key in ("base_model_name_or_path", "tokenizer_name_or_path"):
        if config.get(key):
            config[key] = base_label
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_adapter(peft_model: Any, out_dir: Path, *, base_label: str | None = None) -> Path:
    """Save a PEFT model's adapter as exactly adapter_config.json + adapter_model.safetensors (atomic).

    base_label: written in place of the local paths PEFT records (base model, tokenizer), if given.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        staging = tmp / "peft"
        peft_model.save_pretrained(str(staging), safe_serialization=True)
        final = tmp / "adapter"
        final.mkdir()
        for name in ADAPTER_FILES:
            if not (staging / name).is_file():
                raise TrainingError(f"PEFT did not write {name}")
            os.replace(staging / name, final / name)
            os.chmod(final / name, 0o644)
        if base_label is not None:
            _relabel_config(final / "adapter_config.json", base_label)
        _replace_dir(final, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def save_full_model(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    """Save a fully fine-tuned model as a transformers directory (safetensors weights), atomically."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        pickled = [p.name for p in tmp.rglob("*") if p.suffix in _PICKLE_SUFFIXES]
        if pickled:
            raise TrainingError(f"refusing to keep pickled files {pickled}")
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def stored_parameters(out_dir: Path) -> int:
    """Elements in all safetensors files of a directory (reads headers only)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= int(dim)
                total += n
    return total


def write_manifest(manifest: TrainManifest, out_dir: Path) -> Path:
    path = manifest_path(out_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(out_dir: Path) -> TrainManifest:
    return TrainManifest.model_validate_json(manifest_path(out_dir).read_text())
