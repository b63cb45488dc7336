"""`--demo-adapters`: trained task adapters plus one adapter of four kinds, so a fresh server shows the mix.

Trained demo adapters are the ones `demo/train_demo_adapters.sh` trained with `adapterserve train` on
the embedded default model (json-extract: LoRA, sentiment: prompt tuning, pirate: prefix tuning); they
are committed under `demo/adapters/` with a manifest naming the base fingerprint, and are stored only
when the served base has that fingerprint. The kind adapters (`demo-*`) work on any base.

The kind adapters are randomly initialised PEFT adapters (not trained): they exist to show that LoRA, IA3,
prompt tuning and prefix tuning serve side by side, and each one visibly changes the output. The other
three kinds have no demo adapter: DoRA's magnitudes are the base weights' norms, which the weightless copy
below does not have; bottleneck adapters and templates are not PEFT formats (the training module writes
bottleneck adapters; a template is a config alone). Tests serve all seven side by side. They are
built by PEFT itself on a weightless ("meta") copy of the base architecture, so only the adapter
tensors are ever materialised (milliseconds, no second copy of the base), and saved in PEFT's own
format (adapter_config.json + adapter_model.safetensors). Trained adapters from `adapterserve train`
are uploaded the same way as any other.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEMO_SEED = 1234


def _demo_configs() -> dict[str, Any]:
    """name -> PEFT config of each demo adapter (Llama-family module names)."""
    from adapterserve.server.adapters.peft_configs import build_peft_config

    return {
        "demo-lora": build_peft_config(
            "lora", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
        ),
        "demo-ia3": build_peft_config(
            "ia3", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "demo-prompt": build_peft_config("prompt-tuning", num_virtual_tokens=8),
        "demo-prefix": build_peft_config("prefix-tuning", num_virtual_tokens=8),
    }


def _init_value(name: str, param: Any, embed_std: float) -> None:
    """Random but sensible values: each adapter changes the output without destroying it."""
    import torch

    with torch.no_grad():
        if "ia3_l" in name:
            param.normal_(1.0, 0.2)
        elif "lora_" in name:
            param.normal_(0.0, 0.05)
        elif "prompt_encoder" in name or "embedding" in name:
            param.normal_(0.0, embed_std)
        else:
            param.normal_(0.0, 0.05)


def write_demo_adapter(model_config: Any, peft_config: Any, out: Path, seed: int, embed_std: float) -> Path:
    """Build one PEFT adapter on a weightless copy of the architecture and save it to `out`."""
    import torch
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    with warnings.catch_warnings():  # transformers' deprecation notes from inside PEFT, not actionable here
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(skeleton, copy.deepcopy(peft_config))
    for module in peft_model.modules():  # materialise only the adapter's own (trainable) tensors
        if any(p.requires_grad and p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                _init_value(name, param, embed_std)
    finally:
        torch.random.set_rng_state(generator_state)
    tensors = {
        k: v.detach().to(torch.float32).contiguous() for k, v in get_peft_model_state_dict(peft_model).items()
    }
    out.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


DEMO_DIR_ENV = "ADAPTERSERVE_DEMO_DIR"


def demo_dir() -> Path | None:
    """The repository's demo/ folder: $ADAPTERSERVE_DEMO_DIR, the checkout this code runs from, or ./demo."""
    env = os.environ.get(DEMO_DIR_ENV)
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2] / "demo", Path.cwd() / "demo"]
    return next((c for c in candidates if (c / "adapters").is_dir()), None)


def trained_demo_adapters(fingerprint: str, root: Path | None = None) -> dict[str, Path]:
    """name -> directory of every trained demo adapter whose manifest names this base fingerprint."""
    root = demo_dir() if root is None else root
    if root is None:
        return {}
    found: dict[str, Path] = {}
    for manifest_path in sorted((root / "adapters").glob("*.manifest.json")):
        name = manifest_path.name.removesuffix(".manifest.json")
        adapter = manifest_path.parent / name
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            log.warning("demo adapter %s: unreadable manifest (%s)", name, err)
            continue
        if not (adapter / "adapter_config.json").is_file():
            continue
        if manifest.get("base_fingerprint") != fingerprint:
            log.info("demo adapter %s was trained on another base; not stored", name)
            continue
        found[name] = adapter
    return found


def ensure_demo_adapters(base: Any, put_dir: Callable[[Path, str], Any], existing: set[str]) -> list[str]:
    """Store every demo adapter that is not in the store yet (via `put_dir(src, name)`); returns the added names."""
    added: list[str] = []
    for name, src in trained_demo_adapters(base.fingerprint).items():
        if name not in existing:
            put_dir(src, name)
            added.append(name)
    embedding = base.model.get_input_embeddings().weight
    embed_std = float(embedding.float().std()) if embedding.numel() else 0.02
    with tempfile.TemporaryDirectory(prefix="adapterserve-demo-") as tmp:
        for i, (name, peft_config) in enumerate(_demo_configs().items()):
            if name in existing:
                continue
            src = write_demo_adapter(
                base.model.config, peft_config, Path(tmp) / name, DEMO_SEED + i, embed_std
            )
            put_dir(src, name)
            added.append(name)
    if added:
        log.info("added demo adapters: %s", ", ".join(added))
    return added
