"""The UpdateAdapter stream: tensor chunks in, a dict of CPU tensors out, checked against the limits.

Pure helpers of the Admin servicer. A tensor's chunks come one after another (the first with its dtype
and shape); the bytes become a tensor when the next tensor starts or the stream ends. Names, dtypes and
byte counts are checked here; shapes, finiteness and the fit to the stored adapter in the store
(server/store/live.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from adapterserve.server.adapters.safetensors_check import MAX_NAME_CHARS, MAX_TENSORS
from adapterserve.server.errors import InvalidArgumentError, ResourceExhaustedError
from adapterserve.server.settings import LimitSettings
from adapterserve.server.store.live import tensor_from_bytes
from adapterserve.v1 import admin_pb2


@dataclass
class _Pending:
    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: list[bytes] = field(default_factory=list)


@dataclass
class ReceivedTensors:
    """What an update stream delivered."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    received_bytes: int = 0


async def read_update_tensors(
    messages: AsyncIterator[admin_pb2.UpdateAdapterRequest], limits: LimitSettings
) -> ReceivedTensors:
    """The tensors of the chunk messages after the header (INVALID_ARGUMENT / RESOURCE_EXHAUSTED)."""
    out = ReceivedTensors()
    pending: _Pending | None = None

    def finish() -> None:
        if pending is not None:
            out.tensors[pending.name] = tensor_from_bytes(
                pending.name, pending.dtype, pending.shape, b"".join(pending.parts)
            )

    async for message in messages:
        if message.WhichOneof("payload") != "tensor":
            raise InvalidArgumentError("header: only the first message of an update may be a header")
        chunk = message.tensor
        if pending is None or chunk.name != pending.name:
            if not chunk.name or len(chunk.name) > MAX_NAME_CHARS:
                raise InvalidArgumentError(f"tensor.name: 1 .. {MAX_NAME_CHARS} characters")
            if chunk.name in out.tensors:
                raise InvalidArgumentError(
                    f"tensor.name: {chunk.name!r} was already sent; send each tensor's chunks in one run"
                )
            finish()
            if len(out.tensors) >= MAX_TENSORS:
                raise InvalidArgumentError(f"update: more than {MAX_TENSORS} tensors")
            pending = _Pending(chunk.name, chunk.dtype, tuple(int(d) for d in chunk.shape))
        if len(chunk.data) > limits.upload_chunk_bytes:
            raise ResourceExhaustedError(
                f"tensor.data: {len(chunk.data)} bytes, more than the limit "
                f"upload_chunk_bytes={limits.upload_chunk_bytes}"
            )
        out.received_bytes += len(chunk.data)
        if out.received_bytes > limits.max_upload_bytes:
            raise ResourceExhaustedError(
                f"update: more than the limit max_upload_bytes={limits.max_upload_bytes} bytes"
            )
        pending.parts.append(bytes(chunk.data))
    finish()
    return out
