"""Replies of adapterserve.v1 as SDK results: generation results and stream chunks, scores, adapter
records, upload results and server info. The wire enums map onto the SDK's by name (a kind added to the
proto and to `AdapterKind` needs nothing here). Shared by `Client` and `AsyncClient` through convert.py's
calls."""

from __future__ import annotations

from datetime import UTC

from adapterserve.models import (
    AdapterFile,
    AdapterInfo,
    AdapterKind,
    AdapterOrigin,
    CacheTier,
    Choice,
    FinishReason,
    GenerateResult,
    Limits,
    ScoreResult,
    ServerInfo,
    StreamChunk,
    Timings,
    TokenLogprob,
    UploadResult,
)
from adapterserve.v1 import admin_pb2, generation_pb2, types_pb2

_FINISH: dict[int, FinishReason] = {
    generation_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    generation_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    generation_pb2.FINISH_REASON_EOS: FinishReason.EOS,
}


# Wire ADAPTER_KIND_<NAME> <-> AdapterKind.<NAME>, by name: a kind is added to the proto and the enum only.
_KINDS: dict[int, AdapterKind] = {
    types_pb2.AdapterKind.Value(f"ADAPTER_KIND_{kind.name}"): kind
    for kind in AdapterKind
    if kind is not AdapterKind.UNSPECIFIED and f"ADAPTER_KIND_{kind.name}" in types_pb2.AdapterKind.keys()
}


_TIERS: dict[int, CacheTier] = {
    types_pb2.CACHE_TIER_DISK: CacheTier.DISK,
    types_pb2.CACHE_TIER_HOST: CacheTier.HOST,
    types_pb2.CACHE_TIER_DEVICE: CacheTier.DEVICE,
}


# One chunk of `stream_batch`: the position of its prompt in the batch, and the chunk.
BatchChunk = tuple[int, StreamChunk]


def batch_results_from_proto(message: generation_pb2.GenerateBatchResponse) -> list[GenerateResult]:
    return [result_from_proto(response) for response in message.responses]


def batch_chunk_from_proto(message: generation_pb2.GenerateBatchStreamResponse, index: int) -> BatchChunk:
    """(the prompt's position in the batch, its chunk); `index` counts the call's chunks."""
    return message.position, chunk_from_proto(message.response, index)


def score_from_proto(message: generation_pb2.ScoreResponse) -> ScoreResult:
    return ScoreResult(
        request_id=message.request_id,
        adapter=message.adapter,
        logprob_sum=message.logprob_sum,
        logprob_mean=message.logprob_mean,
        continuation_tokens=message.continuation_tokens,
        prompt_tokens=message.prompt_tokens,
        token_ids=list(message.token_ids),
        token_logprobs=list(message.token_logprobs),
    )


def _timings(message: generation_pb2.Timing) -> Timings:
    return Timings(time_to_first_token_s=message.time_to_first_token_s, total_s=message.total_s)


def logprobs_from_proto(entries) -> list[TokenLogprob]:
    return [
        TokenLogprob(token_id=e.token_id, logprob=e.logprob, top=[(t.token_id, t.logprob) for t in e.top])
        for e in entries
    ]


def result_from_proto(message: generation_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        logprobs=logprobs_from_proto(message.logprobs),
        prompt_logprobs=logprobs_from_proto(message.prompt_logprobs),
        choices=[
            Choice(
                index=c.index,
                text=c.text,
                token_ids=list(c.token_ids),
                finish_reason=_FINISH.get(c.finish_reason, FinishReason.LENGTH),
                logprobs=logprobs_from_proto(c.logprobs),
            )
            for c in message.choices
        ],
        request_id=message.request_id,
        text=message.text,
        token_ids=list(message.token_ids),
        finish_reason=_FINISH.get(message.finish_reason, FinishReason.LENGTH),
        prompt_tokens=message.prompt_tokens,
        generated_tokens=message.generated_tokens,
        timings=_timings(message.timing),
        adapter=message.adapter,
        adapter_version=message.adapter_version,
    )


def chunk_from_proto(message: generation_pb2.GenerateStreamResponse, index: int) -> StreamChunk:
    reason = _FINISH.get(message.finish_reason)
    return StreamChunk(
        request_id=message.request_id,
        index=index,
        text=message.text,
        token_ids=list(message.token_ids),
        finish_reason=reason,
        prompt_tokens=message.prompt_tokens,
        generated_tokens=message.generated_tokens,
        timings=_timings(message.timing) if reason is not None else None,
        choice=message.index,
        logprobs=logprobs_from_proto(message.logprobs),
        prompt_logprobs=logprobs_from_proto(message.prompt_logprobs),
        adapter_version=message.adapter_version,
    )


def adapter_from_proto(message: types_pb2.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(
        name=message.name,
        kind=_KINDS.get(message.kind, AdapterKind.UNSPECIFIED),
        peft_type=message.peft_type,
        rank=message.rank if message.HasField("rank") else None,
        num_virtual_tokens=message.num_virtual_tokens if message.HasField("num_virtual_tokens") else None,
        target_modules=list(message.target_modules),
        num_parameters=message.num_parameters,
        weight_bytes=message.weight_bytes,
        size_bytes=message.size_bytes,
        files=[AdapterFile(name=f.name, size_bytes=f.size_bytes, sha256=f.sha256) for f in message.files],
        digest=message.digest,
        base_fingerprint=message.base_fingerprint,
        created_at=message.created_at.ToDatetime(tzinfo=UTC) if message.HasField("created_at") else None,
        description=message.description,
        pinned=message.pinned,
        version=message.version,
        cache_tier=_TIERS.get(message.cache_tier, CacheTier.UNSPECIFIED),
        origin=_origin_from_proto(message.origin) if message.HasField("origin") else None,
    )


def _origin_from_proto(message: types_pb2.AdapterOrigin) -> AdapterOrigin:
    return AdapterOrigin(
        source=message.source,
        etag=message.etag,
        revision=message.revision,
        fetched_at=message.fetched_at.ToDatetime(tzinfo=UTC) if message.HasField("fetched_at") else None,
    )


def upload_result_from_proto(message: admin_pb2.UploadAdapterResponse) -> UploadResult:
    return UploadResult(
        adapter=adapter_from_proto(message.adapter),
        replaced=message.replaced,
        received_bytes=message.received_bytes,
    )


def server_info_from_proto(message: generation_pb2.ServerInfo) -> ServerInfo:
    lim = message.limits
    return ServerInfo(
        server_version=message.server_version,
        base_model=message.base_model,
        base_fingerprint=message.base_fingerprint,
        model_type=message.model_type,
        quantize=message.quantize,
        adapter_kinds=[_KINDS.get(k, AdapterKind.UNSPECIFIED) for k in message.adapter_kinds],
        limits=Limits(
            max_prompt_tokens=lim.max_prompt_tokens,
            max_new_tokens=lim.max_new_tokens,
            max_stop_sequences=lim.max_stop_sequences,
            max_n=lim.max_n,
            max_logprobs=lim.max_logprobs,
            max_batch_rows=lim.max_batch_rows,
            max_batch_tokens=lim.max_batch_tokens,
            max_upload_bytes=lim.max_upload_bytes,
            max_message_bytes=lim.max_message_bytes,
            upload_chunk_bytes=lim.upload_chunk_bytes,
            max_concurrent_streams=lim.max_concurrent_streams,
        ),
        chat_template=message.chat_template,
    )
