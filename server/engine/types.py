"""The engine's public request/response types: what the gRPC layer hands in and gets back.

Pure dataclasses (no torch) so that the API layer and tests can build them cheaply.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.StrEnum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop sequence matched (the stop text is not part of the output)
    EOS = "eos"  # the model produced an end-of-sequence token
    CANCELLED = "cancelled"  # the caller cancelled (disconnect, deadline, explicit cancel)
    ERROR = "error"  # the request failed inside the engine (see TokenEvent.error)
    SCORED = "scored"  # a scoring request (score_tokens > 0) is done: TokenEvent.logprobs holds its scores


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. temperature == 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None  # same seed + same request = same tokens
    stop: tuple[str, ...] = ()  # stop sequences, matched on the decoded text
    ignore_eos: bool = False
    # OpenAI's penalties over the GENERATED tokens (see logits_processing.py): logit -= presence *
    # (count > 0) + frequency * count. 0 = off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), ids unique
    min_tokens: int = 0  # EOS masked (and stop sequences not matched) until this many tokens are generated
    # None: no logprobs; k >= 0: each generated token's log-probability under the model's raw
    # distribution (its logits after adapters, before penalties/bias/temperature) and the k most likely
    # alternatives
    logprobs: int | None = None
    # with logprobs and temperature > 0: those of log_softmax(logits / temperature) instead of the raw
    # distribution (an RL trainer's sampling logprobs)
    logprobs_at_temperature: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the most likely alternatives at its position (natural log)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


# Bytes of a structured output's JSON schema text at most.
MAX_SCHEMA_BYTES = 64 * 1024


class StructuredKind(enum.StrEnum):
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # JSON that validates against `StructuredOutput.schema`


@dataclass(frozen=True)
class StructuredOutput:
    """Structured output: the generated text is constrained by a grammar (see structured.py)."""

    kind: StructuredKind
    schema: str = ""  # JSON_SCHEMA: the JSON schema as JSON text (its key order is the output's)


@dataclass(frozen=True)
class GenerationRequest:
    """One request. `prompt_ids` are already tokenized (chat template applied if it was a chat)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    adapter: str | None = None  # None or "" = the base model
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # > 0: a scoring request. Nothing is generated: the engine prefills the prompt and returns the
    # log-probabilities of its last `score_tokens` tokens (each given the tokens before it).
    score_tokens: int = 0
    structured: StructuredOutput | None = None  # None: free text
    # None: off; k >= 0: the prompt tokens' logprobs (tokens 1.. of the prompt, each given the ones before
    # it) with k alternatives each, computed during the prefill and carried by the first event
    # (TokenEvent.prompt_logprobs) of each choice, or by the SCORED event of a scoring request.
    prompt_logprobs: int | None = None
    n: int = 1  # choices sampled from one prefill; choice i's events carry TokenEvent.index == i


@dataclass(frozen=True)
class TokenEvent:
    """One step of a request's output stream.

    Every event but the last carries `finish_reason=None`; the last one carries the reason (and
    may carry the final tokens too). `text` is the newly decoded text since the previous event
    (it can be empty while a multi-byte character or a possible stop sequence is held back).
    """

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    error: BaseException | None = None  # set when finish_reason is ERROR; a ServeError for users
    logprobs: tuple[float, ...] = ()  # finish_reason SCORED: log p(token | tokens before it), in order
    index: int = 0  # the choice (0..n-1) this event belongs to
    token_logprobs: tuple[TokenLogprob, ...] = ()  # SamplingParams.logprobs set: one per token_ids entry
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # GenerationRequest.prompt_logprobs set: first event only
    # seconds from the request's arrival at the engine to its first prefill chunk (waiting for a row, then
    # behind the rows admitted before it); None before its prefill started
    queue_wait_s: float | None = None
