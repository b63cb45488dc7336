"""adapterserve: one quantized base model, many PEFT adapters, one batch.

This top-level package is the client SDK and needs only grpcio, protobuf and pydantic (no torch):

    from adapterserve import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate("Hello", max_new_tokens=16).text)

The server, training and benchmark live in `adapterserve.server`, `adapterserve.training` and
`adapterserve.bench` (the `[server]` extra) and are never imported from here.
"""

from __future__ import annotations

from adapterserve.aio import AsyncClient
from adapterserve.client import Client
from adapterserve.errors import (
    Aborted,
    AdapterRefused,
    AdapterServeError,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UnknownError,
)
from adapterserve.models import (
    AdapterFile,
    AdapterInfo,
    AdapterKind,
    AdapterOrigin,
    CacheTier,
    ChatMessage,
    Choice,
    FinishReason,
    GenerateResult,
    HealthStatus,
    Limits,
    RefreshResult,
    ScoreResult,
    ServerInfo,
    StreamChunk,
    Timings,
    TokenLogprob,
    UpdateResult,
    UploadResult,
)
from adapterserve.retry import RetryPolicy
from adapterserve.upload import UploadProgress

__version__ = "0.1.0"

__all__ = [
    "Aborted",
    "AdapterFile",
    "AdapterInfo",
    "AdapterKind",
    "AdapterOrigin",
    "AdapterRefused",
    "AdapterServeError",
    "AlreadyExists",
    "AsyncClient",
    "CacheTier",
    "Cancelled",
    "ChatMessage",
    "Choice",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FinishReason",
    "GenerateResult",
    "HealthStatus",
    "Internal",
    "RefreshResult",
    "InvalidArgument",
    "Limits",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "ServerInfo",
    "ScoreResult",
    "StreamChunk",
    "Timings",
    "TokenLogprob",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UnknownError",
    "UploadProgress",
    "UpdateResult",
    "UploadResult",
    "__version__",
]
