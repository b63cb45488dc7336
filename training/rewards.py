"""Reward functions for `--stage grpo`: built-in verifiable rewards, or the user's `module:function`.

A reward has TRL's reward-function signature: `reward(prompts, completions, **columns) -> list[float]`,
where `columns` holds every other field of the prompt records, one list entry per completion. Built-ins
read their target from a column of the record:

  exact        1.0 when the completion, stripped, equals `answer` (case and surrounding spaces ignored)
  contains     1.0 when `answer` appears in the completion (case ignored)
  regex        1.0 when the regular expression `pattern` matches the stripped completion in full
  json-schema  1.0 when the completion is a JSON document valid against `schema` (an object or JSON text)

Several rewards are summed by TRL (`--reward exact,regex`); each is logged under its own name.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from adapterserve.training.errors import SettingsError

RewardFunc = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """The text of a completion (a string, or a chat's final assistant message)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _column(columns: dict[str, Any], name: str, reward: str, size: int) -> list[Any]:
    values = columns.get(name)
    if values is None:
        raise SettingsError(f"the {reward!r} reward reads the {name!r} field of every prompt record")
    if len(values) != size:
        raise SettingsError(f"the {reward!r} reward got {len(values)} {name!r} values for {size} completions")
    return list(values)


def exact(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    answers = _column(columns, "answer", "exact", len(completions))
    return [
        float(completion_text(c).strip().lower() == str(a).strip().lower())
        for c, a in zip(completions, answers, strict=True)
    ]


def contains(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    answers = _column(columns, "answer", "contains", len(completions))
    return [
        float(str(a).strip().lower() in completion_text(c).lower())
        for c, a in zip(completions, answers, strict=True)
    ]


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise SettingsError(f"regex reward: {pattern!r} is not a regular expression ({err})") from None


def regex(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    patterns = _column(columns, "pattern", "regex", len(completions))
    return [
        float(_compiled(str(p)).fullmatch(completion_text(c).strip()) is not None)
        for c, p in zip(completions, patterns, strict=True)
    ]


def _validator(schema: Any) -> Any:
    try:
        import jsonschema
    except ImportError:
        raise SettingsError(
            "the json-schema reward needs jsonschema: pip install 'adapterserve[train]'"
        ) from None
    document = json.loads(schema) if isinstance(schema, str) else schema
    return jsonschema.Draft202012Validator(document)


def json_schema(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    schemas = _column(columns, "schema", "json-schema", len(completions))
    out = []
    for completion, schema in zip(completions, schemas, strict=True):
        try:
            value = json.loads(completion_text(completion).strip())
        except ValueError:
            out.append(0.0)
            continue
        out.append(float(_validator(schema).is_valid(value)))
    return out


BUILT_IN: dict[str, RewardFunc] = {
    "exact": exact,
    "contains": contains,
    "regex": regex,
    "json-schema": json_schema,
}


def load_reward(spec: str) -> RewardFunc:
    """A built-in reward by name, or `module:function` imported (the function TRL calls)."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SettingsError(f"unknown reward {spec!r}: a built-in ({', '.join(BUILT_IN)}) or module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SettingsError(f"reward {spec!r}: cannot import {module_name!r} ({err})") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise SettingsError(f"reward {spec!r}: {module_name} has no function {attr!r}")
    return func


def load_rewards(specs: Sequence[str]) -> list[RewardFunc]:
    if not specs:
        raise SettingsError("--stage grpo needs at least one --reward")
    return [load_reward(s) for s in specs]
