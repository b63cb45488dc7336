"""Real PEFT adapters on the tiny model, saved the way PEFT saves them (for store and config tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PEFT_TYPES = ("LORA", "ADALORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def peft_config(peft_type: str, **overrides: Any):
    """A PEFT config object of `peft_type` for the tiny Llama (small sizes, non-trivial init)."""
    from adapterserve.server.adapters.peft_configs import build_peft_config

    defaults: dict[str, tuple[str, dict[str, Any]]] = {
        "LORA": (
            "lora",
            dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        ),
        "ADALORA": (
            "adalora",
            dict(init_r=6, target_r=4, target_modules=["q_proj", "v_proj"], total_step=10),
        ),
        "IA3": (
            "ia3",
            dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        ),
        "PROMPT_TUNING": ("prompt-tuning", {"num_virtual_tokens": 4}),
        "P_TUNING": ("p-tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
        "PREFIX_TUNING": ("prefix-tuning", {"num_virtual_tokens": 4}),
    }
    if peft_type not in defaults:
        raise ValueError(peft_type)
    method, fields = defaults[peft_type]
    return build_peft_config(method, **{**fields, **overrides})


def save_peft_adapter(
    model_dir: Path, out: Path, peft_type: str = "LORA", seed: int = 0, **overrides: Any
) -> Path:
    """get_peft_model(tiny model, config).save_pretrained(out); returns `out`."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, peft_config(peft_type, **overrides))
    peft_model.save_pretrained(out)
    return out


def write_lora_dir(out: Path, spec, *, seed: int = 0, r: int = 2, modules=("q_proj", "v_proj")) -> Path:
    """A LoRA adapter folder in PEFT's exact layout, written directly (fast: for hundreds of adapters)."""
    import json

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for short in modules:
            in_f, out_f = spec.linear_shapes[short]
            prefix = f"base_model.model.{spec.module_name(layer, short)}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, r, generator=g)
    config = peft_config("LORA", r=r, lora_alpha=2 * r, target_modules=list(modules)).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["inference_mode"] = True
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under `root` -> its type and content hash (or link target): equal iff unchanged."""
    import hashlib
    import os

    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                state[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = "file:" + hashlib.sha256(p.read_bytes()).hexdigest()
    return state
