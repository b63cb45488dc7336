"""Turn a gRPC `GenerateRequest` into the engine's `GenerationRequest`: read the wire fields, tokenize,
and check every range and limit through the shared check (validation.check_request).

Pure functions (no grpc server, no engine): every refusal is an InvalidArgumentError whose message names
the field, as the proto documents it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from adapterserve.server.api.prompts import checked_ids, ids_of_chat, ids_of_text, vocab_size
from adapterserve.server.api.response_format import SCHEMA_FIELD, structured_output
from adapterserve.server.api.validation import (
    DEFAULT_MAX_NEW_TOKENS,
    GRPC_NAMES,
    check_batch_rows,
    check_batch_tokens,
    check_request,
    check_sampling,
    request_id_or_new,
)
from adapterserve.server.engine.types import (
    GenerationRequest,
    SamplingParams,
    StructuredKind,
    StructuredOutput,
)
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.settings import LimitSettings
from adapterserve.v1 import generation_pb2

_KINDS = {
    generation_pb2.ResponseFormat.TYPE_JSON_OBJECT: StructuredKind.JSON_OBJECT,
    generation_pb2.ResponseFormat.TYPE_JSON_SCHEMA: StructuredKind.JSON_SCHEMA,
}


def sampling_of(params: generation_pb2.SamplingParams, limits: LimitSettings) -> SamplingParams:
    """The engine's sampling parameters of the wire ones; unset fields take gRPC's defaults (unchecked)."""
    if params.HasField("max_new_tokens"):
        max_new = params.max_new_tokens
    else:
        max_new = min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens)
    return SamplingParams(
        max_new_tokens=int(max_new),
        temperature=float(params.temperature),
        top_k=int(params.top_k),
        top_p=float(params.top_p) if params.HasField("top_p") else 1.0,
        repetition_penalty=float(params.repetition_penalty) if params.HasField("repetition_penalty") else 1.0,
        seed=int(params.seed) if params.HasField("seed") else None,
        stop=tuple(params.stop),
        ignore_eos=bool(params.ignore_eos),
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
        logit_bias=tuple(sorted((int(t), float(b)) for t, b in params.logit_bias.items())),
        min_tokens=int(params.min_tokens),
        logprobs=int(params.logprobs) if params.HasField("logprobs") else None,
        logprobs_at_temperature=bool(params.logprobs_at_temperature),
    )


def sampling_from_proto(params: generation_pb2.SamplingParams, limits: LimitSettings) -> SamplingParams:
    """The wire sampling parameters, checked against their ranges and the limits."""
    return check_sampling(sampling_of(params, limits), limits, GRPC_NAMES)


def structured_from_proto(fmt: generation_pb2.ResponseFormat) -> StructuredOutput | None:
    """None for free text (TYPE_TEXT); InvalidArgumentError naming the field for a bad format."""
    kind = _KINDS.get(fmt.type)
    if fmt.type != generation_pb2.ResponseFormat.TYPE_TEXT and kind is None:
        raise InvalidArgumentError(f"response_format.type: unknown type {fmt.type}")
    if kind is not StructuredKind.JSON_SCHEMA:
        if fmt.json_schema:
            raise InvalidArgumentError(f"{SCHEMA_FIELD}: only with type TYPE_JSON_SCHEMA")
        return None if kind is None else structured_output(kind)
    if not fmt.json_schema:
        raise InvalidArgumentError(f"{SCHEMA_FIELD}: required with type TYPE_JSON_SCHEMA")
    return structured_output(kind, fmt.json_schema)


def prompt_ids_from_proto(request: generation_pb2.GenerateRequest, tokenizer: Any) -> tuple[int, ...]:
    """Tokenize the prompt, or render the chat with the model's chat template and tokenize it."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgumentError("prompt: one of prompt or messages is required")
    if kind == "prompt_ids":
        return checked_ids(tokenizer, request.prompt_ids.ids, "prompt_ids")
    if kind == "prompt":
        return ids_of_text(tokenizer, request.prompt, "prompt")
    return ids_of_chat(tokenizer, [(m.role, m.content) for m in request.messages.messages], "messages")


def to_engine_request(
    request: generation_pb2.GenerateRequest, tokenizer: Any, limits: LimitSettings
) -> GenerationRequest:
    """The engine request for a wire request, with every range and limit checked."""
    request_id = request_id_or_new(request.request_id)
    engine_request = GenerationRequest(
        request_id=request_id,
        prompt_ids=prompt_ids_from_proto(request, tokenizer),
        adapter=request.adapter or None,
        sampling=sampling_of(request.sampling, limits),
        structured=structured_from_proto(request.response_format)
        if request.HasField("response_format")
        else None,
        n=request.n or 1,
        prompt_logprobs=request.prompt_logprobs if request.HasField("prompt_logprobs") else None,
    )
    return check_request(
        engine_request,
        limits,
        GRPC_NAMES,
        prompt_field=request.WhichOneof("input") or "prompt",
        vocab=vocab_size(tokenizer),
    )


def to_engine_requests(
    batch: generation_pb2.GenerateBatchRequest, tokenizer: Any, limits: LimitSettings
) -> list[GenerationRequest]:
    """The engine requests of a GenerateBatch call, every one checked as Generate checks it (a refusal
    names `requests[i]`), and the whole against max_batch_rows and max_batch_tokens. A request without
    an id gets `<the first request's id>-<i>`; ids repeated within the batch are refused."""
    wire = batch.requests
    check_batch_rows(len(wire), sum(r.n or 1 for r in wire), limits, "requests")
    adapters = {r.adapter for r in wire}
    if len(adapters) > 1:
        raise InvalidArgumentError(
            f"requests: every request of a batch names the same adapter (got {len(adapters)} adapters)"
        )
    base_id = request_id_or_new(wire[0].request_id)
    requests: list[GenerationRequest] = []
    seen: dict[str, int] = {}
    for i, message in enumerate(wire):
        try:
            request = to_engine_request(message, tokenizer, limits)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"requests[{i}].{exc}") from None
        if not message.request_id:
            request = dataclasses.replace(request, request_id=f"{base_id}-{i}")
        if request.request_id in seen:
            raise InvalidArgumentError(
                f"requests[{i}].request_id: {request.request_id!r} repeats requests[{seen[request.request_id]}]'s"
            )
        seen[request.request_id] = i
        requests.append(request)
    check_batch_tokens(sum(len(r.prompt_ids) for r in requests), limits, "requests")
    return requests
