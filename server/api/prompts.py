"""Prompt token ids from what a client sends (text, token ids, or a chat), for both transports.

Each function refuses an input that cannot be a prompt with an InvalidArgumentError naming the field as
the transport calls it (`field`). The prompt's length against max_prompt_tokens is checked with the
other limits (validation.check_request).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adapterserve.server.errors import InvalidArgumentError

MAX_ROLE_CHARS = 64  # how much of a refused role the error message repeats
# The chat roles a request may use (what chat templates know); anything else is refused, never
# handed to the template as is.
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


def as_ids(encoded: Any) -> list[int]:
    """Token ids from what a tokenizer returns (a list, a BatchEncoding or a dict with input_ids)."""
    if isinstance(encoded, dict) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):  # a batch of one
        encoded = encoded[0]
    return [int(t) for t in encoded]


def vocab_size(tokenizer: Any) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        return None


def ids_of_text(tokenizer: Any, text: str, field: str = "prompt") -> tuple[int, ...]:
    """A text prompt tokenized as the model expects it (with its special tokens)."""
    if not text:
        raise InvalidArgumentError(f"{field}: must not be empty")
    ids = as_ids(tokenizer(text, add_special_tokens=True))
    if not ids:
        raise InvalidArgumentError(f"{field}: tokenizes to no tokens")
    return tuple(ids)


def checked_ids(tokenizer: Any, ids: Sequence[int], field: str = "prompt_ids") -> tuple[int, ...]:
    """Token ids sent as they are: at least one, each a token of the vocabulary."""
    ids = tuple(int(t) for t in ids)
    if not ids:
        raise InvalidArgumentError(f"{field}: at least one token id is required")
    vocab = vocab_size(tokenizer)
    if any(t < 0 for t in ids) or (vocab is not None and any(t >= vocab for t in ids)):
        raise InvalidArgumentError(
            f"{field}: token ids must be non-negative and below the vocabulary size ({vocab})"
        )
    return ids


def ids_of_chat(
    tokenizer: Any, messages: Sequence[tuple[str, str]], field: str = "messages"
) -> tuple[int, ...]:
    """A chat ((role, content) pairs) rendered with the model's chat template and tokenized."""
    if not messages:
        raise InvalidArgumentError(f"{field}: at least one message is required")
    for i, (role, _) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise InvalidArgumentError(
                f"{field}[{i}].role: {role[:MAX_ROLE_CHARS]!r} is not one of {', '.join(sorted(CHAT_ROLES))}"
            )
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError(f"{field}: the base model has no chat template; send a plain prompt")
    chat = [{"role": role, "content": content} for role, content in messages]
    try:
        ids = as_ids(
            tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
    except Exception as exc:  # jinja raises TemplateError for roles/orders the template refuses
        raise InvalidArgumentError(f"{field}: the chat template refused the conversation: {exc}") from exc
    if not ids:
        raise InvalidArgumentError(f"{field}: tokenizes to no tokens")
    return tuple(ids)
