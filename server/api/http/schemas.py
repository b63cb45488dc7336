"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

Unknown fields are refused (a clear 400 naming them), never silently ignored: a client that asks for
`tools` learns at once that this server does not do it. These models check the JSON's shape and types
only; the ranges and the server's limits are checked by validation.check_request, the one check both
transports use (the same 400 and message as gRPC's INVALID_ARGUMENT, naming the OpenAI field). Supported: `n` (up to the server's --max-n,
one prefill for all choices), `presence_penalty` / `frequency_penalty` (-2..2, over the generated
tokens), `logit_bias` (token id -> -100..100), `logprobs` (completions: top-k count; chat: true with
`top_logprobs`), `echo` (completions; with logprobs, the prompt tokens' logprobs too; `max_tokens: 0`
then returns the prompt only). `suffix` is refused; `best_of` only at 1. Extras beyond OpenAI's
fields, as vLLM accepts them: `ignore_eos`, `top_k`, `repetition_penalty`, `min_tokens`. A completions
`prompt` may be a list (of strings or of token-id lists): one engine request per prompt.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# OpenAI's default temperature (the gRPC API's default is greedy, 0).
DEFAULT_TEMPERATURE = 1.0
# OpenAI's default max_tokens for /v1/completions; chat defaults to the server's max_new_tokens limit.
DEFAULT_COMPLETION_MAX_TOKENS = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    """response_format.json_schema, as OpenAI shapes it. `strict` is accepted: the schema is always
    enforced (a grammar masks every token that would break it)."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """{"type": "text"} | {"type": "json_object"} | {"type": "json_schema", "json_schema": {...}}"""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError('type "json_schema" needs json_schema.schema (the JSON schema)')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError('json_schema is only allowed with type "json_schema"')
        return self


class _Sampling(_Body):
    """Fields both endpoints share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1  # 1..the server's --max-n
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted (OpenAI clients send it); not used
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None  # structured output (JSON)
    # extras (as vLLM names them)
    ignore_eos: bool = False
    top_k: int | None = None  # -1 or 0 = off
    repetition_penalty: float | None = None
    min_tokens: int = 0

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 12):
                raise ValueError(
                    f"keys must be token ids (non-negative integers as strings), not {key[:32]!r}"
                )
        return value

    def bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions"""

    # a string, a list of strings, token ids, or a list of token-id lists (one request per prompt)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # 0: only with echo (the prompt and its logprobs)
    echo: bool = False
    logprobs: int | None = None  # alternatives per token (at most the server's --max-logprobs)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("is not supported (leave it unset)")
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        """One shape per request: a clear message for an empty list or a mix (pydantic's union error
        would list every branch)."""
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("the list of prompts is empty (send at least one prompt)")
            if not (
                all(isinstance(p, str) for p in prompt)
                or all(_is_id(p) for p in prompt)
                or all(isinstance(p, list) and all(_is_id(t) for t in p) for p in prompt)
            ):
                raise ValueError(
                    "must be a string, a list of strings, a list of token ids, or a list of token-id lists "
                    "(one kind per request, not a mix)"
                )
        return prompt

    @model_validator(mode="after")
    def _zero_tokens_need_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only supported with echo=true (the prompt and its logprobs)")
        if self.max_tokens == 0 and self.n != 1:
            raise ValueError("n: max_tokens 0 (echo only) has one choice")
        return self

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return best_of

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, each a text or token ids (one engine request each)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]  # one prompt of token ids
        return list(self.prompt)  # type: ignore[arg-type]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted; chat templates do not use it

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions"""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # newer OpenAI name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None  # with logprobs; at most the server's --max-logprobs

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        return self


def describe_validation_error(exc: ValidationError | Any) -> tuple[str, str | None]:
    """(message, param) for a request body that failed validation: unknown fields named as unsupported."""
    errors = exc.errors()
    unsupported = [
        ".".join(str(p) for p in e["loc"] if p != "body") for e in errors if e["type"] == "extra_forbidden"
    ]
    if unsupported:
        names = ", ".join(sorted(set(unsupported)))
        return f"unsupported field(s): {names} (this server does not implement them)", unsupported[0]
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "body")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"{loc}: field required", loc or None
    return (f"{loc}: {msg}" if loc else msg), loc or None
