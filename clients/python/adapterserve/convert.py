"""Pure conversions from SDK arguments to the wire messages of adapterserve.v1 (replies.py turns the
replies into SDK results).

Shared by `Client` and `AsyncClient`, so both build exactly the same requests: each client method
turns its arguments into a `Call` here (request, reply conversion, retried codes) and only performs
it. The generation parameters are declared once, by `generate_call`: a new sampling parameter is
added there, and both clients' `generate` and `stream` take it (see base.takes_arguments_of).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from adapterserve.errors import InvalidArgument
from adapterserve.fields import UINT64_MAX, check_float, check_uint
from adapterserve.models import (
    AdapterInfo,
    ChatMessage,
    GenerateResult,
    RefreshResult,
    ScoreResult,
    ServerInfo,
)
from adapterserve.replies import (
    adapter_from_proto,
    batch_results_from_proto,
    result_from_proto,
    score_from_proto,
    server_info_from_proto,
)
from adapterserve.retry import GENERATION_CODES, READ_CODES
from adapterserve.upload import ProgressTracker, UploadFile, iter_file_chunks
from adapterserve.v1 import admin_pb2, generation_pb2

MessageLike = ChatMessage | Mapping[str, str]
R = TypeVar("R")


def _chat_message(m: MessageLike) -> generation_pb2.ChatMessage:
    if isinstance(m, ChatMessage):
        return generation_pb2.ChatMessage(role=m.role, content=m.content)
    if isinstance(m, Mapping) and "role" in m:
        return generation_pb2.ChatMessage(role=str(m["role"]), content=str(m.get("content", "")))
    raise InvalidArgument(f"messages: each message needs a 'role' and a 'content', got {m!r}")


@dataclass(frozen=True)
class Call(Generic[R]):
    """One unary RPC as the SDK makes it, transport aside: the client picks the stub and the token
    (`admin`), sets the deadline (`timeout`, else its own), retries on `retry_codes` (see retry.py)
    and hands the reply to `reply`."""

    method: str  # the stub's method, e.g. "Generate"
    request: Message
    reply: Callable[[Any], R]  # the wire reply -> the SDK's result
    retry_codes: frozenset[str]
    timeout: float | None = None  # the caller's per-call timeout; None: the client's
    admin: bool = False  # an Admin call (admin token), else a Generation call (generation token)


def generate_call(
    prompt: str | Sequence[MessageLike] | None = None,
    *,
    messages: Sequence[MessageLike] | None = None,
    adapter: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    ignore_eos: bool = False,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
    min_tokens: int = 0,
    logprobs: int | None = None,
    logprobs_at_temperature: bool = False,
    n: int = 1,
    prompt_logprobs: int | None = None,
    request_id: str | None = None,
    response_format: str | Mapping[str, Any] | None = None,
    json_schema: Mapping[str, Any] | str | None = None,
    timeout: float | None = None,
) -> Call[GenerateResult]:
    """The Generate call for a prompt or a chat (a list passed as `prompt` is taken as messages).

    These are the parameters of `Client.generate`, `Client.stream` and their `AsyncClient` twins,
    declared here only. Raises InvalidArgument (locally) unless exactly one of prompt and messages is
    given, or for a numeric field the wire cannot carry (see fields.py). Retried on UNAVAILABLE and
    RESOURCE_EXHAUSTED.
    """
    if prompt is not None and not isinstance(prompt, str):
        if messages is not None:
            raise InvalidArgument("give either a prompt or messages, not both")
        prompt, messages = None, prompt
    if (prompt is None) == (messages is None):
        raise InvalidArgument("give exactly one of prompt and messages")
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop or ())
    for i, item in enumerate(stop):
        if not isinstance(item, str):
            raise InvalidArgument(f"stop[{i}]: expected a string, got {item!r}")
    sampling = generation_pb2.SamplingParams(
        temperature=check_float("temperature", temperature),
        top_k=check_uint("top_k", top_k),
        stop=stop,
        ignore_eos=bool(ignore_eos),
        presence_penalty=check_float("presence_penalty", presence_penalty),
        frequency_penalty=check_float("frequency_penalty", frequency_penalty),
        min_tokens=check_uint("min_tokens", min_tokens),
        logprobs_at_temperature=bool(logprobs_at_temperature),
    )
    for token, bias in (logit_bias or {}).items():
        sampling.logit_bias[check_uint("logit_bias", token)] = check_float("logit_bias", bias)
    if logprobs is not None:
        sampling.logprobs = check_uint("logprobs", logprobs)
    if max_new_tokens is not None:
        sampling.max_new_tokens = check_uint("max_new_tokens", max_new_tokens)
    if top_p is not None:
        sampling.top_p = check_float("top_p", top_p)
    if repetition_penalty is not None:
        sampling.repetition_penalty = check_float("repetition_penalty", repetition_penalty)
    if seed is not None:
        sampling.seed = check_uint("seed", seed, UINT64_MAX)
    for field, text in (("adapter", adapter), ("request_id", request_id)):
        if text is not None and not isinstance(text, str):
            raise InvalidArgument(f"{field}: expected a string, got {text!r}")
    request = generation_pb2.GenerateRequest(
        adapter=adapter or "", sampling=sampling, request_id=request_id or "", n=check_uint("n", n)
    )
    if prompt_logprobs is not None:
        request.prompt_logprobs = check_uint("prompt_logprobs", prompt_logprobs)
    if prompt is not None:
        request.prompt = prompt
    else:
        assert messages is not None
        request.messages.CopyFrom(generation_pb2.ChatMessages(messages=[_chat_message(m) for m in messages]))
    fmt = build_response_format(response_format, json_schema)
    if fmt is not None:
        request.response_format.CopyFrom(fmt)
    return Call("Generate", request, result_from_proto, GENERATION_CODES, timeout)


# One prompt of `generate_batch`: a text, token ids (as the server's tokenizer numbers them), or a chat.
BatchPrompt = str | Sequence[int] | Sequence[MessageLike]


def generate_batch_call(
    prompts: Sequence[BatchPrompt],
    *,
    adapter: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    ignore_eos: bool = False,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
    min_tokens: int = 0,
    logprobs: int | None = None,
    logprobs_at_temperature: bool = False,
    n: int = 1,
    prompt_logprobs: int | None = None,
    response_format: str | Mapping[str, Any] | None = None,
    json_schema: Mapping[str, Any] | str | None = None,
    timeout: float | None = None,
) -> Call[list[GenerateResult]]:
    """The GenerateBatch call: one request per prompt, every one with `adapter` and the same
    parameters as `generate_call` (each prompt with its n choices; with a seed, every prompt's choice
    i samples with seed + i, as that prompt alone would). The parameters of `Client.generate_batch`
    and `AsyncClient.generate_batch`. A prompt is a text, a list of token ids, or a chat (a list of
    messages). Retried on UNAVAILABLE and RESOURCE_EXHAUSTED (the server queues all or none)."""
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence):
        raise InvalidArgument("prompts: expected a list of prompts (texts, token-id lists or chats)")
    if not prompts:
        raise InvalidArgument("prompts: at least one prompt is required")
    params: dict[str, Any] = dict(
        adapter=adapter,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
        ignore_eos=ignore_eos,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=logit_bias,
        min_tokens=min_tokens,
        logprobs=logprobs,
        logprobs_at_temperature=logprobs_at_temperature,
        n=n,
        prompt_logprobs=prompt_logprobs,
        response_format=response_format,
        json_schema=json_schema,
    )
    batch = generation_pb2.GenerateBatchRequest()
    for i, prompt in enumerate(prompts):
        ids = _token_ids(prompt)
        try:
            request = generate_call("" if ids is not None else prompt, **params).request
        except InvalidArgument as exc:
            raise InvalidArgument(f"prompts[{i}]: {exc}") from None
        if ids is not None:
            request.prompt_ids.CopyFrom(generation_pb2.TokenIds(ids=ids))
        batch.requests.append(request)
    return Call("GenerateBatch", batch, batch_results_from_proto, GENERATION_CODES, timeout)


def _token_ids(prompt: Any) -> list[int] | None:
    """The token ids of a prompt given as ids (a non-empty list of ints), else None."""
    if isinstance(prompt, str | Mapping) or not isinstance(prompt, Sequence) or not prompt:
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None
    return [check_uint("prompt_ids", t) for t in prompt]


def build_generate_request(
    prompt: str | Sequence[MessageLike] | None,
    messages: Sequence[MessageLike] | None,
    adapter: str | None,
    **sampling: Any,
) -> generation_pb2.GenerateRequest:
    """The GenerateRequest of `generate_call` (`sampling`: its keyword arguments)."""
    return generate_call(prompt, messages=messages, adapter=adapter, **sampling).request


def build_response_format(
    response_format: str | Mapping[str, Any] | None, json_schema: Mapping[str, Any] | str | None
) -> generation_pb2.ResponseFormat | None:
    """The wire ResponseFormat: `json_schema` (a dict or JSON text) alone means type json_schema;
    `response_format` is "text", "json_object", "json_schema" or OpenAI's dict
    ({"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}). None: free text."""
    kind = response_format
    if isinstance(response_format, Mapping):
        kind = response_format.get("type")
        nested = response_format.get("json_schema")
        if nested is not None:
            if json_schema is not None:
                raise InvalidArgument("json_schema: given twice (argument and response_format)")
            if not isinstance(nested, Mapping) or "schema" not in nested:
                raise InvalidArgument("response_format.json_schema: expected {'name': ..., 'schema': {...}}")
            json_schema = nested["schema"]
    if kind is None and json_schema is not None:
        kind = "json_schema"
    if kind is None or kind == "text":
        if json_schema is not None:
            raise InvalidArgument("json_schema: only with response_format 'json_schema'")
        return None
    if kind == "json_object":
        if json_schema is not None:
            raise InvalidArgument("json_schema: only with response_format 'json_schema'")
        return generation_pb2.ResponseFormat(type=generation_pb2.ResponseFormat.TYPE_JSON_OBJECT)
    if kind != "json_schema":
        raise InvalidArgument(f"response_format: expected text, json_object or json_schema, got {kind!r}")
    if json_schema is None:
        raise InvalidArgument("json_schema: required with response_format 'json_schema'")
    if isinstance(json_schema, Mapping):
        text = json.dumps(json_schema)
    elif isinstance(json_schema, str):
        text = json_schema
    else:
        raise InvalidArgument(f"json_schema: expected a dict or JSON text, got {type(json_schema).__name__}")
    return generation_pb2.ResponseFormat(
        type=generation_pb2.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=text
    )


def score_call(
    prompt: str | Sequence[MessageLike] | None = None,
    continuation: str = "",
    *,
    messages: Sequence[MessageLike] | None = None,
    adapter: str | None = None,
    request_id: str | None = None,
    timeout: float | None = None,
) -> Call[ScoreResult]:
    """The Score call for a prompt or a chat, and the continuation to score (the parameters of
    `Client.score` and `AsyncClient.score`). Retried on UNAVAILABLE and RESOURCE_EXHAUSTED."""
    if not continuation:
        raise InvalidArgument("continuation: must not be empty")
    generate = build_generate_request(prompt, messages, adapter, request_id=request_id)
    request = generation_pb2.ScoreRequest(
        adapter=adapter or "", continuation=continuation, request_id=request_id or ""
    )
    if generate.WhichOneof("input") == "prompt":
        request.prompt = generate.prompt
    else:
        request.messages.CopyFrom(generate.messages)
    return Call("Score", request, score_from_proto, GENERATION_CODES, timeout)


def server_info_call(timeout: float | None) -> Call[ServerInfo]:
    """The GetServerInfo call (a generation call: the generation token). Retried on UNAVAILABLE."""
    return Call(
        "GetServerInfo", generation_pb2.GetServerInfoRequest(), server_info_from_proto, READ_CODES, timeout
    )


# The admin calls on one adapter by name: their request and the codes they are retried on. Delete is
# never retried: a lost reply would turn its success into NOT_FOUND.
_BY_NAME: dict[str, tuple[Callable[..., Message], frozenset[str]]] = {
    "GetAdapter": (admin_pb2.GetAdapterRequest, READ_CODES),
    "DeleteAdapter": (admin_pb2.DeleteAdapterRequest, frozenset()),
    "PinAdapter": (admin_pb2.PinAdapterRequest, READ_CODES),
    "UnpinAdapter": (admin_pb2.UnpinAdapterRequest, READ_CODES),
}


def adapter_call(method: str, name: str, timeout: float | None) -> Call[AdapterInfo]:
    """GetAdapter, DeleteAdapter, PinAdapter or UnpinAdapter on `name`: the adapter they answer with."""
    request_type, codes = _BY_NAME[method]
    return Call(method, request_type(name=name), _reply_adapter, codes, timeout, admin=True)


def _reply_adapter(message: Any) -> AdapterInfo:
    return adapter_from_proto(message.adapter)


def list_page_call(
    name_prefix: str, page_size: int, page_token: str, timeout: float | None
) -> Call[tuple[list[AdapterInfo], str]]:
    """One page of ListAdapters: its adapters and the next page's token ("" after the last page)."""
    request = admin_pb2.ListAdaptersRequest(
        page_size=page_size, page_token=page_token, name_prefix=name_prefix
    )
    return Call("ListAdapters", request, _reply_page, READ_CODES, timeout, admin=True)


def _reply_page(message: admin_pb2.ListAdaptersResponse) -> tuple[list[AdapterInfo], str]:
    return [adapter_from_proto(a) for a in message.adapters], message.next_page_token


def refresh_call(name: str, timeout: float | None) -> Call[RefreshResult]:
    """RefreshAdapter on `name` (retried on UNAVAILABLE: asking the source again is idempotent)."""
    request = admin_pb2.RefreshAdapterRequest(name=name)
    return Call("RefreshAdapter", request, _reply_refresh, READ_CODES, timeout, admin=True)


def _reply_refresh(message: admin_pb2.RefreshAdapterResponse) -> RefreshResult:
    return RefreshResult(adapter=adapter_from_proto(message.adapter), changed=message.changed)


def upload_messages(
    files: list[UploadFile],
    name: str,
    overwrite: bool,
    description: str | None,
    chunk_bytes: int,
    tracker: ProgressTracker,
) -> Iterator[admin_pb2.UploadAdapterRequest]:
    """The UploadAdapter stream: a header, then each file's chunks in order.

    `tracker` advances as each chunk is handed to gRPC (so `tracker.sent_bytes > 0` means file bytes
    have left the client and the upload must not be retried).
    """
    header = admin_pb2.UploadHeader(name=name, overwrite=overwrite, description=description or "")
    yield admin_pb2.UploadAdapterRequest(header=header)
    for f, _offset, data in iter_file_chunks(files, chunk_bytes):
        message = admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(filename=f.name, data=data))
        tracker.advance(f.name, len(data))
        yield message
