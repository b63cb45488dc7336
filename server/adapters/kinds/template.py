"""Hard-prompt templates: a named, versioned prompt with no weights, a PROMPT kind.

adapter_config.json: {"peft_type": "HARD_PROMPT", "template": "Translate to French: {input}\\nFrench:",
"system": "You are a translator."}. The template holds `{input}` exactly once (other braces are literal
text); `system` is optional text put before it, followed by a blank line. adapter_model.safetensors holds
no tensors (`write_template_dir` writes both files), so a template is uploaded, versioned, listed and
deleted exactly like an adapter.

Applied when a request is submitted, on token ids: the request's tokens (after the API tokenized the
prompt or rendered the chat) are wrapped as  [BOS] + tokens(system + before) + request + tokens(after),
where before/after are the template's text around `{input}` (tokenized without special tokens; a
leading BOS of the request stays first). Nothing lives on the device; rows with a template run on the
base alone, in the same batch as every other kind.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from adapterserve.server.adapters.config import PeftConfigBase
from adapterserve.server.adapters.kind import AdapterKind, HookSite, KindWeights, register_kind

PEFT_TYPE = "HARD_PROMPT"
PLACEHOLDER = "{input}"
MAX_TEMPLATE_CHARS = 16 << 10


class TemplateAdapterConfig(PeftConfigBase):
    peft_type: Literal["HARD_PROMPT"]
    template: Annotated[str, Field(min_length=len(PLACEHOLDER), max_length=MAX_TEMPLATE_CHARS)]
    system: Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)] | None = None

    @field_validator("template")
    @classmethod
    def _one_placeholder(cls, value: str) -> str:
        if value.count(PLACEHOLDER) != 1:
            raise ValueError(f"must hold {PLACEHOLDER} exactly once (found {value.count(PLACEHOLDER)})")
        return value


@dataclass
class TemplateWeights(KindWeights):
    before: str  # system text + template text before {input}
    after: str  # template text after {input}


def _ids(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    encoded = tokenizer(text, add_special_tokens=False)
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "input_ids") else encoded
    return [int(t) for t in ids]


class TemplateKind(AdapterKind):
    name = "template"
    configs = {PEFT_TYPE: TemplateAdapterConfig}
    hook = HookSite.PROMPT
    stores_weights = False
    summary = (
        "a named prompt template ({input}, optional system text), no weights; wraps the request's tokens"
    )

    def load(self, config, tensors, spec, settings) -> TemplateWeights:
        assert isinstance(config, TemplateAdapterConfig)
        before, after = config.template.split(PLACEHOLDER)
        if config.system:
            before = f"{config.system}\n\n{before}"
        return TemplateWeights(before=before, after=after)

    def rewrite_prompt(self, weights: KindWeights, prompt_ids: Sequence[int], tokenizer: Any) -> list[int]:
        assert isinstance(weights, TemplateWeights)
        ids = list(prompt_ids)
        bos = getattr(tokenizer, "bos_token_id", None)
        head = [ids.pop(0)] if ids and bos is not None and ids[0] == bos else []
        return head + _ids(tokenizer, weights.before) + ids + _ids(tokenizer, weights.after)


def write_template_dir(out: Path, template: str, system: str | None = None) -> Path:
    """Write a template adapter folder (adapter_config.json + a tensor-less adapter_model.safetensors)."""
    from safetensors.torch import save_file

    config = TemplateAdapterConfig(peft_type=PEFT_TYPE, template=template, system=system)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config.model_dump(mode="json", exclude_none=True)))
    save_file({}, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


register_kind(TemplateKind())
