"""The one check of a generation request's fields against their ranges and the server's limits.

Both transports build the engine's `GenerationRequest` from their own wire format (gRPC: grpc/requests;
HTTP: http/service) and hand it to `check_request` here, so every range and limit is checked in one
place and refused with one message. Only the field names differ: each transport passes how it names
the fields (`FieldNames`), so a refusal names the field as the client sent it.

Pure functions (no grpc, no engine, no web framework); every refusal is an InvalidArgumentError.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from adapterserve.server.engine.types import GenerationRequest, SamplingParams
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.settings import LimitSettings

DEFAULT_MAX_NEW_TOKENS = 64  # gRPC's default when max_new_tokens is unset (capped by the limit)
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 100_000
MAX_REPETITION_PENALTY = 10.0
MAX_STOP_CHARS = 256
MAX_PENALTY = 2.0  # presence_penalty / frequency_penalty, as OpenAI bounds them
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_SEED = (1 << 64) - 1  # a uint64 (the wire type of gRPC's seed)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class FieldNames:
    """How one transport names the request's fields in refusals.

    `sampling`: engine SamplingParams field -> wire name; `request`: GenerationRequest field (n,
    prompt_logprobs) -> wire name; a field not listed keeps `prefix` + its engine name (sampling) or its
    engine name (request).
    """

    prefix: str = ""
    sampling: Mapping[str, str] = field(default_factory=dict)
    request: Mapping[str, str] = field(default_factory=dict)

    def of(self, name: str) -> str:
        return self.sampling.get(name, self.prefix + name)

    def of_request(self, name: str) -> str:
        return self.request.get(name, name)


GRPC_NAMES = FieldNames(prefix="sampling.")


def limit(name: str, value: int) -> str:
    """How a refusal names a server limit: its value and the `serve` flag that raises it."""
    return f"limit {name}={value}; the server's --{name.replace('_', '-')} flag raises it"


def request_id_or_new(request_id: str) -> str:
    """The client's request id (validated) or a fresh one when it is empty."""
    if not request_id:
        return uuid.uuid4().hex
    if not _REQUEST_ID.match(request_id):
        raise InvalidArgumentError("request_id: at most 128 characters of [A-Za-z0-9._:-]")
    return request_id


def _finite_in(value: float, low: float, high: float) -> bool:
    return math.isfinite(value) and low <= value <= high


