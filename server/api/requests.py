"""Turn a wire `GenerateRequest` into the engine's `GenerationRequest`: validate, tokenize, apply limits.

Pure functions (no grpc, no engine): every refusal is an InvalidArgumentError whose message names the
field, as the proto documents it.
"""

from __future__ import annotations

import math
import re
import uuid
from typing import Any

from adapterserve.server.api.response_format import structured_from_proto
from adapterserve.server.engine.types import GenerationRequest, SamplingParams
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.settings import LimitSettings
from adapterserve.v1 import generation_pb2

DEFAULT_MAX_NEW_TOKENS = 64
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 100_000
MAX_REPETITION_PENALTY = 10.0
MAX_STOP_CHARS = 256
MAX_PENALTY = 2.0  # presence_penalty / frequency_penalty, as OpenAI bounds them
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_ROLE_CHARS = 64  # how much of a refused role the error message repeats
# The chat roles a request may use (what chat templates know); anything else is refused, never
# handed to the template as is.
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def limit(name: str, value: int) -> str:
    """How a refusal names a server limit: its value and the `serve` flag that raises it."""
    return f"limit {name}={value}; the server's --{name.replace('_', '-')} flag raises it"


def request_id_of(request: generation_pb2.GenerateRequest) -> str:
    """The client's request id (validated) or a fresh one."""
    if not request.request_id:
        return uuid.uuid4().hex
    if not _REQUEST_ID.match(request.request_id):
        raise InvalidArgumentError("request_id: at most 128 characters of [A-Za-z0-9._:-]")
    return request.request_id


def sampling_from_proto(params: generation_pb2.SamplingParams, limits: LimitSettings) -> SamplingParams:
    """Validate the wire sampling parameters against the limits; unset fields take their defaults."""
    if params.HasField("max_new_tokens"):
        max_new = params.max_new_tokens
        if not 1 <= max_new <= limits.max_new_tokens:
            raise InvalidArgumentError(
                f"sampling.max_new_tokens: {max_new} is outside 1..{limits.max_new_tokens} "
                f"({limit('max_new_tokens', limits.max_new_tokens)})"
            )
    else:
        max_new = min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens)
    temperature = params.temperature
    if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
        raise InvalidArgumentError(f"sampling.temperature: {temperature} is outside 0..{MAX_TEMPERATURE:g}")
    if params.top_k > MAX_TOP_K:
        raise InvalidArgumentError(f"sampling.top_k: {params.top_k} is above {MAX_TOP_K}")
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise InvalidArgumentError(f"sampling.top_p: {top_p} must be greater than 0 and at most 1")
    penalty = params.repetition_penalty if params.HasField("repetition_penalty") else 1.0
    if not (math.isfinite(penalty) and 0.0 < penalty <= MAX_REPETITION_PENALTY):
        raise InvalidArgumentError(
            f"sampling.repetition_penalty: {penalty} must be greater than 0 and at most {MAX_REPETITION_PENALTY:g}"
        )
    if len(params.stop) > limits.max_stop_sequences:
        raise InvalidArgumentError(
            f"sampling.stop: {len(params.stop)} sequences, at most {limits.max_stop_sequences} "
            f"({limit('max_stop_sequences', limits.max_stop_sequences)})"
        )
    for i, stop in enumerate(params.stop):
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise InvalidArgumentError(f"sampling.stop[{i}]: must be 1..{MAX_STOP_CHARS} characters")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
            raise InvalidArgumentError(
                f"sampling.{name}: {value} is outside -{MAX_PENALTY:g}..{MAX_PENALTY:g}"
            )
    if len(params.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidArgumentError(
            f"sampling.logit_bias: {len(params.logit_bias)} entries, at most {MAX_LOGIT_BIAS_ENTRIES}"
        )
    for token, bias in params.logit_bias.items():
        if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
            raise InvalidArgumentError(
                f"sampling.logit_bias[{token}]: {bias} is outside -{MAX_LOGIT_BIAS:g}..{MAX_LOGIT_BIAS:g}"
            )
    if params.min_tokens > max_new:
        raise InvalidArgumentError(
            f"sampling.min_tokens: {params.min_tokens} is more than max_new_tokens ({max_new})"
        )
    logprobs = params.logprobs if params.HasField("logprobs") else None
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise InvalidArgumentError(
            f"sampling.logprobs: {logprobs} alternatives, at most {limits.max_logprobs} "
            f"({limit('max_logprobs', limits.max_logprobs)})"
        )
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=float(temperature),
        top_k=int(params.top_k),
        top_p=float(top_p),
        repetition_penalty=float(penalty),
        seed=int(params.seed) if params.HasField("seed") else None,
        stop=tuple(params.stop),
        ignore_eos=bool(params.ignore_eos),
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
        logit_bias=tuple(sorted((int(t), float(b)) for t, b in params.logit_bias.items())),
        min_tokens=int(params.min_tokens),
        logprobs=logprobs,
    )


