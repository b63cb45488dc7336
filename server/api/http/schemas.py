"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

Unknown fields are refused (a clear 400 naming them), never silently ignored: a client that asks for
`logprobs` or `tools` learns at once that this server does not do it. A few OpenAI fields are
accepted only at their neutral value (`n=1`, `echo=false`, penalties 0), so clients that always send
them keep working. Extras beyond OpenAI's fields, as vLLM accepts them: `ignore_eos`, `top_k`,
`repetition_penalty`.
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
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 64)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted (OpenAI clients send it); not used
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None  # structured output (JSON)
    # extras (as vLLM names them)
    ignore_eos: bool = False
    top_k: int | None = Field(None, ge=-1)  # -1 or 0 = off
    repetition_penalty: float | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported (send several requests for several completions)")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("is not supported (only 0); use repetition_penalty instead")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("is not supported")
        return value

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions"""

    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("is not supported (leave it unset)")
        return value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt per request is supported (a string or a list of one)")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo=true is not supported")
        return echo

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return best_of

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


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
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI name of max_tokens
    logprobs: bool = False

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: bool) -> bool:
        if logprobs:
            raise ValueError("logprobs=true is not supported")
        return logprobs


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
