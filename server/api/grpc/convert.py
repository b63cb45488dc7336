"""Conversions between internal types and wire messages (pure functions)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from adapterserve.server.api.contracts import AdapterRecord
from adapterserve.server.engine.types import FinishReason
from adapterserve.v1 import generation_pb2, types_pb2

FINISH_REASONS: dict[FinishReason, int] = {
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: generation_pb2.FINISH_REASON_EOS,
}


def adapter_kind_to_proto(kind: str) -> int:
    """The wire AdapterKind of a registered kind's name: ADAPTER_KIND_<NAME> (UNSPECIFIED if the proto
    does not know it yet)."""
    try:
        return types_pb2.AdapterKind.Value(f"ADAPTER_KIND_{kind.upper()}")
    except ValueError:
        return types_pb2.ADAPTER_KIND_UNSPECIFIED


CACHE_TIERS: dict[str, int] = {
    "disk": types_pb2.CACHE_TIER_DISK,
    "host": types_pb2.CACHE_TIER_HOST,
    "device": types_pb2.CACHE_TIER_DEVICE,
}


def finish_reason_to_proto(reason: FinishReason) -> int:
    """The wire finish reason of a final engine event (LENGTH, STOP or EOS)."""
    return FINISH_REASONS[reason]


def adapter_to_proto(record: AdapterRecord) -> types_pb2.AdapterInfo:
    """The wire AdapterInfo of a stored adapter."""
    info = record.info
    created = Timestamp()
    created.FromDatetime(record.created_at)
    message = types_pb2.AdapterInfo(
        name=record.name,
        kind=adapter_kind_to_proto(info.kind),
        peft_type=info.peft_type,
        target_modules=list(info.target_modules),
        num_parameters=info.num_parameters,
        weight_bytes=info.nbytes,
        size_bytes=sum(f.size_bytes for f in record.files),
        files=[
            types_pb2.AdapterFile(name=f.name, size_bytes=f.size_bytes, sha256=f.sha256) for f in record.files
        ],
        digest=record.digest,
        base_fingerprint=record.base_fingerprint,
        created_at=created,
        description=record.description,
        pinned=record.pinned,
        version=record.version,
        cache_tier=CACHE_TIERS.get(record.cache_tier, types_pb2.CACHE_TIER_UNSPECIFIED),
    )
    if record.origin is not None:
        fetched = Timestamp()
        fetched.FromDatetime(record.origin.fetched_at)
        message.origin.CopyFrom(
            types_pb2.AdapterOrigin(
                source=record.origin.source,
                etag=record.origin.tag,
                revision=record.origin.revision or "",
                fetched_at=fetched,
            )
        )
    if info.rank is not None:
        message.rank = info.rank
    if info.num_virtual_tokens is not None:
        message.num_virtual_tokens = info.num_virtual_tokens
    return message
