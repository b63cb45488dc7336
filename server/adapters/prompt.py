"""Prompt tuning and P-tuning: learned virtual-token embeddings placed in front of the prompt.

PEFT saves both as `prompt_embeddings` [num_virtual_tokens, hidden]: for P-tuning that tensor is
already the prompt encoder's output (PEFT runs the encoder when it saves), so serving both kinds is
the same splice at prefill and nothing at decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterserve.server.adapters.config import PromptTuningAdapterConfig, PTuningAdapterConfig
from adapterserve.server.errors import BaseMismatchError, UnsupportedAdapterError
from adapterserve.server.model.spec import BaseModelSpec


@dataclass
class PromptWeights:
    embeddings: torch.Tensor  # [num_virtual_tokens, hidden]

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.embeddings]


def single_prompt_tensor(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The one `prompt_embeddings` tensor that PEFT saves for every prompt-learning method."""
    if set(tensors) != {"prompt_embeddings"}:
        raise UnsupportedAdapterError(
            f"a prompt-learning adapter must hold exactly one tensor 'prompt_embeddings'; found {sorted(tensors)}"
        )
    return tensors["prompt_embeddings"]


def load_prompt(
    config: PromptTuningAdapterConfig | PTuningAdapterConfig,
    tensors: dict[str, torch.Tensor],
    spec: BaseModelSpec,
) -> PromptWeights:
    emb = single_prompt_tensor(tensors)
    submodules = config.num_transformer_submodules or 1
    if submodules != 1:
        raise UnsupportedAdapterError(
            f"num_transformer_submodules={submodules}: only decoder-only (causal LM) adapters are served"
        )
    expected = (config.num_virtual_tokens, spec.hidden_size)
    if tuple(emb.shape) != expected:
        raise BaseMismatchError(
            f"prompt_embeddings has shape {tuple(emb.shape)}, expected {expected} "
            f"(num_virtual_tokens x the base model's hidden size)"
        )
    return PromptWeights(embeddings=emb.float().contiguous())
