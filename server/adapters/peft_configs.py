"""The one place a PEFT config object is built (training, the demo adapters and the tests call this).

`build_peft_config("lora", r=8, target_modules=[...])` -> peft.LoraConfig(task_type="CAUSAL_LM", ...).
Method names are the training CLI's; `dora` is LoRA with use_dora=True. Bottleneck adapters and
templates are not PEFT methods (see server/adapters/kinds/).
"""

from __future__ import annotations

from typing import Any

# method -> (PEFT config class name, fields it always sets)
PEFT_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoraConfig", {}),
    "dora": ("LoraConfig", {"use_dora": True}),
    "adalora": ("AdaLoraConfig", {}),
    "ia3": ("IA3Config", {}),
    "prompt-tuning": ("PromptTuningConfig", {}),
    "p-tuning": ("PromptEncoderConfig", {}),
    "prefix-tuning": ("PrefixTuningConfig", {}),
}


def build_peft_config(method: str, **fields: Any) -> Any:
    """A PEFT config for `method` with `fields` (task_type defaults to CAUSAL_LM)."""
    import peft

    try:
        class_name, fixed = PEFT_METHODS[method]
    except KeyError:
        raise ValueError(f"{method!r} is not a PEFT method; known: {', '.join(PEFT_METHODS)}") from None
    return getattr(peft, class_name)(**{"task_type": "CAUSAL_LM", **fields, **fixed})
