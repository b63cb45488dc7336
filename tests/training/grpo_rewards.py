"""A reward the tiny random model can learn within a few GRPO steps (the `module:function` path)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LOW = 192  # half the tiny tokenizer's vocabulary


def low_ids(
    prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]], **_: Any
):
    """The fraction of a completion's tokens whose id is below LOW."""
    return [sum(t < LOW for t in ids) / max(len(ids), 1) for ids in completion_ids]