def _as_ids(encoded: Any) -> list[int]:
    """Token ids from what a tokenizer returns (a list, a BatchEncoding or a dict with input_ids)."""
    if isinstance(encoded, dict) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):  # a batch of one
        encoded = encoded[0]
    return [int(t) for t in encoded]


def _vocab_size(tokenizer: Any) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        return None


def prompt_ids_from_proto(request: generation_pb2.GenerateRequest, tokenizer: Any) -> tuple[int, ...]:
    """Tokenize the prompt, or render the chat with the model's chat template and tokenize it."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgumentError("prompt: one of prompt or messages is required")
    if kind == "prompt_ids":
        ids = [int(t) for t in request.prompt_ids.ids]
        if not ids:
            raise InvalidArgumentError("prompt_ids: at least one token id is required")
        vocab = _vocab_size(tokenizer)
        if vocab is not None and any(t >= vocab for t in ids):
            raise InvalidArgumentError(f"prompt_ids: token ids must be below the vocabulary size ({vocab})")
        return tuple(ids)
    if kind == "prompt":
        if not request.prompt:
            raise InvalidArgumentError("prompt: must not be empty")
        ids = _as_ids(tokenizer(request.prompt, add_special_tokens=True))
    else:
        messages = request.messages.messages
        if not messages:
            raise InvalidArgumentError("messages: at least one message is required")
        for i, message in enumerate(messages):
            if message.role not in CHAT_ROLES:
                raise InvalidArgumentError(
                    f"messages[{i}].role: {message.role[:MAX_ROLE_CHARS]!r} is not one of "
                    f"{', '.join(sorted(CHAT_ROLES))}"
                )
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidArgumentError("messages: the base model has no chat template; send a plain prompt")
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            ids = _as_ids(
                tokenizer.apply_chat_template(
                    chat, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        except Exception as exc:  # jinja raises TemplateError for roles/orders the template refuses
            raise InvalidArgumentError(
                f"messages: the chat template refused the conversation: {exc}"
            ) from exc
    if not ids:
        raise InvalidArgumentError(f"{kind}: tokenizes to no tokens")
    return tuple(ids)


def to_engine_request(
    request: generation_pb2.GenerateRequest, tokenizer: Any, limits: LimitSettings
) -> GenerationRequest:
    """The engine request for a wire request, with every limit enforced."""
    request_id = request_id_of(request)
    sampling = sampling_from_proto(request.sampling, limits)
    prompt_ids = prompt_ids_from_proto(request, tokenizer)
    if len(prompt_ids) > limits.max_prompt_tokens:
        field = request.WhichOneof("input")
        raise InvalidArgumentError(
            f"{field}: {len(prompt_ids)} tokens, more than allowed "
            f"({limit('max_prompt_tokens', limits.max_prompt_tokens)})"
        )
    n = request.n or 1
    if n > limits.max_n:
        raise InvalidArgumentError(f"n: {n} choices, at most {limits.max_n} ({limit('max_n', limits.max_n)})")
    prompt_logprobs = request.prompt_logprobs if request.HasField("prompt_logprobs") else None
    if prompt_logprobs is not None and prompt_logprobs > limits.max_logprobs:
        raise InvalidArgumentError(
            f"prompt_logprobs: {prompt_logprobs} alternatives, at most {limits.max_logprobs} "
            f"({limit('max_logprobs', limits.max_logprobs)})"
        )
    vocab = _vocab_size(tokenizer)
    if vocab is not None:
        for token, _ in sampling.logit_bias:
            if token >= vocab:
                raise InvalidArgumentError(
                    f"sampling.logit_bias: token id {token} is not below the vocabulary size ({vocab})"
                )
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=prompt_ids,
        adapter=request.adapter or None,
        sampling=sampling,
        structured=structured_from_proto(request.response_format)
        if request.HasField("response_format")
        else None,
        n=n,
        prompt_logprobs=prompt_logprobs,
    )
