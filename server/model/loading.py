"""Base model loading: the one function the whole project uses to get the base model.

Sources: a local transformers directory, a `.gguf` file (dequantized once into a cached safetensors
directory), a name transformers can resolve (needs a reachable hub), or None for the embedded default
model. Quantization: bitsandbytes `nf4` (default on CUDA), `int8`, or `none` (default on CPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterserve.server.errors import ModelLoadError
from adapterserve.server.model.default_model import default_model_dir, ensure_converted
from adapterserve.server.model.spec import BaseModelSpec, spec_from_model
from adapterserve.server.settings import Quantize

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# bitsandbytes' int8 matmul warns on every call that fp32 inputs are cast to fp16.
warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")


@dataclass
class LoadedBase:
    """The served base: model (eval mode, no grad), tokenizer (with a chat template), spec, fingerprint."""

    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any  # transformers tokenizer
    spec: BaseModelSpec
    fingerprint: str  # identifies the base weights; adapters trained on another base are refused
    source: str  # what was asked for (path or name), for logs and the manifest
    quantize: Quantize
    device: torch.device
    dtype: torch.dtype  # compute dtype


def eos_token_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's (one id or a list)."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    gen_eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list | tuple):
        ids.update(int(t) for t in gen_eos)
    return frozenset(ids)


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_quantize(quantize: Quantize | None, device: torch.device) -> Quantize:
    if quantize is None:
        return "nf4" if device.type == "cuda" else "none"
    return quantize


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}") from None


def resolve_source(source: str | Path | None) -> tuple[str, str]:
    """(what to pass to from_pretrained, a human label). GGUF files become their cached conversion."""
    if source is None or str(source) == "":
        return str(default_model_dir()), "default:SmolLM2-135M-Instruct"
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"base model file not found: {path}")
        return str(ensure_converted(path.resolve())), str(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a transformers model directory (no config.json)")
        return str(path), str(path)
    if str(source).startswith((".", "/", "~")):
        raise ModelLoadError(f"base model path not found: {source}")
    return str(source), str(source)  # a hub name: works only where a hub is reachable


def _quantization_config(quantize: Quantize, dtype: torch.dtype) -> Any:
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False,
        )
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelLoadError(f"unknown quantization {quantize!r}; use nf4, int8 or none")


FINGERPRINT_SAMPLES = 256  # blocks sampled across each weight file
FINGERPRINT_BLOCK = 4096


def _hash_weight_file(h: Any, path: Path) -> None:
    """The whole safetensors header (every tensor's name, dtype, shape, offsets) plus blocks sampled
    evenly over the data, so a checkpoint that differs in any tensor larger than 1/256 of the file
    differs here; small files are read whole. About 1 MiB read per file, whatever its size."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= FINGERPRINT_SAMPLES * FINGERPRINT_BLOCK:
            h.update(f.read())
            return
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        header_len = min(header_len, size - 8)
        h.update(prefix + f.read(header_len))
        data_start, data_len = 8 + header_len, size - 8 - header_len
        stride = max(data_len // FINGERPRINT_SAMPLES, 1)
        for i in range(FINGERPRINT_SAMPLES):
            f.seek(data_start + min(i * stride, max(data_len - FINGERPRINT_BLOCK, 0)))
            h.update(f.read(FINGERPRINT_BLOCK))


def fingerprint_of(model_dir: str, config: Any) -> str:
    """A stable id of the base weights: sha256 over the architecture config and the weight files.

    Independent of quantization (it reads the checkpoint on disk, not the loaded model), so an adapter
    trained on the fp32 base serves on its nf4 form and vice versa.
    """
    h = hashlib.sha256()
    arch = {
        k: v
        for k, v in config.to_dict().items()
        if k
        in {
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "tie_word_embeddings",
        }
    }
    h.update(json.dumps(arch, sort_keys=True).encode())
    directory = Path(model_dir)
    if directory.is_dir():
        for weight_file in sorted(directory.glob("*.safetensors")):
            _hash_weight_file(h, weight_file)
    else:
        h.update(model_dir.encode())
    return "sha256:" + h.hexdigest()[:32]


def keep_plain_4bit_layout(model: Any) -> None:
    """Stop bitsandbytes from repacking CPU 4-bit weights for its AVX512-BF16 kernel at the first forward.

    The repacked layout stores the block scales in bf16 and cannot be turned back into the exact nf4
    weight, which DoRA needs (row norms of the dequantized weight), and PEFT's DoRA misreads it. On CUDA
    nothing is repacked."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base_model(
    source: str | Path | None = None,
    *,
    quantize: Quantize | None = None,
    dtype: str = "auto",
    device: str | None = None,
) -> LoadedBase:
    """Load the base model once: model (eval, frozen), tokenizer with chat template, spec, fingerprint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target_device = resolve_device(device)
    quant = resolve_quantize(quantize, target_device)
    compute_dtype = resolve_dtype(dtype, target_device)
    model_path, label = resolve_source(source)
    try:
        config = AutoConfig.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        kwargs: dict[str, Any] = {"dtype": compute_dtype}
        qconfig = _quantization_config(quant, compute_dtype)
        if qconfig is not None:
            kwargs["quantization_config"] = qconfig
            kwargs["device_map"] = {"": target_device}
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many kinds; the user needs the source and the cause
        raise ModelLoadError(f"could not load base model {label!r}: {exc}") from exc
    if qconfig is None:
        model.to(target_device)
    model.eval()
    model.requires_grad_(False)
    if qconfig is not None and target_device.type == "cpu":
        keep_plain_4bit_layout(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        log.warning("base model %s has no chat template; chat requests will be refused", label)
    spec = spec_from_model(model)
    fingerprint = fingerprint_of(model_path, config)
    log.info(
        "loaded base %s (%s, quantize=%s, dtype=%s, device=%s, %.1f MB)",
        label,
        spec.model_type,
        quant,
        compute_dtype,
        target_device,
        model.get_memory_footprint() / 1e6,
    )
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        fingerprint=fingerprint,
        source=label,
        quantize=quant,
        device=target_device,
        dtype=compute_dtype,
    )
