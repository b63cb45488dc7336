"""Preference data (`--stage dpo`) and the preference evaluation: does the model prefer `chosen`?

One JSON object a line, either form:
  {"prompt": "...", "chosen": "...", "rejected": "..."}                         plain text
  {"prompt": [{"role": "user", "content": "..."}, ...],                         chat (TRL's
   "chosen": [{"role": "assistant", "content": "..."}],                          conversational form;
   "rejected": [{"role": "assistant", "content": "..."}]}                        or chosen/rejected as strings)
A chat prompt is rendered with the base's chat template and its generation prompt, as the server
renders a chat request. Evaluation: the margin of a pair is log p(chosen | prompt) - log p(rejected |
prompt), scored by the server's engine (the Score RPC's code path) or by PEFT forward passes; the
accuracy is the fraction of held-out pairs with a positive margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from adapterserve.training.errors import DataFormatError

_KEYS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    line: int
    prompt: str | tuple[dict[str, str], ...]  # text, or chat messages
    chosen: str
    rejected: str


class PreferenceMetrics(BaseModel):
    pairs: int
    accuracy: float  # fraction of pairs where chosen is more likely than rejected
    mean_margin: float  # mean of log p(chosen) - log p(rejected), natural log
    backend: str


def _messages(value: Any, name: str, line: int, key: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataFormatError(name, line, f"'{key}' must be a non-empty string or list of messages")
    out = []
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataFormatError(
                name, line, f"{key}[{i}] must be an object with string 'role' and 'content'"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _answer(value: Any, name: str, line: int, key: str) -> str:
    if isinstance(value, list):
        messages = _messages(value, name, line, key)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise DataFormatError(name, line, f"'{key}' as messages must be one assistant message")
        value = messages[0]["content"]
    if not isinstance(value, str):
        raise DataFormatError(name, line, f"'{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataFormatError(name, line, f"'{key}' is empty")
    return value


def parse_pair(obj: Any, name: str, line: int) -> PreferencePair:
    if not isinstance(obj, dict):
        raise DataFormatError(name, line, f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        raise DataFormatError(
            name, line, f"missing {', '.join(repr(k) for k in missing)} (a preference record has {_KEYS})"
        )
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        prompt = _messages(prompt, name, line, "prompt")
    elif not isinstance(prompt, str) or not prompt.strip():
        raise DataFormatError(name, line, "'prompt' must be a non-empty string or list of messages")
    chosen, rejected = (
        _answer(obj["chosen"], name, line, "chosen"),
        _answer(obj["rejected"], name, line, "rejected"),
    )
    if chosen == rejected:
        raise DataFormatError(name, line, "'chosen' and 'rejected' are the same text")
    return PreferencePair(line, prompt, chosen, rejected)


def read_pairs(path: str | Path, limit: int | None = None) -> list[PreferencePair]:
    from adapterserve.training.data import read_jsonl

    pairs = [parse_pair(obj, str(path), number) for number, obj in read_jsonl(path)]
    return pairs[:limit] if limit else pairs


def prompt_ids(tokenizer: Any, pair: PreferencePair) -> list[int]:
    """The prompt's tokens as a server request carries them (chat: template + generation prompt)."""
    if isinstance(pair.prompt, str):
        return list(tokenizer(pair.prompt, add_special_tokens=True)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataFormatError(
            "preference data", pair.line, "a chat prompt needs a base model with a chat template"
        )
    return list(
        tokenizer.apply_chat_template(
            list(pair.prompt), tokenize=True, add_generation_prompt=True, return_dict=False
        )
    )


def prompt_text(tokenizer: Any, pair: PreferencePair) -> str:
    """The prompt as text for TRL (a chat rendered with the template and its generation prompt)."""
    if isinstance(pair.prompt, str):
        return pair.prompt
    return tokenizer.apply_chat_template(list(pair.prompt), tokenize=False, add_generation_prompt=True)


def answer_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def margins_from_scores(chosen: list[float], rejected: list[float], backend: str) -> PreferenceMetrics:
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return PreferenceMetrics(
        pairs=len(margins),
        accuracy=sum(1 for m in margins if m > 0) / len(margins),
        mean_margin=sum(margins) / len(margins),
        backend=backend,
    )
