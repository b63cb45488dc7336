"""Prompt tuning and P-tuning: learned virtual-token embeddings placed in front of the prompt, a
PREFILL kind.

Stores `prompt_embeddings` [num_virtual_tokens, hidden]: for P-tuning PEFT saves the prompt encoder's
output, so both are the same splice at prefill (virtual tokens at cache positions 0..n-1, the prompt
after them) and nothing at decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from adapterserve.server.adapters.config import (
    REMOTE_CODE_HINT,
    PromptLearningConfig,
    ShortStr,
    Str,
)
from adapterserve.server.adapters.kind import (
    AdapterKind,
    BankSite,
    HookSite,
    KindWeights,
    PrefillSlots,
    register_kind,
)
from adapterserve.server.errors import AdapterValidationError, BaseMismatchError, UnsupportedAdapterError


class PromptTuningAdapterConfig(PromptLearningConfig):
    """Prompt tuning: num_virtual_tokens learned input embeddings, prepended to the prompt."""

    peft_type: Literal["PROMPT_TUNING"]
    # Init-time only: how the embeddings were initialised before training.
    prompt_tuning_init: Literal["RANDOM", "TEXT", "SAMPLE_VOCAB"] = "RANDOM"
    prompt_tuning_init_text: Str | None = None
    tokenizer_name_or_path: Str | None = None  # never loaded by the server
    tokenizer_kwargs: dict[ShortStr, Any] | None = None  # never used by the server

    def remote_code(self) -> list[tuple[str, Any, str]]:
        out = super().remote_code()
        for key in self.tokenizer_kwargs or {}:
            if REMOTE_CODE_HINT.search(key):
                out.append((f"tokenizer_kwargs.{key}", self.tokenizer_kwargs[key], "asks for remote code"))  # type: ignore[index]
        return out


class PTuningAdapterConfig(PromptLearningConfig):
    """P-tuning: virtual tokens produced by an MLP/LSTM encoder (PEFT saves the encoder's output)."""

    peft_type: Literal["P_TUNING"]
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: Annotated[int, Field(ge=1)] | None = None
    encoder_num_layers: Annotated[int, Field(ge=1)] = 2
    encoder_dropout: float = 0.0


def single_prompt_tensor(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The one `prompt_embeddings` tensor that PEFT saves for every prompt-learning method."""
    if set(tensors) != {"prompt_embeddings"}:
        raise UnsupportedAdapterError(
            f"a prompt-learning adapter must hold exactly one tensor 'prompt_embeddings'; found {sorted(tensors)}"
        )
    return tensors["prompt_embeddings"]


def check_virtual_tokens(config: PromptLearningConfig, settings: Any) -> None:
    """num_virtual_tokens within the server's cap; decoder-only configs only."""
    if config.num_virtual_tokens > settings.max_virtual_tokens:
        raise AdapterValidationError(
            f"num_virtual_tokens={config.num_virtual_tokens} is above this server's cap of "
            f"{settings.max_virtual_tokens}"
        )
    if (config.num_transformer_submodules or 1) != 1:
        raise UnsupportedAdapterError(
            f"num_transformer_submodules={config.num_transformer_submodules}: only decoder-only "
            "(causal LM) adapters are served"
        )


@dataclass
class PromptWeights(KindWeights):
    embeddings: torch.Tensor  # [num_virtual_tokens, hidden]

    @property
    def num_virtual_tokens(self) -> int:  # type: ignore[override]
        return self.embeddings.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.embeddings]


class PromptSlots(PrefillSlots):
    """slot -> embeddings [n_virtual, hidden] on the device."""

    def __init__(self, site: BankSite) -> None:
        super().__init__(site)
        self.embeddings: dict[int, torch.Tensor] = {}

    def write(self, slot: int, weights: KindWeights) -> None:
        assert isinstance(weights, PromptWeights)
        self.embeddings[slot] = weights.embeddings.to(self.site.device, self.site.dtype)

    def clear(self, slot: int) -> None:
        self.embeddings.pop(slot, None)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.embeddings.values())

    def prefill(self, slot, row, embeds, cache):
        return torch.cat([self.embeddings[slot].to(embeds.dtype), embeds], dim=0), 0  # [n_virtual + n, H]


class PromptKind(AdapterKind):
    name = "prompt"
    peft_method = "prompt-tuning"
    configs = {"PROMPT_TUNING": PromptTuningAdapterConfig, "P_TUNING": PTuningAdapterConfig}
    hook = HookSite.PREFILL
    summary = "virtual-token embeddings [n, hidden]; spliced before the prompt at prefill (prompt/P-tuning)"

    def load(self, config, tensors, spec, settings) -> PromptWeights:
        assert isinstance(config, PromptTuningAdapterConfig | PTuningAdapterConfig)
        check_virtual_tokens(config, settings)
        emb = single_prompt_tensor(tensors)
        expected = (config.num_virtual_tokens, spec.hidden_size)
        if tuple(emb.shape) != expected:
            raise BaseMismatchError(
                f"prompt_embeddings has shape {tuple(emb.shape)}, expected {expected} "
                f"(num_virtual_tokens x the base model's hidden size)"
            )
        return PromptWeights(embeddings=emb.float().contiguous())

    def prefill_slots(self, site: BankSite) -> PrefillSlots:
        return PromptSlots(site)


register_kind(PromptKind())
