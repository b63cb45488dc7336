"""The OpenAI shapes of choices: per-choice text, finish reason and logprobs, for unary replies and
for SSE chunks, gathered from the engine's TokenEvents (TokenEvent.index names the choice).

Logprobs are the model's raw distribution (its logits with the adapter applied, before penalties,
logit_bias, temperature and top-k/top-p), as vLLM reports them by default. Each token's `token` is its
text decoded on its own (a byte-level piece of a multi-byte character decodes to U+FFFD; `bytes`
gives the token's UTF-8 bytes as decoded). Special tokens decode to "" (as in the output text); an
end-of-sequence token that ended a choice is listed (as vLLM does: harnesses drop the last entry of an
echo + max_tokens 1 reply, the generated token, whatever it is).

- /v1/completions (`logprobs: k`): {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, each
  top_logprobs entry a {token text: logprob} map of the k most likely tokens. With `echo`, the prompt
  tokens come first, the first one with null logprob and top_logprobs (nothing predicts it).
- /v1/chat/completions (`logprobs: true`, `top_logprobs: k`): {"content": [{"token", "logprob",
  "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}]}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapterserve.server.engine.types import FinishReason, TokenEvent, TokenLogprob


class TokenTexts:
    """Each token id's text decoded on its own (cached per server)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=True)
            if len(self._cache) < 200_000:
                self._cache[token_id] = text
        return text


@dataclass
class ChoiceState:
    """One choice's progress."""

    index: int
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    started: bool = False  # a chunk of it was streamed
    offset: int = 0  # streaming completions: the text offset of its next logprobs entry

    def add(self, event: TokenEvent) -> list[TokenLogprob]:
        """Record an event; returns its token logprobs to report."""
        self.texts.append(event.text)
        if event.prompt_logprobs:
            self.prompt_logprobs = event.prompt_logprobs
        entries = list(event.token_logprobs)
        self.logprobs += entries
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        return entries

    @property
    def text(self) -> str:
        return "".join(self.texts)


def completion_logprobs(
    texts: TokenTexts,
    entries: list[TokenLogprob],
    offset: int,
    prompt: tuple[TokenLogprob, ...] | None = None,
    first_prompt_token: int | None = None,
) -> dict[str, Any]:
    """The legacy completions logprobs object. `offset`: the text offset of the first entry; `prompt`
    (echo): the prompt's logprobs, after its first token `first_prompt_token` (null logprobs)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []

    def put(token_id: int, logprob: float | None, top: dict[str, float] | None) -> None:
        nonlocal offset
        text = texts(token_id)
        tokens.append(text)
        token_logprobs.append(logprob)
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(text)

    if prompt is not None and first_prompt_token is not None:
        put(first_prompt_token, None, None)
    for entry in [*(prompt or ()), *entries]:
        top: dict[str, float] = {}
        for token_id, value in entry.top:  # most likely first: a text shared by tokens keeps the best
            top.setdefault(texts(token_id), value)
        put(entry.token_id, entry.logprob, top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def chat_logprobs(texts: TokenTexts, entries: list[TokenLogprob], top_k: int) -> dict[str, Any]:
    """The chat logprobs object: {"content": [...]} with top_k alternatives per token."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = texts(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**one(e.token_id, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top[:top_k]]}
            for e in entries
        ]
    }