def check_sampling(
    p: SamplingParams, limits: LimitSettings, names: FieldNames = GRPC_NAMES, *, vocab: int | None = None
) -> SamplingParams:
    """Refuse a sampling field outside its range or above the server's limit; returns `p` unchanged.

    `vocab`: the tokenizer's vocabulary size, to refuse logit_bias entries of tokens that do not exist.
    """
    if not 1 <= p.max_new_tokens <= limits.max_new_tokens:
        raise InvalidArgumentError(
            f"{names.of('max_new_tokens')}: {p.max_new_tokens} is outside 1..{limits.max_new_tokens} "
            f"({limit('max_new_tokens', limits.max_new_tokens)})"
        )
    if not _finite_in(p.temperature, 0.0, MAX_TEMPERATURE):
        raise InvalidArgumentError(
            f"{names.of('temperature')}: {p.temperature} is outside 0..{MAX_TEMPERATURE:g}"
        )
    if not 0 <= p.top_k <= MAX_TOP_K:
        raise InvalidArgumentError(f"{names.of('top_k')}: {p.top_k} is outside 0..{MAX_TOP_K} (0 = off)")
    if not (math.isfinite(p.top_p) and 0.0 < p.top_p <= 1.0):
        raise InvalidArgumentError(f"{names.of('top_p')}: {p.top_p} must be greater than 0 and at most 1")
    if not (math.isfinite(p.repetition_penalty) and 0.0 < p.repetition_penalty <= MAX_REPETITION_PENALTY):
        raise InvalidArgumentError(
            f"{names.of('repetition_penalty')}: {p.repetition_penalty} must be greater than 0 and at most "
            f"{MAX_REPETITION_PENALTY:g}"
        )
    if p.seed is not None and not 0 <= p.seed <= MAX_SEED:
        raise InvalidArgumentError(f"{names.of('seed')}: {p.seed} is outside 0..2**64-1")
    if len(p.stop) > limits.max_stop_sequences:
        raise InvalidArgumentError(
            f"{names.of('stop')}: {len(p.stop)} sequences, at most {limits.max_stop_sequences} "
            f"({limit('max_stop_sequences', limits.max_stop_sequences)})"
        )
    for i, stop in enumerate(p.stop):
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise InvalidArgumentError(f"{names.of('stop')}[{i}]: must be 1..{MAX_STOP_CHARS} characters")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        if not _finite_in(value, -MAX_PENALTY, MAX_PENALTY):
            raise InvalidArgumentError(
                f"{names.of(name)}: {value} is outside -{MAX_PENALTY:g}..{MAX_PENALTY:g}"
            )
    bias_name = names.of("logit_bias")
    if len(p.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidArgumentError(
            f"{bias_name}: {len(p.logit_bias)} entries, at most {MAX_LOGIT_BIAS_ENTRIES}"
        )
    for token, bias in p.logit_bias:
        if not _finite_in(bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS):
            raise InvalidArgumentError(
                f"{bias_name}[{token}]: {bias} is outside -{MAX_LOGIT_BIAS:g}..{MAX_LOGIT_BIAS:g}"
            )
        if token < 0 or (vocab is not None and token >= vocab):
            raise InvalidArgumentError(
                f"{bias_name}: token id {token} is not below the vocabulary size ({vocab})"
                if token >= 0
                else f"{bias_name}: token id {token} is negative"
            )
    if not 0 <= p.min_tokens <= p.max_new_tokens:
        raise InvalidArgumentError(
            f"{names.of('min_tokens')}: {p.min_tokens} is more than max_new_tokens ({p.max_new_tokens})"
            if p.min_tokens > 0
            else f"{names.of('min_tokens')}: {p.min_tokens} is negative"
        )
    _check_logprobs(names.of("logprobs"), p.logprobs, limits)
    return p


def _check_logprobs(name: str, k: int | None, limits: LimitSettings) -> None:
    if k is not None and not 0 <= k <= limits.max_logprobs:
        raise InvalidArgumentError(
            f"{name}: {k} alternatives, at most {limits.max_logprobs} "
            f"({limit('max_logprobs', limits.max_logprobs)})"
        )


def check_request(
    request: GenerationRequest,
    limits: LimitSettings,
    names: FieldNames = GRPC_NAMES,
    *,
    prompt_field: str = "prompt",
    vocab: int | None = None,
) -> GenerationRequest:
    """Refuse a request whose fields are out of range or above the server's limits; returns it unchanged.

    `prompt_field`: the wire field the prompt came from (named when the prompt is too long); `vocab`:
    the tokenizer's vocabulary size. The prompt itself was tokenized and checked by prompts.py. A
    scoring request generates nothing: it carries max_new_tokens=1 and its other sampling fields are
    checked all the same.
    """
    check_sampling(request.sampling, limits, names, vocab=vocab)
    if len(request.prompt_ids) > limits.max_prompt_tokens:
        raise InvalidArgumentError(
            f"{prompt_field}: {len(request.prompt_ids)} tokens, more than allowed "
            f"({limit('max_prompt_tokens', limits.max_prompt_tokens)})"
        )
    n_name = names.of_request("n")
    if not 1 <= request.n <= limits.max_n:
        raise InvalidArgumentError(
            f"{n_name}: {request.n} choices, at most {limits.max_n} ({limit('max_n', limits.max_n)})"
            if request.n > 0
            else f"{n_name}: {request.n} choices, at least 1"
        )
    _check_logprobs(names.of_request("prompt_logprobs"), request.prompt_logprobs, limits)
    return request


def check_batch_rows(prompts: int, rows: int, limits: LimitSettings, prompt_field: str = "prompt") -> None:
    """Refuse a call without a prompt, or whose prompts with their n choices make more rows than
    max_batch_rows (checked before anything is tokenized)."""
    if prompts < 1:
        raise InvalidArgumentError(f"{prompt_field}: at least one prompt is required")
    if rows > limits.max_batch_rows:
        raise InvalidArgumentError(
            f"{prompt_field}: {prompts} prompts with their choices (n) make {rows} rows, more than allowed "
            f"({limit('max_batch_rows', limits.max_batch_rows)})"
        )


def check_batch_tokens(tokens: int, limits: LimitSettings, prompt_field: str = "prompt") -> None:
    """Refuse a request whose prompts hold more than max_batch_tokens tokens together."""
    if tokens > limits.max_batch_tokens:
        raise InvalidArgumentError(
            f"{prompt_field}: the prompts hold {tokens} tokens together, more than allowed "
            f"({limit('max_batch_tokens', limits.max_batch_tokens)})"
        )
